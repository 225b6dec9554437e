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
                     the heuristic otherwise. A fractional LP optimum is first tried on
                     its support (the ILP restricted to the strategies the LP uses):
                     kept when within ``gap_rel`` of the LP bound; a MILP that would
                     have less than MILP_MIN_LP_TIMES LP times left is not started
    4. the reduced choice is restored to the original nodes and re-scored with ``evaluate``.

``time_limit_s`` covers all of it (None: exact solvers run to optimality, the heuristic
gets DEFAULT_HEURISTIC_S).

``cutoff``: only a choice costing less than this matters to the caller (e.g. another logical
mesh already has a plan at that cost). When the LP relaxation's bound (``_lp_first``; without
memory rows it bounds every choice) reaches it, the MILP is skipped; the answer is then, as
when the proven optimum is not below it, status ``"cutoff"`` (``feasible`` False,
``lower_bound`` ≥ cutoff). Otherwise the solve is the same as without a cutoff. (HiGHS's own
``objective_bound`` is not used: measured on a GPT-39B stage ILP, with it the time-limited
MIP found no incumbent at all where without it found one.)

``start`` (a warm start: a choice, or a function of the seconds left that returns one or
None) is what a time limit must never make the result worse than; the time it takes is not
counted against ``time_limit_s`` (the solver keeps its full time). It is asked for only when
the solve would not be exact at once (not when an integral LP optimum settles it), seeds
the ILP (mapped through presolve, ``Presolved.forward``; the best of it, the quick heuristic
incumbent and the LP's rounded / support choices) — or the heuristic, where "auto" falls back
to it (the best of it and the LP support's choice) — and is returned itself when nothing better
is found (``solver`` then ends in ``+start``). A function that takes a ``cutoff`` keyword is
given the cost of the best of those other incumbents: a start costing at least that can
neither seed nor win, so it may return None as soon as it proves that none costs less
(``autopar.warm_start``: the rule's LP bound), without solving its own ILP.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .brute import solve_brute
from .heuristic import solve_heuristic
from .ilp import solve_ilp
from .incumbents import Clock, Scored, WarmStart, ilp_start
from .milp import grouping
from .presolve import presolve as run_presolve
from .presolved import Presolved
from .problem import InfeasibleError, Problem, Solution, evaluate
from .relaxation import RelaxationCache, lp_first as _lp_first, memory_free, relax

SOLVERS = ("auto", "cbc", "highs", "heuristic", "brute")
AUTO_ILP_VARIABLES = 200_000
# above AUTO_ILP_VARIABLES, up to this size the LP relaxation is tried first (≤ AUTO_LP_S, and at
# most 30 % of the time limit): when it is integral and fits memory it is the proven optimum
AUTO_LP_VARIABLES, AUTO_LP_S = 1_000_000, 30.0
DEFAULT_HEURISTIC_S = 60.0
# a time-limited MILP whose LP support did not settle it first gets the local search (with ILP
# neighbourhoods) from the support's choice for this long, within the limit: measured on
# GPT-175B 3-layer stages on a 4 × 8 mesh, the whole solve (10 s limit) came out 0.9 % cheaper
# (two stages; the MILP alone had returned the support's choice unchanged)
SUPPORT_LNS_S, SUPPORT_LNS_SHARE = 2.0, 0.2
# a time-limited MILP is not started with less than this many times its LP relaxation's time left
# (its root LP has the memory rows and cuts besides: the incumbent is returned, with the LP's
# bound). Measured on every "auto" MILP of GPT-175B plans on 128 and 1,024 H100s (79 solves:
# single layers within a share, 3-layer stages on (4, 8) with 5.8 s left after 2.9 s of LP): below
# 10 LP times not one improved its start — the 3-layer stages' MILPs ended in their root node
# after 6 s —; the two that did, 27 % and 39 %, had 65–75 LP times left. Those were times of the
# LP on the memory-aware presolved problem (the MILP's root LP, memory rows aside); the LP is now
# solved on the smaller memory-free one (``solvers.relaxation``), 0.9–3.0× as fast on twelve
# GPT-175B LPs: 30 of its times are 10–32 of the old, still well below 65
MILP_MIN_LP_TIMES = 30.0


def ilp_size(problem: Problem, cap: float = math.inf) -> int:
    """Variables of the marginal ILP: strategies + edge variables, where strategies with
    identical rows / columns of an edge matrix share variables (as ``milp._edge_vars`` does).
    Counting stops once the size exceeds ``cap``."""
    size = sum(len(c) for c in problem.node_costs if len(c) > 1)
    for (u, v), m in zip(problem.edges, problem.edge_costs):
        if size > cap:
            break
        if len(problem.node_costs[u]) > 1 and len(problem.node_costs[v]) > 1:
            sides = grouping(m)[5]
            size += len(sides[0][2]) * len(sides[1][2])  # row groups × column groups
    return size


def solve(problem: Problem, *, solver: str = "auto", time_limit_s: float | None = None,
          presolve: bool = True, seed: int = 0, gap_rel: float = 0.0, start=None,
          cutoff: float | None = None, lp_time_s: float | None = None, stall_s: float | None = None,
          relaxations: RelaxationCache | None = None) -> Solution:
    """Best choice for ``problem`` (in its own node order), scored by ``evaluate``.

    ``gap_rel``: the ILP stops once its incumbent is proven within this relative gap of the
    optimum (0: prove optimality; the planner passes ``autopar.planner.MIP_GAP`` = 1e-3 —
    closing the last 0.1 % of a predicted step time can take HiGHS minutes). ``seed``: the
    heuristic's random seed. ``start``: a warm start, ``cutoff``: see the module doc.
    ``lp_time_s`` ("auto"): seconds its LP relaxation may take outside ``time_limit_s``,
    which is then the MILP's, the support's and the heuristic's alone (None: the LP takes its
    time from the limit; an ILP too big for the MILP gives it min(AUTO_LP_S, 30 % of the
    limit)). The LP is the way to an exact answer — integral and fitting on most sharding
    problems —, and whether it finishes within a short limit depends on the machine's load:
    measured, the MoE-10B stages on (1, 8), 5–12 s of LP each, integral; with 3 s of a 10 s
    limit each went to the heuristic, 10–14 % above the optimum, and the step rose 4.12 →
    4.37 s; a 4-layer GPT's single layers on (2, 2), 0.3–0.5 s of LP under a 1 s limit, took
    1 s and more with two planning processes on two busy cores, and the plan changed.
    ``stall_s``: the heuristic (``"heuristic"``, or "auto"'s fallback to it) stops once it
    has found nothing better for that long, and for as long as its last improvement took
    (``solvers.heuristic._Stall``; None: it runs to its time limit). ``relaxations``: LP
    relaxations already solved, by the problem's costs ("auto"; ``solvers.relaxation``: the
    same problem at another usage limit, or with other usages, solves none again)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown {solver=}; expected one of {SOLVERS}")
    clock = Clock(time_limit_s)
    min_peak = _check_usage_limit(problem)
    stats: dict = {}
    reduced = _presolved(problem, min_peak, stats) if presolve else _Reduced.identity(problem)
    warm = WarmStart(problem, start, clock, stats)
    name, sol = _run_solver(solver, reduced, warm, clock, gap_rel=gap_rel, seed=seed, stats=stats, cutoff=cutoff,
                            lp_time_s=lp_time_s, stall_s=stall_s, relaxations=relaxations)
    stats["solver"] = sol.stats
    if sol.status != "cutoff":
        sol = _answer(problem, reduced, name, sol, warm.value, min_peak, clock, stats)
        if cutoff is None or sol.status != "optimal" or sol.cost < cutoff:
            return sol
    # (the presolved problem's costs are the original's: its bound is theirs)
    return Solution(choice=(), cost=math.inf, feasible=False, status="cutoff",
                    lower_bound=max(sol.lower_bound, cutoff), solver=name, time_s=clock.elapsed(), stats=stats)


@dataclass(frozen=True)
class _Reduced:
    """The problem the solver sees and the maps between its choices and the original's."""
    problem: Problem
    restore: Callable  # reduced choice → original choice
    forward: Callable  # original choice → reduced choice (None: none matches)
    forward_sets: Callable  # strategies per original node → per reduced node
    original: Problem
    presolved: Presolved | None = None  # (``relaxation.relax``: reused when its limit cannot bind)

    @staticmethod
    def identity(problem: Problem) -> "_Reduced":
        return _Reduced(problem, lambda c: tuple(int(x) for x in c), lambda c: tuple(c), list, problem)


def _check_usage_limit(problem: Problem) -> float:
    """The minimum peak usage (every node at its least-usage strategy; 0 without a limit);
    InfeasibleError when the usage limit is below it."""
    min_peak = problem.min_peak_usage() if problem.usage_limit is not None else 0.0
    if problem.usage_limit is not None and problem.usage_limit < min_peak * (1 - 1e-12):
        raise InfeasibleError(
            f"usage_limit={problem.usage_limit:.6g} is below the minimum peak usage {min_peak:.6g} "
            f"(every node at its least-usage strategy); raise the limit to at least min_peak_usage={min_peak:.6g}",
            min_peak_usage=min_peak)
    return min_peak


def _presolved(problem: Problem, min_peak: float, stats: dict) -> _Reduced:
    try:
        ps = run_presolve(problem)
    except InfeasibleError as err:
        raise InfeasibleError(str(err), min_peak_usage=min_peak) from None
    stats["presolve"] = ps.stats
    return _Reduced(ps.problem, ps.restore, ps.forward, ps.forward_sets, problem, ps)


def _run_solver(solver: str, reduced: _Reduced, warm: WarmStart, clock: Clock, *, gap_rel: float, seed: int,
                stats: dict, cutoff: float | None = None, lp_time_s: float | None = None,
                stall_s: float | None = None, relaxations: RelaxationCache | None = None) -> tuple[str, Solution]:
    """(the solver's name as reported, its solution of the reduced problem)."""
    p = reduced.problem
    if solver == "brute":
        return solver, solve_brute(p)
    if solver in ("highs", "cbc"):
        return solver, solve_ilp(p, solver=solver, time_limit_s=clock.left(),
                                 start=ilp_start(reduced, warm, clock), gap_rel=gap_rel)
    if solver == "heuristic":
        warm.ask()
        return solver, solve_heuristic(p, time_limit_s=_heuristic_time(clock.left()), seed=seed, stall_s=stall_s)
    found: list = []  # incumbents (reduced choices) the LP's support gave on the way
    name, sol = _auto_exact(reduced, warm, clock, gap_rel=gap_rel, stats=stats, cutoff=cutoff, lp_time_s=lp_time_s,
                            found=found, relaxations=relaxations)
    if sol is None or (not sol.feasible and sol.status not in ("infeasible", "cutoff")):
        # the heuristic starts from the best of those and the warm start (asked with their cost
        # as its cutoff, as the MILP's is: ``ilp_start``)
        start = ilp_start(reduced, warm, clock, found, quick=False)
        name, sol = "auto:heuristic", solve_heuristic(p, time_limit_s=_heuristic_time(clock.left()), seed=seed,
                                                      start=None if start is None else np.asarray(start),
                                                      stall_s=stall_s)
    return name, sol


def _auto_exact(reduced: _Reduced, warm: WarmStart, clock: Clock, *, gap_rel: float,
                stats: dict, cutoff: float | None = None, lp_time_s: float | None = None,
                found: list | None = None, relaxations: RelaxationCache | None = None) -> tuple[str, Solution | None]:
    """"auto" by the reduced ILP's size: its LP relaxation, then HiGHS (small; not started
    with less than ``MILP_MIN_LP_TIMES`` LP times left: its incumbent, with the LP's bound); the LP
    relaxation alone, briefly (medium); nothing (large: the heuristic's). A fractional LP
    optimum is first tried on its support (``_support_solve``; small: an incumbent for the
    MILP when not within ``gap_rel``; medium: added to ``found``, the heuristic's start)."""
    p = reduced.problem
    size = stats["ilp_size"] = ilp_size(p, cap=AUTO_LP_VARIABLES)
    if size <= AUTO_ILP_VARIABLES:
        rounded: list = []
        relaxed: dict = {}
        sol, lp_s = _relax(reduced, clock, clock.left(), lp_time_s, gap_rel, cutoff, relaxations, rounded, relaxed)
        if sol is not None:
            return "auto:highs-lp", sol
        if "support" in relaxed:
            sol = _support_solve(p, relaxed["support"], relaxed["bound"], clock.left(), gap_rel)
            if sol is not None and math.isfinite(sol.lower_bound):  # within gap_rel of the LP bound
                stats["support"] = sol.stats
                return "auto:highs-lp+support", sol
            if sol is not None and sol.feasible:
                rounded.append(sol.choice)
                left = clock.left()
                if left is not None:  # a time-limited MILP rarely improves it; the local search does
                    lns = solve_heuristic(p, time_limit_s=min(SUPPORT_LNS_S, SUPPORT_LNS_SHARE * left), seed=0,
                                          start=sol.choice, workers=1)  # (the stage pool has the cores)
                    if lns.feasible:
                        rounded.append(lns.choice)
                        stats["support_lns"] = {"from": sol.cost, "to": lns.cost}
        left = clock.left()
        start = ilp_start(reduced, warm, clock, rounded)
        if left is not None and start is not None and clock.left() < MILP_MIN_LP_TIMES * lp_s:
            return "auto:highs-lp+start", _incumbent(p, start, relaxed.get("bound", -math.inf), clock, stats, lp_s)
        sol = solve_ilp(p, solver="highs", time_limit_s=left, start=start, gap_rel=gap_rel)
        if sol.feasible and "bound" in relaxed and relaxed["bound"] > sol.lower_bound:
            # a time-limited MILP may not have finished its root: the LP's bound still holds
            sol = dataclasses.replace(sol, lower_bound=min(relaxed["bound"], sol.cost))
        return "auto:highs", sol
    if size <= AUTO_LP_VARIABLES:  # too big for the MILP, but its LP is often integral: try it, briefly
        limit, relaxed = clock.left(), {}
        sol, _ = _relax(reduced, clock, min(AUTO_LP_S, 0.3 * limit) if limit is not None else AUTO_LP_S, lp_time_s,
                        gap_rel, cutoff, relaxations, relaxed=relaxed)
        if sol is None and "support" in relaxed:  # settled on its support, or the heuristic's
            sup = _support_solve(p, relaxed["support"], relaxed["bound"], clock.left(), gap_rel)
            if sup is not None and math.isfinite(sup.lower_bound):
                stats["support"] = sup.stats
                return "auto:highs-lp+support", sup
            if sup is not None and sup.feasible and found is not None:
                found.append(sup.choice)
        return "auto:highs-lp", sol
    return "auto", None


def _relax(reduced: _Reduced, clock: Clock, inside_s: float | None, lp_time_s: float | None, gap_rel: float,
           cutoff: float | None, relaxations: RelaxationCache | None, rounded: list | None = None,
           relaxed: dict | None = None) -> tuple[Solution | None, float]:
    """``_lp_first`` on the reduced problem, of the relaxation of the original one
    (``relaxation.relax``, from ``relaxations`` when it holds it), solved within ``inside_s``
    of the clock, or, given ``lp_time_s``, within that many seconds outside it (``solve``);
    and the seconds that relaxation takes to solve (``MILP_MIN_LP_TIMES``: as long as it took
    when it was solved, when it comes from ``relaxations``)."""
    if reduced.problem.num_nodes == 0:
        return None, 0.0
    t0 = time.perf_counter()
    r = relax(reduced.original, inside_s if lp_time_s is None else lp_time_s, relaxations, reduced.presolved)
    took = time.perf_counter() - t0
    if lp_time_s is not None:
        clock.excluded_s += took
    return _lp_first(reduced.problem, r.onto(reduced.forward, reduced.forward_sets), gap_rel, cutoff, rounded,
                     relaxed), max(took, r.seconds)


def _incumbent(p: Problem, choice, bound: float, clock: Clock, stats: dict, lp_s: float) -> Solution:
    """The MILP's start as the answer, with the LP's bound, where the time left is too short
    for the MILP (``MILP_MIN_LP_TIMES``)."""
    stats["milp_skipped"] = {"left_s": round(clock.left(), 3), "lp_s": round(lp_s, 3)}
    cost = evaluate(p, choice)[0]
    status = "optimal" if cost - bound <= 1e-9 * max(1.0, abs(cost)) else "feasible"
    return Solution(choice=tuple(choice), cost=cost, feasible=True, status=status, lower_bound=min(bound, cost),
                    solver="highs-lp+start", time_s=clock.elapsed(), stats={})


def _answer(problem: Problem, reduced: _Reduced, name: str, sol: Solution, warm: Scored | None, min_peak: float,
            clock: Clock, stats: dict) -> Solution:
    """The solver's answer restored to the original nodes and re-scored, or the warm start
    when it is cheaper (never worse than it)."""
    elapsed = clock.elapsed()
    found = None  # the solver's answer, in the original problem
    if sol.feasible:
        choice = reduced.restore(sol.choice)
        found = Scored(choice, *evaluate(problem, choice))
    if warm is not None and warm.cost < (found.cost if found else math.inf):
        stats["peak_usage"] = warm.peak
        return Solution(choice=warm.choice, cost=warm.cost, feasible=True, status="feasible",
                        lower_bound=min(sol.lower_bound, warm.cost), solver=name + "+start", time_s=elapsed,
                        stats=stats)
    if sol.status == "infeasible":
        raise InfeasibleError(
            f"no assignment has finite cost and fits usage_limit={problem.usage_limit} ({name} proved it); "
            f"minimum peak usage is {min_peak:.6g}", min_peak_usage=min_peak)
    if found is None:
        return Solution(choice=(), cost=math.inf, feasible=False, status="unknown", lower_bound=sol.lower_bound,
                        solver=name, time_s=elapsed, stats=stats)
    stats["peak_usage"] = found.peak
    bound = min(sol.lower_bound, found.cost) if found.fits else sol.lower_bound
    return Solution(choice=found.choice, cost=found.cost, feasible=found.fits,
                    status=sol.status if found.fits else "unknown", lower_bound=bound, solver=name,
                    time_s=clock.elapsed(), stats=stats)


def _support_solve(problem: Problem, support, bound: float, time_left: float | None,
                   gap_rel: float) -> Solution | None:
    """The ILP restricted to each node's LP support (the strategies its fractional LP
    optimum uses; ``support[v]``), solved exactly with its memory rows, mapped back to
    ``problem``'s strategies. On sharding problems the LP optimum is often half of each of
    two symmetric layouts on many nodes (measured: a GPT-175B layer on a 4 × 8 mesh, 54 of
    106 nodes at 0.5 / 0.5): the restricted ILP is small, and its optimum, when within
    ``gap_rel`` of the LP bound ``bound`` (which bounds every choice of ``problem``), is
    returned with that bound (status "optimal" when they meet, else "feasible"); otherwise
    (or when it finds nothing in ``time_left``) its choice, if any, with ``lower_bound``
    −∞: an incumbent for the full MILP, no proof. None when the restriction has no choice."""
    sup = [np.asarray(s, dtype=np.int64) for s in support]
    if len(sup) != problem.num_nodes or any(len(s) == 0 for s in sup):
        return None
    sub = Problem(node_costs=[c[s] for c, s in zip(problem.node_costs, sup)],
                  node_usages=[u[s] for u, s in zip(problem.node_usages, sup)], intervals=problem.intervals,
                  edges=problem.edges, edge_costs=[m[np.ix_(sup[u], sup[v])] for (u, v), m in
                                                   zip(problem.edges, problem.edge_costs)],
                  usage_limit=problem.usage_limit, name=problem.name + "[LP support]",
                  extra_usages=[(v, use[sup[v]], iv) for v, use, iv in problem.extra_usages],
                  fixed_usages=problem.fixed_usages, cost_offset=problem.cost_offset)
    try:
        sol = solve(sub, solver="highs", time_limit_s=time_left, gap_rel=gap_rel)
    except InfeasibleError:
        return None
    if not sol.feasible:
        return None
    choice = tuple(int(s[c]) for s, c in zip(sup, sol.choice))
    cost, fits, _ = evaluate(problem, choice)
    if not fits or not math.isfinite(cost):
        return None
    within = cost - bound <= max(gap_rel * abs(cost), 1e-9 * max(1.0, abs(cost)))
    status = "optimal" if cost - bound <= 1e-9 * max(1.0, abs(cost)) else "feasible"
    return Solution(choice=choice, cost=cost, feasible=True, status=status if within else "feasible",
                    lower_bound=bound if within else -math.inf, solver="highs-lp+support", time_s=sol.time_s,
                    stats={"support_nodes": sum(len(s) > 1 for s in sup), "support_strategies": int(sum(map(len, sup))),
                           "time_s": round(sol.time_s, 3)})


def _heuristic_time(time_left: float | None) -> float:
    """The heuristic runs to its limit; keep ~1 s (2 % of longer limits) for restoring and
    re-scoring the choice so the whole solve stays within ``time_limit_s``."""
    if time_left is None:
        return DEFAULT_HEURISTIC_S
    return max(0.05, time_left - min(1.0 + 0.005 * time_left, 0.1 * time_left))


def lower_bound(problem: Problem, *, time_limit_s: float | None = None,
                relaxations: RelaxationCache | None = None) -> float:
    """A lower bound on the cost of every choice of ``problem`` that fits its usage limit —
    hence on what ``solve`` returns, with any solver, time limit or warm start: ∞ when the
    usage limit is below the minimum peak usage (or no choice has finite cost); else the
    optimum of the LP relaxation of the problem presolved without its limit
    (``solvers.relaxation``: presolve's reductions are exact and keep the costs; dropping the
    limit and integrality only enlarges the feasible set; from ``relaxations`` when it holds
    it, and kept there), or, when that LP does not finish, the trivial bound: the offset +
    each node's and each edge's least cost."""
    try:
        _check_usage_limit(problem)
        r = relax(problem, time_limit_s, relaxations)
    except InfeasibleError:
        return math.inf
    if r.optimal:
        return r.bound
    p = memory_free(problem).problem
    return float(p.cost_offset + sum(float(np.min(c)) for c in p.node_costs)
                 + sum(float(np.min(m)) for m in p.edge_costs))
