"""Plans saved before the pipeline package and the typed search records (commit 7661121:
refined splits and grid points were dicts) still load, and report as before."""
import gzip
from pathlib import Path

import autopar

DATA = Path(__file__).parent / "data"


def _saved(name: str) -> str:
    return gzip.decompress((DATA / f"{name}.json.gz").read_bytes()).decode()


def test_old_training_plan_loads_with_typed_refined_splits():
    tp = autopar.TrainingPlan.from_json(_saved("training_plan_v1"))
    assert tp.search.costing == "additive" and tp.search.refined
    assert sum(r.chosen for r in tp.search.refined) == 1 and tp.search.refined[0].source == "stage DP"
    assert tp.scan_split is None and "exactly planned splits" in tp.report()
    assert autopar.TrainingPlan.from_json(tp.to_json()) == tp


def test_old_baseline_grid_loads_as_grid_points():
    tp = autopar.TrainingPlan.from_json(_saved("dp_tp_pp_plan_v1"))
    grid = tp.baseline_grid
    assert grid and all(g.estimate_s is not None or g.error for g in grid)
    assert min(g.step_s for g in grid if g.step_s is not None) == tp.predicted.step_time_s


def test_old_intra_op_plan_loads():
    plan = autopar.Plan.from_json(_saved("mlp_plan_v1"))
    assert plan.mesh_shape and "mesh" in plan.report()
