"""``autopar.plan_training``: pipeline stages (inter-op) × sharding inside each stage (intra-op).

Data flow::

    loss_fn(params, micro-batch) ─trace→ Program ─cluster_layers→ L layers
        for each layer range [i, j) and sub-mesh m (solvers.stage_dp.submesh_shapes):
            stage = equations of layers i..j−1 (autopar.stages)
            autopar.plan(stage forward+backward, sub-mesh m)  → latency t, memory
            (cached by the stage's structural key: identical layers are planned once)
        solvers.stage_dp.solve_stages  → stages (layer ranges, sub-meshes)
        → TrainingPlan (each stage keeps its intra-op Plan) → PipelineStep runs it

Costs per stage and micro-batch (seconds, bytes per device):

* t = the intra-op ILP's predicted time of the stage's forward + backward on its best
  logical mesh, plus the sends into the stage: 2·(α + bytes_in / (n_dev·bw)) for the
  activations coming in and their gradients going back (bw, α: the inter-node link when the
  cluster has several nodes, else the intra-node link). Forward/backward split 1 : 2.
* A = the stage's ``jax.vjp`` residuals (activations kept for the backward) / n_dev.
* W = the ILP's peak for one micro-batch − A, where the ILP charges every parameter
  (2 + r)× its bytes (itself, its gradient accumulator and optimizer state; r =
  optimizer-state bytes per parameter byte), so it shards parameters when memory binds.
  Summed over layers (additive costing): Σ parameter parts + max of the other parts.
* memory rule (1F1B): W + min(S − i, B)·A ≤ device memory for stage i of S (GPipe: B·A).

``costing="exact"`` plans every (range, sub-mesh) pair; ``"additive"`` plans single layers
only and sums them over a range (boundary reshards between layers inside a stage are then
not counted; the chosen stages are re-planned exactly). Each range gets a second cost
variant from its layers planned within half their share of the budget (parameters sharded
harder); the stage DP uses it where a stage fits only that way at its position
(``autopar.additive``). ``"auto"`` is exact while the number of
pairs is at most ``max_exact_pairs``. Inputs checked and traced: ``autopar.training_inputs``;
stage costing itself: ``autopar.stage_cost``.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from autopar.solvers.stage_dp import (StageInfeasibleError, StageProblem, solve_stages, submesh_shapes, uniform_stages,
                              uniform_submeshes)

from .additive import AdditiveCosts
from ..graph import build_graph
from .layers import cluster_layers
from ..plan_types import Timing
from ..planner import PlanError
from ..progress import Progress, progress_for
from ..pytree_json import treedef_to_json
from ..rules import stage_rules
from .stage_cost import StageCoster, Sums, nbytes, stage_meshes, structural_key, sub_cluster  # noqa: F401 (re-exported)
from .stages import split_program, owners
from .inputs import abstract, check_options, forced_stages, microbatch_shapes, trace_loss
from .training_plan import PredictedTraining, StagePlan, StageSearch, TrainingPlan

FWD_SHARE = 1.0 / 3.0   # forward : backward = 1 : 2 (matmul-dominated layers)
# additive costing: besides the stage DP's split, this many equal splits (the best by estimate)
# are planned exactly too, and the fastest exact one is kept
REFINE_UNIFORM = 2
# … but only those estimated within this fraction of the best exact step so far
REFINE_MARGIN = 0.05


def place_submeshes(shapes, num_nodes: int, devices_per_node: int) -> list[list[int]]:
    """Global device indices per stage: whole nodes for (k, M); an aligned block inside one
    node for (1, m) (buddy placement, larger sub-meshes first, so power-of-two tilings fit)."""
    free = [[True] * devices_per_node for _ in range(num_nodes)]
    out: list[list[int] | None] = [None] * len(shapes)
    for s in sorted(range(len(shapes)), key=lambda s: (-shapes[s][0] * shapes[s][1], s)):
        n, m = shapes[s]
        if m == devices_per_node:
            nodes = [k for k in range(num_nodes) if all(free[k])][:n]
            if len(nodes) < n:
                raise PlanError(f"cannot place sub-mesh {shapes[s]} on {num_nodes} nodes × {devices_per_node}")
            for k in nodes:
                free[k] = [False] * devices_per_node
            out[s] = [k * devices_per_node + d for k in nodes for d in range(devices_per_node)]
            continue
        placed = False
        for step in (m, 1):  # aligned first, then any contiguous block
            for k in range(num_nodes):
                for off in range(0, devices_per_node - m + 1, step):
                    if all(free[k][off:off + m]):
                        free[k][off:off + m] = [False] * m
                        out[s] = [k * devices_per_node + d for d in range(off, off + m)]
                        placed = True
                        break
                if placed:
                    break
            if placed:
                break
        if not placed:
            raise PlanError(f"cannot place sub-mesh {shapes[s]} on {num_nodes} nodes × {devices_per_node}")
    return out  # type: ignore[return-value]


class _Setup:
    """Everything ``plan_training`` derives before costing stages (shared with the pipeline baseline)."""

    progress: Progress = Progress()  # told of phases; plan_training gives its own (and to the coster)

    def __init__(self, loss_fn, params, batch, *, optimizer, cluster, nodes, num_microbatches, schedule,
                 memory_budget_bytes, costing, mesh_search, num_layers, stages):
        self.t0 = time.perf_counter()
        self.spec = spec = check_options(cluster, nodes, num_microbatches, schedule, optimizer, memory_budget_bytes,
                                  costing, mesh_search)
        self.loss_fn, self.optimizer, self.nodes, self.schedule = loss_fn, optimizer, nodes, schedule
        self.num_microbatches = num_microbatches
        self.name = getattr(loss_fn, "__name__", "loss_fn")
        self.budget = float(memory_budget_bytes or spec.device.memory_bytes)
        params_abs = jax.tree_util.tree_map(abstract, params)
        batch_abs = jax.tree_util.tree_map(abstract, batch)
        self.p_leaves, self.p_tree = jax.tree_util.tree_flatten(params_abs)
        self.b_leaves, self.b_tree = jax.tree_util.tree_flatten(batch_abs)
        bad = [jax.tree_util.keystr(k) for k, x in jax.tree_util.tree_flatten_with_path(params_abs)[0]
               if not jnp.issubdtype(x.dtype, jnp.floating)]
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise ValueError(f"every params leaf is trained and must be floating; got non-float leaves {bad[:5]}{more}. "
                             "Move integer data into the batch or close over it")
        self.microbatch = microbatch_shapes(batch_abs, num_microbatches)
        mb_leaves = jax.tree_util.tree_leaves(self.microbatch)
        self.microbatch_size = int(mb_leaves[0].shape[0]) if mb_leaves and mb_leaves[0].shape else 1
        self.program = trace_loss(loss_fn, params_abs, self.microbatch)
        self.P = len(self.p_leaves)
        try:
            opt_abs = jax.eval_shape(optimizer.init, params_abs)
        except Exception as err:
            raise ValueError(f"optimizer.init(params) failed: {type(err).__name__}: {err}") from err
        p_bytes = sum(nbytes(x) for x in self.p_leaves)
        o_bytes = sum(nbytes(x) for x in jax.tree_util.tree_leaves(opt_abs))
        self.opt_ratio = o_bytes / p_bytes if p_bytes else 0.0
        graph = build_graph(self.program)
        if stages is not None and num_layers is None:
            num_layers = max(int(tuple(s)[1]) for s in stages)
        self.layering = cluster_layers(graph, num_layers)
        off = len(self.program.invars) + len(self.program.consts)
        self.layer_eqns = [(a - off, b - off) for a, b in self.layering.layers]
        self.L = len(self.layer_eqns)
        self.shapes = submesh_shapes(nodes, spec.devices_per_node)
        self.t_trace = time.perf_counter()

    def coster(self, solver, time_limit_s, mesh_search="auto", restrict=None, strategy_name="autopar"):
        """A StageCoster; unrestricted (autopar's own), every stage ILP is warm-started from
        Megatron's DP × TP layout of the stage (``rules.stage_rules``), so a time-limited
        stage plan is never worse than the pipeline grid baseline's plan of it."""
        return StageCoster(self.program, self.P, self.layer_eqns, self.spec, self.nodes, self.budget,
                            self.opt_ratio, solver, time_limit_s, mesh_search, restrict=restrict,
                            strategy_name=strategy_name,
                            warm_start=stage_rules(self.microbatch_size) if restrict is None else None)

    def solve(self, coster, *, forced=None, num_stages=None, mode="exact", strategy_name="autopar",
              estimate_only=False):
        """Cost stages (``forced`` [(a, b, submesh, mesh|None)], or every range in ``mode``),
        run the stage DP and assemble the TrainingPlan. ``estimate_only``: return the stage
        DP's solution (``forced`` with ``mode="additive"``: summed single-layer costs)."""
        L, shapes, spec, nodes = self.L, self.shapes, self.spec, self.nodes
        lat = np.full((L, L + 1, len(shapes)), np.inf)
        mem, act = np.zeros_like(lat), np.zeros_like(lat)
        progress = self.progress
        if forced is not None:
            progress.phase("plan the given stages", total=sum(b - a if mode == "additive" else 1
                                                                for a, b, _, _ in forced))
            for a, b, sub, mesh in forced:
                s = shapes.index(sub)
                if mode == "additive":  # layer by layer (estimate), as the additive search does
                    run = Sums()
                    for i in range(a, b):
                        lat[a, b, s], mem[a, b, s], act[a, b, s] = run.add(coster.cost(i, i + 1, sub, mesh, share=b - a))
                    continue
                c = coster.cost(a, b, sub, mesh)
                lat[a, b, s], mem[a, b, s], act[a, b, s] = c["latency"], c["static"], c["act"]
        elif mode == "exact":
            progress.phase("plan stage candidates (layer range × sub-mesh)", total=L * (L + 1) // 2 * len(shapes))
            for i in range(L):
                for j in range(i + 1, L + 1):
                    for s, sub in enumerate(shapes):
                        c = coster.cost(i, j, sub)
                        lat[i, j, s], mem[i, j, s], act[i, j, s] = c["latency"], c["static"], c["act"]
        name = self.name if strategy_name == "autopar" else f"{self.name} (baseline {strategy_name})"
        costs = None
        if mode == "additive" and forced is None:
            costs, sol = self._additive(coster, num_stages, name)
        else:
            sol = self._stage_dp(coster, lat, mem, act, num_stages, forced, name)
        if estimate_only:
            return sol
        t_solve = time.perf_counter()
        progress.phase(f"stage DP: {len(sol.stages)} stage(s), estimated step {sol.objective_s:.4g} s")

        if costs is not None:  # additive: estimates → plan the DP's split and the best equal splits exactly
            chosen, refined = self._refine(coster, costs, sol, num_stages)
            return self._assemble(chosen, coster, sol.objective_s, t_solve, "additive", strategy_name,
                                  costs.candidates, refined)
        # the chosen stages, planned exactly (cached: the exact mode already planned them)
        mesh_of = {(a, b): mesh for a, b, _, mesh in forced} if forced is not None else {}
        stages = [(a, b, tuple(sub)) for a, b, _, sub, _ in sol.stages]
        chosen = self._exact_stages(coster, stages, lambda a, b, sub: mesh_of.get((a, b)))
        return self._assemble(chosen, coster, sol.objective_s, t_solve, "exact", strategy_name,
                              int(np.isfinite(lat).sum()))

    def _problem(self, lat, mem, act) -> StageProblem:
        return StageProblem(num_layers=self.L, num_nodes=self.nodes, devices_per_node=self.spec.devices_per_node,
                            latency=lat, memory=mem, activation=act, num_microbatches=self.num_microbatches,
                            device_memory=self.budget, schedule=self.schedule)

    def _exact_stages(self, coster, stages, mesh_of) -> list:
        """Each stage planned whole; ``mesh_of(a, b, sub)`` is a logical mesh, None (every
        ``stage_meshes``) or a list of meshes tried one by one (the fastest that fits wins)."""
        S, out = len(stages), []
        for k, (a, b, sub) in enumerate(stages):
            meshes = mesh_of(a, b, sub)
            if not isinstance(meshes, list):
                out.append((a, b, sub, self._exact(coster, a, b, sub, meshes, S - k)))
                continue
            inflight = self._inflight(S - k)
            tries = [self._exact(coster, a, b, sub, m, S - k) for m in meshes]
            fit = [c for c in tries if c["plan"] is not None and c["static"] + inflight * c["act"] <= self.budget]
            out.append((a, b, sub, min(fit or tries, key=lambda c: c["latency"])))
        return out

    def _refine(self, coster, costs, sol, num_stages):
        """Additive costing only estimates a stage (``autopar.additive``). Plan exactly — each
        stage on every logical mesh one of its layers chose in the cost variant the estimate
        used (``AdditiveCosts.layer_meshes``: a stage of mixed layers may prefer another mesh
        than its most expensive layer), within the budget its in-flight micro-batches leave —
        the stage DP's split, then up to ``REFINE_UNIFORM`` equal splits (``uniform_submeshes``)
        in order of estimate, each only when estimated within REFINE_MARGIN of the best exact
        step so far (placeholder costs are resolved first; a skipped split's estimate may be a
        lower bound). Keep the fastest simulated step among those that fit (the DP's split
        when none does)."""
        dp = [(a, b, tuple(sub)) for a, b, _, sub, _ in sol.stages]
        equal = []
        for pp, sub in uniform_submeshes(self.L, self.nodes, self.spec.devices_per_node):
            stages = [(a, b, sub) for a, b in uniform_stages(self.L, pp)]
            if (num_stages is None or pp == num_stages) and stages != dp:
                equal.append((f"equal stages ×{pp}", stages))
        refined, exact = [], []
        progress, coster.progress = self.progress, Progress()  # count splits, not their stage ILPs
        progress.phase("plan splits exactly", total=1 + min(len(equal), REFINE_UNIFORM))

        def best_step() -> float:
            return min((r["step_s"] for r in refined if r["fits"]), default=math.inf)  # fits: step_s set

        def plan(source, stages, est):
            if refined and est.objective_s > best_step() * (1 + REFINE_MARGIN):
                refined.append({"source": source, "stages": _runs(f"{b - a}L@{x}x{y}" for a, b, (x, y) in stages),
                                "estimate_s": est.objective_s, "step_s": None, "peak_bytes": None, "fits": False,
                                "chosen": False, "plan_s": 0.0, "skipped": True})
                exact.append(None)
                return
            t0 = time.perf_counter()
            variant = {(a, b): v for (a, b, *_), v in zip(est.stages, est.variants)}
            chosen = self._exact_stages(coster, stages, lambda a, b, sub: costs.layer_meshes(variant[a, b], a, b, sub))
            ok = all(c["plan"] is not None for *_, c in chosen)
            step = self._simulate(chosen).makespan if ok else math.inf
            peak = max(m for _, m in self._memory(chosen)) if ok else math.inf
            refined.append({"source": source, "estimate_s": est.objective_s, "chosen": False, "skipped": False,
                            "stages": _runs(f"{b - a}L@{sub[0]}x{sub[1]}/{'x'.join(map(str, c['plan'].mesh_shape))}"
                                            if c["plan"] is not None else f"{b - a}L@{sub[0]}x{sub[1]}"
                                            for a, b, sub, c in chosen),
                            "step_s": step if ok else None, "peak_bytes": peak if ok else None,
                            "fits": ok and peak <= self.budget * (1 + 1e-9), "plan_s": time.perf_counter() - t0})
            exact.append(chosen)
            progress.advance(detail=source, incumbent_s=best_step() if math.isfinite(best_step()) else None)

        plan("stage DP", dp, sol)
        while equal and len(refined) <= REFINE_UNIFORM:
            ests = []
            for k, (source, stages) in enumerate(equal):
                try:
                    ests.append((solve_stages(self._problem(costs.latency, costs.memory, costs.activation),
                                              forced=stages), k))
                except ValueError:  # does not fit even by the estimate (StageInfeasibleError)
                    pass
            if not ests:
                break
            est, k = min(ests, key=lambda e: (e[0].objective_s, e[1]))
            lower = costs.placeholders(est)
            if lower and est.objective_s <= best_step() * (1 + REFINE_MARGIN):
                costs.resolve(lower)  # might be planned: estimate it for real first
                continue
            plan(*equal.pop(k), est)
        coster.progress = progress
        fitting = [k for k, r in enumerate(refined) if r["fits"]]
        best = min(fitting, key=lambda k: (refined[k]["step_s"], k)) if fitting else 0
        refined[best]["chosen"] = True
        return exact[best], refined

    def _stage_dp(self, coster, lat, mem, act, num_stages, forced, name):
        spec, nodes = self.spec, self.nodes
        try:
            return solve_stages(self._problem(lat, mem, act), num_stages=num_stages,
                                forced=[(a, b, sub) for a, b, sub, _ in forced] if forced is not None else None)
        except StageInfeasibleError as err:
            need = min(err.min_device_memory, coster.min_need)
            raise PlanError(
                f"no pipeline plan of {name} fits memory_budget_bytes={self.budget:.0f} per device on {nodes} "
                f"node(s) × {spec.devices_per_node}" + (f"; the smallest budget that fits is {need:.0f} bytes per "
                                                         f"device" if math.isfinite(need) else "") +
                ". Raise the budget, add nodes, use more micro-batches, or shrink the model/batch.",
                min_bytes_per_device=need if math.isfinite(need) else None) from err
        except ValueError as err:
            raise PlanError(f"cannot plan stages for {name}: {err}") from err

    def _inflight(self, remaining: int) -> int:
        return min(remaining, self.num_microbatches) if self.schedule == "1f1b" else self.num_microbatches

    def _exact(self, coster, a, b, sub, mesh, remaining: int) -> dict:
        """Stage [a, b) planned whole. The ILP's peak counts one micro-batch of activations; when
        the stage's other in-flight micro-batches then overflow the budget, plan it again within
        the budget less their activations."""
        c = coster.cost(a, b, sub, mesh)
        extra = (self._inflight(remaining) - 1) * c["act"]
        if c["plan"] is not None and c["static"] + c["act"] + extra > self.budget >= extra:
            again = coster.cost_within(a, b, sub, mesh, self.budget - extra)
            if again["plan"] is not None:
                return again
        return c

    def _additive(self, coster, num_stages, name):
        """Stage costs from single-layer plans in two variants (``autopar.additive``), then
        the stage DP; where its solution relies on a placeholder of the lean variant, that
        sub-mesh's layers are planned lean and the DP re-run. Returns (costs, solution)."""
        pbytes = [sum(nbytes(self.p_leaves[q]) for q in coster.stage(i, i + 1)[0].params) * (2.0 + self.opt_ratio)
                  for i in range(self.L)]
        self.progress.phase("plan layers one by one (additive costing)", total=self.L * len(self.shapes))
        costs = AdditiveCosts(coster, self.L, self.shapes, self.nodes * self.spec.devices_per_node, pbytes)
        while True:
            sol = self._stage_dp(coster, costs.latency, costs.memory, costs.activation, num_stages, None, name)
            lower = costs.placeholders(sol)
            if not lower:
                return costs, sol
            costs.resolve(lower)

    def _memory(self, chosen) -> list[tuple[int, float]]:
        """(in-flight micro-batches, bytes per device) of each stage."""
        S = len(chosen)
        return [(self._inflight(S - k), c["static"] + self._inflight(S - k) * c["act"]) for k, (*_, c) in enumerate(chosen)]

    def _simulate(self, chosen):
        from .schedule import simulate, stage_orders
        t = [c["latency"] - c["send"] for *_, c in chosen]
        return simulate(stage_orders(len(chosen), self.num_microbatches, self.schedule), [x * FWD_SHARE for x in t],
                        [x * (1 - FWD_SHARE) for x in t], [c["send"] / 2 for *_, c in chosen[1:]])

    def _assemble(self, chosen, coster, objective_s, t_solve, mode, strategy_name, candidates,
                  refined=()) -> TrainingPlan:
        P, spec, nodes, B = self.P, self.spec, self.nodes, self.num_microbatches
        split = split_program(self.program, P, [(self.layer_eqns[a][0], self.layer_eqns[b - 1][1])
                                                for a, b, _, _ in chosen])
        own = owners(split, P)
        devices = place_submeshes([sub for _, _, sub, _ in chosen], nodes, spec.devices_per_node)
        stage_plans = []
        for k, ((a, b, sub, c), st, (inflight, memory)) in enumerate(zip(chosen, split, self._memory(chosen))):
            if c["plan"] is None:
                raise PlanError(f"stage {k} (layers {a}..{b - 1}) does not fit sub-mesh {sub}")
            t = c["latency"]
            stage_plans.append(StagePlan(
                index=k, layers=[a, b], eqns=list(st.eqns), submesh=list(sub), devices=devices[k], plan=c["plan"],
                latency_s=t, fwd_s=(t - c["send"]) * FWD_SHARE, bwd_s=(t - c["send"]) * (1 - FWD_SHARE),
                send_s=c["send"],
                params=list(st.params), owned_params=[p for p in range(P) if own[p] == k], batch=list(st.batch),
                param_bytes_per_device=c["param_dev"], activation_bytes_per_device=c["act"],
                inflight_microbatches=inflight, memory_bytes_per_device=memory))
        timeline = self._simulate(chosen)
        predicted = PredictedTraining(step_time_s=timeline.makespan, dp_objective_s=objective_s,
                                      bubble_fraction=timeline.bubble_fraction,
                                      peak_memory_bytes=max(s.memory_bytes_per_device for s in stage_plans))
        search = StageSearch(num_layers=self.L, layer_flops=list(self.layering.flops),
                             layer_eqns=[list(x) for x in self.layer_eqns],
                             layers_from_markers=self.layering.from_markers, candidates=candidates,
                             ilp_solves=coster.solves, cache_hits=coster.hits, infeasible=coster.infeasible,
                             costing=mode, refined=[dict(r) for r in refined])
        t_end = time.perf_counter()
        result = TrainingPlan(
            function=getattr(self.loss_fn, "__qualname__", self.name), fingerprint=self.program.fingerprint,
            cluster=spec, nodes=nodes, num_microbatches=B, schedule=self.schedule, memory_budget_bytes=self.budget,
            optimizer_state_ratio=self.opt_ratio, param_tree=treedef_to_json(self.p_tree),
            batch_tree=treedef_to_json(self.b_tree),
            param_shapes=[list(x.shape) for x in self.p_leaves], param_dtypes=[str(np.dtype(x.dtype)) for x in self.p_leaves],
            batch_shapes=[list(x.shape) for x in self.b_leaves], batch_dtypes=[str(np.dtype(x.dtype)) for x in self.b_leaves],
            stages=stage_plans, predicted=predicted, search=search, strategy_name=strategy_name,
            timing=Timing(trace_s=self.t_trace - self.t0, solve_s=t_solve - self.t_trace, total_s=t_end - self.t0))
        result._loss_fn, result._optimizer = self.loss_fn, self.optimizer
        return result


def _runs(parts) -> str:
    """``2×6L@1x8/2x4 1×3L@1x4/4``: runs of equal stage descriptions, counted."""
    runs = []
    for p in parts:
        if runs and runs[-1][1] == p:
            runs[-1][0] += 1
        else:
            runs.append([1, p])
    return " ".join(f"{n}×{p}" for n, p in runs)


def plan_training(loss_fn, params, batch, *, optimizer, cluster="cpu-8", nodes: int = 1,
                  num_microbatches: int = 1, schedule: str = "1f1b", num_stages: int | None = None,
                  stages=None, num_layers: int | None = None, memory_budget_bytes: float | None = None,
                  solver: str = "auto", time_limit_s: float | None = None, costing: str = "auto",
                  max_exact_pairs: int = 24, mesh_search: str = "auto", verbose=False) -> TrainingPlan:
    """Plan a training step of ``loss_fn(params, batch) -> scalar mean loss`` with ``optimizer``.

    ``mesh_search``: "auto" tries a few logical meshes per sub-mesh (``stage_meshes``),
    "full" every factorization.

    The batch is split into ``num_microbatches`` along axis 0; the forward is cut into
    ``num_layers`` layers (``autopar.stage_boundary`` markers, else the layer-clustering DP,
    default min(8, equations)); the stage DP picks stages and sub-meshes minimising
    Σ t_i + (B − 1)·max t_i, each stage sharded by the intra-op ILP. ``num_stages`` forces the
    stage count; ``stages=[(layer_start, layer_end, (nodes, devices)[, logical_mesh]), …]``
    fixes the whole split. One stage (pure intra-op + gradient accumulation) comes out of the
    same search when it is predicted fastest.

    Progress (phase, stage plans done of total, best step so far, elapsed) goes to the
    ``"autopar"`` logger at INFO; ``verbose=True`` prints it on stderr, a
    :class:`autopar.progress.Progress` receives it.
    """
    progress = progress_for(verbose)
    try:
        progress.phase("trace the loss and cut it into layers")
        setup = _Setup(loss_fn, params, batch, optimizer=optimizer, cluster=cluster, nodes=nodes,
                       num_microbatches=num_microbatches, schedule=schedule, memory_budget_bytes=memory_budget_bytes,
                       costing=costing, mesh_search=mesh_search, num_layers=num_layers, stages=stages)
        coster = setup.coster(solver, time_limit_s, mesh_search)
        setup.progress = coster.progress = progress
        forced = forced_stages(stages, setup.L, setup.shapes) if stages is not None else None
        pairs = setup.L * (setup.L + 1) // 2 * len(setup.shapes)
        mode = "exact" if forced is not None else (
            costing if costing != "auto" else ("exact" if pairs <= max_exact_pairs else "additive"))
        return setup.solve(coster, forced=forced, num_stages=num_stages, mode=mode)
    finally:
        if progress is not verbose:
            progress.close()


__all__ = ["plan_training", "microbatch_shapes", "place_submeshes", "stage_meshes", "structural_key", "sub_cluster"]
