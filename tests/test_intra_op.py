"""Alpa's intra-op results on MLP training steps, checked in the compiled HLO."""
import jax
import numpy as np
import pytest
from conftest import make_cluster

import autopar
from autopar.validate import hlo_collectives
from examples import mlp

F32 = 4


def _check_numerics(plan, fn, make_args):
    want = jax.jit(fn)(*make_args())
    got = plan.apply(fn)(*make_args())  # fresh arguments: the plan donates the params
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _compiled(plan, fn, args):
    return hlo_collectives(plan.apply(fn).lower(*args).compile().as_text())


def _check_bytes(plan, fn, args):
    v = plan.validate(*args, fn=fn)
    assert v.compiled_total_bytes > 0
    assert v.bytes_error() <= 0.05, v.table()


def test_megatron_small_batch_large_hidden(devices8):
    make = lambda: mlp.mlp_step_args(batch=128, hidden=1024)  # noqa: E731
    args = make()
    plan = autopar.plan(mlp.mlp_step, *args, cluster=make_cluster(4, alpha_s=5e-6), mesh_shape=(4,),
                        donate_argnums=(0,))
    w1, w2 = plan.input_specs[0][0]["w"], plan.input_specs[0][1]["w"]
    assert (w1, w2) == (jax.sharding.PartitionSpec(None, "x"), jax.sharding.PartitionSpec("x")), plan.report()
    colls = _compiled(plan, mlp.mlp_step, args)
    assert [c.kind for c in colls] == ["all-reduce"], [c.line for c in colls]
    assert colls[0].bytes == 128 * 1024 * F32
    _check_bytes(plan, mlp.mlp_step, args)
    _check_numerics(plan, mlp.mlp_step, make)


def test_data_parallel_large_batch_small_hidden(devices8):
    make = lambda: mlp.mlp_step_args(batch=1024, hidden=128)  # noqa: E731
    args = make()
    plan = autopar.plan(mlp.mlp_step, *args, cluster=make_cluster(4, alpha_s=1e-7), mesh_shape=(4,),
                        donate_argnums=(0,))
    x_spec = plan.input_specs[1]
    assert x_spec == jax.sharding.PartitionSpec("x"), plan.report()
    forward = [e for e in plan.eqns if e.primitive == "dot_general"][:2]
    for e in forward:  # batch split, weight whole for compute
        assert e.strategy.startswith("S0R") and e.strategy.split("x")[1] == "RR", (e.strategy, plan.report())
    weight_bytes = 128 * 128 * F32
    colls = _compiled(plan, mlp.mlp_step, args)
    # only gradient-sized collectives (XLA combines the gradient all-reduces into one tuple op):
    # nothing activation-sized (1024×128, or a batch shard of it) is ever communicated
    assert colls and all("[1024,128]" not in c.line and "[256,128]" not in c.line for c in colls), \
        [c.line[:160] for c in colls]
    assert sum(c.bytes for c in colls) <= 4 * weight_bytes + 64
    _check_bytes(plan, mlp.mlp_step, args)
    _check_numerics(plan, mlp.mlp_step, make)


def test_2d_mesh_data_parallel_on_slow_axis_megatron_on_fast(devices8):
    # 2 nodes × 2 devices: mesh axis "x" crosses nodes (10× slower), "y" stays inside a node
    cluster = make_cluster(2, intra_bw=150e9, inter_bw=15e9, nics=2, flops=1e11)
    make = lambda: mlp.mlp_step_args(batch=256, hidden=32, layers=6)  # noqa: E731
    args = make()
    plan = autopar.plan(mlp.mlp_step, *args, cluster=cluster, nodes=2, mesh_shape=(2, 2), donate_argnums=(0,))
    P = jax.sharding.PartitionSpec
    assert plan.input_specs[1] == P("x"), plan.report()        # batch split over the slow axis
    ws = [layer["w"] for layer in plan.input_specs[0]]
    assert ws == [P(None, "y"), P("y")] * 3, plan.report()     # column / row split over the fast axis
    _check_bytes(plan, mlp.mlp_step, args)
    _check_numerics(plan, mlp.mlp_step, make)


def test_plan_searches_meshes_and_reports_them(devices8):
    args = mlp.mlp_step_args(batch=128, hidden=1024)
    plan = autopar.plan(mlp.mlp_step, *args, cluster="cpu-8")
    shapes = [tuple(c.mesh_shape) for c in plan.mesh_candidates]
    assert shapes == [(8,), (2, 4), (4, 2)]
    best = min(c.objective_s for c in plan.mesh_candidates)
    assert plan.solver.objective_s == pytest.approx(best)
    assert tuple(plan.mesh_shape) in shapes


@pytest.mark.parametrize("hidden", [64, 1024])
def test_mesh_cutoff_gives_the_same_plan(devices8, hidden):
    """``PlanHooks(cutoff=True)`` (pipeline stages): a mesh proven unable to beat the best so
    far stops early; the plan chosen is the same as with every mesh solved."""
    from autopar.planner import PlanHooks, plan_with
    args = mlp.mlp_step_args(batch=128, hidden=hidden)
    full = plan_with(mlp.mlp_step, args, cluster="cpu-8")
    cut = plan_with(mlp.mlp_step, args, cluster="cpu-8", hooks=PlanHooks(cutoff=True))
    assert cut.mesh_shape == full.mesh_shape and cut.solver.objective_s == full.solver.objective_s
    assert cut.input_specs_flat == full.input_specs_flat
    for a, b in zip(full.mesh_candidates, cut.mesh_candidates):
        assert b.status == "cutoff" and a.objective_s >= full.solver.objective_s or b == a
