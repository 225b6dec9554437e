"""Pipeline stages keep the user's jax.custom_vjp / jax.custom_jvp derivative rules.

A training plan differentiates each stage's forward after the loss was traced and flattened;
an inlined custom call is bound whole there (trace.CustomCall, emit.interpret(custom_calls=True)),
so the step's gradients are jax.grad's, not those of the custom functions' bodies.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_step_equals_single_device, make_cluster

import autopar
from autopar.trace import trace


@jax.custom_vjp
def half_grad(x):
    """Identity whose gradient is halved (the body has no equation: a passthrough output)."""
    return x


half_grad.defvjp(lambda x: (x, None), lambda _, g: (0.5 * g,))


@jax.custom_vjp
def scaled_grad(x, s):
    """Identity in x; its gradient is scaled by s, which only the backward reads."""
    return x


scaled_grad.defvjp(lambda x, s: (x, s), lambda s, g: (g * s, jnp.zeros_like(s)))


@jax.custom_jvp
def relu(x):
    return jnp.maximum(x, 0.0)


relu.defjvps(lambda g, ans, x: jnp.where(x > 0, g, 0.0))   # 0 at x == 0 (max's own rule: 0.5)


def loss_fn(params, batch):
    h = batch["x"]
    for i, w in enumerate(params["w"]):
        h = relu(h @ w)
        h = half_grad(h) if i % 2 == 0 else scaled_grad(h, params["s"] * 3.0)
        h = autopar.stage_boundary(h)
    return jnp.mean((h - jax.lax.stop_gradient(batch["y"] * h)) ** 2)


def _case():
    rng = np.random.default_rng(0)
    w = [rng.normal(size=(16, 16)).astype(np.float32) * 0.5 for _ in range(4)]
    w[0][:4] = 0.0                       # exact zeros into the first relu: the rules differ there
    x = rng.normal(size=(16, 16)).astype(np.float32)
    x[:, :4] = 0.0
    params = {"w": [jnp.asarray(a) for a in w], "s": jnp.float32(0.25)}
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(rng.normal(size=(16, 16)).astype(np.float32))}
    return params, batch


def test_trace_records_each_custom_call_and_tags_its_equations():
    params, batch = _case()
    assert not trace(loss_fn, params, batch).customs     # (an intra-op program: inlined as before)
    prog = trace(loss_fn, params, batch, calls=True)
    assert len(prog.customs) == 8          # 4 relus, 2 half_grads, 2 scaled_grads
    for c in prog.customs.values():
        eqns = [k for k, e in enumerate(prog.eqns) if e.custom == c.id]
        assert eqns == list(range(eqns[0], eqns[-1] + 1))                   # contiguous
        made = {o for k in eqns for o in prog.eqns[k].outputs}
        assert set(c.outputs) <= made                                       # each output has a place
    passthrough = [c for c in prog.customs.values() if c.prim.name == "custom_vjp_call"]
    assert all(prog.eqns[[e.custom for e in prog.eqns].index(c.id)].prim.name == "copy" for c in passthrough)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_a_two_stage_plan_keeps_the_custom_derivatives(devices8, remat):
    params, batch = _case()
    opt = optax.sgd(0.1)
    tplan = autopar.plan_training(loss_fn, params, batch, optimizer=opt, cluster=make_cluster(4), nodes=2,
                                  num_microbatches=2, num_stages=2, remat=remat)
    assert tplan.num_stages == 2 and {s.remat for s in tplan.stages} == {remat}
    assert (tplan.search.custom_calls, tplan.search.checkpoints) == (8, 0)
    assert "8 jax.custom_vjp/custom_jvp (their derivative rules hold)" in tplan.report()
    assert_step_equals_single_device(loss_fn, params, batch, opt, tplan, rtol=1e-5, atol=1e-6)
    # the rules matter here: the bodies' derivatives (same forward) give other gradients
    params, batch = _case()   # (apply() donated the first ones)
    g_custom, g_plain = jax.grad(loss_fn)(params, batch), jax.grad(_plain_loss)(params, batch)
    assert loss_fn(params, batch) == pytest.approx(float(_plain_loss(params, batch)))
    assert not np.allclose(g_custom["w"][0], g_plain["w"][0], atol=1e-3)


def _plain_loss(params, batch):
    h = batch["x"]
    for w in params["w"]:
        h = jnp.maximum(h @ w, 0.0)
    return jnp.mean((h - jax.lax.stop_gradient(batch["y"] * h)) ** 2)


def test_a_custom_call_in_a_scanned_layer_stack(devices8):
    """A lax.scan over stacked layers (split per iteration into pipeline layers)."""
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(4, 16, 16)).astype(np.float32) * 0.5)}
    batch = {"x": jnp.asarray(rng.normal(size=(16, 16)).astype(np.float32))}

    def scan_loss(p, b):
        def layer(h, w):
            return half_grad(relu(h @ w)), None
        h, _ = jax.lax.scan(layer, b["x"], p["w"])
        return jnp.mean(h ** 2)
    opt = optax.sgd(0.1)
    tplan = autopar.plan_training(scan_loss, params, batch, optimizer=opt, cluster=make_cluster(4), nodes=2,
                                  num_microbatches=2, num_stages=2)
    assert tplan.num_stages == 2
    assert_step_equals_single_device(scan_loss, params, batch, opt, tplan, rtol=1e-5, atol=1e-6)


def test_a_stage_boundary_inside_a_custom_function_is_a_clear_error(devices8):
    params, batch = _case()

    @jax.custom_vjp
    def cut_inside(x):
        return autopar.stage_boundary(jnp.tanh(x)) * 2.0
    cut_inside.defvjp(lambda x: (cut_inside(x), x), lambda x, g: (g,))

    def bad_loss(p, b):
        h = autopar.stage_boundary(jnp.tanh(b["x"] @ p["w"][0]))
        return jnp.mean(cut_inside(h @ p["w"][1]))
    with pytest.raises(ValueError, match="stage_boundary marker inside a jax.custom_jvp / custom_vjp"):
        autopar.plan_training(bad_loss, params, batch, optimizer=optax.sgd(0.1), cluster=make_cluster(4), nodes=2,
                              num_microbatches=2)


def _ckpt_case(checkpoint: bool, scan: bool):
    def layer(h, w1, w2):
        return h + jnp.tanh(jnp.tanh(h @ w1) @ w2)
    f = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable) if checkpoint else layer

    def loss(p, b):
        h = b["x"]
        if scan:
            h, _ = jax.lax.scan(lambda c, w: (f(c, *w), None), h, p)
        else:
            for w1, w2 in p:
                h = autopar.stage_boundary(f(h, w1, w2))
        return jnp.mean(h ** 2)
    rng = np.random.default_rng(2)
    w1 = rng.normal(size=(4, 64, 256)).astype(np.float32) * 0.1
    w2 = rng.normal(size=(4, 256, 64)).astype(np.float32) * 0.1
    params = (jnp.asarray(w1), jnp.asarray(w2)) if scan else [(jnp.asarray(a), jnp.asarray(b)) for a, b in zip(w1, w2)]
    batch = {"x": jnp.asarray(rng.normal(size=(32, 64)).astype(np.float32))}
    return loss, params, batch


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_a_users_jax_checkpoint_is_kept_in_each_stage(devices8, scan):
    """A jax.checkpoint(policy=nothing_saveable) per layer: the stages keep only the layer
    inputs (each checkpoint call bound whole), and the step equals jax.grad's."""
    opt = optax.sgd(0.1)
    kw = dict(optimizer=opt, cluster=make_cluster(4), nodes=2, num_microbatches=2, num_stages=2, remat="none")
    saved = {}
    for ck in (False, True):
        loss, params, batch = _ckpt_case(ck, scan)
        tplan = autopar.plan_training(loss, params, batch, **kw)
        saved[ck] = [s.activation_bytes_per_device for s in tplan.stages]
        assert (tplan.search.checkpoints, tplan.search.checkpoints_cut) == ((4 if ck else 0), 0)
        assert_step_equals_single_device(loss, params, batch, opt, tplan, rtol=1e-5, atol=1e-6)
    # 2 layers per stage: each keeps its input (32×64) instead of that and two tanh outputs (32×256, 32×64)
    assert all(a * 4 <= b for a, b in zip(saved[True], saved[False])), saved


def test_a_users_checkpoint_inside_the_planners_remat(devices8):
    """Your jax.checkpoint nested in the stage's own remat (each layer under jax.checkpoint)."""
    loss, params, batch = _ckpt_case(True, False)
    opt = optax.sgd(0.1)
    tplan = autopar.plan_training(loss, params, batch, optimizer=opt, cluster=make_cluster(4), nodes=2,
                                  num_microbatches=2, num_stages=2, remat="dots")
    assert {s.remat for s in tplan.stages} == {"dots"}
    assert_step_equals_single_device(loss, params, batch, opt, tplan, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("marked", [True, False], ids=["markers", "clustered"])
def test_a_checkpoint_around_the_whole_forward_is_cut_and_says_so(devices8, marked):
    """Nothing else to cut (or markers inside it): the layers split the checkpoint, which then
    runs without its recomputation (still equal to jax.grad's step), and the report says so."""
    loss, params, batch = _ckpt_case(False, False)

    def unmarked(p, b):
        h = b["x"]
        for w1, w2 in p:
            h = h + jnp.tanh(jnp.tanh(h @ w1) @ w2)
        return jnp.mean(h ** 2)
    whole = jax.checkpoint(loss if marked else unmarked, policy=jax.checkpoint_policies.nothing_saveable)

    def whole_loss(p, b):
        return whole(p, b)
    opt = optax.sgd(0.1)
    tplan = autopar.plan_training(whole_loss, params, batch, optimizer=opt, cluster=make_cluster(4), nodes=2,
                                  num_microbatches=2, num_stages=2, remat="none")
    assert tplan.num_stages == 2 and (tplan.search.checkpoints, tplan.search.checkpoints_cut) == (1, 1)
    assert "1 checkpoint(s) cut by a stage or layer boundary run without recomputation" in tplan.report()
    assert_step_equals_single_device(whole_loss, params, batch, opt, tplan, rtol=1e-5, atol=1e-6)
