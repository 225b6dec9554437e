"""Exact ILP for the sharding problem (the marginal formulation), solved by HiGHS or CBC.

Variables (strategies whose cost is ``inf``, or that no finite edge entry supports, are
removed first by arc consistency; a node left with one strategy is a constant):

    s_v[i] ∈ {0,1}        node v picks strategy i                (``_node_vars``)
    e_uv[i,j] ∈ [0,1]     edge (u,v) picks the pair (i,j); only for finite E_uv[i,j]
                           (an ``inf`` pair is the variable fixed at 0, i.e. omitted)

    minimise  Σ_v Σ_i c_v[i] s_v[i] + Σ_(u,v) Σ_ij E_uv[i,j] e_uv[i,j]

    Σ_i s_v[i] = 1                                 one-hot         (``_node_vars``)
    Σ_j e_uv[i,j] = s_u[i]   for every i of u      marginal rows   (``_edge_vars``)
    Σ_i e_uv[i,j] = s_v[j]   for every j of v      marginal cols   (``_edge_vars``)
    (strategies with identical rows / columns of E_uv share their edge variables: the
    marginals are summed over each group — see ``_edge_vars``)
    Σ_{items covering p} use_j[i] s_{node_j}[i] ≤ limit − base[p]  (``_memory_rows``)

With binary s the marginals force e_uv = s_u ⊗ s_v (a transportation polytope with unit
margins has one vertex), so e may be continuous. Edges to a constant node fold into the
other node's costs; edges with a separable matrix E[i,j] = a_i + b_j fold into both nodes;
parallel edges are summed. Memory rows are built only at maximal time points that can bind
(``Compact.binding``); identical rows keep the tightest right-hand side.

The objective is scaled by a power of two so its largest coefficient is about 1e6 (costs in
seconds ~1e-6 and contest costs ~1e10 both solve well); memory rows stay in their own units
(integral byte counts then cannot be violated by the solver's tolerances). ``highs`` uses
highspy directly (the whole matrix in one call, and the MIP dual bound is readable);
``cbc`` goes through pulp's bundled CBC and reads the bound from its log (``backends``).
The model itself (variables, rows, memory rows) is built by ``solvers.milp``.
"""
from __future__ import annotations

import math
import time

import numpy as np

from .backends import CbcBackend, HighsBackend
from .compact import Compact
from .milp import _add_memory_rows, build
from .problem import Problem, Solution, evaluate


FULL_MEMORY_NNZ = 300_000  # write every memory row up front below this many nonzeros
ROWS_PER_ROUND = 40  # violated memory rows added per round of lazy generation


def solve_ilp(problem: Problem, *, solver: str = "highs", time_limit_s: float | None = None,
              gap_rel: float = 0.0, threads: int | None = None, relax: bool = False,
              start=None, lazy: bool | None = None) -> Solution:
    """Solve ``problem`` exactly (or to ``gap_rel``) with ``solver`` in {"highs", "cbc"}.

    Memory rows are all written when they are few; otherwise (``lazy``) the model starts
    without them and each round adds the most violated row of every violated stretch of
    time, until the solution fits — the optimum of a relaxation that is feasible is optimal,
    and every relaxation's bound is a valid lower bound.

    ``relax=True`` solves the LP relaxation (a lower bound; the rounded choice is returned
    as-is). ``start`` (a feasible choice) seeds HiGHS and is returned if nothing better is
    found. Status: "optimal" (proven), "feasible" (limit hit with an incumbent),
    "infeasible" (proven), "unknown" (limit hit without an incumbent).
    """
    t0 = time.perf_counter()
    sol = solve_compact(Compact.from_problem(problem), solver=solver, time_limit_s=time_limit_s, gap_rel=gap_rel,
                        threads=threads, relax=relax, start=start, lazy=lazy)
    if not sol.feasible and not sol.choice:
        return Solution(choice=(), cost=math.inf, feasible=False, status=sol.status, lower_bound=sol.lower_bound,
                        solver=solver, time_s=time.perf_counter() - t0, stats=sol.stats)
    cost, feasible, peak = evaluate(problem, sol.choice)
    return Solution(choice=sol.choice, cost=cost, feasible=feasible, status=sol.status,
                    lower_bound=min(sol.lower_bound, cost) if feasible and not relax else sol.lower_bound,
                    solver=solver, time_s=time.perf_counter() - t0, stats={**sol.stats, "peak_usage": peak})


def check(cp: Compact, choice) -> tuple[float, bool]:
    """(cost, fits) of a choice on the compact problem (memory checked at maximal points)."""
    choice = np.asarray(choice, dtype=np.int64)
    cost = cp.total_cost(choice)
    fits = cp.limit is None or len(cp.points) == 0 or bool(np.all(cp.load(choice) <= cp.limit * (1 + 1e-9)))
    return cost, math.isfinite(cost) and fits


def solve_compact(cp: Compact, *, solver: str = "highs", time_limit_s: float | None = None,
                  gap_rel: float = 0.0, threads: int | None = None, relax: bool = False,
                  start=None, lazy: bool | None = None, lp_first: bool = False,
                  fix_integral: bool = False) -> Solution:
    """``solve_ilp`` on a :class:`Compact` problem (also used for LNS sub-problems).

    ``lp_first`` (HiGHS) solves the LP relaxation first and branches only if its optimum is
    fractional: LNS sub-problems are usually integral at the root, and the LP is 5–15×
    faster than HiGHS's MIP set-up. ``fix_integral`` then keeps the nodes the LP decided
    integrally and branches on the rest only (a heuristic: the status is at best "feasible")."""
    t0 = time.perf_counter()
    deadline = None if time_limit_s is None else t0 + time_limit_s
    b = build(cp, integer=not relax)
    stats = {"variables": len(b.milp.c), "rows": len(b.milp.rows)}
    if b.infeasible_reason:
        return Solution(choice=(), cost=math.inf, feasible=False, status="infeasible", solver=solver,
                        time_s=time.perf_counter() - t0, stats={**stats, "reason": b.infeasible_reason})
    mem = b.memory
    if lazy is None:
        lazy = mem is not None and mem.total_nnz > FULL_MEMORY_NNZ
    if mem is not None and not lazy:
        _add_memory_rows(b, mem)
    stats.update(rows=len(b.milp.rows), lazy=bool(lazy), build_s=time.perf_counter() - t0)
    if solver == "highs":
        backend = HighsBackend(b, gap_rel, threads)
    elif solver == "cbc":
        backend = CbcBackend(b, gap_rel, threads)
    else:
        raise ValueError(f"unknown ILP {solver=}; expected 'highs' or 'cbc'")

    best = None  # (cost, choice) of the best feasible choice seen
    if start is not None:
        c0, f0 = check(cp, start)
        if f0:
            best = (c0, tuple(int(c) for c in start))
    bound, status, rounds, added, x = -math.inf, "unknown", 0, set(), None
    lp_mode = lp_first and solver == "highs" and not relax and any(b.milp.integer)
    fixed = False
    if lp_mode:  # an integral LP optimum that fits is the MIP optimum, found without branching
        backend.set_relaxation(True)
    while True:
        rounds += 1
        left = None if deadline is None else deadline - time.perf_counter()
        if left is not None and left <= 0:
            status = "feasible" if best else "unknown"
            break
        if b.milp.c:
            status, x, bound = backend.solve(left, best[1] if best and not (relax or lp_mode) else None)
        else:  # nothing left to choose: the one choice's cost is the optimum (and the bound)
            x = np.zeros(0)
            status, bound = "optimal", cp.total_cost(np.asarray(b.decode(x), dtype=np.int64))
        if lp_mode and status != "infeasible" and (x is None or status != "optimal" or not b.integral(x)):
            lp_mode = False  # the relaxation is fractional (or unfinished): branch
            backend.set_relaxation(False)
            if fix_integral and x is not None and status == "optimal":
                backend.fix(b.integral_columns(x))  # heuristic: branch only on the fractional nodes
                fixed = True
            continue
        if x is None:
            break
        choice = tuple(int(c) for c in b.decode(x))
        cost, feasible = check(cp, choice)
        if feasible and (best is None or cost < best[0]):
            best = (cost, choice)
        if relax or not lazy or feasible or status == "infeasible":
            break
        new = _violated_points(cp, np.array(choice), added)
        if not new:
            break
        for p in new:
            added.add(p)
            idx, val, rhs = mem.at(p)
            backend.add_row(idx, val, rhs)
        status = "unknown"  # the relaxation's solution does not fit yet
    elapsed = time.perf_counter() - t0
    stats.update(rounds=rounds, lazy_rows=len(added))
    if status != "optimal":
        bound = max(bound, trivial_bound(cp))
    if relax:
        stats["relaxation"] = status  # "optimal": ``bound`` is the LP optimum
    if relax and x is not None:
        # each node's strategies with a positive LP value (``driver._support_solve``)
        stats["support"] = [al if b.var0[v] < 0 else al[x[b.var0[v]: b.var0[v] + len(al)] > 1e-6]
                            for v, al in enumerate(b.allowed)]
        choice = tuple(int(c) for c in b.decode(x))
        cost, feasible = check(cp, choice)
        return Solution(choice=choice, cost=cost, feasible=feasible, status="feasible" if feasible else "unknown",
                        lower_bound=bound, solver=solver, time_s=elapsed, stats=stats)
    if best is None:
        return Solution(choice=(), cost=math.inf, feasible=False,
                        status="infeasible" if status == "infeasible" else "unknown",
                        lower_bound=bound, solver=solver, time_s=elapsed, stats=stats)
    cost, choice = best
    if fixed:
        status, bound = "feasible", -math.inf
    if status == "optimal" and (not math.isfinite(bound) or cost <= bound + 1e-9 * max(1.0, abs(cost))):
        bound = cost
    else:
        status = "feasible"  # limit hit (or the proven optimum did not fit by tolerances): the incumbent
    return Solution(choice=choice, cost=cost, feasible=True, status=status, lower_bound=min(bound, cost),
                    solver=solver, time_s=elapsed, stats=stats)


def trivial_bound(cp: Compact) -> float:
    """offset + Σ_v min_i c_v[i] + Σ_e min E_e — a lower bound that ignores all coupling."""
    lb = cp.offset + sum(float(np.min(cp.cost[cp.off[v]: cp.off[v + 1]])) for v in range(cp.n))
    for m in cp.edge_costs:
        fin = m[np.isfinite(m)]
        lb += float(fin.min()) if len(fin) else math.inf
    return lb


def _violated_points(cp: Compact, choice: np.ndarray, added: set) -> list[int]:
    """The most violated point of each maximal stretch of violated points (most violated first)."""
    excess = cp.load(choice) - cp.limit * (1 + 1e-12)
    bad = excess > 0
    if not bad.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate([[0], bad.astype(np.int8), [0]])))
    picks = []
    for a, z in zip(edges[::2], edges[1::2]):
        p = a + int(np.argmax(excess[a:z]))
        if p not in added:
            picks.append((excess[p], p))
        else:  # already a row (tolerance): take another point of the stretch
            for q in a + np.argsort(-excess[a:z]):
                if int(q) not in added:
                    picks.append((excess[q], int(q)))
                    break
    picks.sort(reverse=True)
    return [int(p) for _, p in picks[:ROWS_PER_ROUND]]
