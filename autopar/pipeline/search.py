"""The stage search of ``autopar.plan_training``: stage costs (every (layer range, sub-mesh)
planned exactly, the given stages only, or single layers summed — ``autopar.pipeline.additive``)
→ the stage DP (``solvers.stage_dp``) → the chosen stages planned whole.

``costing="exact"`` plans every (range, sub-mesh) pair; ``"additive"`` plans single layers only
and sums them over a range (boundary reshards between layers inside a stage are then not
counted; the chosen stages are re-planned exactly, ``autopar.pipeline.refine``). Each range
gets a second cost variant from its layers planned within half their share of the budget
(parameters sharded harder); the stage DP uses it where a stage fits only that way at its
position.
"""
from __future__ import annotations

import math

from autopar.solvers.schedules import Schedule
from autopar.solvers.stage_dp import StageInfeasibleError, StageProblem, StageSolution, solve_stages

from ..planner import PlanError
from ..progress import Progress
from .additive import AdditiveCosts
from .costs import ChosenStage, CostArrays, StageCost, Sums, entry
from .inputs import ForcedStage, TrainingInputs, nbytes


def stage_problem(inputs: TrainingInputs, num_layers: int, costs: CostArrays) -> StageProblem:
    return StageProblem(num_layers=num_layers, num_nodes=inputs.nodes, devices_per_node=inputs.spec.devices_per_node,
                        latency=costs.latency, memory=costs.memory, activation=costs.activation,
                        num_microbatches=inputs.num_microbatches, device_memory=inputs.budget,
                        schedule=inputs.schedule)


def run_stage_dp(inputs: TrainingInputs, num_layers: int, costs: CostArrays, *, min_need: float = math.inf,
                 num_stages: int | None = None, forced: list[ForcedStage] | None = None,
                 name: str = "") -> StageSolution:
    """``solvers.stage_dp.solve_stages`` with its failures as :class:`PlanError`s that say
    what to change (``min_need``: the least memory a stage plan reported needing)."""
    name = name or inputs.name
    try:
        return solve_stages(stage_problem(inputs, num_layers, costs), num_stages=num_stages,
                            forced=None if forced is None else [(f.start, f.end, f.submesh) for f in forced])
    except StageInfeasibleError as err:
        need = min(err.min_device_memory, min_need)
        raise PlanError(
            f"no pipeline plan of {name} fits memory_budget_bytes={inputs.budget:.0f} per device on {inputs.nodes} "
            f"node(s) × {inputs.spec.devices_per_node}" + (
                f"; the smallest budget that fits is {need:.0f} bytes per device" if math.isfinite(need) else "") +
            ". Raise the budget, add nodes, use more micro-batches, or shrink the model/batch.",
            min_bytes_per_device=need if math.isfinite(need) else None) from err
    except ValueError as err:
        raise PlanError(f"cannot plan stages for {name}: {err}") from err


def exact_costs(coster, num_layers: int, shapes, progress: Progress) -> CostArrays:
    """Every (layer range, sub-mesh) planned whole."""
    costs = CostArrays.empty(num_layers, len(shapes))
    progress.phase("plan stage candidates (layer range × sub-mesh)", total=num_layers * (num_layers + 1) // 2 * len(shapes))
    for i in range(num_layers):
        for j in range(i + 1, num_layers + 1):
            for s, sub in enumerate(shapes):
                costs.set(i, j, s, entry(coster.cost(i, j, sub)))
    return costs


def forced_costs(coster, num_layers: int, shapes, forced: list[ForcedStage], progress: Progress, *,
                 additive: bool = False) -> CostArrays:
    """Only the given stages: planned whole, or (``additive``) estimated layer by layer as the
    additive search does."""
    costs = CostArrays.empty(num_layers, len(shapes))
    progress.phase("plan the given stages", total=sum(f.end - f.start if additive else 1 for f in forced))
    for f in forced:
        s = list(shapes).index(f.submesh)
        if additive:
            run, value = Sums(), None
            for i in range(f.start, f.end):
                value = run.add(coster.cost(i, i + 1, f.submesh, f.mesh, share=f.end - f.start))
            costs.set(f.start, f.end, s, value)
        else:
            costs.set(f.start, f.end, s, entry(coster.cost(f.start, f.end, f.submesh, f.mesh)))
    return costs


def additive_search(coster, inputs: TrainingInputs, num_layers: int, progress: Progress, *,
                    num_stages: int | None = None, name: str = "") -> tuple[AdditiveCosts, StageSolution]:
    """Stage costs from single-layer plans in two variants (``autopar.pipeline.additive``),
    then the stage DP; where its solution relies on a placeholder of the lean variant, that
    sub-mesh's layers are planned lean and the DP re-run."""
    pbytes = [sum(nbytes(inputs.p_leaves[q]) for q in coster.stage(i, i + 1)[0].params) * (2.0 + inputs.opt_ratio)
              for i in range(num_layers)]
    progress.phase("plan layers one by one (additive costing)", total=num_layers * len(inputs.shapes))
    costs = AdditiveCosts(coster, num_layers, inputs.shapes, inputs.nodes * inputs.spec.devices_per_node, pbytes)
    while True:
        sol = run_stage_dp(inputs, num_layers, costs.arrays, min_need=coster.min_need, num_stages=num_stages,
                           name=name)
        lower = costs.placeholders(sol)
        if not lower:
            return costs, sol
        costs.resolve(lower)


def plan_stage(coster, inputs: TrainingInputs, a: int, b: int, sub, mesh, remaining: int) -> StageCost:
    """Stage [a, b) planned whole. The ILP's peak counts one micro-batch of activations; when
    the stage's other in-flight micro-batches then overflow the budget, plan it again within
    the budget less their activations."""
    c = coster.cost(a, b, sub, mesh)
    extra = (Schedule(inputs.schedule).inflight(remaining, inputs.num_microbatches) - 1) * c.act
    if c.fits and c.static + c.act + extra > inputs.budget >= extra:
        again = coster.cost_within(a, b, sub, mesh, inputs.budget - extra)
        if again.fits:
            return again
    return c


def plan_stages(coster, inputs: TrainingInputs, stages, mesh_of) -> list[ChosenStage]:
    """Each stage (a, b, sub) planned whole; ``mesh_of(a, b, sub)`` is a logical mesh, None
    (every ``stage_meshes``) or a list of meshes tried one by one (the fastest that fits
    with its in-flight micro-batches wins)."""
    S, out = len(stages), []
    for k, (a, b, sub) in enumerate(stages):
        meshes = mesh_of(a, b, sub)
        if not isinstance(meshes, list):
            out.append(ChosenStage(a, b, tuple(sub), plan_stage(coster, inputs, a, b, sub, meshes, S - k)))
            continue
        inflight = Schedule(inputs.schedule).inflight(S - k, inputs.num_microbatches)
        tries = [plan_stage(coster, inputs, a, b, sub, m, S - k) for m in meshes]
        fit = [c for c in tries if c.fits and c.memory(inflight) <= inputs.budget]
        out.append(ChosenStage(a, b, tuple(sub), min(fit or tries, key=lambda c: c.latency)))
    return out


def solution_stages(sol: StageSolution) -> list[tuple[int, int, tuple[int, int]]]:
    """The stage DP's stages as (start, end, sub-mesh)."""
    return [(a, b, tuple(sub)) for a, b, _, sub, _ in sol.stages]


def estimate_forced(coster, inputs: TrainingInputs, num_layers: int, forced: list[ForcedStage], progress: Progress,
                    name: str = "") -> StageSolution:
    """The given stages' step estimated from single-layer plans (as the additive search does)."""
    costs = forced_costs(coster, num_layers, inputs.shapes, forced, progress, additive=True)
    return run_stage_dp(inputs, num_layers, costs, min_need=coster.min_need, forced=forced, name=name)
