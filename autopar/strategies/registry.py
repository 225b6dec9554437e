"""The per-primitive table: every fact autopar keeps about a primitive, declared in one call.

Like jax's ``standard_primitive(shape_rule, dtype_rule, name, sharding_rule=…)``, one
:func:`register` call declares for each primitive name

* its sharding strategies: ``STRATEGY_RULES[name](node, mesh) -> list[Strategy]`` (the
  decorated function; a primitive missing here is planned replicated, ``strategies_for``);
* its FLOPs per execution: ``FLOPS_RULES[name](params, operands, outputs)`` (operands and
  outputs: anything with ``.shape``; default :func:`output_elements`); ``graph.build_graph``
  reads them through :func:`primitive_flops`;
* whether XLA fuses it away, its output never materialised: ``FUSION_RULES[name]``
  (:class:`Fusion`; ``xla_view.fused_nodes`` charges such a node no memory).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from autopar.cost import MeshModel

from ..trace import INLINE_PARAMS

if TYPE_CHECKING:
    from ..graph import Node
    from .base import Strategy

Rule = Callable[["Node", MeshModel], "list[Strategy]"]
FlopsRule = Callable[[dict, list, list], float]


@dataclass(frozen=True)
class Fusion:
    """XLA fuses the op into its consumers when every consumer is one of ``into`` (and, with
    ``single_consumer``, there is exactly one): its output holds no buffer of its own."""

    into: frozenset[str]
    single_consumer: bool = False


def num_elements(values) -> int:
    """Σ_v ∏ v.shape."""
    return sum(math.prod(v.shape) for v in values)


def output_elements(params: dict, operands: list, outputs: list) -> float:
    """One FLOP per output element (elementwise ops; the default)."""
    return float(num_elements(outputs))


def operand_elements(params: dict, operands: list, outputs: list) -> float:
    """One FLOP per operand element (reductions, scans along a dim, arg-min/max)."""
    return float(num_elements(operands))


STRATEGY_RULES: dict[str, Rule] = {}
FLOPS_RULES: dict[str, FlopsRule] = {}
FUSION_RULES: dict[str, Fusion] = {}


def register(*names: str, flops: FlopsRule = output_elements, fusion: Fusion | None = None):
    """Decorator: the function is the strategy rule of ``names``; ``flops`` and ``fusion`` are
    their FLOPs and fusion facts (decorators stack where names differ in FLOPs)."""
    def deco(rule: Rule) -> Rule:
        for n in names:
            STRATEGY_RULES[n] = rule
            FLOPS_RULES[n] = flops
            if fusion is not None:
                FUSION_RULES[n] = fusion
        return rule
    return deco


def primitive_flops(name: str, params: dict, operands: list, outputs: list) -> float:
    """FLOPs of one execution of primitive ``name`` (unregistered: one per output element)."""
    return FLOPS_RULES.get(name, output_elements)(params, operands, outputs)


def jaxpr_flops(jaxpr) -> float:
    """FLOPs of a (jax.extend.core) jaxpr, nested calls and control flow included."""
    total = 0.0
    for e in jaxpr.eqns:
        body = e.params.get(INLINE_PARAMS.get(e.primitive.name, ""))
        if body is not None:
            total += jaxpr_flops(getattr(body, "jaxpr", body))
        else:
            total += primitive_flops(e.primitive.name, e.params, [v.aval for v in e.invars],
                                     [v.aval for v in e.outvars])
    return total
