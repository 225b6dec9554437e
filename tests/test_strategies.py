"""Every strategy family: planned, compiled, run on 8 CPU devices; outputs equal the
unsharded function and predicted collective bytes match the compiled HLO."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_cluster
from jax.sharding import PartitionSpec as P

import autopar
from autopar import baselines
from autopar.strategies import STRATEGY_RULES, replicated_rule

# slow devices and cheap links: splitting pays for every op, so the rules are exercised
CLUSTER = make_cluster(8, flops=1e9, alpha_s=1e-7)
rng = np.random.default_rng(0)


def arr(*shape, dtype=np.float32):
    return jnp.asarray(rng.standard_normal(shape).astype(dtype))


def embed(table, tokens):
    return jnp.take(table, tokens, axis=0) * 2.0


def embed_grad(table, tokens):
    return jax.grad(lambda t: (embed(t, tokens) ** 2).sum())(table)


def cross_entropy_grad(logits, labels):
    def loss(lg):
        lp = jax.nn.log_softmax(lg, axis=-1)
        return -jnp.take_along_axis(lp, labels[..., None], axis=-1).mean()
    return jax.value_and_grad(loss)(logits)


def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))


def conv_step(x, w):
    return jax.grad(lambda w: (conv(x, w) ** 2).mean())(w)


def attention_like(q, k):
    s = jnp.einsum("bqd,bkd->bqk", q, k) / 8.0
    return jax.nn.softmax(s, axis=-1).sum(axis=1)


def layout_ops(x):
    y = jnp.transpose(x.reshape(8, 4, 16), (1, 0, 2))            # reshape split + transpose
    z = jnp.concatenate([y, y * 2], axis=2)[:, :, 1:9]            # concatenate + slice
    return z.reshape(4, 64).sum(0), jnp.cumsum(x, axis=1), jnp.argmax(x, axis=1)


def dynamic_ops(x, i):
    part = jax.lax.dynamic_slice(x, (i, 0), (4, 64))
    return jax.lax.dynamic_update_slice(x, part * 3.0, (i + 4, 0)), jnp.squeeze(x[:, :1], 1)


def elementwise_mix(x, y):
    m = jnp.where(x > 0, x, y) + jnp.exp(-jnp.abs(y)) + jnp.arange(64, dtype=jnp.float32)
    return jnp.maximum(m, 0.1).astype(jnp.bfloat16).astype(jnp.float32), jnp.max(m, axis=0)


def random_ops(x):
    noise = jax.random.uniform(jax.random.key(1), x.shape)
    return x + noise


def control_flow(x):
    y = jax.lax.scan(lambda c, r: (c + r.sum(), c * r), 0.0, x)[1]
    z = jax.lax.cond(x.sum() > 0, lambda v: v * 2, lambda v: v - 1, y)
    return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 1.5), (0, z))[1]


def sort_ops(x):
    return jnp.sort(x, axis=1), jax.lax.top_k(x, 3)[0]


def pad_mid(x):
    return jnp.pad(x, ((0, 0), (1, 1), (0, 0))) * 2


def concat_last(x):
    return jnp.concatenate([x, x * 3], axis=2) * 2


def pool_grads(x):
    """Max-pool and avg-pool (reduce_window) and their gradients (select_and_scatter_add;
    pad with interior padding + reduce_window_sum), NHWC."""
    def maxpool(v):
        return jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")

    def avgpool(v):
        return jax.lax.reduce_window(v, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 2, 2, 1), "SAME") / 9
    return jax.grad(lambda v: (maxpool(v) ** 2).sum() + (avgpool(v) ** 2).sum())(x)


def bitcast_barrier(x, y):
    a, b = jax.lax.optimization_barrier((x * 3, y + 1))                 # operands of two shapes
    bits = jax.lax.bitcast_convert_type(a, jnp.uint8).astype(jnp.float32)  # (64, 32) -> (64, 32, 4)
    return bits.sum(-1) + a * 2 + b[:, None]


def batched_keys(x, keys):
    return x + jax.vmap(lambda k: jax.random.normal(k, x.shape[1:]))(keys)


def grouped_matmul_grads(x, w, sizes):   # a dropless MoE's expert FFN and its gradients (ragged_dot ×3)
    return jax.grad(lambda x_, w_: jnp.tanh(jax.lax.ragged_dot(x_, w_, sizes)).sum(), argnums=(0, 1))(x, w)


CASES = {
    "dot_general": (lambda a, b: jnp.tanh(a @ b) @ b.T, lambda: (arr(64, 128), arr(128, 256))),
    "batched_dot": (attention_like, lambda: (arr(8, 32, 16), arr(8, 32, 16))),
    "conv": (conv, lambda: (arr(8, 16, 8, 8), arr(32, 16, 3, 3))),
    "conv_grad": (conv_step, lambda: (arr(8, 16, 8, 8), arr(32, 16, 3, 3))),
    "gather_embedding": (embed, lambda: (arr(512, 64), jnp.asarray(rng.integers(0, 512, (16, 8)), jnp.int32))),
    "scatter_add_grad": (embed_grad, lambda: (arr(512, 64), jnp.asarray(rng.integers(0, 512, (16, 8)), jnp.int32))),
    "take_along_axis": (cross_entropy_grad, lambda: (arr(8, 16, 512), jnp.asarray(rng.integers(0, 512, (8, 16)), jnp.int32))),
    "layout": (layout_ops, lambda: (arr(32, 16),)),
    "dynamic": (dynamic_ops, lambda: (arr(64, 64), jnp.int32(3))),
    "elementwise_reduce": (elementwise_mix, lambda: (arr(64, 64), arr(64, 64))),
    "random_bits": (random_ops, lambda: (arr(64, 64),)),
    "control_flow": (control_flow, lambda: (arr(16, 32),)),
    "sort_topk": (sort_ops, lambda: (arr(64, 32),)),
    "pad": (pad_mid, lambda: (arr(64, 32, 128),)),
    "concatenate": (concat_last, lambda: (arr(64, 32, 128),)),
    "pooling": (pool_grads, lambda: (arr(16, 16, 16, 8),)),
    "bitcast_barrier": (bitcast_barrier, lambda: (arr(64, 32), arr(64))),
    "batched_keys": (batched_keys, lambda: (arr(64, 32), jax.random.split(jax.random.key(0), 64))),
    "ragged_dot": (grouped_matmul_grads, lambda: (arr(256, 64), arr(4, 64, 128), jnp.asarray([60, 100, 30, 66], jnp.int32))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_family_runs_and_matches(name, devices8):
    fn, make = CASES[name]
    args = make()
    plan = autopar.plan(fn, *args, cluster=CLUSTER)
    got = plan.apply(fn)(*args)
    want = jax.jit(fn)(*args)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    v = plan.validate(*args)
    assert v.bytes_error() <= 0.05, v.table()


def test_control_flow_is_replicated_and_reported(devices8):
    """cond / while stay single replicated nodes, reported, costed at least their bodies'
    FLOPs; a scan is planned (tests/test_scan.py), not a fallback."""
    fn, make = CASES["control_flow"]
    plan = autopar.plan(fn, *make(), cluster=CLUSTER)
    prims = {f.primitive for f in plan.fallbacks}
    assert {"cond", "while"} <= prims and "scan" not in prims
    assert "control flow" in plan.report()
    from autopar.graph import build_graph
    from autopar.trace import trace

    def heavy(x):  # 2·64³ FLOPs inside each branch / the loop body
        c = jax.lax.cond(x.sum() > 0, lambda v: v @ v, lambda v: v @ v.T, x)
        return jax.lax.while_loop(lambda s: s[0] < 3, lambda s: (s[0] + 1, s[1] @ s[1]), (0, c))[1]
    nodes = {n.name: n for n in build_graph(trace(heavy, arr(64, 64))).nodes}
    assert nodes["cond"].flops >= 2 * 64 ** 3 and nodes["while"].flops >= 2 * 64 ** 3


def test_unknown_primitive_is_replicated_and_listed(devices8):
    def fn(x):
        return jnp.linalg.cholesky(x @ x.T + 64 * jnp.eye(64)).sum(0)
    args = (arr(64, 64),)
    plan = autopar.plan(fn, *args, cluster=CLUSTER)
    assert any(f.primitive == "cholesky" and "unsupported" in f.reason for f in plan.fallbacks)
    assert "cholesky" in plan.report()
    np.testing.assert_allclose(plan.apply(fn)(*args), jax.jit(fn)(*args), rtol=1e-5, atol=1e-5)


def test_megatron_rule_finds_partial_sum_all_reduce(devices8):
    # a budget that forbids holding either 256 KB operand whole: the cheapest way is to split
    # the contracting dim; exactly the all-reduce the rule predicts shows up in the HLO
    def fn(a, b):
        return a @ b
    args = (arr(16, 4096), arr(4096, 16))
    plan = autopar.plan(fn, *args, cluster=CLUSTER, mesh_shape=(8,), memory_budget_bytes=100_000)
    assert plan.input_specs == (jax.sharding.PartitionSpec(None, "x"), jax.sharding.PartitionSpec("x"))
    v = plan.validate(*args)
    assert set(v.compiled_bytes) == {"all-reduce"} and v.bytes_error() <= 0.05, v.table()


# (primitive, dims it must leave unsplit: the padded / concatenated / windowed ones)
LOCAL_OPS = {"pad": ("pad", {1}), "concatenate": ("concatenate", {2}),
             "pooling": ("select_and_scatter_add", {1, 2})}
COLLECTIVE = re.compile(r"all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute")


@pytest.mark.parametrize("how", ["autopar", "data_parallel"])
@pytest.mark.parametrize("name", list(LOCAL_OPS))
def test_batch_split_pad_concat_pool_stay_local(name, how, devices8):
    """pad / concatenate / pooling of a batch-split input: split on the dims they leave alone,
    no collective at all (they used to be replicated: an all-gather each, not reported)."""
    fn, make = CASES[name]
    args = make()
    if how == "autopar":
        plan = autopar.plan(fn, *args, cluster=CLUSTER, mesh_shape=(8,))
    else:  # the input is pinned batch-split; the ILP chooses the rest
        plan = baselines.data_parallel(fn, *args, cluster=CLUSTER, batch_argnums=(0,))
        assert plan.input_specs[0] == P("x")
    prim, frozen = LOCAL_OPS[name]
    eqns = [e for e in plan.eqns if e.primitive == prim]
    assert eqns, [e.primitive for e in plan.eqns]
    for e in eqns:
        assert e.strategy != "replicated" and any(e.out_specs[0]), (e.strategy, plan.report())
        assert all(not e.out_specs[0][d] for d in frozen), e.out_specs
        assert not e.reshard_inputs and e.fallback is None, e
    assert plan.fallbacks == [] and plan.predicted.comm_bytes_per_device == 0, plan.report()
    step = plan.apply(fn)
    for a, b in zip(jax.tree_util.tree_leaves(step(*args)), jax.tree_util.tree_leaves(jax.jit(fn)(*args))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    hlo = step.lower(*args).compile().as_text()
    assert not COLLECTIVE.findall(hlo), sorted(set(COLLECTIVE.findall(hlo)))


@pytest.mark.parametrize("name", ["bitcast_barrier", "batched_keys"])
def test_shape_changing_ops_are_split(name, devices8):
    """bitcast to a narrower type, optimization_barrier of two shapes, random_bits of batched
    keys: split on the dims they share (they used to be replicated without a report)."""
    fn, make = CASES[name]
    plan = autopar.plan(fn, *make(), cluster=CLUSTER, mesh_shape=(8,))
    prims = {"bitcast_barrier": ("bitcast_convert_type", "optimization_barrier"), "batched_keys": ("random_bits",)}
    for prim in prims[name]:
        eqns = [e for e in plan.eqns if e.primitive == prim and len(e.shapes[0]) > 1]
        assert eqns and all(any(e.out_specs[0]) for e in eqns), plan.report()
    assert plan.fallbacks == [] and plan.predicted.comm_bytes_per_device == 0, plan.report()


def route_top2(gates):
    """MoE routing: the two largest gates of each token and their experts."""
    vals, idx = jax.lax.top_k(gates, 2)
    return vals / vals.sum(-1, keepdims=True), idx


def gates_with_ties():
    """(batch 64, experts 8), integer-valued so that most rows tie: top_k must return the
    lower expert index first, as jax.jit does."""
    return jnp.asarray(rng.integers(0, 4, (64, 8)).astype(np.float32))


@pytest.mark.parametrize("mesh_shape,batch_axes", [((8,), ["x"]), ((2, 4), ["x", "y"])])
def test_batch_split_top_k_stays_local(mesh_shape, batch_axes, devices8):
    """A top_k of (batch, experts) gates is split on the batch dim over every mesh axis (not a
    fallback), runs per shard (emit.PER_SHARD) with no collective in the compiled program, and
    gives jax.jit's values and indices exactly."""
    args = (gates_with_ties(),)
    plan = autopar.plan(route_top2, *args, cluster=CLUSTER, mesh_shape=mesh_shape)
    (e,) = [e for e in plan.eqns if e.primitive == "top_k"]
    assert e.out_specs == [[batch_axes, []], [batch_axes, []]] and e.fallback is None, plan.report()
    assert not e.reshard_inputs and plan.fallbacks == [], plan.report()
    step = plan.apply(route_top2)
    hlo = step.lower(*args).compile().as_text()
    assert not COLLECTIVE.findall(hlo), sorted(set(COLLECTIVE.findall(hlo)))
    assert plan.predicted.comm_bytes_per_device == 0
    v = plan.validate(*args)
    assert sum(v.compiled_bytes.values()) == 0, v.table()
    for a, b in zip(step(*args), jax.jit(route_top2)(*args), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_top_k_without_per_shard_emission_is_all_gathered(devices8, monkeypatch):
    """The measured reason for emit.PER_SHARD: bound as is, a batch-split top_k makes XLA's
    partitioner all-gather its operand (the planned 0 bytes would be wrong)."""
    from autopar import emit
    args = (gates_with_ties(),)
    plan = autopar.plan(route_top2, *args, cluster=CLUSTER, mesh_shape=(8,))
    monkeypatch.setattr(emit, "PER_SHARD", frozenset())
    hlo = plan.apply(route_top2).lower(*args).compile().as_text()
    assert "all-gather" in COLLECTIVE.findall(hlo)


def test_rule_that_only_replicates_is_reported(devices8, monkeypatch):
    """A rule offering nothing but the replicated strategy for a splittable op is a fallback:
    the planner lists it instead of silently all-gathering its operands."""
    monkeypatch.setitem(STRATEGY_RULES, "pad", replicated_rule)
    fn, make = CASES["pad"]
    plan = autopar.plan(fn, *make(), cluster=CLUSTER, mesh_shape=(8,))
    assert [(f.primitive, f.count) for f in plan.fallbacks] == [("pad", 1)]
    assert "no valid split" in plan.fallbacks[0].reason and "pad" in plan.report()


def rope_stack(x, w):
    """Llama RoPE: pairs rotated and put back with jnp.stack (``stack``); its gradient, and
    jnp.unstack, give ``unstack``."""
    def rot(v):
        pos = jnp.arange(v.shape[1], dtype=jnp.float32)[:, None] * (1.0 + jnp.arange(v.shape[-1] // 2, dtype=jnp.float32)) / 16
        cos, sin = jnp.cos(pos)[None, :, None], jnp.sin(pos)[None, :, None]
        vr = v.reshape(*v.shape[:-1], v.shape[-1] // 2, 2)
        a, b = jnp.unstack(vr, axis=-1)
        return jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(v.shape)

    def loss(w):
        return (rot(jnp.tanh(x @ w).reshape(x.shape[0], x.shape[1], 4, -1)) ** 2).sum()
    return jax.value_and_grad(loss)(w)


@pytest.mark.parametrize("mesh", [(8,), (2, 4)])
def test_stack_unstack_split_and_match(mesh, devices8):
    """stack / unstack (RoPE) are planned split — not replicated fallbacks — on (8,) and
    (2, 4): the run equals jax.jit and the predicted collective bytes equal the compiled
    HLO's, per kind (the strict comparison of tests/test_fuzz.py)."""
    from test_fuzz import CLUSTERS, _check_bytes, _check_numerics
    fn = rope_stack
    args = (arr(16, 32, 64), arr(64, 128))
    cluster, nodes = CLUSTERS[mesh]
    plan = autopar.plan(fn, *args, cluster=cluster, nodes=nodes, mesh_shape=mesh)
    assert not plan.fallbacks, plan.report()
    for prim in ("stack", "unstack"):
        eqns = [e for e in plan.eqns if e.primitive == prim]
        assert eqns and all(any(e.out_specs[0]) for e in eqns), (prim, plan.report())
    _check_numerics(plan.apply(fn)(*args), jax.jit(fn)(*args))
    _check_bytes(plan.validate(*args, fn=fn), plan)


def test_census_llama_gpt_flax_have_no_fallback_ops():
    """benchmarks/census.py: every primitive of the Llama-3-style step (scanned, unrolled,
    fused attention, cudnn, remat), GPT and the flax LM has a rule that splits it on (8,) and (2, 4)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import census
    result = census.census(list(census.MODELS))
    bad = {m: [k for k in seen if k[1].startswith("fallback")] for m, seen in result.items()}
    assert not any(bad.values()), bad
    seen = {p for s in result.values() for p, _ in s}
    assert {"stack", "unstack", "dot_product_attention", "dot_product_attention_bwd"} <= seen


# jax.lax.ragged_dot (a dropless MoE's grouped matmul) and the two ragged dots of its gradient:
# (lhs, rhs, dimension numbers) — rows ragged and free, rows ragged and contracted (the weight
# gradient, whose output gains the group dim), rows ragged and free against the weight's out dim
_RAGGED = {
    "forward": ((64, 16), (4, 16, 32), (((1,), (1,)), ((), ())), (0,)),
    "weight_grad": ((64, 16), (64, 32), (((0,), (0,)), ((), ())), ()),
    "input_grad": ((64, 32), (4, 16, 32), (((1,), (2,)), ((), ())), (0,)),
}


@pytest.mark.parametrize("mesh_shape", [(8,), (2, 4)])
@pytest.mark.parametrize("mode", list(_RAGGED))
def test_every_ragged_dot_strategy_runs_equal_with_the_predicted_collectives(mode, mesh_shape, devices8):
    """Each strategy of ``ragged_dot_rule``, compiled with its specs: the values of the
    unsharded ragged dot, and in the HLO exactly the all-reduces it predicts (kind, group,
    bytes) and nothing else."""
    from jax.sharding import NamedSharding

    from autopar.cost import mesh_model
    from autopar.graph import build_graph
    from autopar.strategies.dot_general import ragged_dot_rule
    from autopar.trace import trace
    from autopar.validate import hlo_collectives
    lshape, rshape, dot_dn, group = _RAGGED[mode]
    dn = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=dot_dn, lhs_ragged_dimensions=(0,),
                                           rhs_group_dimensions=group)
    fn = lambda a, b, s: jax.lax.ragged_dot_general(a, b, s, dn)  # noqa: E731
    args = (arr(*lshape), arr(*rshape), jnp.asarray([10, 20, 30, 4], jnp.int32))
    want = jax.jit(fn)(*args)
    node = next(n for n in build_graph(trace(fn, *args)).nodes if n.name == "ragged_dot_general")
    mesh_m = mesh_model(CLUSTER, 1, mesh_shape)
    strategies = ragged_dot_rule(node, mesh_m)
    names = ("x", "y")[:len(mesh_shape)]
    mesh = jax.make_mesh(mesh_shape, names)
    spec = lambda s: P(*[tuple(names[a] for a in axes) or None for axes in s])  # noqa: E731
    split = 0
    for s in strategies:
        shard = [NamedSharding(mesh, spec(sp)) for sp in s.in_specs]
        f = jax.jit(fn, in_shardings=shard, out_shardings=NamedSharding(mesh, spec(s.out_specs[0])))
        np.testing.assert_allclose(np.asarray(f(*args)), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=s.name)
        got = sorted((c.kind, c.group_size, c.bytes) for c in hlo_collectives(f.lower(*args).compile().as_text()))
        predicted = sorted((k, math.prod(mesh_shape[a] for a in axes), round(b)) for k, axes, b in s.comm)
        assert got == predicted, (s.name, got, predicted)
        split += any(len(ax) > 0 for ax in s.in_specs[0] + s.in_specs[1])
    assert split >= len(mesh_shape) * 2, [s.name for s in strategies]   # rows, free and contracting dims split
