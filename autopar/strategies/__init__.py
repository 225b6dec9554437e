"""Per-primitive sharding strategies, FLOPs and fusion facts: one table (``registry``), filled by
one ``register`` call per primitive (or family) in the modules below."""
from . import attention, control_flow, conv, dot_general, elementwise, gather, reshape, scan  # noqa: F401  (register rules)
from .base import Fallback, Strategy, enumerate_specs, replicate, replicated_rule, spec_name
from .control_flow import CONTROL_FLOW
from .registry import FLOPS_RULES, FUSION_RULES, STRATEGY_RULES, Fusion, jaxpr_flops, primitive_flops, register


def _is_replicated(s: Strategy) -> bool:
    return not any(axes for sp in (*s.out_specs, *(x for x in s.in_specs if x is not None)) for axes in sp)


def strategies_for(node, mesh) -> tuple[list[Strategy], str | None]:
    """(strategies, fallback reason or None). Unknown primitives are replicated only; so is a
    node whose rule raises :class:`Fallback`, and one whose rule offers only the replicated
    strategy although an output could be split on this mesh: all are reported."""
    rule = STRATEGY_RULES.get(node.name)
    if rule is None:
        return replicated_rule(node, mesh), "unsupported primitive: replicated"
    try:
        strats = rule(node, mesh)
    except Fallback as err:
        return replicated_rule(node, mesh), str(err)
    if not strats:
        return replicated_rule(node, mesh), "no valid split: replicated"
    if node.name in CONTROL_FLOW:
        return strats, "control flow: replicated"
    if all(map(_is_replicated, strats)) and any(
            len(enumerate_specs(tuple(v.shape), mesh.shape)) > 1 for v in node.outputs):
        return strats, "no valid split: replicated"
    return strats, None


__all__ = ["FLOPS_RULES", "FUSION_RULES", "STRATEGY_RULES", "Fallback", "Fusion", "Strategy", "enumerate_specs",
           "jaxpr_flops", "primitive_flops", "register", "replicate", "replicated_rule", "spec_name", "strategies_for"]
