"""Optimizers that mix parameters across pipeline stages (``autopar.pipeline.update_split``):
``optax.clip_by_global_norm`` clips by the norm of every stage's gradients together — before,
each stage clipped by its own norm, silently a different step — with ZeRO-1 too, and inside
MultiSteps, apply_if_finite and multi_transform; an optimizer that would need a large value of
another stage is refused with a clear error; a per-parameter one updates each stage apart, as
before (multi_transform too: it used to be refused)."""
import jax
import numpy as np
import optax
import pytest

from autopar import plan_training
from conftest import make_cluster
from test_pipeline import assert_tree_close, reference_step
from test_pipeline_remat import loss_fn, params_and_batch

# one block per stage, each on one node's 4 devices as a 1D mesh
STAGES = [(0, 1, (1, 4), (4,)), (1, 2, (1, 4), (4,))]
KW = dict(cluster=make_cluster(4), nodes=2, num_microbatches=2, remat="none", stages=STAGES)
MAX_NORM = 0.05


@pytest.fixture(scope="module")
def model():
    return params_and_batch(layers=2, d=128, seq=16, batch=32)


def _global_norm(tree):
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree_util.tree_leaves(tree))))


def _steps(tplan, opt, params, batch, n=2):
    step, ref = tplan.apply(loss_fn, opt, donate=False), reference_step(loss_fn, opt)
    got = want = (params, opt.init(params))
    for _ in range(n):
        got, want = step(*got[:2], batch), ref(*want[:2], batch)
        assert_tree_close(got, want)
    return step, got, want


def test_clip_by_global_norm_clips_by_the_norm_of_all_stages(devices8, model):
    params, batch = model
    opt = optax.chain(optax.clip_by_global_norm(MAX_NORM), optax.sgd(1.0))
    grads = jax.grad(loss_fn)(params, batch)
    per_stage = [_global_norm(g) for g in grads]
    assert min(per_stage) > MAX_NORM  # each stage alone would be clipped to MAX_NORM (√2 × too long in all)
    tplan = plan_training(loss_fn, params, batch, optimizer=opt, schedule="gpipe", zero="none", **KW)
    step, (new_p, _, _), _ = _steps(tplan, opt, params, batch, n=1)
    # sgd(1): the update is the clipped gradient, of norm MAX_NORM over both stages together
    update = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b), new_p, params)
    assert _global_norm(update) == pytest.approx(MAX_NORM, rel=1e-4)
    split = step.split_update.split
    # two rounds: each stage's sums of squares (one float32 pack per stage, sent to the other),
    # then the clipped update; the global norm is recomputed on both stages
    assert split.num_rounds == 2 and split.sends_per_step == 2
    assert sorted(set(split.partials.values())) == [0, 1]
    _steps(tplan, opt, params, batch)
    # forward only through the stages (a mean loss)
    ev = tplan.apply(loss_fn, opt).evaluate(params, batch)
    np.testing.assert_allclose(np.asarray(ev), loss_fn(params, batch), rtol=1e-5)


def test_clip_and_adamw_with_zero1_run_equal(devices8, model):
    params, batch = model
    opt = optax.chain(optax.clip_by_global_norm(MAX_NORM), optax.adamw(1e-3, eps=1e-3, weight_decay=0.1))
    tplan = plan_training(loss_fn, params, batch, optimizer=opt, schedule="1f1b", zero="1", **KW)
    assert all(s.zero for s in tplan.stages)
    step, got, _ = _steps(tplan, opt, params, batch)
    # the Adam moments of each stage live split 4 ways on its devices, as ZeRO-1 lays them out
    mu = got[1][1][0].mu
    for i, m in enumerate(mu):
        shard = m["fc"].sharding.shard_shape(m["fc"].shape)
        assert np.prod(shard) * 4 == m["fc"].size
        assert {d.id for d in m["fc"].sharding.device_set} == set(tplan.stages[i].devices)


def _frozen_scales(inner):
    """optax.multi_transform: the 'scale' leaves frozen (as when fine-tuning), ``inner`` for the rest."""
    labels = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: "frozen" if path[-1].key == "scale" else "train", p)
    return optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)


@pytest.mark.parametrize("name", ["multisteps", "apply_if_finite", "multi_transform"])
def test_wrappers_around_a_global_norm_run_equal(devices8, model, name):
    """optax.MultiSteps (a lax.cond over the whole tree: run as selects, per leaf) accumulating
    two steps before a clipped Adam step; apply_if_finite (a global all-finite check) around it;
    multi_transform (its masked state lines up with the full state by key path) clipping the
    trained leaves by their global norm."""
    params, batch = model
    inner = optax.chain(optax.clip_by_global_norm(MAX_NORM), optax.adam(1e-3, eps=1e-3))
    opt = {"multisteps": lambda: optax.MultiSteps(inner, 2), "apply_if_finite": lambda: optax.apply_if_finite(inner, 3),
           "multi_transform": lambda: _frozen_scales(inner)}[name]()
    tplan = plan_training(loss_fn, params, batch, optimizer=opt, schedule="1f1b", zero="none", **KW)
    step, got, _ = _steps(tplan, opt, params, batch, n=2 if name == "multisteps" else 1)
    assert step.split_update is not None
    changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)), got[0], params)
    for layer in changed:  # the second micro-step applied the update; frozen leaves stay
        assert layer == {"fc": True, "proj": True, "scale": name != "multi_transform"}


def test_noise_drawn_over_the_whole_tree_is_the_whole_trees(devices8, model):
    """optax.noisy_sgd (add_noise: one key split over all the tree's leaves) per stage on its
    own leaves would split the key over fewer leaves (other noise, silently): its update runs
    as the whole tree's, split by home."""
    params, batch = model
    opt = optax.noisy_sgd(0.1, eta=0.01, seed=3)
    tplan = plan_training(loss_fn, params, batch, optimizer=opt, schedule="1f1b", zero="none", **KW)
    step, _, _ = _steps(tplan, opt, params, batch, n=2)
    assert step.split_update is not None


def test_a_per_parameter_optimizer_updates_each_stage_apart(devices8, model):
    params, batch = model
    for opt in (optax.adam(1e-3, eps=1e-3), optax.MultiSteps(optax.adam(1e-3, eps=1e-3), 2),
                _frozen_scales(optax.adamw(1e-3, eps=1e-3))):
        tplan = plan_training(loss_fn, params, batch, optimizer=opt, schedule="gpipe", zero="none", **KW)
        step, _, _ = _steps(tplan, opt, params, batch, n=2)
        assert step.split_update is None


def _add_first_leaf():
    """A transformation adding stage 0's first gradient leaf to every leaf of its shape: a
    large value crossing stages."""
    def update(updates, state, params=None):
        first = jax.tree_util.tree_leaves(updates)[1]
        return jax.tree_util.tree_map(lambda u: u + first if u.shape == first.shape else u, updates), state
    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def test_an_optimizer_sending_a_large_value_between_stages_is_refused(devices8, model):
    params, batch = model
    opt = optax.chain(_add_first_leaf(), optax.sgd(0.1))
    tplan = plan_training(loss_fn, params, batch, optimizer=opt, schedule="gpipe", zero="none", **KW)
    with pytest.raises(ValueError, match=r"combines values of different pipeline stages, and one of them is not "
                                         r"small: a float32\[512, 128\] value of stage 0 .*num_stages=1"):
        tplan.apply(loss_fn, opt)


def test_a_state_not_kept_per_parameter_is_refused(devices8, model):
    """A transformation whose state is one vector over all leaves cannot be split by stage."""
    params, batch = model
    count_leaves = optax.GradientTransformation(
        lambda p: np.zeros(len(jax.tree_util.tree_leaves(p)), np.float32), lambda u, s, p=None: (u, s))
    opt = optax.chain(count_leaves, optax.sgd(0.1))
    tplan = plan_training(loss_fn, params, batch, optimizer=opt, schedule="gpipe", zero="none", **KW)
    with pytest.raises(ValueError, match=r"the optimizer state does not split per parameter .*multi_transform"):
        tplan.apply(loss_fn, opt)


@pytest.mark.parametrize("form", ["unrolled", "nnx.scan"])
def test_a_flax_nnx_decoder_with_clip_and_adamw_runs_equal(devices8, form):
    """The zoo's flax NNX decoder as users write it (nnx.split State, nnx.List or nnx.vmap +
    nnx.scan blocks) in 2 stages with clip_by_global_norm + adamw: equal to the single-device step."""
    from examples.zoo import nnx_transformer as m
    state, _, tokens = m.nnx_step_args() if form == "unrolled" else m.nnx_scan_step_args()
    opt = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-3, eps=1e-3))
    tplan = plan_training(m.loss_fn, state, tokens, optimizer=opt, cluster=make_cluster(4), nodes=2,
                          num_microbatches=2, num_stages=2)
    assert (tplan.scan_split is not None) == (form == "nnx.scan")
    step, ref = tplan.apply(m.loss_fn, opt, donate=False), reference_step(m.loss_fn, opt)
    got = want = (state, opt.init(state))
    for _ in range(2):
        got, want = step(*got[:2], tokens), ref(*want[:2], tokens)
        assert_tree_close(got, want)
    assert step.split_update is not None  # the norm crosses the stages
