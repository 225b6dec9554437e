"""Optimizers that mix parameters across pipeline stages (``autopar.pipeline.update_split``):
``optax.clip_by_global_norm`` clips by the norm of every stage's gradients together — before,
each stage clipped by its own norm, silently a different step — with ZeRO-1 too; an optimizer
that would need a large value of another stage is refused with a clear error; a
per-parameter one updates each stage apart, as before."""
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


def test_a_per_parameter_optimizer_updates_each_stage_apart(devices8, model):
    params, batch = model
    opt = optax.adam(1e-3, eps=1e-3)
    tplan = plan_training(loss_fn, params, batch, optimizer=opt, schedule="gpipe", zero="none", **KW)
    step, _, _ = _steps(tplan, opt, params, batch, n=1)
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
