"""The one entry point: ``solve(problem) -> Solution`` (presolve, pick a solver, map back).

    1. usage_limit < min peak usage (every node at its least-usage strategy)  → InfeasibleError
    2. presolve (exact reductions, ``solvers.presolve``)
    3. solver on the reduced problem:
         "brute"     exhaustive (tiny problems only)
         "highs"     marginal ILP with HiGHS            ("cbc": the same with CBC)
         "heuristic" memory-aware local search + ILP neighbourhoods
         "auto"      HiGHS when the reduced ILP is small (≤ AUTO_ILP_VARIABLES), falling back
                     to the heuristic if HiGHS finds nothing in time; up to AUTO_LP_VARIABLES
                     the LP relaxation alone, kept when it is integral and fits memory;
                     the heuristic otherwise
    4. the reduced choice is restored to the original nodes and re-scored with ``evaluate``.

``time_limit_s`` covers all of it (None: exact solvers run to optimality, the heuristic
gets DEFAULT_HEURISTIC_S).

``start`` (a warm start: a choice, or a function of the seconds left that returns one or
None) is what a time limit must never make the result worse than; the time it takes is not
counted against ``time_limit_s`` (the solver keeps its full time). It is asked for only when
the solve would not be exact at once (not when an integral LP optimum settles it), seeds
the ILP (mapped through presolve, ``Presolved.forward``; the better of it and the quick
heuristic incumbent) and is returned itself when nothing better is found
(``solver`` then ends in ``+start``).
"""
from __future__ import annotations

import math
import time

import numpy as np

from .brute import solve_brute
from .heuristic import solve_heuristic
from .ilp import solve_ilp
from .milp import unique_rows
from .presolve import presolve as run_presolve
from .problem import InfeasibleError, Problem, Solution, evaluate

SOLVERS = ("auto", "cbc", "highs", "heuristic", "brute")
AUTO_ILP_VARIABLES = 200_000
# above AUTO_ILP_VARIABLES, up to this size the LP relaxation is tried first (≤ AUTO_LP_S, and at
# most 30 % of the time limit): when it is integral and fits memory it is the proven optimum
AUTO_LP_VARIABLES, AUTO_LP_S = 1_000_000, 30.0
DEFAULT_HEURISTIC_S = 60.0


def ilp_size(problem: Problem, cap: float = math.inf) -> int:
    """Variables of the marginal ILP: strategies + edge variables, where strategies with
    identical rows / columns of an edge matrix share variables (as ``milp._edge_vars`` does).
    Counting stops once the size exceeds ``cap``."""
    size = sum(len(c) for c in problem.node_costs if len(c) > 1)
    for (u, v), m in zip(problem.edges, problem.edge_costs):
        if size > cap:
            break
        if len(problem.node_costs[u]) > 1 and len(problem.node_costs[v]) > 1:
            rows = unique_rows(m)[0]
            size += len(rows) * len(unique_rows(rows.T)[0])
    return size


def solve(problem: Problem, *, solver: str = "auto", time_limit_s: float | None = None,
          presolve: bool = True, seed: int = 0, gap_rel: float = 0.0, start=None) -> Solution:
    """Best choice for ``problem`` (in its own node order), scored by ``evaluate``.

    ``gap_rel``: the ILP stops once its incumbent is proven within this relative gap of the
    optimum (0: prove optimality; the planner passes ``autopar.planner.MIP_GAP`` = 1e-3 —
    closing the last 0.1 % of a predicted step time can take HiGHS minutes). ``start``: a warm start (module doc)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown {solver=}; expected one of {SOLVERS}")
    t0 = time.perf_counter()
    min_peak = problem.min_peak_usage() if problem.usage_limit is not None else 0.0
    if problem.usage_limit is not None and problem.usage_limit < min_peak * (1 - 1e-12):
        raise InfeasibleError(
            f"usage_limit={problem.usage_limit:.6g} is below the minimum peak usage {min_peak:.6g} "
            f"(every node at its least-usage strategy); raise the limit to at least min_peak_usage={min_peak:.6g}",
            min_peak_usage=min_peak)
    stats: dict = {}
    if presolve:
        try:
            ps = run_presolve(problem)
        except InfeasibleError as err:
            raise InfeasibleError(str(err), min_peak_usage=min_peak) from None
        reduced, restore, forward = ps.problem, ps.restore, ps.forward
        stats["presolve"] = ps.stats
    else:
        reduced, restore, forward = problem, (lambda c: tuple(int(x) for x in c)), (lambda c: tuple(c))

    start_s = 0.0  # the warm start's own solve (not counted against time_limit_s)

    def left() -> float | None:
        return None if time_limit_s is None else max(0.0, time_limit_s + start_s - (time.perf_counter() - t0))

    warm, asked = None, False  # (cost, choice, peak) of the warm start in the original problem; asked for yet

    def warm_start() -> None:
        nonlocal warm, asked, start_s
        if start is None or asked:
            return
        asked, ts = True, time.perf_counter()
        choice = start(left()) if callable(start) else start
        if choice is not None:
            cost, feasible, peak = evaluate(problem, choice)
            warm = (cost, tuple(int(c) for c in choice), peak) if feasible else None
        start_s = stats["start_s"] = time.perf_counter() - ts

    def ilp_start():
        """The ILP's incumbent on the reduced problem: the warm start (if it has finite cost
        and fits) or the quick heuristic's, whichever is cheaper."""
        warm_start()
        seeds = [forward(warm[1])] if warm is not None else []
        seeds = [c for c in seeds if c is not None] + [_quick_start(reduced, left())]
        scored = [(evaluate(reduced, c), c) for c in seeds if c is not None]
        scored = [(r[0], c) for r, c in scored if r[1]]
        return min(scored, key=lambda x: x[0])[1] if scored else None

    name = solver
    if solver == "brute":
        sol = solve_brute(reduced)
    elif solver in ("highs", "cbc"):
        sol = solve_ilp(reduced, solver=solver, time_limit_s=left(), start=ilp_start(), gap_rel=gap_rel)
    elif solver == "heuristic":
        warm_start()
        sol = solve_heuristic(reduced, time_limit_s=_heuristic_time(left()), seed=seed)
    else:
        size = ilp_size(reduced, cap=AUTO_LP_VARIABLES)
        stats["ilp_size"] = size
        sol = None
        if size <= AUTO_ILP_VARIABLES:
            name = "auto:highs"
            sol = _lp_first(reduced, left(), gap_rel)
            if sol is None:
                sol = solve_ilp(reduced, solver="highs", time_limit_s=left(), start=ilp_start(), gap_rel=gap_rel)
            else:
                name = "auto:highs-lp"
        elif size <= AUTO_LP_VARIABLES:  # too big for the MILP, but its LP is often integral: try it, briefly
            limit = left()
            sol = _lp_first(reduced, min(AUTO_LP_S, 0.3 * limit) if limit is not None else AUTO_LP_S, gap_rel)
            name = "auto:highs-lp"
        if sol is None or (not sol.feasible and sol.status != "infeasible"):
            name = "auto:heuristic"
            warm_start()
            budget = left()
            sol = solve_heuristic(reduced, time_limit_s=_heuristic_time(budget), seed=seed)
    stats["solver"] = sol.stats
    elapsed = time.perf_counter() - t0
    found = None  # (choice, cost, fits, peak) of the solver's answer, in the original problem
    if sol.feasible:
        choice = restore(sol.choice)
        found = (choice, *evaluate(problem, choice))
    if warm is not None and warm[0] < (found[1] if found else math.inf):  # never worse than the warm start
        stats["peak_usage"] = warm[2]
        return Solution(choice=warm[1], cost=warm[0], feasible=True, status="feasible",
                        lower_bound=min(sol.lower_bound, warm[0]), solver=name + "+start", time_s=elapsed,
                        stats=stats)
    if sol.status == "infeasible":
        raise InfeasibleError(
            f"no assignment has finite cost and fits usage_limit={problem.usage_limit} ({name} proved it); "
            f"minimum peak usage is {min_peak:.6g}", min_peak_usage=min_peak)
    if found is None:
        return Solution(choice=(), cost=math.inf, feasible=False, status="unknown", lower_bound=sol.lower_bound,
                        solver=name, time_s=elapsed, stats=stats)
    choice, cost, feasible, peak = found
    stats["peak_usage"] = peak
    bound = min(sol.lower_bound, cost) if feasible else sol.lower_bound
    return Solution(choice=choice, cost=cost, feasible=feasible, status=sol.status if feasible else "unknown",
                    lower_bound=bound, solver=name, time_s=time.perf_counter() - t0, stats=stats)


def _lp_first(problem: Problem, time_left: float | None, gap_rel: float) -> Solution | None:
    """The marginal LP relaxation is often integral on sharding problems (measured: every GPT
    mesh in benchmarks/plan_time.py), and the memory limit rarely binds. The LP is solved
    without memory rows; its rounded choice is returned when it fits the memory limit and is
    within ``gap_rel`` of the LP bound (that bound proves it); otherwise None → the MILP."""
    if problem.num_nodes == 0:
        return None
    # without memory rows (lazy, relax: none are added): still a lower bound of the real problem,
    # and when the rounded choice fits memory nothing else is needed
    lp = solve_ilp(problem, solver="highs", relax=True, time_limit_s=time_left, lazy=True)
    if not lp.feasible or not math.isfinite(lp.lower_bound) or not lp.choice:
        return None
    if lp.cost - lp.lower_bound > max(gap_rel * abs(lp.cost), 1e-9 * max(1.0, abs(lp.cost))):
        return None
    status = "optimal" if lp.cost - lp.lower_bound <= 1e-9 * max(1.0, abs(lp.cost)) else "feasible"
    return Solution(choice=lp.choice, cost=lp.cost, feasible=True, status=status, lower_bound=lp.lower_bound,
                    solver="highs-lp", time_s=lp.time_s, stats=lp.stats)


def _heuristic_time(time_left: float | None) -> float:
    """The heuristic runs to its limit; keep ~1 s (2 % of longer limits) for restoring and
    re-scoring the choice so the whole solve stays within ``time_limit_s``."""
    if time_left is None:
        return DEFAULT_HEURISTIC_S
    return max(0.05, time_left - min(1.0 + 0.005 * time_left, 0.1 * time_left))


def _quick_start(problem: Problem, time_left: float | None):
    """A feasible incumbent for a time-limited ILP (least-usage start + memory-aware ICM)."""
    if time_left is None or problem.num_nodes == 0:
        return None
    sol = solve_heuristic(problem, time_limit_s=min(5.0, 0.1 * time_left), lns=False)
    return sol.choice if sol.feasible else None
