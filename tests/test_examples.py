"""Quick tests of the example models (examples/mlp.py, examples/gpt.py)."""
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import gpt, mlp


def _count_prims(jaxpr, name):
    """Number of equations with primitive ``name``, recursing into nested jaxprs."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            n += 1
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):   # ClosedJaxpr
                    n += _count_prims(sub.jaxpr, name)
                elif hasattr(sub, "eqns"):                              # Jaxpr
                    n += _count_prims(sub, name)
    return n


def _all_sds(tree):
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(isinstance(l, jax.ShapeDtypeStruct) for l in leaves)


# ----------------------------------------------------------------------------- MLP

def test_mlp_args_shapes():
    params, x, y = mlp.mlp_step_args(batch=4, hidden=8, layers=3)
    assert [p["w"].shape for p in params] == [(8, 8)] * 3
    assert all(set(p) == {"w"} for p in params)
    assert x.shape == (4, 8) and y.shape == (4, 8) and x.dtype == jnp.float32
    params, x = mlp.mlp_forward_args(batch=4, hidden=8, layers=2, in_dim=3, out_dim=5, bias=True)
    assert [p["w"].shape for p in params] == [(3, 8), (8, 5)]
    assert [p["b"].shape for p in params] == [(8,), (5,)]
    assert mlp.mlp_forward(params, x).shape == (4, 5)
    params, batch = mlp.params_and_batch(batch=4, hidden=8)
    assert set(batch) == {"x", "y"}
    assert mlp.loss_fn(params, batch).shape == ()


def test_mlp_args_deterministic_and_abstract():
    a = mlp.mlp_step_args(batch=4, hidden=8)
    b = mlp.mlp_step_args(batch=4, hidden=8)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)
    s = mlp.mlp_step_args(abstract=True, dtype=jnp.bfloat16)
    assert _all_sds(s)
    assert s[0][0]["w"].shape == (1024, 1024) and s[0][0]["w"].dtype == jnp.bfloat16
    assert s[1].shape == (128, 1024)
    assert len(mlp.mlp_forward_args(abstract=True)) == 2


def test_mlp_step_decreases_loss():
    params, x, y = mlp.mlp_step_args(batch=16, hidden=32)
    step = jax.jit(mlp.mlp_step)
    losses = []
    for _ in range(5):
        params, loss = step(params, x, y)
        losses.append(float(loss))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_mlp_step_has_no_input_gradient():
    # 2 layers: 2 forward matmuls, 2 weight grads, 1 hidden-activation grad; none for x.
    args = mlp.mlp_step_args(batch=8, hidden=16, layers=2, abstract=True)
    closed = jax.make_jaxpr(mlp.mlp_step)(*args)
    assert _count_prims(closed.jaxpr, "dot_general") == 5


# ----------------------------------------------------------------------------- GPT

def test_gpt_args_shapes():
    params, opt_state, batch = gpt.train_step_args()
    assert params["wte"].shape == (256, 64) and params["wpe"].shape == (32, 64)
    assert len(params["blocks"]) == 2
    blk = params["blocks"][0]
    assert blk["attn"]["qkv"]["w"].shape == (64, 192) and blk["attn"]["qkv"]["b"].shape == (192,)
    assert blk["attn"]["proj"]["w"].shape == (64, 64)
    assert blk["mlp"]["fc"]["w"].shape == (64, 256) and blk["mlp"]["proj"]["w"].shape == (256, 64)
    assert set(blk["ln1"]) == {"scale", "bias"}
    assert batch["tokens"].shape == (8, 32) and batch["tokens"].dtype == jnp.int32
    assert batch["labels"].shape == (8, 32) and batch["labels"].dtype == jnp.int32
    np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    n = sum(math.prod(l.shape) for l in jax.tree.leaves(params))
    assert n == gpt.param_count(gpt.GPTConfig())
    p, toks = gpt.forward_args(batch=2, seq=16)
    assert toks.shape == (2, 16)
    assert len(gpt.sgd_train_step_args()) == 2 and len(gpt.params_and_batch()) == 2


def test_gpt_suite_abstract_no_allocation():
    assert gpt.default_heads(64) == gpt.GPTConfig().heads == 4
    for cfg in gpt.SUITE.values():
        assert gpt.default_heads(cfg.hidden) == cfg.heads
        assert (cfg.seq, cfg.vocab) == (1024, 51200)
    before = len(jax.live_arrays())
    t0 = time.perf_counter()
    params, opt_state, batch = gpt.train_step_args(suite="gpt-39b", abstract=True, batch=4)
    elapsed = time.perf_counter() - t0
    assert len(jax.live_arrays()) <= before
    assert _all_sds((params, opt_state, batch))
    assert elapsed < 10
    n = sum(math.prod(l.shape) for l in jax.tree.leaves(params))
    assert n == gpt.param_count(gpt.SUITE["gpt-39b"])
    assert abs(n - 39e9) / 39e9 < 0.10
    assert batch["tokens"].shape == (4, 1024)
    for name, cfg in gpt.SUITE.items():
        nominal = {"gpt-350m": 0.35e9, "gpt-1.3b": 1.3e9, "gpt-2.6b": 2.6e9,
                   "gpt-6.7b": 6.7e9, "gpt-15b": 15e9, "gpt-39b": 39e9}[name]
        assert abs(gpt.param_count(cfg) - nominal) / nominal < 0.10, name


def test_gpt_train_step_runs():
    params, opt_state, batch = gpt.train_step_args()
    step = jax.jit(gpt.train_step)
    params, opt_state, loss0 = step(params, opt_state, batch)
    assert np.isfinite(float(loss0))
    assert abs(float(loss0) - math.log(256)) < 0.3
    params, opt_state, loss1 = step(params, opt_state, batch)
    assert float(loss1) < float(loss0)


def test_gpt_sgd_step_and_causality():
    params, batch = gpt.sgd_train_step_args(layers=1, seq=16, batch=2)
    _, loss = jax.jit(gpt.sgd_train_step)(params, batch)
    assert np.isfinite(float(loss)) and abs(float(loss) - math.log(256)) < 0.3
    fwd = jax.jit(gpt.forward)
    toks = batch["tokens"]
    changed = toks.at[:, 10].set((toks[:, 10] + 1) % 256)
    a, b = fwd(params, toks), fwd(params, changed)
    np.testing.assert_allclose(a[:, :10], b[:, :10], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a[:, 10:], b[:, 10:])


def test_gpt_make_train_step_explicit_heads():
    cfg = gpt.GPTConfig(hidden=32, heads=2, layers=1, seq=8, batch=2)
    args = gpt.args_for(cfg, "train_step")
    _, _, loss = jax.jit(gpt.make_train_step(cfg))(*args)
    assert np.isfinite(float(loss))
    with pytest.raises(ValueError):
        gpt.GPTConfig(hidden=30, heads=4)
