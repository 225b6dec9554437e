"""Brute force for the stage DP (``solvers.stage_dp``): every partition × sub-mesh assignment
of a tiny instance, with the same objective, memory rule and tie-break, for tests."""
from __future__ import annotations

import itertools
import math

import numpy as np

from .stage_dp import (StageInfeasibleError, StageProblem, StageSolution, _better, _need, _same, _solution,
                       _stage_range)


def brute_force(p: StageProblem, *, num_stages: int | None = None, limit: int = 200_000) -> StageSolution:
    """Every partition × sub-mesh assignment; same objective, rules and tie-break as
    ``solve_stages``. Raises ValueError when more than ``limit`` plans could be enumerated."""
    L, D, sizes, srange = p.num_layers, p.total_devices, p.sizes, _stage_range(p, num_stages)
    count = sum(math.comb(L - 1, S - 1) * (len(sizes) * p.num_variants) ** S for S in srange)
    if count > limit:
        raise ValueError(f"brute_force: {count} plans > limit {limit}; use solve_stages")
    best, min_mem, needs = None, math.inf, {}

    def visit(plan):
        nonlocal best, min_mem
        S = len(plan)
        if S not in srange or any(not np.isfinite(p._v[0][:, m, k, j]).any() for k, j, m in plan):
            return
        if S not in needs:
            needs[S] = [_need(p, r) for r in range(S, 0, -1)]
        per_stage = [[v for v in range(p.num_variants) if math.isfinite(p._v[0][v, m, k, j])]
                     for k, j, m in plan]
        for vs in itertools.product(*per_stage):  # every variant choice of every stage
            need = max(float(needs[S][i][v, m, k, j]) for i, ((k, j, m), v) in enumerate(zip(plan, vs)))
            min_mem = min(min_mem, need)
            if need <= p.device_memory:
                sol = _solution(p, plan, "optimal", vs)
                if _better(sol, best) or (best is not None and _same(sol, best) and vs < best.variants):
                    best = sol

    def rec(k, d, plan):
        if k == L:
            if d == 0:
                visit(plan)
            return
        for j in range(k + 1, L + 1):
            for m, n in enumerate(sizes):
                if n <= d:
                    rec(j, d - n, plan + [(k, j, m)])

    rec(0, D, [])
    if best is None:
        raise StageInfeasibleError(f"brute_force: no feasible plan; min device memory {min_mem:.6g}", min_mem)
    return best
