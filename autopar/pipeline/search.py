"""The stage search of ``autopar.plan_training``: stage costs (every (layer range, sub-mesh)
planned exactly — ``autopar.pipeline.exact`` —, the given stages only, or single layers summed —
``autopar.pipeline.additive``) → the stage DP (``solvers.stage_dp``) → the chosen stages
planned whole. Every stage cost comes in one variant per stage option (``TrainingInputs.options``:
activation rematerialisation × ZeRO-1), the options after the first planned lazily: the DP is
re-run until its solution uses no placeholder (``solve_lazily``).

``costing="exact"`` plans every (range, sub-mesh) pair; ``"additive"`` plans single layers only
and sums them over a range (boundary reshards between layers inside a stage are then not
counted; the chosen stages are re-planned exactly, ``autopar.pipeline.refine``). Each range
gets a second cost variant from its layers planned within half their share of the budget
(parameters sharded harder); the stage DP uses it where a stage fits only that way at its
position. On several nodes, sub-meshes other than one whole node enter the additive search as lower bounds (each layer's
LP relaxation) and are planned only once a DP solution uses them (``additive.LAZY_SUBMESHES``;
same optimum, stated and tested there).
"""
from __future__ import annotations

import math

import numpy as np

from autopar.solvers.schedules import Schedule
from autopar.solvers.stage_dp import StageInfeasibleError, StageProblem, StageSolution, solve_stages

from ..planner import PlanError
from ..progress import Progress
from .additive import AdditiveCosts
from .costs import ChosenStage, CostArrays, StageCost, StageOption, Sums, entry
from .inputs import ForcedStage, TrainingInputs, resident_bytes
from .pool import run_tasks

# ``plan_stage`` plans a stage again for its micro-batches in flight at most this often
IN_FLIGHT_REPLANS = 3
# ``_task_work``: a layer the LP relaxation did not prove optimal weighs this many times its strategies
HARD_LAYER = 3.0
# … and a stage whose single-layer sums fill more than this share of the budget with its
# micro-batches in flight likely overflows planned whole (GPT-175B's 3-layer stages on (4, 8):
# sums of 83.2 and 83.7 of 85.9 GB with 17 and 20 in flight, both planned again)
SUMS_FIT = 0.9


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


def solve_lazily(coster, inputs: TrainingInputs, num_layers: int, costs, *, num_stages: int | None = None,
                 forced: list[ForcedStage] | None = None, name: str = "",
                 progress: Progress | None = None) -> StageSolution:
    """The stage DP on ``costs`` (``ExactCosts``, ``AdditiveCosts`` or ``ForcedCosts``),
    re-run after planning the placeholders its solution uses, until it uses none."""
    while True:
        sol = run_stage_dp(inputs, num_layers, costs.arrays, min_need=coster.min_need, num_stages=num_stages,
                           forced=forced, name=name)
        lower = costs.placeholders(sol)
        if not lower:
            return sol
        if progress is not None:
            # (counted per plan made, which one placeholder may need many of: no total)
            progress.phase(f"plan the candidates the stage DP relies on ({len(lower)} placeholder(s))")
        costs.resolve(lower)


class ForcedCosts:
    """Only the given stages, in every stage option (:class:`StageOption`): planned whole, or
    (``additive``) estimated layer by layer as the additive search does."""

    def __init__(self, coster, num_layers: int, shapes, forced: list[ForcedStage], progress: Progress,
                 options=(StageOption(),), *, additive: bool = False):
        self.options = tuple(options)
        arrays = [CostArrays.empty(num_layers, len(shapes)) for _ in self.options]
        progress.phase("plan the given stages", total=len(self.options) * sum(
            f.end - f.start if additive else 1 for f in forced))
        for f in forced:
            s = list(shapes).index(f.submesh)
            for costs, r in zip(arrays, self.options):
                if additive:
                    run, value = Sums(), None
                    for i in range(f.start, f.end):
                        value = run.add(coster.cost(i, i + 1, f.submesh, f.mesh, share=f.end - f.start, **r._asdict()))
                    costs.set(f.start, f.end, s, value)
                else:
                    costs.set(f.start, f.end, s, entry(coster.cost(f.start, f.end, f.submesh, f.mesh, **r._asdict())))
        self.arrays = arrays[0] if len(arrays) == 1 else CostArrays(
            *(np.stack([getattr(c, k) for c in arrays]) for k in ("latency", "memory", "activation")))

    def placeholders(self, sol) -> set:
        return set()

    def resolve(self, keys) -> None:
        """(Nothing is a placeholder.)"""

    def option(self, variant: int) -> StageOption:
        return self.options[variant]

    @property
    def candidates(self) -> int:
        lat = self.arrays.latency
        return int(np.isfinite(lat if lat.ndim == 3 else lat.min(axis=0)).sum())


def additive_search(coster, inputs: TrainingInputs, num_layers: int, progress: Progress, *,
                    num_stages: int | None = None, name: str = "") -> tuple[AdditiveCosts, StageSolution]:
    """Stage costs from single-layer plans in two variants (``autopar.pipeline.additive``),
    then the stage DP; where its solution relies on a placeholder of the lean variant, that
    sub-mesh's layers are planned lean and the DP re-run."""
    pbytes = [resident_bytes([inputs.p_leaves[q] for q in coster.stage(i, i + 1)[0].params], inputs.opt_ratio,
                             inputs.grad_accum) for i in range(num_layers)]
    progress.phase("plan layers one by one (additive costing)", total=num_layers * len(inputs.shapes))
    costs = AdditiveCosts(coster, num_layers, inputs.shapes, inputs.nodes * inputs.spec.devices_per_node, pbytes,
                          inputs.options)
    return costs, solve_lazily(coster, inputs, num_layers, costs, num_stages=num_stages, name=name, progress=progress)


def _inflight_request(inputs: TrainingInputs, c: StageCost, inflight: int, within: float | None = None) -> dict | None:
    """How ``plan_stage`` plans ``c``'s stage again for its ``inflight`` micro-batches
    (``StageCoster.cost`` keywords), None when ``c`` fits with them or nothing is left to try:
    their residuals held in the ILP (``inflight``) within the whole budget — or, when ``c``
    was such a plan (made within ``within`` bytes) and still overflows, within ``within`` less
    the overflow: a stage that cannot be cut in halves holds none (``StageCoster.holds``), and
    with ZeRO-1 the ILP reserves the least optimizer state, the plan keeps its own."""
    if not c.fits or c.memory(inflight) <= inputs.budget or inflight <= 1:
        return None
    if within is None:
        return dict(inflight=inflight)
    budget = within - (c.memory(inflight) - inputs.budget)
    return dict(inflight=inflight, budget=budget) if budget > 0 else None


def plan_stage(coster, inputs: TrainingInputs, a: int, b: int, sub, mesh, remaining: int,
               option: StageOption = StageOption()) -> StageCost:
    """Stage [a, b) planned whole with ``option`` (remat, ZeRO-1). The ILP's peak counts one
    micro-batch of activations; when the stage's other in-flight micro-batches then overflow
    the budget, plan it again with their residuals held all step in the ILP (so it weighs a
    layout's activations by the micro-batches in flight: measured on GPT-175B's 3-layer stages
    on 4 × 8 H100s with 17 in flight, a plan 9 % faster than the one planned within the budget
    less 16 micro-batches' activations, which left 16 GB unused) — and, should that plan still
    overflow, within less budget (at most ``IN_FLIGHT_REPLANS`` times). The first that fits
    with its in-flight micro-batches is returned; when none does, the one needing the least
    memory."""
    c = coster.cost(a, b, sub, mesh, **option._asdict())
    inflight = Schedule(inputs.schedule).inflight(remaining, inputs.num_microbatches)
    tries, within = [c], None
    for _ in range(IN_FLIGHT_REPLANS):
        request = _inflight_request(inputs, tries[-1], inflight, within)
        if request is None:
            break
        within = request.get("budget", inputs.budget)
        again = coster.cost(a, b, sub, mesh, **request, **option._asdict())
        if not again.fits:
            break
        tries.append(again)
    fit = [t for t in tries if t.fits and t.memory(inflight) <= inputs.budget]
    return fit[0] if fit else min(tries, key=lambda t: t.memory(inflight))


def _independent(items: list) -> list[list]:
    """One stage program's ``plan_stage`` arguments (stage order) as tasks that cannot serve one
    another: ZeRO-1 and plain stages apart when every ZeRO-1 one comes first (a plain plan may
    serve a later ZeRO-1 request, ``reuse.zero_of``; a ZeRO-1 plan never serves a plain one),
    else together."""
    zero = [k for k, it in enumerate(items) if it[5].zero]
    plain = [k for k, it in enumerate(items) if not it[5].zero]
    if zero and plain and max(zero) < min(plain):
        return [[items[k] for k in zero], [items[k] for k in plain]]
    return [items]


def _plans_new(coster, inputs: TrainingInputs, a: int, b: int, sub, mesh, remaining: int, option) -> bool:
    """Whether ``plan_stage`` with these arguments would make a plan not in the cache yet."""
    kw = option._asdict()
    key = coster.plan_key(a, b, sub, mesh, **kw)
    c = coster.cache.get(key) or coster.served(a, b, key)  # (not ``cost``: that counts a hit)
    if c is None:
        return True
    inflight = Schedule(inputs.schedule).inflight(remaining, inputs.num_microbatches)
    request = _inflight_request(inputs, c, inflight)
    return request is not None and not coster.is_cached(a, b, sub, mesh, **request, **kw)


def stage_asks(stages, mesh_of, option_of=None) -> list[tuple]:
    """(a, b, sub, meshes, option) of each stage (a, b, sub) of a split (``plan_stages``)."""
    return [(a, b, sub, mesh_of(a, b, sub), StageOption() if option_of is None else option_of(a, b, sub))
            for a, b, sub in stages]


def prefetch_stages(coster, inputs: TrainingInputs, asks, extra=()) -> None:
    """With a worker pool: the ``plan_stage`` requests of a split's ``stage_asks`` planned, one
    task per stage program and sub-mesh (``pool.run_tasks``), each in stage order — and those
    of another split's asks ``extra`` (planned after it) whose stage program and sub-mesh
    ``asks`` has not: they cannot serve one another, so they may go in any order (the ones
    that share a task would change its order: a plain plan may serve a ZeRO-1 request)."""
    if getattr(coster, "workers", 1) <= 1:
        return
    groups: dict = {}  # (stage program, sub-mesh) -> plan_stage arguments, in stage order
    for split in (asks, extra):
        if hasattr(coster, "stages_ahead"):  # (each split's stages cut in one pass; test doubles cut none)
            coster.stages_ahead([(a, b) for a, b, *_ in split])
        known, S = set(groups), len(split)
        for k, (a, b, sub, meshes, option) in enumerate(split):
            for m in (meshes if isinstance(meshes, list) else [meshes]):
                key = coster.plan_key(a, b, sub, m, **option._asdict())
                if key[:2] not in known:
                    groups.setdefault(key[:2], []).append((a, b, sub, m, S - k, option))
    tasks = [t for items in groups.values() for t in _independent(items)]
    run_tasks(coster, lambda c, items: [plan_stage(c, inputs, *it) for it in items],
              [t for t in tasks if any(_plans_new(coster, inputs, *it) for it in t)],
              size=lambda t: _task_work(coster, inputs, t))


def _task_work(coster, inputs: TrainingInputs, items) -> float:
    """The work a ``prefetch_stages`` task (one stage program's ``plan_stage`` arguments, in
    stage order: the first holds the most micro-batches in flight) likely takes, to hand the
    longest out first: its first stage's single-layer plans (whole budget, its option), each
    weighted by its strategies — ×1 where the LP relaxation proved it optimal, ×``HARD_LAYER``
    otherwise (the stage ILP then goes through the LP's support, the local search, the rule's
    start or the heuristic) — times the solves it likely needs: one when their sums
    (``costs.Sums``) fit its micro-batches in flight well (``SUMS_FIT``), else the plan and a
    replan for the micro-batches in flight of each stage, at most ``IN_FLIGHT_REPLANS``.
    Measured on GPT-175B on 1,024 H100s, the refinement's six tasks: a 3-layer stage whose layers
    the LP proved, 1.6 s (one solve); of unproven layers, 3.5 s a solve, 7.9 and 10.6 s for
    two and three; the LM-head stage, 7.6 s (one solve, the heuristic). Ordered by the number of
    stages, then by their layers' solve seconds, the LM-head stage started last and ended 6 s
    after the other worker's last task. 0 for a task whose layers are not all planned."""
    a, b, sub, _, remaining, option = items[0]
    inflight = Schedule(inputs.schedule).inflight(remaining, inputs.num_microbatches)
    run, work, sums = Sums(), 0.0, None
    for i in range(a, b):
        c = coster.cache.get(coster.plan_key(i, i + 1, sub, **option._asdict()))
        if c is None or c.plan is None:
            return 0.0
        sums = run.add(c)
        work += c.plan.solver.strategies * (1.0 if c.plan.solver.status == "optimal" else HARD_LAYER)
    _, static, act = sums
    fits = static + inflight * act <= SUMS_FIT * inputs.budget
    return work * (1 if fits else 1 + min(IN_FLIGHT_REPLANS, len(items)))


def plan_stages(coster, inputs: TrainingInputs, stages, mesh_of, option_of=None) -> list[ChosenStage]:
    """Each stage (a, b, sub) planned whole; ``mesh_of(a, b, sub)`` is a logical mesh, None
    (every ``stage_meshes``) or a list of meshes tried one by one (the fastest that fits
    with its in-flight micro-batches wins); ``option_of(a, b, sub)``: its
    :class:`StageOption` (default: no remat, no ZeRO-1). With a worker pool, the stages of
    one stage program and sub-mesh are one task (``pool.run_tasks``, the likely longest first:
    ``_task_work``): planned, and planned again for their micro-batches in flight (``plan_stage``), in
    stage order, in one worker that goes on without waiting for the other programs' plans
    (measured on GPT-175B on 1,024 H100s: a 3-layer program's whole-budget plan, then two
    replans for 17 and 16 in flight, 18.6 s in one worker, beside the LM-head stage's 12.7 s)."""
    S, out = len(stages), []
    asks = stage_asks(stages, mesh_of, option_of)
    prefetch_stages(coster, inputs, asks)
    for k, (a, b, sub, meshes, option) in enumerate(asks):
        if not isinstance(meshes, list):
            out.append(ChosenStage(a, b, tuple(sub), plan_stage(coster, inputs, a, b, sub, meshes, S - k, option)))
            continue
        inflight = Schedule(inputs.schedule).inflight(S - k, inputs.num_microbatches)
        tries = [plan_stage(coster, inputs, a, b, sub, m, S - k, option) for m in meshes]
        fit = [c for c in tries if c.fits and c.memory(inflight) <= inputs.budget]
        out.append(ChosenStage(a, b, tuple(sub), min(fit or tries, key=lambda c: c.dp_latency)))
    return out


def solution_stages(sol: StageSolution) -> list[tuple[int, int, tuple[int, int]]]:
    """The stage DP's stages as (start, end, sub-mesh)."""
    return [(a, b, tuple(sub)) for a, b, _, sub, _ in sol.stages]


def solution_options(sol: StageSolution, costs) -> dict[tuple[int, int], StageOption]:
    """{(start, end): stage option} of the stage DP's stages (``costs.option`` of each variant)."""
    variants = sol.variants or (0,) * len(sol.stages)
    return {(a, b): costs.option(v) for (a, b, *_), v in zip(sol.stages, variants)}


def estimate_forced(coster, inputs: TrainingInputs, num_layers: int, forced: list[ForcedStage], progress: Progress,
                    name: str = "", options=None, virtual: int = 1) -> StageSolution:
    """The given stages' step estimated from single-layer plans (as the additive search does),
    each stage with the fastest fitting of ``options`` (default ``inputs.options``);
    ``virtual`` > 1: the stages are chunks interleaved on len(forced) / virtual device groups
    (``interleave.estimate``; a PlanError when a group fits in no option)."""
    costs = ForcedCosts(coster, num_layers, inputs.shapes, forced, progress, options or inputs.options,
                        additive=True)
    if virtual > 1:
        from .interleave import estimate
        est = estimate(inputs, costs.arrays, [(f.start, f.end, tuple(f.submesh)) for f in forced], virtual)
        if est is None:
            raise PlanError(f"{name or inputs.name}: the interleaved stages do not fit "
                            f"memory_budget_bytes={inputs.budget:.0f} per device by estimate")
        return est
    return run_stage_dp(inputs, num_layers, costs.arrays, min_need=coster.min_need, forced=forced, name=name)
