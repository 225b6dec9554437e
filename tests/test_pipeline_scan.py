"""Pipelines over scanned layer stacks (``autopar.pipeline.unscan``): ``plan_training`` cuts a
``nn.scan`` / ``lax.scan`` over stacked parameters into stages, one layer per iteration, and
the pipelined step equals the single-device training step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import autopar
from autopar.report import _paths
from autopar.pipeline.unscan import find_scan_split, join_leaves, split_loss, split_tree
from conftest import make_cluster
from examples.zoo.common import OPTIMIZER


def _reference(loss_fn, optimizer, params, opt_state, batch, steps):
    @jax.jit
    def step(p, o, b):
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        u, o = optimizer.update(g, o, p)
        return optax.apply_updates(p, u), o, loss
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, batch)
    return params, opt_state, loss


def _run(tplan, params, opt_state, batch, steps, *fns):
    step = tplan.apply(*fns, donate=False)
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, batch)
    return params, opt_state, loss


def _assert_equal(got, want, rtol=2e-5, atol=2e-6):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def _stack_loss(p, b):
    h = b["x"] @ p["emb"]

    def body(h, w):
        return jnp.tanh(h @ w["w"] + w["b"]), None
    h, _ = jax.lax.scan(body, h, p["layers"])
    return jnp.mean((h @ p["head"] - b["y"]) ** 2)


def _stack_args(n=8, d=32):
    rng = np.random.default_rng(0)
    p = {"emb": rng.normal(size=(16, d)) * 0.3, "layers": {"w": rng.normal(size=(n, d, d)) * 0.2,
                                                         "b": np.full((n, d), 0.1)}, "head": np.full((d, 4), 0.1)}
    b = {"x": rng.normal(size=(16, 16)), "y": np.zeros((16, 4))}
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), (p, b))


def test_split_loss_equals_the_scanned_loss_and_its_gradient():
    p, b = _stack_args(n=4)
    split = find_scan_split(_stack_loss, p, b)
    assert split is not None and split.lengths == (4, 4)            # layers.b and layers.w, 4 iterations
    leaves, tdef = jax.tree.flatten(p)
    sp = split_tree(split, tdef, leaves)
    loss2 = split_loss(_stack_loss, split, p, b)
    np.testing.assert_allclose(loss2(sp, b), _stack_loss(p, b), rtol=1e-6)
    g = tdef.unflatten(join_leaves(split, tdef, jax.tree.leaves(jax.grad(loss2)(sp, b))))
    _assert_equal(g, jax.grad(_stack_loss)(p, b), rtol=1e-5, atol=1e-6)
    # one stage_boundary between consecutive iterations: the iterations are the pipeline's layers
    names = [e.primitive.name for e in jax.make_jaxpr(loss2)(sp, b).eqns]
    assert names.count("stage_boundary") == 3 and "scan" not in names


def test_a_stacked_leaf_read_outside_the_scan_is_not_split():
    def loss(p, b):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), b, p["w"])
        return jnp.mean(h) + jnp.sum(p["w"][0])        # the stack is also read whole
    p = {"w": jnp.ones((3, 4, 4))}
    assert find_scan_split(loss, p, jnp.ones((2, 4))) is None


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_four_stage_pipeline_of_a_lax_scan_equals_the_single_device_step(schedule):
    p, b = _stack_args()
    opt = optax.adam(1e-2)
    tplan = autopar.plan_training(_stack_loss, p, b, optimizer=opt, cluster=make_cluster(4), nodes=2,
                                  num_microbatches=4, num_stages=4, schedule=schedule)
    assert tplan.num_stages == 4 and tplan.scan_split is not None and tplan.search.num_layers == 8
    assert tplan.search.layers_from_markers
    # each stage owns the slices of the iterations it runs, nothing of the others
    paths = _paths(tplan.param_tree, len(tplan.param_shapes))
    for st in tplan.stages:
        owned = {paths[i] for i in st.owned_params if "layers" in paths[i]}
        assert owned == {f"['layers']['{n}'][{t}]" for n in "bw" for t in range(*st.layers)}
    assert "scanned layer stack split per iteration" in tplan.report()
    o = opt.init(p)
    _assert_equal(_run(tplan, p, o, b, 2), _reference(_stack_loss, opt, p, o, b, 2))
    back = autopar.TrainingPlan.from_json(tplan.to_json())
    assert back == tplan and back.scan_split == tplan.scan_split
    _assert_equal(_run(back, p, o, b, 1, _stack_loss, opt), _reference(_stack_loss, opt, p, o, b, 1))


def test_flax_nn_scan_decoder_pipelines_per_layer():
    from examples.zoo import linen_transformer as lt
    cfg = dataclasses.replace(lt.TINY, layers=4, scan=True)
    params, opt_state, tokens = lt._args(cfg, abstract=False)
    opt = OPTIMIZER
    # one layer per nn.scan iteration; two stages of two (the 4-stage case is the lax.scan test above)
    tplan = autopar.plan_training(lt.loss_fn, params, tokens, optimizer=opt, cluster="cpu-8",
                                  num_microbatches=2, stages=[(0, 2, (1, 4)), (2, 4, (1, 4))])
    assert tplan.num_stages == 2 and tplan.scan_split is not None and tplan.search.num_layers == 4
    stacked = [p for p in _paths(tplan.scan_split.param_tree, len(tplan.scan_split.param_shapes))
               if p.startswith("['blocks']")]
    assert len(tplan.scan_split.stacked) == len(stacked) > 0 and set(tplan.scan_split.lengths) == {4}
    _assert_equal(_run(tplan, params, opt_state, tokens, 1), _reference(lt.loss_fn, opt, params, opt_state, tokens, 1),
                  rtol=1e-4, atol=1e-5)


def test_flax_nn_remat_under_nn_scan_keeps_its_recomputation_in_the_stages():
    """The MaxText way: nn.scan over nn.remat(Block) (policy nothing_saveable). Each stage keeps
    only its layers' inputs (the checkpoint is bound whole in the stage's forward), and the step
    equals the unsharded one."""
    from examples.zoo import linen_transformer as lt
    cfg = dataclasses.replace(lt.TINY, layers=4, scan=True)
    opt = OPTIMIZER
    kw = dict(optimizer=opt, cluster="cpu-8", num_microbatches=2, remat="none",
              stages=[(0, 2, (1, 4)), (2, 4, (1, 4))])
    params, opt_state, tokens = lt._args(cfg, abstract=False)
    plain = autopar.plan_training(lt.loss_fn, params, tokens, **kw)
    tplan = autopar.plan_training(lt.remat_loss_fn, params, tokens, **kw)
    res = [(s.activation_bytes_per_device, t.activation_bytes_per_device) for s, t in zip(tplan.stages, plain.stages)]
    assert all(a * 3 < b for a, b in res), res
    _assert_equal(_run(tplan, params, opt_state, tokens, 1),
                  _reference(lt.remat_loss_fn, opt, params, opt_state, tokens, 1), rtol=1e-4, atol=1e-5)


def test_an_optimizer_treating_a_stacked_leaf_whole_is_refused_and_a_global_norm_runs():
    """The stages update each layer's slice apart: lamb (a trust ratio per whole leaf) would
    update differently and adafactor's factored state does not split per slice — both refused
    at plan time; clip_by_global_norm (a norm over everything: split or not, the same) runs
    equal to the single-device step."""
    p, b = _stack_args()
    kw = dict(cluster=make_cluster(4), nodes=2, num_microbatches=2, num_stages=2)
    with pytest.raises(ValueError, match=r"update of a scanned layer stack's parameter \(\['layers'\]\['b'\]\) "
                                         r"differs when the stack is split per layer.*split_scans=False"):
        autopar.plan_training(_stack_loss, p, b, optimizer=optax.lamb(1e-2), **kw)
    with pytest.raises(ValueError, match=r"cannot update the scanned layer stack's parameters split per layer"):
        autopar.plan_training(_stack_loss, p, b, optimizer=optax.adafactor(1e-2, min_dim_size_to_factor=2), **kw)
    opt = optax.chain(optax.clip_by_global_norm(0.1), optax.adam(1e-2))
    tplan = autopar.plan_training(_stack_loss, p, b, optimizer=opt, **kw)
    o = opt.init(p)
    _assert_equal(_run(tplan, p, o, b, 2), _reference(_stack_loss, opt, p, o, b, 2))
    # forward only, through the split stages, from the stacked parameters
    step = tplan.apply(donate=False)
    np.testing.assert_allclose(np.asarray(step.evaluate(p, b)), _stack_loss(p, b), rtol=1e-5)
    assert step.split_update is not None  # the global norm crosses the two stages


def test_the_split_form_step_keeps_each_slice_on_its_stage():
    """``apply(stacked=False)``: the stages' own step over the split form — nothing gathered on
    one device — equal to the single-device step once stacked back (``step.stack``)."""
    p, b = _stack_args()
    opt = optax.adam(1e-2)
    tplan = autopar.plan_training(_stack_loss, p, b, optimizer=opt, cluster=make_cluster(4), nodes=2,
                                  num_microbatches=4, num_stages=4)
    step = tplan.apply(donate=False, stacked=False)
    ps = step.split(p)
    assert isinstance(ps["layers"]["w"], list) and len(ps["layers"]["w"]) == 8
    os_ = opt.init(ps)  # the optimizer state made in the split form (never stacked)
    for _ in range(2):
        ps, os_, loss = step(ps, os_, b)
    want = _reference(_stack_loss, opt, p, opt.init(p), b, 2)
    _assert_equal((step.stack(ps), step.stack(os_), loss), want)
    np.testing.assert_allclose(np.asarray(step.evaluate(ps, b)), _stack_loss(step.stack(ps), b), rtol=1e-5)
    # every slice (and its Adam moments) stays on the devices of the stage running its iteration
    devs = jax.devices()
    for st in tplan.stages:
        for t in range(*st.layers):
            for x in (ps["layers"]["w"][t], os_[0].mu["layers"]["w"][t]):
                assert set(x.sharding.device_set) == {devs[d] for d in st.devices}


def _masked_stack_loss(p, b):
    """MaxText's shape of step: scanned layers, a loss weighted per example, returned as a
    WeightedLoss (summed over micro-batches, divided once)."""
    h = b["x"] @ p["emb"]
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w["w"] + w["b"]), None), h, p["layers"])
    err = jnp.mean((h @ p["head"] - b["y"]) ** 2, axis=-1)
    return autopar.WeightedLoss(jnp.sum(err * b["m"]), jnp.sum(b["m"]))


@pytest.mark.parametrize("stacked", [True, False])
def test_scan_weighted_loss_and_global_norm_together(stacked):
    from autopar.pipeline.loss_form import full_batch_loss
    p, b = _stack_args()
    b["m"] = jnp.asarray((np.arange(16) % 3 != 0) * (np.arange(16) % 5 + 1), jnp.float32)  # per-example weights
    opt = optax.chain(optax.clip_by_global_norm(0.1), optax.adamw(1e-2, eps=1e-3))
    tplan = autopar.plan_training(_masked_stack_loss, p, b, optimizer=opt, cluster=make_cluster(4), nodes=2,
                                  num_microbatches=4, num_stages=2)
    step = tplan.apply(donate=False, stacked=stacked)
    ps = p if stacked else step.split(p)
    os_ = opt.init(ps)
    for _ in range(2):
        ps, os_, loss = step(ps, os_, b)
    got = (ps, os_, loss) if stacked else (step.stack(ps), step.stack(os_), loss)
    _assert_equal(got, _reference(full_batch_loss(_masked_stack_loss), opt, p, opt.init(p), b, 2))
    np.testing.assert_allclose(np.asarray(step.evaluate(ps, b)),
                               full_batch_loss(_masked_stack_loss)(jax.device_get(got[0]), b), rtol=1e-5)
