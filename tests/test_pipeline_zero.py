"""Optimizer-state sharding (ZeRO-1) as a decision of the pipeline stage search
(``autopar.pipeline.zero``): two stages that do not fit without it get it where needed, the
plan runs equal to the single-device Adam step with the optimizer state really split; with
ample memory it is neither chosen nor planned; its per-step all-gather is in the predicted
step, at the time ``autopar.cost`` gives it."""
import numpy as np
import optax
import pytest

from autopar import PlanError, TrainingPlan, plan_training
from autopar.cost import ALL_GATHER, collective_time, mesh_model
from autopar.pipeline.zero import zero_spec
from conftest import make_cluster
from test_pipeline import assert_tree_close, reference_step
from test_pipeline_remat import loss_fn, params_and_batch

# Adam: two state bytes per parameter byte, so ZeRO-1 matters; eps ≫ float noise in the
# gradients (with eps=1e-8 summation-order noise on near-zero gradients turns into ±lr
# updates: measured 6 parameter elements off by up to 3.5e-6 after two steps, the same 6 with
# and without ZeRO-1)
OPT = optax.adam(1e-3, eps=1e-3)
# one block per stage, each on one node's 4 devices as a 1D mesh; 2 micro-batches in flight
STAGES = [(0, 1, (1, 4), (4,)), (1, 2, (1, 4), (4,))]
KW = dict(cluster=make_cluster(4), nodes=2, num_microbatches=2, schedule="gpipe", remat="none", stages=STAGES)
# measured: without ZeRO-1 stage 1 needs 4.30 MB per device (parameters replicated: the
# data-parallel layout), with it 3.51 MB (its Adam state 1.05 MB → 262 kB per device);
# stage 0 needs 3.05 MB either way (its parameters sharded)
BUDGET = 3.7e6


@pytest.fixture(scope="module")
def model():
    return params_and_batch(layers=2, d=128, seq=16, batch=32)


@pytest.fixture(scope="module")
def tight(model):
    return plan_training(loss_fn, *model, optimizer=OPT, memory_budget_bytes=BUDGET, **KW)


def test_zero1_is_chosen_where_memory_needs_it_and_runs_equal(devices8, model, tight):
    params, batch = model
    with pytest.raises(PlanError, match="smallest budget that fits is 4296330 "):
        plan_training(loss_fn, params, batch, optimizer=OPT, memory_budget_bytes=BUDGET, zero="none", **KW)
    assert [s.zero for s in tight.stages] == [False, True]
    assert all(s.memory_bytes_per_device <= BUDGET for s in tight.stages)
    s1 = tight.stages[1]
    # its Adam state: 2 × the replicated parameters' bytes (+ the step count's share), split 4 ways
    assert s1.optimizer_bytes_per_device == pytest.approx(2 * s1.param_bytes_per_device / 4, rel=1e-5)
    lines = tight.report().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("-----")) + 1   # the stage table's rows
    assert "zero 1: optimizer state" in tight.report() and [r.split()[-1] for r in lines[first:first + 2]] == ["-", "1"]
    loaded = TrainingPlan.from_json(tight.to_json())
    assert loaded == tight
    step, ref = loaded.apply(loss_fn, OPT, donate=False), reference_step(loss_fn, OPT)
    got = want = (params, OPT.init(params))
    for _ in range(2):
        got, want = step(*got[:2], batch), ref(*want[:2], batch)
        assert_tree_close(got, want)
    # the optimizer state of stage 1's parameters lives split 4 ways (1/4 of each leaf per
    # device), the parameters themselves as planned (replicated); stage 0's state as its params
    new_p, new_o, _ = got
    mu = new_o[0].mu
    for i, (p, m) in enumerate(zip(new_p, mu)):
        for name in ("fc", "proj"):
            shard = m[name].sharding.shard_shape(m[name].shape)
            if i == 1:
                assert np.prod(shard) * 4 == m[name].size and p[name].sharding.is_fully_replicated
                assert {d.id for d in m[name].sharding.device_set} == set(tight.stages[1].devices)
            else:
                assert shard == p[name].sharding.shard_shape(p[name].shape)


def test_the_per_step_all_gather_is_in_the_predicted_step(devices8, model):
    params, batch = model
    tp = plan_training(loss_fn, params, batch, optimizer=OPT, zero="1", **KW)
    plain = plan_training(loss_fn, params, batch, optimizer=OPT, zero="none", **KW)
    assert all(s.zero for s in tp.stages) and not any(s.zero for s in plain.stages)
    # the all-gather of each replicated leaf over the stage's mesh, as autopar.cost times it
    cluster = make_cluster(4)
    for s in tp.stages:
        sizes = dict(zip(s.plan.axis_names, s.plan.mesh_shape))
        mesh = mesh_model(cluster, 1, tuple(s.plan.mesh_shape))
        want = 0.0
        for i, spec in zip(s.params, s.plan.input_specs_flat):
            shape = tp.param_shapes[i]
            added = [a for axes in zero_spec(shape, spec, sizes) for a in axes if not any(a in x for x in spec)]
            if added:
                local = np.prod(shape) * 4 / np.prod([sizes[a] for axes in spec for a in axes])
                want += collective_time(mesh, ALL_GATHER, tuple(s.plan.axis_names.index(a) for a in added), local)
        assert s.gather_s == pytest.approx(want) and (want > 0) == any(not any(sp) for sp in s.plan.input_specs_flat)
    # GPipe: stage 0 runs the step's last backward, its all-gather ends the step
    timeline = tp.simulate()
    assert tp.predicted.zero_gather_s == pytest.approx(tp.stages[0].gather_s) and tp.stages[0].gather_s > 0
    assert tp.predicted.step_time_s == pytest.approx(timeline.makespan + tp.stages[0].gather_s)
    assert plain.predicted.zero_gather_s == 0.0
    assert tp.predicted.step_time_s > plain.predicted.step_time_s
    print("all-gather per step (s):", [s.gather_s for s in tp.stages], "step", tp.predicted.step_time_s,
          "vs", plain.predicted.step_time_s, "optimizer bytes/dev:",
          [(s.optimizer_bytes_per_device, p.optimizer_bytes_per_device) for s, p in zip(tp.stages, plain.stages)])


def test_ample_memory_chooses_no_zero_and_plans_none(model):
    # the whole search (exact costing): ZeRO-1 candidates enter the stage DP as placeholders
    # no faster than without it, so none is ever planned
    params, batch = model
    kw = dict(optimizer=OPT, cluster=make_cluster(4), num_microbatches=2, remat="none")
    auto, none = (plan_training(loss_fn, params, batch, zero=z, **kw) for z in ("auto", "none"))
    assert auto.search.costing == "exact" and not any(s.zero for s in auto.stages)
    assert auto.search.ilp_solves == none.search.ilp_solves
    assert auto.predicted == none.predicted


def test_zero_option_is_checked_and_old_plans_load_without_zero():
    import gzip
    from pathlib import Path
    params, batch = params_and_batch(layers=2)
    with pytest.raises(ValueError, match="zero must be"):
        plan_training(loss_fn, params, batch, optimizer=OPT, zero="3")
    old = TrainingPlan.from_json(gzip.decompress(
        (Path(__file__).parent / "data" / "training_plan_v1.json.gz").read_bytes()).decode())
    assert not any(s.zero or s.gather_s for s in old.stages) and old.predicted.zero_gather_s == 0.0
    assert "zero 1:" not in old.report()
