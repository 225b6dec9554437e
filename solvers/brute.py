"""Exhaustive enumeration for tiny problems — the reference the other solvers are tested against.

All Π_v k_v assignments are scored at once with numpy: total cost
Σ_v c_v[s_v] + Σ_(u,v) E_uv[s_u, s_v] and load at every maximal time point; the cheapest
feasible one wins (ties: the lexicographically smallest choice).
"""
from __future__ import annotations

import math
import time

import numpy as np

from .compact import Compact
from .problem import Problem, Solution, evaluate

MAX_COMBINATIONS = 1_000_000


def solve_brute(problem: Problem, *, max_combinations: int = MAX_COMBINATIONS) -> Solution:
    t0 = time.perf_counter()
    cp = Compact.from_problem(problem)
    total = math.prod(int(k) for k in cp.k)
    if total > max_combinations:
        raise ValueError(
            f"brute force needs {total:.3g} assignments (> {max_combinations=}); "
            "use solver='highs', 'cbc' or 'heuristic' for this problem"
        )
    n = cp.n
    if n == 0:
        choices = np.zeros((1, 0), dtype=np.int64)
    else:
        choices = np.indices(tuple(int(k) for k in cp.k)).reshape(n, -1).T  # lexicographic order
    cost = np.full(len(choices), float(cp.offset))
    for v in range(n):
        cost += cp.cost[cp.off[v] + choices[:, v]]
    for u, v, m in zip(cp.edge_u, cp.edge_v, cp.edge_costs):
        cost += m[choices[:, u], choices[:, v]]
    ok = np.isfinite(cost)
    if cp.limit is not None and len(cp.points):
        load = np.tile(cp.base, (len(choices), 1))
        for v, lo, hi, use in zip(cp.item_node, cp.item_lo, cp.item_hi, cp.item_use):
            load[:, lo:hi] += use[choices[:, v]][:, None]
        ok &= (load <= cp.limit * (1 + 1e-9)).all(axis=1)
    elapsed = time.perf_counter() - t0
    if not ok.any():
        return Solution(choice=(), cost=math.inf, feasible=False, status="infeasible",
                        solver="brute", time_s=elapsed, stats={"assignments": total})
    best = int(np.flatnonzero(ok)[np.argmin(cost[ok])])
    choice = tuple(int(c) for c in choices[best])
    value, feasible, _ = evaluate(problem, choice)
    return Solution(choice=choice, cost=value, feasible=feasible, status="optimal", lower_bound=value,
                    solver="brute", time_s=elapsed, stats={"assignments": total})
