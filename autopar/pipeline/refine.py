"""Refinement of the additive search (``autopar.pipeline.search``): additive costing only
estimates a stage, so the splits worth it are planned exactly and the fastest that fits
wins.

Each stage is planned on every logical mesh one of its layers chose in the cost variant the
estimate used (``AdditiveCosts.layer_meshes``: a stage of mixed layers may prefer another
mesh than its most expensive layer; one that then does not fit, or comes out more than
``GROSS_MISS`` times its estimate, also on the other logical meshes of its sub-mesh) with that variant's
stage option (remat, ZeRO-1), within the budget its in-flight micro-batches leave — first the stage DP's split, then up to ``REFINE_UNIFORM``
equal splits (``uniform_submeshes``) in order of estimate, each only when estimated within
``REFINE_MARGIN`` of the best exact step so far (placeholder costs are resolved first; a
skipped split's estimate may be a lower bound). The fastest simulated step among those that
fit is kept (the DP's split when none does).
"""
from __future__ import annotations

import math
import time

from autopar.solvers.schedules import Schedule
from autopar.solvers.stage_dp import StageSolution, solve_stages, uniform_stages, uniform_submeshes

from ..progress import Progress
from .additive import AdditiveCosts
from .costs import ChosenStage, chosen_step, stage_memory
from .inputs import TrainingInputs
from .search import plan_stage, plan_stages, prefetch_stages, solution_stages, stage_asks, stage_problem
from .stage_cost import stage_meshes
from .training_plan import RefinedSplit

# besides the stage DP's split, this many equal splits (the best by estimate) are planned
# exactly too, and the fastest exact one is kept
REFINE_UNIFORM = 2
# … but only those estimated within this fraction of the best exact step so far
REFINE_MARGIN = 0.05
# a stage planned at more than this many times its estimate is planned on the other logical
# meshes of its sub-mesh too (``_replan_unfit``)
GROSS_MISS = 2.0


def runs(parts) -> str:
    """``2×6L@1x8/2x4 1×3L@1x4/4``: runs of equal stage descriptions, counted."""
    out = []
    for p in parts:
        if out and out[-1][1] == p:
            out[-1][0] += 1
        else:
            out.append([1, p])
    return " ".join(f"{n}×{p}" for n, p in out)


def _describe(chosen: list[ChosenStage]) -> str:
    return runs(f"{c.end - c.start}L@{c.submesh[0]}x{c.submesh[1]}"
                + (f"/{'x'.join(map(str, c.cost.plan.mesh_shape))}" if c.cost.fits else "")
                + c.cost.option.label() for c in chosen)


def _equal_splits(inputs: TrainingInputs, num_layers: int, dp_split, num_stages: int | None):
    out = []
    for pp, sub in uniform_submeshes(num_layers, inputs.nodes, inputs.spec.devices_per_node):
        stages = [(a, b, sub) for a, b in uniform_stages(num_layers, pp)]
        if (num_stages is None or pp == num_stages) and stages != dp_split:
            out.append((f"equal stages ×{pp}", stages))
    return out


def planned(coster, inputs: TrainingInputs, costs, source: str, stages,
            est: StageSolution, virtual: int = 1) -> tuple[RefinedSplit, list[ChosenStage]]:
    """One split planned exactly, stage by stage, on the meshes its layers chose (``costs``
    without single-layer plans, ``ExactCosts``: on every mesh); ``virtual`` > 1: its stages
    interleaved on len(stages) / virtual device groups (``autopar.pipeline.interleave``)."""
    t0 = time.perf_counter()
    variant = _variants(est)
    chosen = plan_stages(coster, inputs, stages, *_asked(costs, variant))
    _replan_unfit(coster, inputs, chosen, costs, variant, {(a, b): t for a, b, _, _, t in est.stages})
    ok = all(c.cost.fits for c in chosen)
    B = inputs.num_microbatches
    step = chosen_step(chosen, inputs.schedule, B, virtual) if ok else math.inf
    peak = max(m for _, m in stage_memory(chosen, inputs.schedule, B, virtual)) if ok else math.inf
    split = RefinedSplit(source=source, estimate_s=est.objective_s, stages=_describe(chosen),
                         step_s=step if ok else None, peak_bytes=peak if ok else None,
                         fits=ok and peak <= inputs.budget * (1 + 1e-9), plan_s=time.perf_counter() - t0,
                         virtual=virtual)
    return split, chosen


def _variants(est: StageSolution) -> dict:
    """{(start, end): the cost variant} of each stage of a split estimated as ``est``."""
    return {(a, b): v for (a, b, *_), v in zip(est.stages, est.variants)}


def _asked(costs, variant: dict) -> tuple:
    """``plan_stages``'s ``mesh_of`` and ``option_of`` for a split whose stages use the cost
    variants ``variant`` (``_variants``): each stage on the meshes its layers chose in that
    variant (costs without single-layer plans: every mesh), with the variant's stage option."""
    if not hasattr(costs, "layer_meshes"):
        return (lambda a, b, sub: None), (lambda a, b, sub: costs.option(variant[a, b]))
    return (lambda a, b, sub: costs.layer_meshes(variant[a, b], a, b, sub),
            lambda a, b, sub: costs.option(variant[a, b]))


def _equal_estimates(inputs: TrainingInputs, num_layers: int, costs: AdditiveCosts, equal) -> list:
    """(estimate, index) of each equal split that fits by the estimate."""
    ests = []
    for k, (source, stages) in enumerate(equal):
        try:
            ests.append((solve_stages(stage_problem(inputs, num_layers, costs.arrays), forced=stages), k))
        except ValueError:  # does not fit even by the estimate (StageInfeasibleError)
            pass
    return ests


def _replan_unfit(coster, inputs: TrainingInputs, chosen: list[ChosenStage], costs: AdditiveCosts,
                  variant: dict, estimate: dict) -> None:
    """A stage whose exact plan on its layers' meshes does not fit (with the micro-batches it
    holds in flight), or comes out more than ``GROSS_MISS`` times its ``estimate`` {(start,
    end): seconds per micro-batch}, is planned again on the other logical meshes of its
    sub-mesh (``stage_meshes``; the meshes already tried are not solved again), the best that
    fits kept: a guard for when the meshes single layers prefer are wrong for the whole stage
    (MoE-27B on 2 p3.16xlarge nodes: 8 layers estimated at 35.67 s for the step, planned at
    4,558 s on the (16,) mesh, where two of its layers alone cost 0.40 s against 0.074 s on
    (2, 8)). A stage that fits but comes out more than ``REFINE_MARGIN`` above its estimate used to be
    replanned too; that never helped where measured — the case that prompted it (MoE-2.4B's
    16 layers on a p3.16xlarge node, 128 micro-batches, 57.5 s on the layers' (2, 4) against
    an estimate of 37.0 s, four jobs on 2 cores) planned 37.1 s on the same (2, 4) mesh,
    LP-optimal, under a lighter load: its stage LP, not the mesh, was at fault
    (``STAGE_LP_TIME_S``) —, and it cost GPT-175B on 1,024 GPUs 30–70 s of 3-layer stage ILPs
    on the (32,) mesh, none of them chosen."""
    S, sched = len(chosen), Schedule(inputs.schedule)
    if not hasattr(costs, "layer_meshes"):  # (exact costs: every mesh was tried)
        return
    for k, c in enumerate(chosen):
        inflight = sched.inflight(S - k, inputs.num_microbatches)
        fits = c.cost.fits and c.cost.memory(inflight) <= inputs.budget
        missed = fits and c.cost.dp_latency > GROSS_MISS * estimate.get((c.start, c.end), math.inf)
        if (c.start, c.end) not in variant or (fits and not missed):
            continue
        v = variant[c.start, c.end]
        tried = costs.layer_meshes(v, c.start, c.end, c.submesh)
        others = [] if tried is None else [m for m in stage_meshes(c.submesh, coster.mesh_search) if m not in tried]
        for mesh in others:
            again = plan_stage(coster, inputs, c.start, c.end, c.submesh, mesh, S - k, costs.option(v))
            best = chosen[k].cost
            if again.fits and again.memory(inflight) <= inputs.budget and (
                    not best.fits or best.memory(inflight) > inputs.budget or again.dp_latency < best.dp_latency):
                chosen[k] = ChosenStage(c.start, c.end, c.submesh, again)


def _speculate(coster, inputs: TrainingInputs, num_layers: int, costs: AdditiveCosts, sol: StageSolution,
               dp_split, equal) -> None:
    """With a worker pool: the stages of the equal split ``refine`` plans after the stage DP's
    — the best by estimate, when it relies on no placeholder and its estimate is within
    ``REFINE_MARGIN`` of the DP split's (``refine`` asks the same of the DP split's exact step,
    which is usually above its estimate: boundary reshards) — planned in the same pool round
    as the DP split's stages where no DP-split stage has their stage program and sub-mesh
    (``search.prefetch_stages``), the others after as before (GPT-175B on 1,024 H100s: the
    equal split's first stage, 2 s, planned beside the DP split's 22 s instead of after).
    Only the cache changes: which plans ``refine`` keeps does not; one it ends up skipping
    costs its stage plans (counted in ``search.ilp_solves``)."""
    if getattr(coster, "workers", 1) <= 1 or not equal:
        return
    ests = _equal_estimates(inputs, num_layers, costs, equal)
    if not ests:
        return
    est, k = min(ests, key=lambda e: (e[0].objective_s, e[1]))
    if costs.placeholders(est) or est.objective_s > sol.objective_s * (1 + REFINE_MARGIN):
        return
    prefetch_stages(coster, inputs, stage_asks(dp_split, *_asked(costs, _variants(sol))),
                    stage_asks(equal[k][1], *_asked(costs, _variants(est))))


def refine(coster, inputs: TrainingInputs, num_layers: int, costs: AdditiveCosts, sol: StageSolution,
           progress: Progress, num_stages: int | None = None) -> tuple[list[ChosenStage], list[RefinedSplit]]:
    """The splits worth it planned exactly (module docstring); returns the chosen split's
    stages and every split tried, the chosen one marked."""
    dp_split = solution_stages(sol)
    equal = _equal_splits(inputs, num_layers, dp_split, num_stages)
    refined: list[RefinedSplit] = []
    exact: list[list[ChosenStage] | None] = []
    stage_progress, coster.progress = coster.progress, Progress()  # count splits, not their stage ILPs
    progress.phase("plan splits exactly", total=1 + min(len(equal), REFINE_UNIFORM))

    def best_step() -> float:
        return min((r.step_s for r in refined if r.fits), default=math.inf)

    def plan(source, stages, est):
        if refined and est.objective_s > best_step() * (1 + REFINE_MARGIN):
            refined.append(RefinedSplit(source=source, estimate_s=est.objective_s, skipped=True,
                                        stages=runs(f"{b - a}L@{x}x{y}" for a, b, (x, y) in stages)))
            exact.append(None)
            return
        split, chosen = planned(coster, inputs, costs, source, stages, est)
        refined.append(split)
        exact.append(chosen)
        progress.advance(detail=source, incumbent_s=best_step() if math.isfinite(best_step()) else None)

    try:
        _speculate(coster, inputs, num_layers, costs, sol, dp_split, equal)
        plan("stage DP", dp_split, sol)
        while equal and len(refined) <= REFINE_UNIFORM:
            ests = _equal_estimates(inputs, num_layers, costs, equal)
            if not ests:
                break
            est, k = min(ests, key=lambda e: (e[0].objective_s, e[1]))
            lower = costs.placeholders(est)
            if lower and est.objective_s <= best_step() * (1 + REFINE_MARGIN):
                costs.resolve(lower)  # might be planned: estimate it for real first
                continue
            plan(*equal.pop(k), est)
    finally:
        coster.progress = stage_progress
    fitting = [k for k, r in enumerate(refined) if r.fits]
    best = min(fitting, key=lambda k: (refined[k].step_s, k)) if fitting else 0
    refined[best] = refined[best].model_copy(update={"chosen": True})
    return exact[best], refined
