"""scan / while / cond stay single nodes with the conservative strategy: everything
replicated. Registered explicitly so the report lists them as control flow, not unknown.
Their FLOPs are their bodies': the taken branch is the dearest one, a while loop runs its
body at least once."""
from __future__ import annotations

from .base import replicated_rule
from .registry import jaxpr_flops, register

CONTROL_FLOW = ("scan", "while", "cond")


def cond_flops(params: dict, operands: list, outputs: list) -> float:
    return max((jaxpr_flops(b.jaxpr) for b in params["branches"]), default=0.0)


def while_flops(params: dict, operands: list, outputs: list) -> float:
    return jaxpr_flops(params["body_jaxpr"].jaxpr) + jaxpr_flops(params["cond_jaxpr"].jaxpr)


def scan_flops(params: dict, operands: list, outputs: list) -> float:
    return int(params["length"]) * jaxpr_flops(params["jaxpr"].jaxpr)


register("cond", flops=cond_flops)(replicated_rule)
register("while", flops=while_flops)(replicated_rule)
register("scan", flops=scan_flops)(replicated_rule)
