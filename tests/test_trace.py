"""Tracing: inlining, dead code, control flow kept whole, abstract arguments."""
import jax
import jax.numpy as jnp
import numpy as np

from autopar.graph import build_graph
from autopar.trace import trace


@jax.custom_vjp
def clip_grad(x):
    return x


clip_grad.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -1, 1),))


def fn(x, w):
    h = jax.jit(lambda a: jax.nn.relu(a @ w))(x)              # nested jit + custom_jvp (relu)
    h = jax.checkpoint(lambda a: jnp.sin(a) * 2)(h)            # remat2
    h = clip_grad(h)                                          # custom_vjp
    _unused = jnp.exp(x)                                      # dead
    s = jax.lax.scan(lambda c, r: (c + r, c), jnp.zeros(h.shape[1]), h)[1]
    return jax.lax.cond(s.sum() > 0, lambda v: v, lambda v: -v, s).sum()


def test_inlines_calls_expands_scans_and_keeps_cond_whole():
    args = (jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((16, 32), jnp.float32))
    prog = trace(jax.grad(fn, argnums=1), *args)
    names = [e.prim.name for e in prog.eqns]
    for inlined in ("jit", "pjit", "custom_jvp_call", "custom_vjp_call", "remat2", "checkpoint"):
        assert inlined not in names
    assert "cond" in names and "scan" not in names  # a scan's body is expanded in place (trace.Region)
    assert {"scan_carry_in", "scan_slice", "scan_carry_out", "scan_stack"} <= set(names) and prog.regions
    assert prog.stats["inlined_calls"] >= 3 and prog.stats["dead_eqns"] >= 1
    graph = build_graph(prog)
    dots = [n for n in graph.nodes if n.name == "dot_general"]
    assert dots and all(n.flops > 0 for n in dots)
    assert dots[0].flops == 2 * 8 * 16 * 32


def test_fingerprint_is_deterministic_and_shape_sensitive():
    a = (jnp.ones((8, 16)), jnp.ones((16, 32)))
    b = (jnp.ones((4, 16)), jnp.ones((16, 32)))
    assert trace(fn, *a).fingerprint == trace(fn, *a).fingerprint
    assert trace(fn, *a).fingerprint != trace(fn, *b).fingerprint


def test_checkpoint_keeps_its_optimization_barriers(devices8):
    """An inlined jax.checkpoint's equations stay a group (Eqn.remat) and emit reads their
    outside inputs through optimization_barrier, as jax lowers checkpoint(prevent_cse=True):
    XLA then cannot merge the backward's recomputation with the forward."""
    import autopar

    def loss(ws, x):
        for w in ws:
            x = jax.checkpoint(lambda h, w: jnp.tanh(h @ w) + h)(x, w)
        return jnp.mean(x ** 2)

    step = jax.grad(loss)
    ws = [jnp.ones((16, 16)) * 0.01 for _ in range(3)]
    x = jnp.ones((8, 16))
    prog = trace(step, ws, x)
    assert any(e.remat is not None for e in prog.eqns)
    plan = autopar.plan(step, ws, x, mesh_shape=(8,))
    barriers = plan.apply(step).lower(ws, x).as_text().count("optimization_barrier")
    assert barriers == jax.jit(step).lower(ws, x).as_text().count("optimization_barrier") > 0
    np.testing.assert_allclose(plan.apply(step)(ws, x)[0], jax.jit(step)(ws, x)[0], rtol=1e-5, atol=1e-6)
