"""The benchmark-suite example models (examples/wresnet.py, examples/moe.py): planned and run
on 8 CPU devices equal to unsharded, suite configs built from shapes only with their nominal
sizes, and micro-batch equivalence (the pipeline requirement)."""
import math
import time

import jax
import numpy as np
import pytest
from conftest import make_cluster

import autopar
from examples import moe, wresnet

CLUSTER = make_cluster(8, flops=2e9, alpha_s=1e-6)  # slow devices: sharding pays at test sizes

# small knobs (the defaults): WResNet L14 = one bottleneck block per stage, c8 w2, 32px;
# MoE: 2 layers (one MoE, one dense), hidden 64, 4 experts, seq 32
MODELS = {"wresnet": (wresnet, {}), "moe": (moe, {})}
# The math is under test, not XLA's code generation: compiling with LLVM optimizations off
# and the legacy loop emitters is 4-6x faster on the CPU (e.g. 1.8 s instead of 11 s for the
# WResNet SGD step), which is what keeps this file fast. Same HLO, same partitioning.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
EXPECTED_FALLBACKS = {"wresnet": [], "moe": []}   # (primitive, count) replicated by the planner

NOMINAL = {
    "wresnet-250m": 250e6, "wresnet-1b": 1e9, "wresnet-2b": 2e9, "wresnet-4b": 4e9,
    "wresnet-6.8b": 6.8e9, "wresnet-13b": 13e9,
    "moe-380m": 380e6, "moe-1.3b": 1.3e9, "moe-2.4b": 2.4e9, "moe-10b": 10e9, "moe-27b": 27e9,
    "moe-70b": 70e9,
}


def _leaves_close(got, want, rtol=1e-5, atol=1e-6):
    got, want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def _n_params(tree):
    return sum(math.prod(l.shape) for l in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sgd_step_planned_matches_unsharded(name, devices8):
    mod, knobs = MODELS[name]
    make = lambda: mod.sgd_train_step_args(**knobs)  # noqa: E731
    # the 1D mesh only: solving the 2D meshes too costs ~8 s (MoE) / ~35 s (WResNet) on 2 cores
    plan = autopar.plan(mod.sgd_train_step, *make(), cluster=CLUSTER, mesh_shape=(8,))
    assert [(f.primitive, f.count) for f in plan.fallbacks] == EXPECTED_FALLBACKS[name], plan.report()
    is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)  # noqa: E731
    specs = jax.tree_util.tree_leaves((plan.input_specs, plan.output_specs), is_leaf=is_spec)
    assert any(any(d is not None for d in s) for s in specs), plan.report()   # something is split
    # = plan.apply(fn)(*args) and jax.jit(fn)(*args), compiled with FAST_COMPILE
    sharded = plan.apply(mod.sgd_train_step)
    args = make()
    got = sharded.lower(*args).compile(FAST_COMPILE)(*jax.tree_util.tree_leaves(sharded.shard_inputs(*args)))
    want = jax.jit(mod.sgd_train_step).lower(*args).compile(FAST_COMPILE)(*args)
    _leaves_close(got, want)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_suite_configs_abstract(name):
    mod = MODELS[name][0]
    before = len(jax.live_arrays())
    t0 = time.perf_counter()
    for key, cfg in mod.SUITE.items():
        n = mod.param_count(cfg)
        assert abs(n - NOMINAL[key]) / NOMINAL[key] < 0.15, (key, n)
        params, batch = mod.loss_fn_args(suite=key, abstract=True, batch=2)
        assert all(isinstance(l, jax.ShapeDtypeStruct) for l in jax.tree_util.tree_leaves((params, batch)))
        assert _n_params(params) == n, key
    largest = max(mod.SUITE, key=lambda k: NOMINAL[k])
    params, opt_state, batch = mod.train_step_args(suite=largest, abstract=True, batch=2)
    leaves = jax.tree_util.tree_leaves((params, opt_state, batch))
    assert all(isinstance(l, jax.ShapeDtypeStruct) for l in leaves)
    assert _n_params(opt_state) >= 2 * _n_params(params)          # AdamW moments
    assert len(jax.live_arrays()) <= before                         # nothing allocated
    assert time.perf_counter() - t0 < 20


def test_suite_config_shapes():
    cfg = wresnet.SUITE["wresnet-13b"]
    assert cfg.stage_sizes == (3, 4, 23, 3) and (cfg.channels, cfg.width, cfg.image, cfg.classes) == (320, 16, 224, 1000)
    assert wresnet.SUITE["wresnet-250m"].stage_sizes == (3, 4, 6, 3)
    params, batch = wresnet.loss_fn_args(suite="wresnet-250m", abstract=True, batch=2)
    assert batch["images"].shape == (2, 224, 224, 3) and batch["labels"].shape == (2,)
    blk = params["stages"][3][0]
    assert blk["conv2"].shape == (3, 3, 1280, 2560) and blk["conv3"].shape == (1, 1, 2560, 5120)
    assert params["head"]["w"].shape == (5120, 1000)
    for cfg in moe.SUITE.values():
        assert (cfg.seq, cfg.vocab, cfg.heads, cfg.top_k) == (1024, 32000, 16, 2)
    params, batch = moe.loss_fn_args(suite="moe-70b", abstract=True, batch=2)
    assert batch["tokens"].shape == (2, 1024)
    assert len(params["blocks"]) == 32 and sum("moe" in b for b in params["blocks"]) == 16
    assert params["blocks"][0]["moe"]["wi"].shape == (64, 2048, 8 * 2048)
    assert params["blocks"][0]["moe"]["wo"].shape == (64, 8 * 2048, 2048)
    assert params["blocks"][1]["mlp"]["fc"]["w"].shape == (2048, 8 * 2048)


def test_wresnet_layer_costs_unequal():
    cfg = wresnet.SUITE["wresnet-1b"]
    per_block = wresnet.block_param_counts(cfg)
    assert len(per_block) == 16 and sum(per_block) < wresnet.param_count(cfg)
    last_of_stage = [per_block[i] for i in (2, 6, 12, 15)]
    assert all(b > 3 * a for a, b in zip(last_of_stage, last_of_stage[1:]))   # ~4x per stage
    small = wresnet.WResNetConfig()
    assert small.stage_sizes == (1, 1, 1, 1) and wresnet.stage_sizes(26) == (2, 2, 2, 2)
    with pytest.raises(ValueError):
        wresnet.WResNetConfig(layers=15)


def test_moe_routing_capacity():
    # one group, 4 experts, capacity 2: top-1 choices fill the buffers first, overflow is dropped
    logits = np.full((1, 6, 4), -5.0, np.float32)
    logits[0, :4, 0] = 5.0                     # tokens 0-3 prefer expert 0 ...
    logits[0, :4, 1] = 4.0                     # ... then expert 1
    logits[0, 4:, 2] = 5.0
    logits[0, 4:, 3] = 4.0
    gates = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    combine, dispatch, aux = jax.jit(moe._gating, static_argnums=(1, 2))(gates, 2, 2)
    d = np.asarray(dispatch)
    assert d.shape == (1, 6, 4, 2)
    assert d[0, :, 0].sum() == 2 and d[0, :2, 0].sum() == 2      # first two tokens get expert 0
    assert d[0, :, 1].sum() == 2 and d[0, :2, 1].sum() == 2      # second choices of tokens 0-1
    assert d[0, 2:4].sum() == 0                                   # tokens 2-3 dropped entirely
    assert d[0, 4:, 2].sum() == 2 and d[0, 4:, 3].sum() == 2
    assert (d.sum(axis=1) <= 1).all()                             # one token per buffer slot
    np.testing.assert_allclose(np.asarray(combine).sum(axis=(2, 3))[0, [0, 1, 4, 5]], 1.0, rtol=1e-6)
    assert float(aux) > 1.0                                       # unbalanced router
    assert moe.expert_capacity(1024, 64) == 32 and moe.SUITE["moe-380m"].capacity == 256


@pytest.mark.parametrize("name", sorted(MODELS))
def test_microbatch_equivalence(name):
    """Mean over 2 half batches of the loss and its gradients == full batch (fp32, rtol 1e-5)."""
    mod, knobs = MODELS[name]
    params, batch = mod.loss_fn_args(**knobs)
    vg = jax.jit(jax.value_and_grad(mod.loss_fn))
    half = jax.tree_util.tree_leaves(batch)[0].shape[0] // 2
    halves = [jax.tree_util.tree_map(lambda x: np.asarray(x)[sl], batch) for sl in (slice(None, half), slice(half, None))]
    loss, grads = vg.lower(params, batch).compile(FAST_COMPILE)(params, batch)
    vg_half = vg.lower(params, halves[0]).compile(FAST_COMPILE)
    parts = [vg_half(params, h) for h in halves]
    np.testing.assert_allclose(np.mean([float(l) for l, _ in parts]), float(loss), rtol=1e-5)
    mean_grads = jax.tree_util.tree_map(lambda a, b: (np.asarray(a) + np.asarray(b)) / 2, parts[0][1], parts[1][1])
    _leaves_close(mean_grads, grads)
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(grads))  # no vacuous grads
