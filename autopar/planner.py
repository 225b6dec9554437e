"""``autopar.plan``: trace → graph → strategies → ILP per candidate mesh → best Plan."""
from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from autopar import solvers
from autopar.cost import ALL_GATHER, ALL_REDUCE, ClusterSpec, collective_time, load_cluster, mesh_model, resharding
from autopar.solvers.relaxation import RelaxationCache

from .build import IntraProblem, build_problem
from .xla_view import combinable_nodes
from .build_edges import ReshardCache, gathers_combined, match_donations
from .carry import carried_pairs
from .emit import axis_names
from .graph import build_graph
from .plan_types import (CollectiveCost, EqnPlan, FallbackTotal, KindTotal, MeshCandidate, Plan, Predicted,
                   SolverStats, Timing)
from .progress import Progress, progress_for
from .pytree_json import treedef_to_json
from .trace import trace

SOLVERS = ("auto", "cbc", "highs", "heuristic", "brute")
MIP_GAP = 1e-3  # stop when proven within 0.1 % of the optimum (the report shows the gap)


class PlanError(ValueError):
    """No plan satisfies the request (e.g. the memory budget)."""

    def __init__(self, message: str, *, min_bytes_per_device: float | None = None):
        super().__init__(message)
        self.min_bytes_per_device = min_bytes_per_device


def candidate_meshes(num_devices: int) -> list[tuple[int, ...]]:
    """The 1D mesh and every 2D factorization a×b (a, b > 1)."""
    out = [(num_devices,)]
    out += [(a, num_devices // a) for a in range(2, num_devices) if num_devices % a == 0]
    return out


def _check_args(cluster, nodes, mesh_shape, solver, memory_budget_bytes, time_limit_s) -> ClusterSpec:
    spec = load_cluster(cluster)
    if not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes must be a positive int, got {nodes=}")
    total = nodes * spec.devices_per_node
    if mesh_shape is not None:
        shape = tuple(mesh_shape)
        if not shape or any(not isinstance(d, int) or d < 1 for d in shape) or len(shape) > 2:
            raise ValueError(f"mesh_shape must be 1 or 2 positive ints, got {mesh_shape=}")
        if math.prod(shape) != total:
            raise ValueError(
                f"mesh_shape={shape} has {math.prod(shape)} devices but cluster {spec.name!r} × nodes={nodes} "
                f"has {total}; use a shape whose product is {total}, e.g. {candidate_meshes(total)[1:3] or [(total,)]}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    if memory_budget_bytes is not None and not memory_budget_bytes > 0:
        raise ValueError(f"memory_budget_bytes must be > 0, got {memory_budget_bytes}")
    if time_limit_s is not None and not time_limit_s > 0:
        raise ValueError(f"time_limit_s must be > 0, got {time_limit_s}")
    return spec


def plan(fn, *example_args, cluster="cpu-8", nodes: int = 1, mesh_shape=None,
         memory_budget_bytes: float | None = None, solver: str = "auto",
         time_limit_s: float | None = None, donate_argnums=(), verbose=False) -> Plan:
    """Plan ``fn(*example_args)`` on ``nodes`` nodes of ``cluster``.

    ``example_args`` may be arrays or ``jax.ShapeDtypeStruct`` pytrees. Every logical mesh
    (1D and each 2D factorization) is solved unless ``mesh_shape`` fixes one; the cheapest
    predicted step wins. ``memory_budget_bytes`` defaults to the device memory.
    ``donate_argnums`` (as in ``jax.jit``): those arguments' buffers are reused for the
    outputs they alias (same shape/dtype), which must then keep the same sharding — pass the
    params/optimizer-state positions of a training step.

    Progress (meshes solved of total, best plan so far, gap, elapsed) goes to the
    ``"autopar"`` logger at INFO — silent unless logging is configured; ``verbose=True``
    prints it on stderr, a :class:`autopar.progress.Progress` receives it.
    """
    progress = progress_for(verbose)
    try:
        return plan_with(fn, example_args, cluster=cluster, nodes=nodes, mesh_shape=mesh_shape,
                         memory_budget_bytes=memory_budget_bytes, solver=solver, time_limit_s=time_limit_s,
                         donate_argnums=donate_argnums, progress=progress)
    finally:
        if progress is not verbose:  # made here
            progress.close()


@dataclass(frozen=True)
class PlanHooks:
    """How a run of :func:`plan_with` differs from ``autopar.plan`` (every field optional)."""
    # mesh_shape -> build_problem keyword arguments for that mesh: hard filters on the program
    # inputs' shardings (allowed / allowed_reshard: only the rule's layouts can be chosen;
    # autopar.baselines) and input_usage_scale (pipeline stages)
    restrict: Callable | None = None
    # mesh_shape -> WarmStart or None: the rule's plan warm-starts the ILP but forbids nothing,
    # so a time limit never leaves the plan worse than the rule's (pipeline stages: Megatron's
    # DP × TP layout)
    warm_start: Callable | None = None
    strategy_name: str = "autopar"  # recorded in the Plan
    # replaces the candidate meshes when mesh_shape is None (pipeline stages search fewer)
    mesh_shapes: list | None = None
    # (program, graph) of fn on these arguments: skips tracing (one stage on many sub-meshes)
    traced: tuple | None = None
    # {mesh_shape: IntraProblem}: the built problem per mesh, reused by calls that differ only
    # in memory_budget_bytes (a stage planned at several budgets)
    problems: dict | None = None
    # resharding matrices shared across builds (default: one per call, shared by its meshes)
    reshard_cache: ReshardCache | None = None
    # LP relaxations shared across solves, by the problem's costs (``solvers.relaxation``: a
    # stage planned at several budgets, and bounded, solves one)
    relaxations: RelaxationCache | None = None
    # seconds an "auto" ILP gives its LP relaxation outside the time limit
    # (``solvers.solve(lp_time_s=)``; pipeline stages under a limit of autopar's own)
    lp_time_s: float | None = None
    # the heuristic stops once it has found nothing better for this long (``solvers.solve(stall_s=)``)
    stall_s: float | None = None
    carry: bool = True  # False: no loop-carried pairs (a stage's gradient program feeds nothing back)
    # True: a mesh whose ILP proves it cannot beat the best mesh so far stops there (its
    # candidate says "cutoff", no objective); the plan is the same (pipeline stages)
    cutoff: bool = False
    # a dict plan_with fills with what the solves showed: "memory_free" — True when no mesh's
    # outcome depended on the memory budget (each solved by the LP relaxation without memory
    # rows, or with no usage left that the budget could bind after presolve): the plan is then
    # the best of every budget it fits (``autopar.pipeline.stage_cost``)
    outcomes: dict | None = None


def plan_with(fn, example_args, *, cluster="cpu-8", nodes: int = 1, mesh_shape=None,
              memory_budget_bytes: float | None = None, solver: str = "auto",
              time_limit_s: float | None = None, donate_argnums=(), hooks: PlanHooks = PlanHooks(),
              progress=None) -> Plan:
    """``plan`` with :class:`PlanHooks` (restricted, warm-started or repeated runs: baselines,
    pipeline stages). ``progress``: a :class:`autopar.progress.Progress` told of each mesh
    solved."""
    t0 = time.perf_counter()
    progress = progress if progress is not None else Progress()
    progress.phase(f"trace {getattr(fn, '__name__', 'fn')}")
    spec, budget, program, graph, donated, carried, shapes = _setup(
        fn, example_args, hooks, cluster, nodes, mesh_shape, solver, memory_budget_bytes, time_limit_s, donate_argnums)
    t_trace = time.perf_counter()
    cache = hooks.reshard_cache if hooks.reshard_cache is not None else ReshardCache()
    best, candidates, min_needed, per_mesh, free = None, [], [], {}, []
    t_strat = t_solve = 0.0
    progress.phase("solve meshes", total=len(shapes))
    for shape in shapes:
        ts = time.perf_counter()
        ip = _problem(graph, spec, nodes, shape, budget, hooks, donated, carried, cache)
        t_strat += time.perf_counter() - ts
        ts = time.perf_counter()
        warm = hooks.warm_start(shape) if hooks.warm_start is not None else None
        # a later mesh replaces the best only below this (``solvers.solve(cutoff=)``: proving
        # that it cannot stops its solve, and the choice among meshes is the same)
        cutoff = best[1].cost * (1 - 1e-9) if hooks.cutoff and best is not None and solver in ("auto", "highs") \
            else None
        try:
            sol = solvers.solve(ip.problem, solver=solver, time_limit_s=time_limit_s, gap_rel=MIP_GAP,
                                start=warm.start_for(ip, solver=solver, time_limit_s=time_limit_s, gap_rel=MIP_GAP,
                                                     relaxations=hooks.relaxations)
                                if warm else None, cutoff=cutoff, lp_time_s=hooks.lp_time_s, stall_s=hooks.stall_s,
                                relaxations=hooks.relaxations)
        except solvers.InfeasibleError as err:
            sol = err
        t_solve += time.perf_counter() - ts
        per_mesh["x".join(map(str, shape))] = round(time.perf_counter() - ts, 3)
        free.append(not isinstance(sol, solvers.InfeasibleError) and (
            sol.solver == "auto:highs-lp" or sol.stats.get("presolve", {}).get("items", 1) == 0))
        if not isinstance(sol, solvers.InfeasibleError) and sol.status == "cutoff":
            progress.advance(detail=f"mesh {'x'.join(map(str, shape))}: no plan faster than the best")
            candidates.append(MeshCandidate(mesh_shape=list(shape), objective_s=None, status="cutoff"))
            continue
        if isinstance(sol, solvers.InfeasibleError):
            progress.advance(detail=f"mesh {'x'.join(map(str, shape))} infeasible")
            min_needed.append(sol.min_peak_usage)
            candidates.append(MeshCandidate(mesh_shape=list(shape), objective_s=None, status="infeasible"))
            continue
        ok = sol.feasible and math.isfinite(sol.cost)
        candidates.append(MeshCandidate(mesh_shape=list(shape), objective_s=sol.cost / 1e6 if ok else None,
                                        status=sol.status if ok else "infeasible"))
        if not ok:
            progress.advance(detail=f"mesh {'x'.join(map(str, shape))} does not fit")
            min_needed.append(ip.full.min_peak_usage())
            continue
        if best is None or sol.cost < best[1].cost * (1 - 1e-9):
            best = (ip, sol)
        progress.advance(detail=f"mesh {'x'.join(map(str, shape))} {sol.status}", incumbent_s=best[1].cost / 1e6,
                         gap=sol.gap if np.isfinite(sol.gap) else None)
    if hooks.outcomes is not None:
        hooks.outcomes["memory_free"] = all(free)
    if best is None:
        raise _no_plan(getattr(fn, "__name__", "fn"), hooks.strategy_name, shapes, budget, min_needed)
    timing = Timing(trace_s=t_trace - t0, strategies_s=t_strat, solve_s=t_solve,
                    total_s=time.perf_counter() - t0, per_mesh_solve_s=per_mesh)
    result = assemble_plan(fn, program, best[0], best[1], spec, nodes, budget, candidates, timing, donated,
                           strategy_name=hooks.strategy_name)
    result._fn = fn
    from .runtime import abstract_args
    result._args = abstract_args(example_args)
    return result


def _setup(fn, example_args, hooks: PlanHooks, cluster, nodes: int, mesh_shape, solver, memory_budget_bytes,
           time_limit_s, donate_argnums):
    """What ``plan_with`` and ``lower_bound_with`` start from: the checked spec, the memory
    budget, the traced program and its graph (``hooks.traced`` when given), the donated input
    leaves, the carried (donated input, output) pairs and the mesh shapes to try."""
    spec = _check_args(cluster, nodes, mesh_shape, solver, memory_budget_bytes, time_limit_s)
    budget = float(memory_budget_bytes or spec.device.memory_bytes)
    program, graph = hooks.traced if hooks.traced is not None else (trace(fn, *example_args), None)
    donated = donated_leaves(example_args, donate_argnums)
    graph = graph if graph is not None else build_graph(program)
    aliases = match_donations(graph, donated)
    carried = carried_pairs(program, [i for i, _ in aliases], [k for _, k in aliases]) if hooks.carry else []
    shapes = [tuple(mesh_shape)] if mesh_shape is not None else (
        [tuple(m) for m in hooks.mesh_shapes] if hooks.mesh_shapes is not None else
        candidate_meshes(nodes * spec.devices_per_node))
    return spec, budget, program, graph, donated, carried, shapes


def _problem(graph, spec, nodes: int, shape, budget: float, hooks: PlanHooks, donated=(), carried=(),
             cache: ReshardCache | None = None) -> IntraProblem:
    """The ILP of ``graph`` on mesh ``shape`` within ``budget`` (``hooks.problems`` reused/filled)."""
    if hooks.problems is not None and shape in hooks.problems:
        return hooks.problems[shape].with_budget(budget)
    ip = build_problem(graph, mesh_model(spec, nodes, shape), memory_budget_bytes=budget, donated_inputs=donated,
                       carried=carried, reshard_cache=cache if cache is not None else hooks.reshard_cache,
                       **({} if hooks.restrict is None else hooks.restrict(shape)))
    if hooks.problems is not None:
        hooks.problems[shape] = ip
    return ip


def lower_bound_with(fn, example_args, *, cluster="cpu-8", nodes: int = 1, memory_budget_bytes: float | None = None,
                     hooks: PlanHooks = PlanHooks()) -> float:
    """A lower bound, in seconds, on ``plan_with(...).predicted.step_time_s`` for the same
    arguments (no donation), without solving an ILP (∞: no mesh has a plan that fits): the
    least over the meshes of ``solvers.driver.lower_bound`` of the mesh's ILP, less the most
    its memory tie-break can add to a choice's objective (τ·Σ_v max usage_v, τ =
    ``TIEBREAK_US_PER_BYTE``), in seconds, + the spec's ``step_overhead_s``. It assumes what
    ``assemble_plan`` predicts for a choice (compute + collectives + reshards) is not below
    that choice's objective without the tie-break (the ILP prices the same terms;
    ``tests/test_lazy_submeshes.py`` checks it on every stage it plans)."""
    from autopar.solvers.driver import lower_bound
    from .build_nodes import TIEBREAK_US_PER_BYTE
    spec, budget, _, graph, _, carried, shapes = _setup(fn, example_args, hooks, cluster, nodes, None, "auto",
                                                        memory_budget_bytes, None, ())
    best = math.inf
    for shape in shapes:
        ip = _problem(graph, spec, nodes, shape, budget, hooks, (), carried)
        lb = lower_bound(ip.problem, relaxations=hooks.relaxations)
        if math.isfinite(lb):
            slack = TIEBREAK_US_PER_BYTE * sum(float(np.max(u)) for u in ip.full.node_usages)
            best = min(best, (lb - slack) / 1e6 + spec.step_overhead_s)
    return best


def _no_plan(name: str, strategy_name: str, shapes, budget: float, min_needed) -> PlanError:
    """Why no mesh has a plan: the memory budget, or forbidden combinations."""
    need = min((m for m in min_needed if m is not None), default=None)
    if strategy_name != "autopar":
        name = f"{name} (baseline {strategy_name})"
        if need is not None and need <= budget:  # the fixed layouts (not one op at a time) need more
            return PlanError(
                f"no sharding of {name} on meshes {shapes} fits memory_budget_bytes={budget:.0f} per device "
                f"with the baseline's input layouts and alias constraints; {need:.0f} bytes per device is a "
                "lower bound (every op at its smallest allowed sharding), the baseline needs more. Raise the "
                "budget or try another baseline.", min_bytes_per_device=need)
    if need is None or need <= budget:  # not a memory problem: forbidden combinations
        return PlanError(f"no valid sharding of {name} on meshes {shapes} (every plan breaks an alias "
                         "constraint or an unsupported combination); try mesh_shape=(N,) or no donate_argnums",
                         min_bytes_per_device=need)
    return PlanError(
        f"no sharding of {name} fits memory_budget_bytes={budget:.0f} per device on meshes {shapes}; "
        f"the minimum is {need:.0f} bytes per device (every tensor split as finely as possible). "
        "Raise the budget, add devices/nodes, or shrink the model/batch; a training step can also be planned "
        "with autopar.plan_training(loss_fn, params, batch, optimizer=..., remat='auto'), which pipelines it and "
        "chooses activation recomputation and optimizer-state sharding per stage.", min_bytes_per_device=need)


def donated_leaves(args, donate_argnums) -> list[int]:
    """Flat leaf indices of the positional arguments in ``donate_argnums``."""
    import jax
    nums = (donate_argnums,) if isinstance(donate_argnums, int) else tuple(donate_argnums or ())
    bad = [a for a in nums if not isinstance(a, int) or not -len(args) <= a < len(args)]
    if bad:
        raise ValueError(f"donate_argnums={nums} refers to missing arguments {bad}; the function got "
                         f"{len(args)} positional arguments")
    nums = {a % len(args) for a in nums}
    out, offset = [], 0
    for a, arg in enumerate(args):
        n = len(jax.tree_util.tree_leaves(arg))
        if a in nums:
            out.extend(range(offset, offset + n))
        offset += n
    return out


def _names(spec, names) -> list[list[str]]:
    return [[names[a] for a in axes] for axes in spec]


def _where(graph, idx) -> str:
    node = graph.nodes[idx]
    src = node.eqn.source if node.eqn is not None else ""
    loop = f" ×{node.repeat} (scan)" if node.repeat > 1 else ""
    return f"{node.name} #{idx}" + (f" ({src})" if src else "") + loop


def assemble_plan(fn, program, ip: IntraProblem, sol, spec: ClusterSpec, nodes: int, budget: float,
                  candidates, timing, donated=(), strategy_name: str = "autopar") -> Plan:
    graph, mesh = ip.graph, ip.mesh
    names = axis_names(len(mesh.shape))
    choice = ip.expand(sol.choice)
    chosen = [ip.strategies[v][c] for v, c in enumerate(choice)]
    colls: list[CollectiveCost] = []
    compute_s = float(sum(ip.compute_s[v][c] for v, c in enumerate(choice)))
    combined = combinable_nodes(graph) if mesh.combine_all_reduces else frozenset()
    groups: dict[tuple, list[int]] = {}   # (kind, axes) -> the collectives XLA combines into one op there
    for v, s in enumerate(chosen):
        r = graph.nodes[v].repeat  # inside a scan: once per iteration
        for kind, axes, nbytes in s.comm:
            if v in combined and kind == ALL_REDUCE.name:
                groups.setdefault((kind, tuple(axes)), []).append(len(colls))
            colls.append(CollectiveCost(kind=kind, axes=[names[a] for a in axes], bytes=nbytes * r,
                                        time_s=collective_time(mesh, kind, axes, nbytes) * r, where=_where(graph, v)))
    reshard: dict[int, dict[int, list]] = {}
    mat = ip.materialized(sol.choice)  # value → the spec it is converted into once (build_shared)
    for vid, into in sorted(mat.items()):
        u, j = graph.producer[vid]
        value, r = program.values[vid], graph.nodes[u].repeat
        for kind, axes, nbytes in resharding(mesh, value.shape, value.itemsize, chosen[u].out_specs[j], into)[1]:
            if kind == ALL_GATHER.name and gathers_combined(graph, mesh, vid):
                groups.setdefault((kind, tuple(axes)), []).append(len(colls))
            colls.append(CollectiveCost(kind=kind, axes=[names[a] for a in axes], bytes=nbytes * r,
                                        time_s=collective_time(mesh, kind, axes, nbytes) * r,
                                        where=f"reshard {_where(graph, u)} (shared by its readers)"))
    done = set()  # XLA reshards a value once per target spec, however many consumers want it
    for (u, v), ops in zip(ip.edges, ip.edge_operands):
        for op in ops:
            src = mat.get(op.value.id, chosen[u].out_specs[op.out_index])
            dst = chosen[v].in_specs[op.operand]
            if dst is None or src == dst:
                continue
            reshard.setdefault(v, {})[op.operand] = _names(dst, names)
            if (op.value.id, dst) in done or u in ip.rematerialized:  # emit recomputes constants
                continue
            done.add((op.value.id, dst))
            _, parts = resharding(mesh, op.value.shape, op.value.itemsize, src, dst)
            r = graph.reshard_repeat(v)
            for kind, axes, nbytes in parts:
                if kind == ALL_GATHER.name and gathers_combined(graph, mesh, op.value.id, v):
                    groups.setdefault((kind, tuple(axes)), []).append(len(colls))
                colls.append(CollectiveCost(
                    kind=kind, axes=[names[a] for a in axes], bytes=nbytes * r,
                    time_s=collective_time(mesh, kind, axes, nbytes) * r,
                    where=f"reshard {_where(graph, u)} -> {_where(graph, v)}"))
    for (kind, axes), members in groups.items():   # one op moving their bytes; each gets its bytes' share
        total = sum(colls[k].bytes for k in members)
        t = collective_time(mesh, kind, axes, total)
        for k in members:
            colls[k] = colls[k].model_copy(update={"time_s": t * colls[k].bytes / total,
                                                   "where": f"{colls[k].where} (combined with {len(members) - 1})"})
    comm_s = sum(c.time_s for c in colls)
    by_kind: dict[str, KindTotal] = {}
    for kind in sorted({c.kind for c in colls}):
        cs = [c for c in colls if c.kind == kind]
        by_kind[kind] = KindTotal(count=len(cs), bytes=sum(c.bytes for c in cs), time_s=sum(c.time_s for c in cs))
    _, _, peak = solvers.evaluate(ip.full, ip.expand_full(sol.choice))
    in_specs = [chosen[v].out_specs[0] for v in range(len(program.invars))]
    loop_s = 0.0  # fed-back outputs whose layout differs from their input's: resharded by apply
    for i, k in ip.carried:
        u, j = graph.producer[program.outvars[k]]
        value = program.values[program.outvars[k]]
        loop_s += resharding(mesh, value.shape, value.itemsize, chosen[u].out_specs[j], in_specs[i])[0]
    predicted = Predicted(step_time_s=compute_s + comm_s + spec.step_overhead_s, compute_s=compute_s, comm_s=comm_s,
                          comm_bytes_per_device=sum(c.bytes for c in colls), peak_memory_bytes=peak,
                          collectives=colls, by_kind=by_kind, loop_reshard_s=loop_s)
    eqn_offset = len(program.invars) + len(program.consts)
    eqns = []
    for v in range(eqn_offset, len(graph.nodes)):
        node, s = graph.nodes[v], chosen[v]
        eqns.append(EqnPlan(
            index=v - eqn_offset, primitive=node.name, strategy=s.name,
            out_specs=[_names(sp, names) for sp in s.out_specs], reshard_inputs=reshard.get(v, {}),
            shapes=[list(o.shape) for o in node.outputs],
            compute_s=float(ip.compute_s[v][choice[v]]), comm_s=float(ip.comm_s[v][choice[v]]),
            source=node.eqn.source, fallback=ip.fallbacks.get(v)))
    in_specs = [_names(s, names) for s in in_specs]
    out_specs = []
    for o in program.outvars:
        if isinstance(o, int):
            u, j = graph.producer[o]
            out_specs.append(_names(chosen[u].out_specs[j], names))
        else:
            out_specs.append(None)
    fb = Counter((graph.nodes[v].name, r) for v, r in ip.fallbacks.items())
    fallbacks = [FallbackTotal(primitive=p, count=n, reason=r) for (p, r), n in sorted(fb.items())]
    stats = SolverStats(solver=sol.solver, status=sol.status, objective_s=sol.cost / 1e6,
                        lower_bound_s=sol.lower_bound / 1e6 if np.isfinite(sol.lower_bound) else None,
                        gap=sol.gap if np.isfinite(sol.gap) else None, nodes=ip.problem.num_nodes,
                        edges=ip.problem.num_edges, strategies=int(sum(len(c) for c in ip.problem.node_costs)))
    plan = Plan(
        function=getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn))),
        fingerprint=program.fingerprint, cluster=spec, nodes=nodes, mesh_shape=list(mesh.shape),
        axis_names=list(names), memory_budget_bytes=budget, input_specs_flat=in_specs,
        output_specs_flat=out_specs, input_tree=treedef_to_json(program.in_tree),
        output_tree=treedef_to_json(program.out_tree),
        input_shapes=[list(program.values[v].shape) for v in program.invars],
        input_dtypes=[str(program.values[v].dtype) for v in program.invars], eqns=eqns,
        predicted=predicted, solver=stats, mesh_candidates=candidates, fallbacks=fallbacks,
        donated_inputs=list(donated), timing=timing,
        carried=sorted(list(p) for p in ip.aliases + ip.carried),
        materialized={vid: _names(into, names) for vid, into in sorted(mat.items())},
        strategy_name=strategy_name)
    plan._in_treedef, plan._out_treedef = program.in_tree, program.out_tree
    return plan
