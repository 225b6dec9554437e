"""scan / while / cond stay single nodes with the conservative strategy: everything
replicated. Registered explicitly so the report lists them as control flow, not unknown."""
from __future__ import annotations

from .base import register, replicated_rule

CONTROL_FLOW = ("scan", "while", "cond")
register(*CONTROL_FLOW)(replicated_rule)
