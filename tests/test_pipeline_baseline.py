"""The Megatron DP×TP×PP baseline (autopar.baselines.dp_tp_pp): grid, rules, execution, errors."""
import numpy as np
import optax
import pytest
from conftest import assert_step_equals_single_device, make_cluster

import autopar
from autopar import PlanError, TrainingPlan
from autopar.baselines import dp_tp_pp, pipeline_grid, uniform_stages
from examples import gpt


def test_grid_and_uniform_stages():
    # 2 nodes × 4, micro-batch 4: pp ∈ {1, 2, 4, 8}; tp divides a node; dp divides the micro-batch
    grid = pipeline_grid(num_layers=4, nodes=2, devices_per_node=4, microbatch_size=4)
    assert (1, (2, 4), (2, 4)) in grid and (2, (1, 4), (4, 1)) in grid and (4, (1, 2), (1, 2)) in grid
    assert all(pp * dp * tp == 8 and tp <= 4 and 4 % dp == 0 for pp, _, (dp, tp) in grid)
    assert not any(pp == 8 for pp, _, _ in grid)          # more stages than layers
    assert (1, (2, 4), (8, 1)) not in grid                  # dp = 8 does not divide the micro-batch of 4
    assert uniform_stages(4, 2) == [(0, 2), (2, 4)]
    assert uniform_stages(7, 3) == [(0, 2), (2, 5), (5, 7)]


@pytest.fixture(scope="module")
def gpt_case(devices8):
    params, batch = gpt.params_and_batch(layers=4, hidden=32, seq=16, vocab=64, batch=16)
    opt = optax.sgd(0.1, momentum=0.9)
    kw = dict(optimizer=opt, cluster=make_cluster(4), nodes=2, num_microbatches=2)
    base = dp_tp_pp(gpt.loss_fn, params, batch, **kw)
    ours = autopar.plan_training(gpt.loss_fn, params, batch, **kw)
    return params, batch, opt, base, ours


def test_baseline_is_a_uniform_grid_point_under_the_dp_tp_rule(gpt_case):
    params, batch, _, base, _ = gpt_case
    assert isinstance(base, TrainingPlan) and base.strategy_name == "dp_tp_pp"
    assert base.report().startswith("baseline dp_tp_pp training plan")
    pp = base.num_stages
    assert [s.layers for s in base.stages] == [list(r) for r in uniform_stages(4, pp)]
    assert len({tuple(s.submesh) for s in base.stages}) == 1 and len({tuple(s.plan.mesh_shape) for s in base.stages}) == 1
    assert pp * np.prod(base.stages[0].submesh) == 8
    # every grid point was costed; the returned one is the fastest refined one
    grid = base.baseline_grid
    assert len(grid) == len(pipeline_grid(4, 2, 4, 8))
    refined = [g for g in grid if g.step_s is not None]
    assert refined and min(g.step_s for g in refined) == pytest.approx(base.predicted.step_time_s)
    names = base.stages[0].plan.axis_names
    for st in base.stages:
        dp_ax, tp_ax = st.plan.axis_names
        for spec in st.plan.input_specs_flat[:len(st.params)]:   # params: never split over the data axis
            assert not any(dp_ax in axes for axes in spec)
        for spec in st.plan.input_specs_flat[len(st.params):]:   # activations/batch: dim 0 over x, no tp split
            assert not any(tp_ax in axes for axes in spec)
            assert all(not axes for axes in spec[1:])
    assert names


def test_baseline_runs_and_equals_the_single_device_step(gpt_case):
    params, batch, opt, base, _ = gpt_case
    assert_step_equals_single_device(gpt.loss_fn, params, batch, opt, base)


def test_autopar_is_not_slower_than_the_grid(gpt_case):
    *_, base, ours = gpt_case
    assert ours.predicted.step_time_s <= base.predicted.step_time_s * (1 + 1e-6)


def test_json_round_trip_keeps_the_grid(gpt_case):
    *_, base, _ = gpt_case
    back = TrainingPlan.model_validate_json(base.model_dump_json())
    assert back == base and back.strategy_name == "dp_tp_pp" and back.baseline_grid == base.baseline_grid


def test_errors(devices8):
    params, batch = gpt.params_and_batch(layers=2, hidden=32, seq=16, vocab=64, batch=8)
    kw = dict(optimizer=optax.sgd(0.1), cluster=make_cluster(4), nodes=2, num_microbatches=2)
    with pytest.raises(ValueError, match="grid point"):
        dp_tp_pp(gpt.loss_fn, params, batch, grid=[(2, (1, 2), (1, 2))], **kw)   # 2 stages × 2 devices ≠ 8
    with pytest.raises(PlanError, match="Megatron DP×TP×PP .*smallest"):
        dp_tp_pp(gpt.loss_fn, params, batch, memory_budget_bytes=1e4, **kw)


def test_autopar_refines_its_split_and_equal_splits_exactly(gpt_case):
    # 4 layers × 4 sub-meshes > 24 pairs: additive costing, then the stage DP's split and the
    # best equal splits are planned exactly; the plan is the fastest of them that fits
    *_, base, ours = gpt_case
    refined = ours.search.refined
    assert ours.search.costing == "additive" and refined[0].source == "stage DP"
    assert all(r.source.startswith("equal stages ×") for r in refined[1:])
    chosen = [r for r in refined if r.chosen]
    assert len(chosen) == 1 and chosen[0].fits
    assert chosen[0].step_s == pytest.approx(ours.predicted.step_time_s)
    assert all(r.step_s >= chosen[0].step_s for r in refined if r.fits)
    assert "exactly planned splits" in ours.report()
    back = TrainingPlan.model_validate_json(ours.model_dump_json())
    assert back.search.refined == refined


def test_strong_baseline_takes_recompute_or_zero_when_memory_forces_it(devices8):
    # Megatron's practice on top of the grid: recompute none/dots/full × distributed optimizer
    # × micro-batch counts. One block per stage on dp=4 (parameters replicated over it), Adam.
    from test_pipeline_remat import loss_fn, params_and_batch
    from test_pipeline_zero import OPT
    params, batch = params_and_batch(layers=2, d=128, seq=16, batch=32)
    kw = dict(optimizer=OPT, cluster=make_cluster(4), nodes=2, num_microbatches=2, schedule="gpipe",
              grid=[(2, (1, 4), (4, 1))], memory_budget_bytes=3.6e6)
    # measured: the plain point needs 4.16 MB per device; ZeRO-1 3.38 MB, selective recompute fits too
    with pytest.raises(PlanError, match="Megatron DP×TP×PP"):
        dp_tp_pp(loss_fn, params, batch, remat=("none",), zero=(False,), **kw)
    base = dp_tp_pp(loss_fn, params, batch, microbatches=(1, 2), **kw)
    rows = {(g.num_microbatches, g.remat, g.zero): g for g in base.baseline_grid}
    assert set(rows) == {(b, r, z) for b in (1, 2) for r in ("none", "dots", "full") for z in (False, True)}
    assert rows[2, "none", False].error and rows[1, "none", False].error and rows[2, "dots", False].estimate_s
    refined = [g for g in base.baseline_grid if g.step_s is not None]
    best = min(refined, key=lambda g: g.step_s)
    assert best.step_s == pytest.approx(base.predicted.step_time_s) and base.num_microbatches == best.num_microbatches
    assert (best.remat, best.zero) != ("none", False)
    assert all((s.remat, s.zero) == (best.remat, best.zero) for s in base.stages)   # uniform, as Megatron
    assert all(s.memory_bytes_per_device <= 3.6e6 for s in base.stages)
    back = TrainingPlan.model_validate_json(base.model_dump_json())
    assert back.baseline_grid == base.baseline_grid
    # it runs: one step equals the single-device step
    from test_pipeline import assert_tree_close, reference_step
    state = OPT.init(params)
    want = reference_step(loss_fn, OPT)(params, state, batch)
    assert_tree_close(base.apply(donate=False)(params, state, batch), want)


def test_baseline_options_are_checked(devices8):
    params, batch = gpt.params_and_batch(layers=2, hidden=32, seq=16, vocab=64, batch=8)
    kw = dict(optimizer=optax.sgd(0.1), cluster=make_cluster(4), nodes=2, num_microbatches=2)
    with pytest.raises(ValueError, match="remat must be"):
        dp_tp_pp(gpt.loss_fn, params, batch, remat=("selective",), **kw)
    with pytest.raises(ValueError, match="microbatches must be"):
        dp_tp_pp(gpt.loss_fn, params, batch, microbatches=(0,), **kw)


def test_step_lower_bound_is_below_every_plan_and_scales_with_the_devices(gpt_case):
    """autopar.step_lower_bound: the micro-batch's compute on one device × micro-batches /
    devices; neither planner's predicted step is below it."""
    params, batch, _, base, ours = gpt_case
    kw = dict(cluster=make_cluster(4), num_microbatches=2)
    bound = autopar.step_lower_bound(gpt.loss_fn, params, batch, nodes=2, **kw)
    assert 0 < bound <= ours.predicted.step_time_s and bound <= base.predicted.step_time_s
    # every stage's compute (collectives left out) is at least its share of the bound
    compute = sum(s.plan.predicted.compute_s * np.prod(s.submesh) for s in ours.stages) * ours.num_microbatches
    assert compute >= bound * 8 * (1 - 1e-9)
    assert autopar.step_lower_bound(gpt.loss_fn, params, batch, nodes=1, **kw) == pytest.approx(2 * bound)
    # the fewest micro-batches asked for (the largest, nearest peak) make the bound
    assert autopar.step_lower_bound(gpt.loss_fn, params, batch, nodes=2, cluster=make_cluster(4),
                                    num_microbatches=(4, 2)) == pytest.approx(bound)
    assert autopar.step_lower_bound(gpt.loss_fn, params, batch, nodes=2, cluster=make_cluster(4),
                                    num_microbatches=4) >= bound * (1 - 1e-9)
    with pytest.raises(ValueError, match="nodes must be a positive int"):
        autopar.step_lower_bound(gpt.loss_fn, params, batch, nodes=0, **kw)
