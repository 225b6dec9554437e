"""``format_report(plan) -> str``: the strategy report (a pure function of the Plan)."""
from __future__ import annotations

from .emit import to_pspec
from .pytree_json import leaf_paths


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def _time(s: float) -> str:
    if abs(s) >= 1:
        return f"{s:.3f} s"
    if abs(s) >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} µs"


def _paths(tree_json, n: int) -> list[str]:
    return leaf_paths(tree_json, n)


def format_report(plan, *, equations: bool = False, max_collectives: int = 12) -> str:
    p = plan.predicted
    total = plan.nodes * plan.cluster.devices_per_node
    who = "autopar" if plan.strategy_name == "autopar" else f"baseline {plan.strategy_name}"
    lines = [f"{who} plan: {plan.function} on {plan.cluster.name} × {plan.nodes} node(s) = {total} devices",
             f"mesh: {tuple(plan.mesh_shape)} axes {tuple(plan.axis_names)}"]
    cands = ", ".join(f"{tuple(c.mesh_shape)}: " + (_time(c.objective_s) if c.objective_s is not None else c.status)
                      for c in plan.mesh_candidates)
    lines.append(f"meshes tried: {cands}")
    lines.append(f"predicted step time: {_time(p.step_time_s)} (compute {_time(p.compute_s)}, "
                 f"communication {_time(p.comm_s)})")
    lines.append(f"per-device memory: peak {_si(p.peak_memory_bytes, 'B')} "
                 f"(budget {_si(plan.memory_budget_bytes, 'B')}); communication {_si(p.comm_bytes_per_device, 'B')}")
    lines.append("")
    lines.append("inputs (parameters and data):")
    in_paths = _paths(plan.input_tree, len(plan.input_specs_flat))
    w = max((len(x) for x in in_paths), default=0)
    for path, shape, spec in zip(in_paths, plan.input_shapes, plan.input_specs_flat):
        lines.append(f"  {path:<{w}}  {str(tuple(shape)):<18} {to_pspec(spec)}")
    lines.append("outputs:")
    out_paths = _paths(plan.output_tree, len(plan.output_specs_flat))
    for path, spec in zip(out_paths, plan.output_specs_flat):
        lines.append(f"  {path:<{w}}  {to_pspec(spec or [])}")
    lines.append("")
    if p.collectives:
        lines.append(f"collectives ({len(p.collectives)}):")
        for kind, t in p.by_kind.items():
            lines.append(f"  {kind:<18} ×{t.count:<4} {_si(t.bytes, 'B'):>10}  {_time(t.time_s):>10}")
        lines.append(f"  largest {min(max_collectives, len(p.collectives))} (plan.predicted.collectives has all):")
        for c in sorted(p.collectives, key=lambda c: -c.time_s)[:max_collectives]:
            lines.append(f"    {c.kind:<18} over {','.join(c.axes):<4} {_si(c.bytes, 'B'):>10} {_time(c.time_s):>10}  {c.where}")
    else:
        lines.append("collectives: none")
    s = plan.solver
    gap = "n/a" if s.gap is None else f"{s.gap:.2%}"
    bound = "n/a" if s.lower_bound_s is None else _time(s.lower_bound_s)
    lines.append("")
    lines.append(f"solver: {s.solver} {s.status}; objective {_time(s.objective_s)}, lower bound {bound}, gap {gap}; "
                 f"{s.nodes} nodes, {s.edges} edges, {s.strategies} strategies")
    if s.solver.endswith("+start"):
        lines.append("  (+start: the solver stopped at its time limit without beating its warm start, the plan under "
                     "a hand-written input layout rule (pipeline stages: Megatron's DP×TP), so that plan is returned)")
    t = plan.timing
    lines.append(f"planning time: {t.total_s:.2f} s (trace {t.trace_s:.2f} s, strategies {t.strategies_s:.2f} s, "
                 f"solve {t.solve_s:.2f} s)")
    if plan.fallbacks:
        lines.append("fallback ops (replicated):")
        for f in plan.fallbacks:
            lines.append(f"  {f.primitive} ×{f.count}: {f.reason}")
    else:
        lines.append("fallback ops: none")
    if any(e.primitive.startswith("dot_product_attention") and e.strategy.endswith("(cudnn)") for e in plan.eqns):
        from .attention import cudnn_note
        if (note := cudnn_note()) is not None:
            lines.append(note)
    if equations:
        lines.append("")
        lines.append("equations:")
        for e in plan.eqns:
            outs = " ".join(str(to_pspec(s)) for s in e.out_specs if s is not None)
            re_ = "".join(f" reshard[{k}]→{to_pspec(v)}" for k, v in e.reshard_inputs.items())
            lines.append(f"  #{e.index:<4} {e.primitive:<20} {e.strategy:<28} {outs}{re_}  "
                         f"{_time(e.compute_s + e.comm_s)}  {e.source}")
    return "\n".join(lines)
