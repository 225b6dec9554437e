"""Public API behaviour: JSON round trip, determinism, memory budgets, clear errors."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_cluster

import autopar
from examples import gpt, mlp


@pytest.fixture(scope="module")
def mlp_plan():
    args = mlp.mlp_step_args(batch=128, hidden=1024)
    return autopar.plan(mlp.mlp_step, *args, cluster="cpu-8", donate_argnums=(0,)), args


def test_json_round_trip_gives_identical_plan(mlp_plan, tmp_path):
    plan, _ = mlp_plan
    text = plan.to_json()
    again = autopar.Plan.from_json(text)
    assert again == plan
    assert again.input_specs == plan.input_specs and again.output_specs == plan.output_specs
    assert json.loads(again.to_json()) == json.loads(text)
    assert again.report() == plan.report()


def test_loaded_plan_runs(mlp_plan):
    plan, _ = mlp_plan
    loaded = autopar.Plan.from_json(plan.to_json())
    got = loaded.apply(mlp.mlp_step)(*mlp.mlp_step_args(batch=128, hidden=1024))
    want = jax.jit(mlp.mlp_step)(*mlp.mlp_step_args(batch=128, hidden=1024))
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_planning_twice_gives_the_same_plan(mlp_plan):
    plan, args = mlp_plan
    again = autopar.plan(mlp.mlp_step, *args, cluster="cpu-8", donate_argnums=(0,))
    assert again.model_dump(exclude={"timing"}) == plan.model_dump(exclude={"timing"})


def test_predicted_fields(mlp_plan):
    p = mlp_plan[0].predicted
    assert p.step_time_s == pytest.approx(p.compute_s + p.comm_s)
    assert p.comm_bytes_per_device == pytest.approx(sum(c.bytes for c in p.collectives))
    assert p.peak_memory_bytes > 0 and set(p.by_kind) <= {"all-reduce", "all-gather", "reduce-scatter",
                                                          "all-to-all", "collective-permute"}


def test_abstract_arguments_never_allocate():
    # a 6.7B-parameter GPT training step planned from ShapeDtypeStructs (27 GB of fp32 params)
    args = gpt.train_step_args(suite="gpt-6.7b", abstract=True, batch=8)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(args))
    from autopar.graph import build_graph
    from autopar.trace import trace
    graph = build_graph(trace(gpt.train_step, *args))
    assert len(graph.nodes) > 1000


def _momentum_mlp(params, x, y):
    # momentum SGD on a tanh MLP: Adam turns float noise on tiny gradients into ±lr updates
    # and ReLU masks flip on float noise near 0 (DESIGN.md), so two correct programs could
    # differ there; this step is well conditioned
    import optax
    opt = optax.sgd(1e-2, momentum=0.9)

    def loss_fn(params, x, y):
        h = x
        for layer in params:
            h = jnp.tanh(h @ layer["w"])
        return jnp.mean((h - y) ** 2)

    def step(params, state, x, y):
        loss, g = jax.value_and_grad(loss_fn)(params, x, y)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, loss
    return step, opt.init(params)


def test_memory_budget_forces_sharded_parameters(devices8):
    params, x, y = mlp.mlp_step_args(batch=256, hidden=256, layers=4)
    step, state = _momentum_mlp(params, x, y)
    args = (params, state, x, y)
    state_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves((params, state)))
    free = autopar.plan(step, *args, cluster="cpu-8", mesh_shape=(8,), donate_argnums=(0, 1))
    def is_sharded(s):
        return any(d is not None for d in s)
    specs = jax.tree_util.tree_leaves(free.input_specs[:2], is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    assert not any(map(is_sharded, specs)), free.report()  # unconstrained: replicated state is best
    assert free.predicted.peak_memory_bytes > state_bytes
    budget = 0.5 * state_bytes
    plan = autopar.plan(step, *args, cluster="cpu-8", mesh_shape=(8,), donate_argnums=(0, 1),
                        memory_budget_bytes=budget)
    specs = jax.tree_util.tree_leaves(plan.input_specs[:2], is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    assert any(map(is_sharded, specs)), plan.report()
    assert plan.predicted.peak_memory_bytes <= budget
    # compiled: below what the replicated state alone needs, and well below the free plan
    # (the model leaves out reshard buffers such as all-gathered weights: README, known limits)
    v, v_free = plan.validate(*args), free.validate(*args)
    assert v.compiled_peak_bytes < state_bytes < v_free.compiled_peak_bytes, (v.table(), v_free.table())
    got = plan.apply(step)(*jax.tree_util.tree_map(jnp.array, args))
    want = jax.jit(step)(*args)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_budget_no_plan_fits_names_the_minimum():
    args = mlp.mlp_step_args(batch=128, hidden=1024, abstract=True)
    with pytest.raises(autopar.PlanError, match=r"minimum is \d+ bytes per device") as err:
        autopar.plan(mlp.mlp_step, *args, cluster="cpu-8", memory_budget_bytes=10_000)
    assert err.value.min_bytes_per_device > 10_000
    assert "plan_training" in str(err.value) and "remat='auto'" in str(err.value)   # the way out for a training step


def test_unknown_cluster_lists_known_ones():
    with pytest.raises(autopar.ClusterSpecError, match="known clusters: cpu-8, dgx-a100-80g, dgx-h100, p3.16xlarge"):
        autopar.load_cluster("dgx-b200")


def test_invalid_spec_field_is_named(tmp_path):
    spec = json.loads(autopar.load_cluster("dgx-h100").model_dump_json())
    spec["intra_node_link"]["bandwidth_bytes_per_s"] = -1
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(autopar.ClusterSpecError, match="intra_node_link.bandwidth_bytes_per_s"):
        autopar.load_cluster(str(path))
    spec["devices_per_node"] = 8
    spec["gpu_count"] = 3
    path.write_text(json.dumps(spec))
    with pytest.raises(autopar.ClusterSpecError, match="gpu_count"):
        autopar.load_cluster(path)


def test_missing_spec_field_is_named_without_dumping_the_spec(tmp_path):
    spec = json.loads(autopar.load_cluster("dgx-h100").model_dump_json())
    del spec["device"]["memory_bytes"]
    path = tmp_path / "missing.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(autopar.ClusterSpecError, match="field 'device.memory_bytes' is missing") as err:
        autopar.load_cluster(path)
    assert "peak_flops" not in str(err.value) and len(str(err.value)) < 300, str(err.value)


def test_custom_spec_file_and_nodes(tmp_path):
    spec = json.loads(autopar.load_cluster("p3.16xlarge").model_dump_json())
    spec["name"] = "my-cluster"
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(spec))
    args = mlp.mlp_step_args(batch=128, hidden=1024, abstract=True)
    plan = autopar.plan(mlp.mlp_step, *args, cluster=str(path), nodes=2, mesh_shape=(2, 8))
    assert plan.cluster.name == "my-cluster" and plan.nodes == 2


def test_mesh_must_match_device_count():
    args = mlp.mlp_step_args(batch=128, hidden=1024, abstract=True)
    with pytest.raises(ValueError, match=r"mesh_shape=\(3, 2\) has 6 devices .* has 8"):
        autopar.plan(mlp.mlp_step, *args, cluster="cpu-8", mesh_shape=(3, 2))


def test_non_jittable_function_is_a_clear_error():
    def bad(x):
        if x.sum() > 0:  # Python control flow on a traced value
            return x
        return -x
    with pytest.raises(autopar.TraceError, match="jittable"):
        autopar.plan(bad, jnp.ones(8))
    with pytest.raises(autopar.TraceError, match="callable"):
        autopar.plan("not a function", jnp.ones(8))


def test_applying_a_plan_to_other_shapes_is_a_clear_error(mlp_plan, devices8):
    plan, _ = mlp_plan
    with pytest.raises(autopar.PlanMismatchError, match="Re-plan") as err:
        plan.apply(mlp.mlp_step)(*mlp.mlp_step_args(batch=64, hidden=1024))
    # the leaves that differ, planned next to given, with dtypes
    assert re.search(r"\[1\] +planned \(128, 1024\) float32 +given \(64, 1024\) float32", str(err.value)), err.value
    assert "[0][0]['w']" not in str(err.value)  # same shape: not listed
    with pytest.raises(autopar.PlanMismatchError, match="traces to another program"):
        plan.apply(lambda p, x, y: mlp.mlp_step(p, x * 2, y))(*mlp.mlp_step_args(batch=128, hidden=1024))


def test_bad_arguments_are_clear_errors():
    args = mlp.mlp_step_args(batch=128, hidden=1024, abstract=True)
    with pytest.raises(ValueError, match="unknown solver"):
        autopar.plan(mlp.mlp_step, *args, solver="gurobi")
    with pytest.raises(ValueError, match="nodes must be a positive int"):
        autopar.plan(mlp.mlp_step, *args, nodes=0)
    with pytest.raises(ValueError, match="donate_argnums"):
        autopar.plan(mlp.mlp_step, *args, donate_argnums=(5,))


def test_solvers_are_selectable_and_agree():
    args = mlp.mlp_step_args(batch=128, hidden=1024, abstract=True)
    plans = {s: autopar.plan(mlp.mlp_step, *args, cluster="cpu-8", mesh_shape=(8,), solver=s)
             for s in ("highs", "cbc", "auto", "heuristic")}
    best = plans["highs"].solver.objective_s
    assert plans["cbc"].solver.objective_s == pytest.approx(best, rel=1e-6)
    assert plans["auto"].solver.objective_s == pytest.approx(best, rel=1e-3)
    assert plans["heuristic"].solver.objective_s >= best * (1 - 1e-9)
    assert {p.solver.solver for p in plans.values()} >= {"highs", "cbc"}


def test_time_limit_returns_incumbent_with_bound_and_gap():
    args = mlp.mlp_step_args(batch=128, hidden=1024, abstract=True)
    plan = autopar.plan(mlp.mlp_step, *args, cluster="cpu-8", mesh_shape=(2, 4), solver="highs", time_limit_s=5)
    s = plan.solver
    assert s.status in ("optimal", "feasible") and s.lower_bound_s is not None and s.gap is not None
    assert s.lower_bound_s <= s.objective_s * (1 + 1e-9)


def test_plan_needing_more_devices_than_visible_is_a_clear_error(devices8):
    args = mlp.mlp_step_args(batch=128, hidden=1024, abstract=True)
    plan = autopar.plan(mlp.mlp_step, *args, cluster="cpu-8", nodes=2, mesh_shape=(16,))
    with pytest.raises(autopar.MeshError, match="needs 16 devices .* JAX sees 8"):
        plan.apply(mlp.mlp_step)


def test_literal_and_passthrough_outputs(devices8):
    def fn(x, n):
        return x @ x.T + n, 3.0, x
    args = (jnp.ones((16, 64)), jnp.int32(2))
    plan = autopar.plan(fn, *args, cluster="cpu-8")
    for a, b in zip(jax.tree_util.tree_leaves(plan.apply(fn)(*args)), jax.tree_util.tree_leaves(jax.jit(fn)(*args))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_hlo_group_sizes_of_every_replica_group_form():
    from autopar.validate import _group_size
    assert _group_size("all-reduce(x), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=add") == 4
    assert _group_size("all-gather(x), replica_groups=[2,4]<=[8], dimensions={0}") == 4
    assert _group_size("reduce-scatter(x), replica_groups=mesh['x'=2,'y'=4] {'y'}, dimensions={0}") == 4
    assert _group_size("reduce-scatter(x), replica_groups=mesh['x'=2,'y'=4] device_ids=(0,1,2,3,4,5,6,7) "
                       "{'x','y'}, dimensions={0}") == 8
    assert _group_size("collective-permute(x), source_target_pairs={{0,1},{1,0}}") == 2
