"""jax.nn.dot_product_attention as one planned op (autopar.attention, strategies/attention.py)."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_cluster

import autopar
from autopar import attention
from autopar.graph import build_graph
from autopar.trace import trace
from examples import llama

CLUSTER = make_cluster(8, flops=1e9, alpha_s=1e-7)


def tiny(**kw):
    base = dict(vocab=128, dim=64, layers=2, heads=8, kv_heads=8, ffn=128, seq=16, batch=8, attention="dpa")
    return llama.LlamaConfig(**{**base, **kw})


def close(got, want):
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def attention_ops(plan):
    return [e for e in plan.eqns if e.primitive.startswith("dot_product_attention")]


@pytest.mark.parametrize("impl", [None, "cudnn"])
def test_traced_as_one_op_with_flops(impl):
    """Forward: one equation (no S×S value in the program); the gradient: a second one.
    FLOPs 4·B·N·T·S·H forward, 2.5× that backward."""
    b, t, n, kh, h = 2, 16, 4, 2, 8
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
    k = jax.ShapeDtypeStruct((b, t, kh, h), jnp.float32)

    def loss(q, k):
        return (jax.nn.dot_product_attention(q, k, k, is_causal=True, implementation=impl) ** 2).sum()
    g = build_graph(trace(jax.grad(loss, argnums=(0, 1)), q, k))
    ops = {n_.name: n_ for n_ in g.nodes if n_.name.startswith("dot_product_attention")}
    assert set(ops) == {"dot_product_attention", "dot_product_attention_bwd"}
    assert ops["dot_product_attention"].flops == 4 * b * n * t * t * h
    assert ops["dot_product_attention_bwd"].flops == 2.5 * 4 * b * n * t * t * h
    assert not any(t in v.shape for v in g.program.values.values() if v.shape[-2:] == (t, t))
    assert len(trace(lambda q, k: jax.nn.dot_product_attention(q, k, k, implementation=impl), q, k).eqns) == 1
    assert jax.nn.dot_product_attention is attention._ORIGINAL   # restored after tracing


@pytest.mark.parametrize("impl", [None, "cudnn"])
@pytest.mark.parametrize("kind", ["forward", "train_step"])
def test_llama_dpa_plans_abstract_runs_equal(impl, kind, devices8):
    """The tiny Llama with dot_product_attention plans from ShapeDtypeStructs (also with
    implementation="cudnn", which cannot even be traced on a CPU without autopar), the plan
    splits the attention's batch/heads, no fallback; with implementation=None the planned
    program equals jax.jit (the "cudnn" one runs as "xla" here, with a warning)."""
    cfg = tiny(implementation=impl)
    fn = llama.make_forward(cfg) if kind == "forward" else llama.make_train_step(cfg)
    make = llama.forward_args if kind == "forward" else llama.train_step_args
    plan = autopar.plan(fn, *make(cfg, abstract=True), cluster=CLUSTER, mesh_shape=(8,))
    assert not plan.fallbacks, plan.report()
    ops = attention_ops(plan)
    assert len(ops) == (2 if kind == "forward" else 4), [e.primitive for e in ops]
    for e in ops:
        assert any(e.out_specs[0][d] for d in (0, 2)), (e.strategy, plan.report())
    args = make(cfg)
    if impl is None:
        close(plan.apply(fn)(*args), jax.jit(fn)(*args))
        ref = llama.make_forward(tiny(attention="einsum")) if kind == "forward" else None
        if ref is not None:   # the fused op computes what the written-out attention does
            close(plan.apply(fn)(*args), jax.jit(ref)(*args))
    else:   # the same model with implementation=None is the reference jax.jit can run here
        ref = llama.make_forward(tiny()) if kind == "forward" else llama.make_train_step(tiny())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            attention._warned.clear()
            got = plan.apply(fn)(*args)
        assert any(issubclass(w.category, attention.CudnnOnCpuWarning) for w in caught)
        assert "runs it as implementation='xla'" in plan.report()
        close(got, jax.jit(ref)(*args))


def gqa_step(q, k, v):
    def loss(q, k, v):
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return (jnp.tanh(o) ** 2).sum()
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("mesh", [(8,), (2, 4)])
def test_attention_split_matches_hlo(mesh, devices8):
    """GQA attention and its gradient on (8,) and (2, 4): equal to jax.jit, predicted
    collective bytes equal the compiled HLO's (the strict check of tests/test_fuzz.py)."""
    from test_fuzz import CLUSTERS, _check_bytes, _check_numerics
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((8, 16, 16, 8)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((8, 16, 8, 8)).astype(np.float32))
    v = jnp.asarray(rng.standard_normal((8, 16, 8, 8)).astype(np.float32))
    cluster, nodes = CLUSTERS[mesh]
    plan = autopar.plan(gqa_step, q, k, v, cluster=cluster, nodes=nodes, mesh_shape=mesh)
    assert not plan.fallbacks, plan.report()
    ops = attention_ops(plan)
    assert len(ops) == 2 and all(any(any(sp) for sp in e.out_specs) for e in ops), plan.report()
    _check_numerics(plan.apply(gqa_step)(q, k, v), jax.jit(gqa_step)(q, k, v))
    _check_bytes(plan.validate(q, k, v, fn=gqa_step), plan)


def test_head_and_kv_seq_never_split(devices8):
    """No strategy splits head_dim or the kv sequence; the q sequence only in the forward."""
    from autopar.strategies import strategies_for
    from autopar.cost import mesh_model
    g = build_graph(trace(lambda q, k: jax.grad(lambda q: jax.nn.dot_product_attention(q, k, k).sum())(q),
                          jax.ShapeDtypeStruct((8, 32, 8, 16), jnp.float32),
                          jax.ShapeDtypeStruct((8, 32, 4, 16), jnp.float32)))
    mesh = mesh_model(CLUSTER, 1, (8,))
    for node in g.nodes:
        if node.name.startswith("dot_product_attention"):
            strats, reason = strategies_for(node, mesh)
            assert reason is None and len(strats) > 1
            for s in strats:
                q_spec, k_spec = s.in_specs[0], s.in_specs[1]
                assert not q_spec[3] and not k_spec[3] and not k_spec[1]
                if node.name.endswith("_bwd"):
                    assert not q_spec[1]
            assert any(s.in_specs[0][1] for s in strats) == (node.name == "dot_product_attention")


def _plan_8b(fused: bool, remat: bool):
    import dataclasses
    cfg = dataclasses.replace(llama.LLAMA3_8B, remat=remat)
    attention.ENABLED = fused
    try:
        return autopar.plan(llama.make_train_step(cfg), *llama.train_step_args(cfg, abstract=True),
                            cluster="dgx-h100", mesh_shape=(8,))
    except autopar.PlanError as err:
        return err
    finally:
        attention.ENABLED = True


def test_llama3_8b_seq8192_no_sxs_memory():
    """Llama-3-8B shape (32 layers scanned, dim 4096, 32 heads, 8 kv heads, vocab 128256),
    batch 8 × seq 8192, bf16, AdamW, one DGX H100 (8 × 80 GB). Attention traced into ops
    (``attention.ENABLED = False``, the old view), no remat: the S×S scores saved for the
    backward (32 layers × 8 × 32 heads × 8192²) need ≥ 527 GB per device; as one flash-style
    op ≤ 93 GB (the rest of the activations: over 80 GB, so the 8B config remats each layer).
    With remat the plan fits: predicted peak 57.2 GB → 33.3 GB per device."""
    before, after = _plan_8b(False, False), _plan_8b(True, False)
    assert isinstance(before, autopar.PlanError) and before.min_bytes_per_device > 500e9
    assert isinstance(after, autopar.PlanError) and after.min_bytes_per_device < 100e9
    before, after = _plan_8b(False, True), _plan_8b(True, True)
    print(f"no remat: minimum {_plan_8b(False, False).min_bytes_per_device / 1e9:.1f} GB -> "
          f"{_plan_8b(True, False).min_bytes_per_device / 1e9:.1f} GB; remat: peak "
          f"{before.predicted.peak_memory_bytes / 1e9:.1f} GB -> {after.predicted.peak_memory_bytes / 1e9:.1f} GB")
    assert after.predicted.peak_memory_bytes < 40e9 < before.predicted.peak_memory_bytes < 80e9
    assert not after.fallbacks and attention_ops(after)
    assert all(any(e.out_specs[0][d] for d in (0, 2)) for e in attention_ops(after)), after.report()
