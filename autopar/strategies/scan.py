"""Strategies of a scan's boundary equations (``autopar.trace.Region``): the body itself is
planned like straight-line code, one strategy per equation for every iteration.

* ``scan_carry_in`` / ``scan_carry_out``: the carry keeps its spec (the initial value is
  resharded once at loop entry if it comes laid out otherwise); ``graph.ties`` makes the
  body's end-of-iteration carry take the same spec.
* ``scan_slice``: the stacked ``xs`` (length, …) → one iteration's slice: any spec of the
  slice, the stacked array unsplit on its leading (iteration) dim — a slice is then local.
* ``scan_stack``: the body's output → the stacked ``ys``, the same way round.

Splitting the iteration dim over devices is not offered: every iteration would then need
data from other devices (a gather per step).
"""
from __future__ import annotations

from ..trace import Lit
from .base import Strategy, enumerate_specs, follow_output, spec_name
from .registry import register


@register("scan_carry_in", "scan_carry_out")
def carry_rule(node, mesh) -> list[Strategy]:
    return follow_output(node, mesh)


@register("scan_slice")
def slice_rule(node, mesh) -> list[Strategy]:
    return [Strategy(spec_name(s), (s,), (((),) + s,)) for s in enumerate_specs(tuple(node.outputs[0].shape), mesh.shape)]


@register("scan_stack")
def stack_rule(node, mesh) -> list[Strategy]:
    (x,) = node.operands
    return [Strategy(spec_name(s), (((),) + s,), (None if isinstance(x, Lit) else s,))
            for s in enumerate_specs(tuple(node.outputs[0].shape[1:]), mesh.shape)]
