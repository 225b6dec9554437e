"""Per-primitive sharding strategies: one rule table, ``STRATEGY_RULES``."""
from . import control_flow, conv, dot_general, elementwise, gather, reshape  # noqa: F401  (register rules)
from .base import STRATEGY_RULES, Strategy, enumerate_specs, replicate, replicated_rule, spec_name
from .control_flow import CONTROL_FLOW


def strategies_for(node, mesh) -> tuple[list[Strategy], str | None]:
    """(strategies, fallback reason or None). Unknown primitives are replicated only."""
    rule = STRATEGY_RULES.get(node.name)
    if rule is None:
        return replicated_rule(node, mesh), "unsupported primitive: replicated"
    strats = rule(node, mesh)
    if not strats:
        return replicated_rule(node, mesh), "no valid split: replicated"
    if node.name in CONTROL_FLOW:
        return strats, "control flow: replicated"
    return strats, None


__all__ = ["STRATEGY_RULES", "Strategy", "enumerate_specs", "replicate", "replicated_rule", "spec_name",
           "strategies_for"]
