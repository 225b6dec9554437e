"""The model zoo (examples/zoo/, examples/llama.py): models written the way the ecosystem
writes them (flax linen unrolled and nn.scan, flax NNX unrolled and nnx.scan, equinox, a GShard
MoE with lax.top_k routing, a ViT, Llama-3 unrolled and scanned, a Mixtral-style dropless MoE
with jax.lax.ragged_dot), each an optax AdamW training
step at its tiny size. Every one plans on (2, 4) (one also on (8,)), runs equal to jax.jit
(loss and the whole optimizer state — first and second moments — at rtol 1e-5; the parameters
are not compared: AdamW turns float noise on ~zero gradients into ±lr updates, DESIGN.md),
predicts the compiled program's collective bytes and (within 15 %) its peak memory, and
reports the ops it replicated."""
import importlib

import jax
import numpy as np
import pytest

import autopar
from autopar.validate import compiled_peak_bytes, hlo_collectives
from conftest import make_cluster

CLUSTER = make_cluster(8)

# (module in examples/zoo, step) → the fallback ops (primitive, count) observed: none
# (moe's lax.top_k is split on its token dims and run per shard, emit.PER_SHARD).
MODELS = {
    ("linen_transformer", "linen_step"): [],
    ("linen_transformer", "linen_scan_step"): [],
    ("nnx_transformer", "nnx_step"): [],
    ("nnx_transformer", "nnx_scan_step"): [],
    ("eqx_transformer", "eqx_step"): [],
    ("moe", "moe_step"): [],
    ("vit", "vit_step"): [],
    ("llama", "llama_step"): [],
    ("llama", "llama_scan_step"): [],
    # the dropless MoE's two argsorts over all the batch's (token, expert) pairs stay whole
    ("mixtral", "mixtral_step"): [("sort", 2)],
}


def _run(module: str, name: str, mesh_shape):
    mod = importlib.import_module(f"examples.zoo.{module}")
    fn, args = getattr(mod, name), getattr(mod, f"{name}_args")("tiny")
    plan = autopar.plan(fn, *args, cluster=CLUSTER, mesh_shape=mesh_shape)
    fallbacks = sorted((f.primitive, f.count) for f in plan.fallbacks)
    sharded = plan.apply(fn)
    compiled = sharded.lower(*args).compile()   # compiled once: bytes read and run from it
    compiled_bytes = sum(c.bytes for c in hlo_collectives(compiled.as_text()))
    flat, _ = jax.tree_util.tree_flatten(args)
    flat = [jax.device_put(x, s) for x, s in zip(flat, sharded.in_shardings)]
    out_tree = sharded._compiled_for(args)[0][1]
    out = jax.tree_util.tree_unflatten(out_tree, compiled(*flat))
    ref = jax.jit(fn)(*args)
    # (params, opt_state, loss): the loss and every optimizer-state leaf (mu, nu, count)
    np.testing.assert_allclose(float(out[2]), float(ref[2]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[1]), jax.tree.leaves(ref[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    peak = compiled_peak_bytes(compiled)
    assert abs(plan.predicted.peak_memory_bytes - peak) <= 0.15 * peak, (plan.predicted.peak_memory_bytes, peak)
    return plan, fallbacks, compiled_bytes


@pytest.mark.parametrize("module,name", list(MODELS), ids=[n for _, n in MODELS])
def test_zoo_model_plans_runs_equal_and_predicts_collectives(module, name, devices8):
    plan, fallbacks, compiled_bytes = _run(module, name, (2, 4))
    assert fallbacks == MODELS[module, name], plan.fallbacks
    assert any(any(axes for axes in s) for s in plan.input_specs_flat), "nothing sharded"
    assert compiled_bytes == plan.predicted.comm_bytes_per_device, (
        compiled_bytes, plan.predicted.comm_bytes_per_device)


def test_zoo_model_on_a_1d_mesh(devices8):
    plan, fallbacks, compiled_bytes = _run("llama", "llama_step", (8,))
    assert fallbacks == [] and plan.mesh_shape == [8]
    assert compiled_bytes == plan.predicted.comm_bytes_per_device


def test_nnx_decoder_layers_are_tied():
    """The NNX step's backward repeats with a period (110 equations at full size) that is not
    among the 8 most frequent gaps between equal signatures (gaps of 1, 2, 4, 16, … between
    repeated elementwise ops crowd it out): with 8 candidate periods none of its dots were tied
    at 6 layers and the full-size plan stopped at the solver's time limit (162 s, 'feasible');
    with 24, two thirds of the dots copy an earlier layer's strategy."""
    import dataclasses

    from autopar.build_nodes import node_strategies
    from autopar.cost import mesh_model
    from autopar.graph import build_graph
    from autopar.repeats import find_repeats
    from autopar.trace import trace
    from examples.zoo import nnx_transformer as m

    args = m._args(dataclasses.replace(m.TINY, layers=6), abstract=True)
    graph = build_graph(trace(m.nnx_step, *args))
    strats, _ = node_strategies(graph, mesh_model(CLUSTER, 1, (2, 4)), graph.signatures)
    tie = find_repeats(graph, strats)
    dots = [v for v, node in enumerate(graph.nodes) if node.name == "dot_general"]
    assert sum(tie[v] != v for v in dots) >= 0.6 * len(dots), (sum(tie[v] != v for v in dots), len(dots))
