"""The memory-free LP relaxation ``driver._lp_first`` solves, remembered per process by what
it depends on: the objective — node costs, edges, edge costs, offset — of the (presolved)
problem. Memory rows are not in it, so problems that differ only in their usages or usage
limit have the same LP: a pipeline stage planned again for its micro-batches in flight
(GPT-175B's 3-layer stage on 4 × 8 H100s with 17, then 16 in flight: the same presolved
problem, a 2.5 s LP, and the same 1 s LP of its warm-start rule's restriction). HiGHS solves
a given LP deterministically, so a remembered relaxation is the one a new solve would return;
only relaxations solved to optimality are kept (one stopped by its time limit depends on the
machine's load). The choice it rounds to is scored again on each problem (whether it fits
its memory). A remembered LP is charged to a time-limited solve's clock as if solved again
(``driver._auto_exact``), so what follows it gets the same time either way: the memo saves
the LP's time and changes no decision — the plan is the same with one worker process (one memo)
as with two (one per process)."""
from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict

import numpy as np

from .problem import Problem, Solution, evaluate

# relaxations kept (least recently used dropped first): a handful of stage problems at a time
MEMO_ENTRIES = 16
_MEMO: OrderedDict = OrderedDict()


def objective_key(problem: Problem) -> str:
    """A digest of everything the memory-free LP relaxation of ``problem`` depends on."""
    h = hashlib.sha256()
    for c in problem.node_costs:
        h.update(len(c).to_bytes(4, "little"))
        h.update(np.ascontiguousarray(c, dtype=np.float64).tobytes())
    h.update(np.asarray(problem.edges, dtype=np.int64).tobytes())
    for m in problem.edge_costs:
        h.update(np.asarray(m.shape, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(m, dtype=np.float64).tobytes())
    h.update(repr(float(problem.cost_offset)).encode())
    return h.hexdigest()


def remembered(problem: Problem, key: str) -> Solution | None:
    """The relaxation remembered for ``key``, its rounded choice scored on ``problem``."""
    sol = _MEMO.get(key)
    if sol is None:
        return None
    _MEMO.move_to_end(key)
    cost, fits, peak = evaluate(problem, sol.choice) if sol.choice else (sol.cost, False, 0.0)
    return dataclasses.replace(sol, cost=cost, feasible=fits, status="feasible" if fits else "unknown",
                               stats={**sol.stats, "peak_usage": peak, "remembered": True})


def remember(key: str, sol: Solution) -> None:
    """Keep a relaxation solved to optimality (``stats["relaxation"]``), with its support."""
    if sol.stats.get("relaxation") != "optimal":
        return
    _MEMO[key] = dataclasses.replace(sol, stats=dict(sol.stats))
    _MEMO.move_to_end(key)
    while len(_MEMO) > MEMO_ENTRIES:
        _MEMO.popitem(last=False)


def forget() -> None:
    """Drop every remembered relaxation."""
    _MEMO.clear()


__all__ = ["MEMO_ENTRIES", "objective_key", "remembered", "remember", "forget"]
