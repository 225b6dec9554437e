"""``Plan.explain(leaf)``: why is this input leaf sharded the way it is ("why replicated?").

For a replicated or partly split program input the plan is re-solved on its own mesh, memory
budget and donations with that one leaf forced to a more-split sharding (``build_problem``'s
``allowed`` filter keeps only specs with a larger shard factor than the chosen one; every
other operator is free). The answer holds the cheapest such plan's extra predicted time (the
difference of the two solved objectives) and peak memory, and the operations whose cost
grows the most: the plan and the alternative are compared node by node (compute + the
collectives inside each equation) and edge by edge (resharding a value between producer and
consumer), grouped by primitive and source line, so the user can see e.g. that a ``split``
whose pieces do not line up with the shards forces an all-gather of the fused activations.
"""
from __future__ import annotations

import math
import time

from autopar import solvers
from autopar.cost import mesh_model, shard_factor

from .build_edges import ReshardCache
from .explain_compare import compare, gathers, hint, pspec
from .explain_leaf import leaf_paths, resolve_leaf
from .explanation import ExplainError, Explanation, _bytes
from .runtime import abstract_args
from .strategies import enumerate_specs

__all__ = ["ExplainError", "explain", "leaf_paths", "resolve_leaf"]


def explain(plan, leaf, *, fn=None, args=None, axis: str | None = None, top: int = 5, solver: str = "auto",
            time_limit_s: float | None = None) -> Explanation:
    """Why input ``leaf`` of ``plan`` (a path as the report prints it, e.g. ``"[0]['qkv']"``,
    or a flat index) has its sharding, and what splitting it further would cost.

    ``fn`` / ``args`` default to the function and (abstract) arguments the plan was made from
    in this process; a plan loaded from JSON needs both. ``axis`` (a mesh axis name, e.g. "y"):
    the alternatives must split the leaf over that axis. ``top``: causes listed each way."""
    from .plan_types import Plan

    t0 = time.perf_counter()
    if not isinstance(plan, Plan):
        raise ExplainError(f"explain works on intra-op plans (autopar.Plan), got {type(plan).__name__}; for a "
                           "training plan explain one stage's plan")
    index, path = resolve_leaf(plan, leaf)
    mesh_shape = tuple(plan.mesh_shape)
    names = tuple(plan.axis_names)
    devices = math.prod(mesh_shape)
    if axis is not None and axis not in names:
        raise ExplainError(f"axis={axis!r} is not an axis of the plan's mesh {mesh_shape}; use one of {names}")
    want_axis = None if axis is None else names.index(axis)
    over_axis = "" if axis is None else f" over axis {axis!r}"
    shape = tuple(plan.input_shapes[index])
    spec_names = plan.input_specs_flat[index]
    factor = shard_factor(spec_names, dict(zip(names, mesh_shape)))
    base = dict(leaf=path, index=index, shape=shape, spec=pspec(spec_names), split_factor=factor,
                devices=devices, mesh_shape=mesh_shape, axis_names=names, objective_s=plan.solver.objective_s,
                peak_memory_bytes=plan.predicted.peak_memory_bytes)
    if factor >= devices:
        return Explanation(**base, dtype="", alternative=None,
                           note=f"already split over all {devices} devices of the mesh: nothing to split further",
                           seconds=time.perf_counter() - t0)

    program, graph = _traced(plan, fn, args)
    dtype = str(graph.nodes[index].outputs[0].dtype)
    base["dtype"] = dtype
    mesh = mesh_model(plan.cluster, plan.nodes, mesh_shape)

    def more_split(spec) -> bool:
        return shard_factor(spec, mesh.shape) > factor and (
            want_axis is None or any(want_axis in axes for axes in spec))
    if not any(map(more_split, enumerate_specs(shape, mesh.shape))):
        return Explanation(**base, alternative=None,
                           note=f"cannot be split further{over_axis} on this mesh: no dim of {shape} is divisible "
                                f"by a larger product of mesh axes {dict(zip(names, mesh_shape))}",
                           seconds=time.perf_counter() - t0)

    def allowed(u, s):
        return u != index or more_split(s.out_specs[0])

    def kept(u, src, dst):  # the leaf's consumers read it without gathering any of its mesh axes
        return u != index or {a for axes in src for a in axes} <= {a for axes in dst for a in axes}

    cache = ReshardCache()  # shared by the two forced builds

    def solve(**filters):
        return _solve_forced(plan, graph, mesh, solver=solver, time_limit_s=time_limit_s, cache=cache, **filters)

    notes = [] if plan.strategy_name == "autopar" else \
        [f"note: this is a baseline plan ({plan.strategy_name}); the alternatives are planned freely by autopar"]
    ip, sol, fail = solve(allowed=allowed)
    if fail:
        notes.insert(0, f"forcing it over more than {factor} device(s){over_axis} is infeasible: {fail}")
        return Explanation(**base, alternative=None, note="\n".join(notes), seconds=time.perf_counter() - t0)
    alt, prims, after = compare(plan, ip, program, index, sol, top,
                                f"cheapest plan that splits it further{over_axis}")
    used = None
    if gathers(ip, index, after):  # it is stored split but gathered where used: also force it used split
        ip2, sol2, fail2 = solve(allowed=allowed, allowed_reshard=kept)
        if fail2:
            notes.append(f"keeping it split where it is used (no all-gather of it) is infeasible: {fail2}")
        else:
            used, prims2, _ = compare(plan, ip2, program, index, sol2, top,
                                      "cheapest plan that also uses it split (no all-gather of it: tensor parallel)")
            prims += prims2
    return Explanation(**base, alternative=alt, used_split=used, note="\n".join(notes), hint=hint(prims),
                       seconds=time.perf_counter() - t0)


def _traced(plan, fn, args):
    """(program, graph) of ``fn(*args)`` (default: what the plan was made from in this
    process), checked to be the program the plan was made for."""
    from .graph import build_graph
    from .trace import trace

    fn = fn if fn is not None else plan._fn
    args = tuple(args) if args is not None else plan._args
    if fn is None or args is None:
        missing = " and ".join(x for x, y in (("fn", fn), ("args", args)) if y is None)
        raise ExplainError(f"this plan does not hold its {missing} (it was loaded from JSON or planned elsewhere): "
                           "call plan.explain(leaf, fn=the_function, args=(example arguments, arrays or "
                           "jax.ShapeDtypeStructs))")
    program = trace(fn, *abstract_args(args))
    if program.fingerprint != plan.fingerprint:
        raise ExplainError(f"the plan was made for {plan.function} (fingerprint {plan.fingerprint}) but fn/args "
                           f"trace to a different program ({program.fingerprint}); pass the function and example "
                           "arguments the plan was made from")
    return program, build_graph(program)


def _solve_forced(plan, graph, mesh, *, solver: str, time_limit_s: float | None, cache: ReshardCache, **filters):
    """(problem, solution, None) of the plan's program under ``filters`` (``build_problem``'s
    ``allowed`` / ``allowed_reshard``) on the plan's mesh, budget and donations, or (problem,
    None, why) when it has no plan."""
    from .build import build_problem
    from .planner import MIP_GAP

    ip = build_problem(graph, mesh, memory_budget_bytes=plan.memory_budget_bytes,
                       donated_inputs=plan.donated_inputs, reshard_cache=cache, **filters, **_same_build(plan))
    try:
        sol = solvers.solve(ip.problem, solver=solver, time_limit_s=time_limit_s, gap_rel=MIP_GAP)
    except solvers.InfeasibleError as err:
        need = err.min_peak_usage
        if need is not None and need > plan.memory_budget_bytes:
            return ip, None, (f"it does not fit the memory budget {_bytes(plan.memory_budget_bytes)} per device "
                              f"(needs at least {_bytes(need)})")
        return ip, None, ("every such plan breaks an alias constraint (a donated input must keep the sharding "
                          "of the output it aliases) or an unsupported combination")
    if not (sol.feasible and math.isfinite(sol.cost)):
        return ip, None, "no plan found within the solver's time limit"
    return ip, sol, None


def _same_build(plan) -> dict:
    """The other ``build_problem`` arguments the planner passed (loop-carried pairs)."""
    import inspect

    from .build import build_problem
    carried = getattr(plan, "carried", None)
    if carried and "carried" in inspect.signature(build_problem).parameters:
        return {"carried": [tuple(p) for p in carried]}
    return {}
