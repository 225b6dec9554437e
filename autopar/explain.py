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

import difflib
import math
import re
import time

from autopar import solvers
from autopar.cost import mesh_model, resharding, shard_factor

from .pytree_json import leaf_paths as _leaf_paths
from .explanation import Alternative, Cause, ExplainError, Explanation, _bytes
from .report import _time
from .runtime import abstract_args
from .strategies import enumerate_specs

MAX_PATHS_IN_ERROR = 30
# primitives whose cost grows when the pieces of a fused tensor do not line up with the shards
_CUT_PRIMS = {"split", "slice", "dynamic_slice", "concatenate", "pad"}
_LAYOUT_PRIMS = _CUT_PRIMS | {"reshape"}


# ----------------------------------------------------------------------------- helpers

def short_source(src: str) -> str:
    """'/a/b/model.py:42:7 (attention)' → 'model.py:42 (attention)'."""
    m = re.match(r"^(.*?):(\d+)(?::\d+)?(.*)$", src or "")
    if not m:
        return src or ""
    where = re.sub(r"\(([^()]*\.)([^.()]+)\)", r"(\2)", m.group(3))  # (f.<locals>.g) → (g)
    return f"{m.group(1).replace(chr(92), '/').rsplit('/', 1)[-1]}:{m.group(2)}{where}"


def leaf_paths(plan) -> list[str]:
    return _leaf_paths(plan.input_tree, len(plan.input_specs_flat))


def _norm(path: str) -> str:
    return re.sub(r"\s+", "", path).replace('"', "'")


def resolve_leaf(plan, leaf) -> tuple[int, str]:
    """(flat index, path) of ``leaf``: a path as the report prints it ("[0]['w']") or an index."""
    paths = leaf_paths(plan)
    n = len(paths)
    if isinstance(leaf, str) and re.fullmatch(r"\s*-?\d+\s*", leaf):
        leaf = int(leaf)
    if isinstance(leaf, int) and not isinstance(leaf, bool):
        if not -n <= leaf < n:
            raise ExplainError(f"input leaf index {leaf} is out of range: the plan has {n} input leaves "
                               f"(0..{n - 1}); {_listing(paths)}")
        return leaf % n, paths[leaf % n]
    if not isinstance(leaf, str):
        raise ExplainError(f"leaf must be a path string such as {paths[0]!r} or a flat index, got {leaf!r}")
    want = _norm(leaf)
    exact = [i for i, p in enumerate(paths) if _norm(p) == want]
    if len(exact) == 1:
        return exact[0], paths[exact[0]]
    inside = [i for i, p in enumerate(paths) if want and want in _norm(p)]
    if len(inside) == 1:
        return inside[0], paths[inside[0]]
    if len(inside) > 1:
        raise ExplainError(f"input leaf {leaf!r} matches {len(inside)} leaves: "
                           + ", ".join(paths[i] for i in inside[:MAX_PATHS_IN_ERROR])
                           + (" …" if len(inside) > MAX_PATHS_IN_ERROR else "") + "; give the whole path")
    close = difflib.get_close_matches(leaf, paths, n=5, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ExplainError(f"no input leaf {leaf!r} in this plan.{hint} Give a path as the report prints it, or a "
                       f"flat index 0..{n - 1}; {_listing(paths)}")


def _listing(paths) -> str:
    head = ", ".join(paths[:MAX_PATHS_IN_ERROR])
    more = f" … and {len(paths) - MAX_PATHS_IN_ERROR} more (plan.report() lists them all)" \
        if len(paths) > MAX_PATHS_IN_ERROR else ""
    return f"valid paths: {head}{more}"


def _pspec(names) -> str:
    from .emit import to_pspec
    return str(to_pspec(names))


def _spec_names(spec, names) -> list[list[str]]:
    return [[names[a] for a in axes] for axes in spec]


def _node_label(graph, v, paths) -> str:
    node = graph.nodes[v]
    if node.kind == "input":
        return f"input {paths[v]}" if v < len(paths) else node.name
    if node.kind == "const":
        return "constant"
    src = short_source(node.eqn.source)
    return f"{node.name} at {src}" if src else node.name


def _plan_choice(ip, plan, program, leaf: int):
    """The plan's strategy per graph node, matched by name and specs (Strategy objects; the
    leaf's own entry is the plan's spec, which the forced problem no longer offers)."""
    from .strategies import Strategy
    graph, names = ip.graph, plan.axis_names
    n_in = len(program.invars)
    offset = n_in + len(program.consts)
    chosen = []
    for node in graph.nodes:
        v = node.index
        if node.kind == "input":
            want = plan.input_specs_flat[v]
            if v == leaf:
                spec = tuple(tuple(names.index(a) for a in axes) for axes in want)
                chosen.append(Strategy("plan", (spec,), ()))
                continue
            cands = [s for s in ip.strategies[v] if _spec_names(s.out_specs[0], names) == want]
        elif node.kind == "const":
            cands = ip.strategies[v][:1]
        else:
            e = plan.eqns[v - offset]
            cands = [s for s in ip.strategies[v] if s.name == e.strategy
                     and [None if sp is None else _spec_names(sp, names) for sp in s.out_specs] == e.out_specs]
            if len(cands) > 1:  # disambiguate by what the equation reads
                def reads(s, e=e, node=node):
                    for k, sp in enumerate(s.in_specs):
                        if sp is None:
                            continue
                        o = node.operands[k]
                        u, j = graph.producer[o.id]
                        src = chosen[u].out_specs[j]
                        if _spec_names(sp, names) != e.reshard_inputs.get(k, _spec_names(src, names)):
                            return False
                    return True
                cands = [s for s in cands if reads(s)] or cands
        if not cands:
            raise ExplainError(f"the plan's choice for {node.name} #{v} is not among this version's strategies "
                               "(was the plan made by another autopar version?); re-plan, then explain")
        chosen.append(cands[0])
    return chosen


def _edge_cost(mesh, op, src, dst) -> tuple[float, tuple]:
    if dst is None or src == dst:
        return 0.0, ()
    return resharding(mesh, op.value.shape, op.value.itemsize, src, dst)


def _describe_reshard(op, src, dst, names, seconds, parts) -> str:
    shape = tuple(op.value.shape)
    if dst is None or src == dst:
        return f"{shape} {_pspec(_spec_names(src, names))}, used as it is (free)"
    coll = ", ".join(f"{kind} over {','.join(names[a] for a in axes)} {_bytes(nbytes)}"
                     for kind, axes, nbytes in parts) or "local slice"
    return (f"{shape} {_pspec(_spec_names(src, names))} → {_pspec(_spec_names(dst, names))}: {coll} "
            f"({_time(seconds)})")


def _describe_op(ip, v, s, names, seconds) -> str:
    coll = ", ".join(f"{kind} over {','.join(names[a] for a in axes)} {_bytes(nbytes)}"
                     for kind, axes, nbytes in s.comm)
    outs = " ".join(_pspec(_spec_names(sp, names)) for sp in s.out_specs if sp is not None)
    return f"{s.name} → {outs}" + (f", {coll}" if coll else "") + f" ({_time(seconds)})"


def _same_build(plan) -> dict:
    """The other ``build_problem`` arguments the planner passed (loop-carried pairs)."""
    import inspect

    from .build import build_problem
    carried = getattr(plan, "carried", None)
    if carried and "carried" in inspect.signature(build_problem).parameters:
        return {"carried": [tuple(p) for p in carried]}
    return {}


# ----------------------------------------------------------------------------- explain

def explain(plan, leaf, *, fn=None, args=None, axis: str | None = None, top: int = 5, solver: str = "auto",
            time_limit_s: float | None = None) -> Explanation:
    """Why input ``leaf`` of ``plan`` (a path as the report prints it, e.g. ``"[0]['qkv']"``,
    or a flat index) has its sharding, and what splitting it further would cost.

    ``fn`` / ``args`` default to the function and (abstract) arguments the plan was made from
    in this process; a plan loaded from JSON needs both. ``axis`` (a mesh axis name, e.g. "y"):
    the alternatives must split the leaf over that axis. ``top``: causes listed each way."""
    from .planner import MIP_GAP
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
    base = dict(leaf=path, index=index, shape=shape, spec=_pspec(spec_names), split_factor=factor,
                devices=devices, mesh_shape=mesh_shape, axis_names=names, objective_s=plan.solver.objective_s,
                peak_memory_bytes=plan.predicted.peak_memory_bytes)
    if factor >= devices:
        return Explanation(**base, dtype="", alternative=None,
                           note=f"already split over all {devices} devices of the mesh: nothing to split further",
                           seconds=time.perf_counter() - t0)

    fn = fn if fn is not None else plan._fn
    args = tuple(args) if args is not None else plan._args
    if fn is None or args is None:
        missing = " and ".join(x for x, y in (("fn", fn), ("args", args)) if y is None)
        raise ExplainError(f"this plan does not hold its {missing} (it was loaded from JSON or planned elsewhere): "
                           "call plan.explain(leaf, fn=the_function, args=(example arguments, arrays or "
                           "jax.ShapeDtypeStructs))")

    from .build import build_problem
    from .graph import build_graph
    from .trace import trace
    program = trace(fn, *abstract_args(args))
    if program.fingerprint != plan.fingerprint:
        raise ExplainError(f"the plan was made for {plan.function} (fingerprint {plan.fingerprint}) but fn/args "
                           f"trace to a different program ({program.fingerprint}); pass the function and example "
                           "arguments the plan was made from")
    graph = build_graph(program)
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

    def solve(**restrict):
        ip = build_problem(graph, mesh, memory_budget_bytes=plan.memory_budget_bytes,
                           donated_inputs=plan.donated_inputs, **restrict, **_same_build(plan))
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

    notes = [] if plan.strategy_name == "autopar" else \
        [f"note: this is a baseline plan ({plan.strategy_name}); the alternatives are planned freely by autopar"]
    ip, sol, fail = solve(allowed=allowed)
    if fail:
        notes.insert(0, f"forcing it over more than {factor} device(s){over_axis} is infeasible: {fail}")
        return Explanation(**base, alternative=None, note="\n".join(notes), seconds=time.perf_counter() - t0)
    alt, prims, after = _compare(plan, ip, program, index, sol, top,
                                 f"cheapest plan that splits it further{over_axis}")
    used = None
    if _gathers(ip, index, after):  # it is stored split but gathered where used: also force it used split
        ip2, sol2, fail2 = solve(allowed=allowed, allowed_reshard=kept)
        if fail2:
            notes.append(f"keeping it split where it is used (no all-gather of it) is infeasible: {fail2}")
        else:
            used, prims2, _ = _compare(plan, ip2, program, index, sol2, top,
                                       "cheapest plan that also uses it split (no all-gather of it: tensor parallel)")
            prims += prims2
    return Explanation(**base, alternative=alt, used_split=used, note="\n".join(notes), hint=_hint(prims),
                       seconds=time.perf_counter() - t0)


def _hint(layout) -> str:
    """A model change for the first split / slice / reshape among the costliest causes."""
    cut = [(p, w) for p, w in layout if p in _CUT_PRIMS]
    if cut:
        p, where = cut[0]
        return (f"{p} at {where} is among the costliest changes: its pieces do not line up with the shards of the "
                "dim it cuts, so that layout is gathered or exchanged first. Lay the fused dim out as its own axis "
                "(e.g. QKV as (d, 3, heads, head_dim), indexed instead of jnp.split) so every piece is split the "
                "same way on every device")
    if layout:
        p, where = layout[0]
        return (f"{p} at {where} is among the costliest changes: a dim split over the mesh that a reshape merges "
                "or divides (e.g. heads·head_dim ↔ (heads, head_dim)) lines up with the shards only when the split "
                "is on the major factor; keep the split dim whole across the reshape (heads divisible by the mesh "
                "axis)")
    return ""


def _gathers(ip, index, after) -> bool:
    """Whether a consumer of input ``index`` reads it with fewer mesh axes than it is stored with."""
    for (u, v), ops in zip(ip.edges, ip.edge_operands):
        if u != index:
            continue
        for op in ops:
            src, dst = after[u].out_specs[op.out_index], after[v].in_specs[op.operand]
            if dst is not None and not {a for x in src for a in x} <= {a for x in dst for a in x}:
                return True
    return False


def _compare(plan, ip, program, index, sol, top, title) -> tuple[Alternative, set, list]:
    graph, mesh, names = ip.graph, ip.mesh, tuple(plan.axis_names)
    paths = leaf_paths(plan)
    before = _plan_choice(ip, plan, program, index)
    after_idx = ip.expand(sol.choice)
    after = [ip.strategies[v][c] for v, c in enumerate(after_idx)]
    groups: dict[str, dict] = {}   # source line -> {"d": delta, "n": count, "prims": {p: delta}, "top": …}

    def add(v, prim, delta, item, plan_desc, alt_desc):
        node = graph.nodes[v] if v is not None else None
        where = (short_source(node.eqn.source) or node.name) if node is not None and node.kind == "eqn" else \
            "the loop (outputs fed back as the next call's inputs)"
        g = groups.setdefault(where, {"d": 0.0, "n": 0, "prims": {}, "top": None})
        g["d"] += delta
        g["n"] += 1
        g["prims"][prim] = g["prims"].get(prim, 0.0) + delta
        if g["top"] is None or abs(delta) > g["top"][0]:
            g["top"] = (abs(delta), item, plan_desc, alt_desc)

    def node_cost(v, idx):
        if graph.nodes[v].kind != "eqn":
            return 0.0
        return float(ip.compute_s[v][idx] + ip.comm_s[v][idx])

    index_of = [{id(s): i for i, s in enumerate(ss)} for ss in ip.strategies]
    for node in graph.nodes:
        v = node.index
        b, a = before[v], after[v]
        if b is a or node.kind != "eqn":
            continue
        cb, ca = node_cost(v, index_of[v][id(b)]), node_cost(v, after_idx[v])
        if cb != ca:
            add(v, node.name, ca - cb, f"{node.name} itself (compute + collectives)",
                _describe_op(ip, v, b, names, cb), _describe_op(ip, v, a, names, ca))
    for (u, v), ops in zip(ip.edges, ip.edge_operands):
        if before[u] is after[u] and before[v] is after[v]:
            continue
        for op in ops:
            sb, db = before[u].out_specs[op.out_index], before[v].in_specs[op.operand]
            sa, da = after[u].out_specs[op.out_index], after[v].in_specs[op.operand]
            (cb, pb), (ca, pa) = _edge_cost(mesh, op, sb, db), _edge_cost(mesh, op, sa, da)
            if cb != ca:
                name = graph.nodes[v].name
                add(v, name, ca - cb, f"reshard {_node_label(graph, u, paths)} → {name}",
                    _describe_reshard(op, sb, db, names, cb, pb), _describe_reshard(op, sa, da, names, ca, pa))
    for i, k in getattr(ip, "carried", ()):  # a loop feeds output k back as input i
        u, j = graph.producer[program.outvars[k]]
        value = program.values[program.outvars[k]]
        cost = [resharding(mesh, value.shape, value.itemsize, x[u].out_specs[j], x[i].out_specs[0])
                for x in (before, after)]
        if cost[0][0] != cost[1][0]:
            add(None, "loop reshard", cost[1][0] - cost[0][0], f"reshard {_node_label(graph, u, paths)} → {paths[i]}",
                _time(cost[0][0]), _time(cost[1][0]))
    causes = []
    for where, g in groups.items():
        prims = tuple(p for p, _ in sorted(g["prims"].items(), key=lambda kv: -abs(kv[1])))
        causes.append(Cause(where, prims, g["d"], g["n"], *g["top"][1:]))
    objective = sol.cost / 1e6
    extra = objective - plan.solver.objective_s
    scale = max(abs(extra), max((abs(c.delta_s) for c in causes), default=0.0))
    tiny = 1e-3 * scale
    costlier = tuple(sorted((c for c in causes if c.delta_s > tiny), key=lambda c: -c.delta_s)[:top])
    cheaper = tuple(sorted((c for c in causes if c.delta_s < -tiny), key=lambda c: c.delta_s)[:top])
    other = extra - sum(c.delta_s for c in costlier + cheaper)
    if abs(other) <= max(tiny, 5e-8):  # below what the report prints (0.1 µs)
        other = 0.0
    changed = []
    for i in range(len(program.invars)):
        if i != index and before[i].out_specs[0] != after[i].out_specs[0]:
            changed.append(f"{paths[i]}: {_pspec(_spec_names(before[i].out_specs[0], names))} → "
                           f"{_pspec(_spec_names(after[i].out_specs[0], names))}")
    _, _, peak = solvers.evaluate(ip.full, after_idx)
    leaf_spec = after[index].out_specs[0]
    layout = [(p, c.where) for c in costlier[:3] for p in c.primitives[:2] if p in _LAYOUT_PRIMS]
    return Alternative(
        title=title, leaf_spec=_pspec(_spec_names(leaf_spec, names)),
        leaf_split_factor=shard_factor(leaf_spec, mesh.shape),
        objective_s=objective, extra_time_s=extra, peak_memory_bytes=peak,
        extra_memory_bytes=peak - plan.predicted.peak_memory_bytes, solver_status=f"{sol.solver} {sol.status}",
        costlier=costlier, cheaper=cheaper, other_s=other, also_changed=tuple(changed)), layout, after
