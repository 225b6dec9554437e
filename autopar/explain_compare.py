"""The plan and a forced alternative compared (``autopar.explain``): each graph node's
strategy in the plan (matched by name and specs) and in the alternative, their costs node by
node (compute + the collectives inside each equation) and edge by edge (resharding a value
between producer and consumer), grouped by source line into :class:`Cause` values, and a
model-change hint for the costliest layout cause."""
from __future__ import annotations

from autopar import solvers
from autopar.cost import resharding, shard_factor

from .build_edges import Operand
from .explain_leaf import leaf_paths, short_source
from .explanation import Alternative, Cause, ExplainError, _bytes
from .report import _time

# primitives whose cost grows when the pieces of a fused tensor do not line up with the shards
_CUT_PRIMS = {"split", "slice", "dynamic_slice", "concatenate", "pad"}
_LAYOUT_PRIMS = _CUT_PRIMS | {"reshape"}


def pspec(names) -> str:
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
                        src = _spec_names(chosen[u].out_specs[j], names)
                        src = plan.materialized.get(o.id, src)  # read from its shared conversion
                        if _spec_names(sp, names) != e.reshard_inputs.get(k, src):
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
        return f"{shape} {pspec(_spec_names(src, names))}, used as it is (free)"
    coll = ", ".join(f"{kind} over {','.join(names[a] for a in axes)} {_bytes(nbytes)}"
                     for kind, axes, nbytes in parts) or "local slice"
    return (f"{shape} {pspec(_spec_names(src, names))} → {pspec(_spec_names(dst, names))}: {coll} "
            f"({_time(seconds)})")


def _describe_op(ip, v, s, names, seconds) -> str:
    coll = ", ".join(f"{kind} over {','.join(names[a] for a in axes)} {_bytes(nbytes)}"
                     for kind, axes, nbytes in s.comm)
    outs = " ".join(pspec(_spec_names(sp, names)) for sp in s.out_specs if sp is not None)
    return f"{s.name} → {outs}" + (f", {coll}" if coll else "") + f" ({_time(seconds)})"


def hint(layout) -> str:
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


def gathers(ip, index, after) -> bool:
    """Whether a consumer of input ``index`` reads it with fewer mesh axes than it is stored with."""
    for (u, v), ops in zip(ip.edges, ip.edge_operands):
        if u != index:
            continue
        for op in ops:
            src, dst = after[u].out_specs[op.out_index], after[v].in_specs[op.operand]
            if dst is not None and not {a for x in src for a in x} <= {a for x in dst for a in x}:
                return True
    return False


def compare(plan, ip, program, index, sol, top, title) -> tuple[Alternative, set, list]:
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
    # values converted once after they are produced (autopar.build_shared): their readers
    # convert from that spec; the conversion itself is the producer's
    mat_b = {int(vid): tuple(tuple(names.index(a) for a in axes) for axes in spec)
             for vid, spec in plan.materialized.items()}
    mat_a = ip.materialized(sol.choice)
    for m in ip.materialize:
        vid, u, j = m.value.id, m.producer, m.out_index
        if mat_b.get(vid) == mat_a.get(vid) and before[u] is after[u]:
            continue
        op = Operand(u, 0, m.value, u, j)
        (cb, pb), (ca, pa) = [_edge_cost(mesh, op, x[u].out_specs[j], mt.get(vid))
                              for x, mt in ((before, mat_b), (after, mat_a))]
        if cb != ca:  # charged where its first reader is: the reason it is converted
            r = min(n for n, _ in graph.consumers[vid])
            name = graph.nodes[r].name
            add(r, name, ca - cb, f"reshard {_node_label(graph, u, paths)} → {name} (once, for all its readers)",
                _describe_reshard(op, before[u].out_specs[j], mat_b.get(vid), names, cb, pb),
                _describe_reshard(op, after[u].out_specs[j], mat_a.get(vid), names, ca, pa))
    for (u, v), ops in zip(ip.edges, ip.edge_operands):
        if before[u] is after[u] and before[v] is after[v] and not (mat_a or mat_b):
            continue
        for op in ops:
            sb, db = mat_b.get(op.value.id, before[u].out_specs[op.out_index]), before[v].in_specs[op.operand]
            sa, da = mat_a.get(op.value.id, after[u].out_specs[op.out_index]), after[v].in_specs[op.operand]
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
            changed.append(f"{paths[i]}: {pspec(_spec_names(before[i].out_specs[0], names))} → "
                           f"{pspec(_spec_names(after[i].out_specs[0], names))}")
    _, _, peak = solvers.evaluate(ip.full, ip.expand_full(sol.choice))
    leaf_spec = after[index].out_specs[0]
    layout = [(p, c.where) for c in costlier[:3] for p in c.primitives[:2] if p in _LAYOUT_PRIMS]
    return Alternative(
        title=title, leaf_spec=pspec(_spec_names(leaf_spec, names)),
        leaf_split_factor=shard_factor(leaf_spec, mesh.shape),
        objective_s=objective, extra_time_s=extra, peak_memory_bytes=peak,
        extra_memory_bytes=peak - plan.predicted.peak_memory_bytes, solver_status=f"{sol.solver} {sol.status}",
        costlier=costlier, cheaper=cheaper, other_s=other, also_changed=tuple(changed)), layout, after
