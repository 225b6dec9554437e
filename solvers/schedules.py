"""Pipeline schedules and the one rule for how many micro-batches a stage holds in flight.

A stage keeps the activations (``jax.vjp`` residuals) of every micro-batch whose forward it
has run and whose backward it has not. At its peak, with ``r`` stages from it to the last
(r = 1 for the last stage) and B micro-batches:

    GPipe: all B forwards run before any backward           → B
    1F1B:  a stage starts its backwards after r warm-up forwards → min(r, B)

The stage DP (``solvers.stage_dp``), the stage planner (``autopar.pipeline``) and the
runtime's schedule (``autopar.pipeline.schedule.peak_inflight``, which measures it on the
simulated task order) all use this rule. Interleaved 1F1B (several model chunks per device
group, ``autopar.pipeline.interleave``) is not a rule of this kind: its groups' activations
are measured on the simulated order (``autopar.pipeline.schedule.peak_held``).
"""
from __future__ import annotations

from enum import Enum


class Schedule(str, Enum):
    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"

    def inflight(self, remaining: int, num_microbatches: int) -> int:
        """Micro-batches in flight at the peak of a stage with ``remaining`` stages from it to
        the last (itself included)."""
        return min(remaining, num_microbatches) if self is Schedule.ONE_F_ONE_B else num_microbatches


SCHEDULES = tuple(s.value for s in Schedule)
