"""Heuristic for large problems: Lagrangian-priced message passing, repair, ILP neighbourhoods.

Three phases on the flat :class:`Compact` view (state in ``solvers.local``):

1. *Start* — every node at its least-usage strategy (the choice that fits whenever anything
   fits, for problems with one usage term per node), ``repair`` for what is left, then
   memory-aware ICM (``LocalSearch.descend``). This is the first incumbent (upper bound U).
2. *Lagrangian phase* — relax the memory rows with multipliers λ_p ≥ 0 on the maximal
   points:  L(λ) = min_x cost(x) + Σ_p λ_p (load_p(x) − limit). For fixed λ this is a
   memory-free pairwise problem whose unary terms gain the price Σ_items use[i] Σ_{p∈item} λ_p;
   TRW-S (``solvers.mrf``, messages kept between rounds) plus priced ICM approximately
   minimise it, giving x_λ. The subgradient g = load(x_λ) − limit updates
   λ ← max(0, λ + θ (U − L̃) g / ‖g‖²) (Polyak's step with the estimate L̃ = L(λ, x_λ);
   θ halves when L̃ stalls), and then λ_p ← ``push`` · λ_p wherever x_λ still overloads:
   the approximate inner minimiser makes L̃ noisy, and without the push the step shrinks
   while x_λ stays ~20 % over the limit (measured on S: repaired cost 1.85e9 without,
   1.57e9 with push = 1.3; 2.0 gets there about twice as fast on M). Each x_λ is repaired
   and improved under the hard limit, and may become the incumbent.
   This phase takes ``lagrangian_share`` of the time; meanwhile a second thread runs LNS
   (below) with one HiGHS worker on a copy of the incumbent (highspy releases the GIL).
3. *LNS* — ILP neighbourhoods (``solvers.lns``) around the incumbent until the time is up
   (with ``stall_s``, phases 2 and 3 end early once they stall: ``_Stall``):
   breadth-first balls and the nodes live at the tightest points, solved by HiGHS, LP first
   (sub-problems are nearly always integral at the root), ``workers`` at a time.

A problem small enough for one neighbourhood (``budget``) is solved as a whole ILP instead.
Measured on the IOPDDL instances M and S (2 cores): the Lagrangian phase alone reaches
within ~0.5 % (M) and ~2 % (S) of the best known costs in about a minute; LNS refines.
"""
from __future__ import annotations

import math
import threading
import time

import numpy as np

from .compact import Compact
from .local import LocalSearch
from .lns import ball, size_of, sub_problem, tight_set
from .mrf import TRWS
from .problem import Problem, Solution, evaluate


def solve_heuristic(problem: Problem, *, time_limit_s: float = 60.0, seed: int = 0, start=None,
                    lns: bool = True, lagrangian: bool | None = None, budget: float = 12000.0,
                    lagrangian_share: float = 0.4, gap_rel: float = 1e-5, lazy_rows: bool | None = True,
                    workers: int = 2, follow: bool = True, push: float = 2.0,
                    stall_s: float | None = None) -> Solution:
    """Best feasible choice found within ``time_limit_s``: status "feasible", "optimal" when one
    ILP neighbourhood covered the whole problem, "infeasible" when that ILP proved it,
    "unknown" if nothing that fits was found. ``stall_s``: the Lagrangian phase and LNS stop
    early once no better choice has been found for that long, nor for as long as finding the
    last one took (``_Stall``; ``stats["stalled_s"]``: when); None: they run to the limit."""
    t0 = time.perf_counter()
    deadline = t0 + time_limit_s
    stalled = _Stall(stall_s, t0)
    cp = Compact.from_problem(problem)
    ls = LocalSearch(cp, seed=seed)
    stats: dict = {"lagrangian_rounds": 0, "lns_steps": 0, "lns_improved": 0}

    def finish(x, status: str) -> Solution:
        if x is None:
            return Solution(choice=(), cost=math.inf, feasible=False, status=status, solver="heuristic",
                            time_s=time.perf_counter() - t0, stats=stats)
        choice = tuple(int(c) for c in x)
        cost, feasible, _ = evaluate(problem, choice)
        from .ilp import trivial_bound

        bound = cost if status == "optimal" else min(trivial_bound(cp), cost)
        if stalled.at is not None:
            stats["stalled_s"] = round(stalled.at - t0, 3)
        return Solution(choice=choice, cost=cost, feasible=feasible, status=status if feasible else "unknown",
                        lower_bound=bound, solver="heuristic",
                        time_s=time.perf_counter() - t0, stats=stats)

    best = None  # (cost, x)
    lock = threading.Lock()

    def offer(state: LocalSearch) -> None:
        nonlocal best
        if state.feasible() and (best is None or state.total < best[0] * (1 + 1e-9) + 1e-9):
            exact = state.cost()
            with lock:
                if best is None or exact < best[0]:
                    best = (exact, state.x.copy())
                    stalled.improved()
                    stats.setdefault("trace", []).append((round(time.perf_counter() - t0, 2), exact))

    ls.set_choice(ls.least_usage() if start is None else start)
    ls.repair()
    ls.descend(memory=True, max_sweeps=20)
    offer(ls)
    stats["start_cost"] = best[0] if best else math.inf
    whole = sum(size_of(ls, v) for v in range(cp.n)) <= budget
    if lagrangian is None:
        lagrangian = lns and not whole and cp.limit is not None
    if lagrangian and cp.n:
        phase_end = t0 + lagrangian_share * time_limit_s
        follower = None
        if follow and lns and workers > 1 and best is not None:  # one core polishes the incumbent meanwhile
            follower = threading.Thread(target=_follow, args=(ls.clone(seed + 1),), kwargs=dict(
                deadline=phase_end, get_best=lambda: best, step_s=max(1.0, time_limit_s / 20), budget=budget,
                gap_rel=gap_rel, lazy_rows=lazy_rows, offer=offer, stats=stats, stalled=stalled), daemon=True)
            follower.start()
        _lagrangian(ls, deadline=phase_end, offer=offer, get_best=lambda: best, stats=stats, push=push,
                    stalled=stalled)
        if follower is not None:
            follower.join()
    if best is None and not lns:
        return finish(None, "unknown")
    if best is not None:
        stats["lagrangian_cost"] = best[0]
        ls.set_choice(best[1])
    if lns and cp.n and whole:
        from .ilp import solve_compact

        sol = solve_compact(cp, time_limit_s=max(deadline - time.perf_counter(), 0.01),
                            start=best[1] if best else None)
        if sol.status == "infeasible":  # proven: no choice has finite cost and fits
            return finish(None, "infeasible")
        if sol.feasible:
            ls.set_choice(np.array(sol.choice, dtype=np.int64))
            offer(ls)
        if best is None:
            return finish(None, "unknown")
        return finish(best[1], "optimal" if sol.status == "optimal" else "feasible")
    if lns and cp.n:  # (also from an infeasible state: steps that reduce cost and overload are kept)
        _lns(ls, deadline=deadline, step_s=max(1.0, time_limit_s / 20), budget=budget, workers=workers,
             gap_rel=gap_rel, lazy_rows=lazy_rows, offer=offer, stats=stats, stalled=stalled)
    return finish(None, "unknown") if best is None else finish(best[1], "feasible")


def _lns(ls: LocalSearch, *, deadline: float, step_s: float, budget: float, workers: int, gap_rel: float,
         lazy_rows, offer, stats: dict, stalled: "_Stall") -> None:
    """ILP neighbourhoods solved by ``workers`` HiGHS threads (highspy releases the GIL) on
    disjoint node sets; a result is applied only if it still lowers the cost and fits."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from .ilp import solve_compact

    pending: dict = {}
    busy: set[int] = set()
    kind = 0

    def going() -> bool:
        return time.perf_counter() < deadline - 0.05 and not stalled()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while pending or going():
            while len(pending) < workers and going():
                kind += 1
                tag = "tight" if kind % 3 == 0 else "ball"
                seed = int(ls.rng.integers(ls.cp.n))
                nodes = tight_set(ls, budget) if tag == "tight" else ball(ls, seed, budget)
                nodes = [v for v in nodes if v not in busy]
                if len(nodes) < 2:
                    if kind > 100 * workers and not pending:
                        return
                    continue
                sub, nodes = sub_problem(ls, nodes)
                left = deadline - time.perf_counter()
                fut = pool.submit(solve_compact, sub, time_limit_s=min(left, step_s), start=ls.x[nodes],
                                  gap_rel=gap_rel, lazy=lazy_rows, threads=1, lp_first=True, fix_integral=True)
                pending[fut] = (nodes, tag, time.perf_counter())
                busy.update(int(v) for v in nodes)
            if not pending:
                break
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                nodes, tag, ts = pending.pop(fut)
                busy.difference_update(int(v) for v in nodes)
                sol = fut.result()
                stats["lns_steps"] += 1
                rec = stats.setdefault("lns_" + tag, [0, 0, 0.0, 0])  # steps, improved, seconds, not optimal
                rec[0] += 1
                rec[2] += time.perf_counter() - ts
                rec[3] += sol.status != "optimal"
                if not (sol.feasible and sol.choice):
                    continue
                before, over, old = ls.total, max(ls.overload(), 0.0), ls.x[nodes].copy()
                for v, i in zip(nodes, sol.choice):
                    ls.move(int(v), int(i))
                if max(ls.overload(), 0.0) <= over and ls.total < before - 1e-9 * max(1.0, abs(before)):
                    stats["lns_improved"] += 1
                    rec[1] += 1
                    offer(ls)
                elif max(ls.overload(), 0.0) > over or ls.total > before:
                    for v, i in zip(nodes, old):
                        ls.move(int(v), int(i))


def _follow(ls: LocalSearch, *, deadline: float, get_best, offer, **lns_kw) -> None:
    """LNS with one worker on a copy of the incumbent, re-synced whenever another phase
    found something better."""
    while time.perf_counter() < deadline - 0.5 and not lns_kw["stalled"]():
        best = get_best()
        if best[0] < ls.cost() - 1e-9 * abs(best[0]):
            ls.set_choice(best[1])
        _lns(ls, deadline=min(deadline, time.perf_counter() + 10.0), workers=1, offer=offer, **lns_kw)


def _lagrangian(ls: LocalSearch, *, deadline: float, offer, get_best, stats: dict, push: float = 0.0,
                stalled: "_Stall") -> None:
    cp = ls.cp
    lam = np.zeros(len(cp.points))
    edges = [(u, v, m) for u, v, m in zip(cp.edge_u, cp.edge_v, cp.edge_costs)]
    trws = TRWS(ls.costs, edges)
    theta, best_dual, stall = 1.0, -math.inf, 0
    t_start = time.perf_counter()
    while time.perf_counter() < deadline and not stalled():
        stats["lagrangian_rounds"] += 1
        price = ls.prices(lam)
        trws.set_unary([c + price[a:z] for c, a, z in zip(ls.costs, cp.off[:-1], cp.off[1:])])
        trws.sweep()
        ls.set_choice(trws.decode())
        ls.descend(price=price, memory=False, max_sweeps=3)
        g = ls.load - cp.limit
        dual = ls.total + float(lam @ g)
        if dual > best_dual + 1e-9 * abs(best_dual):
            best_dual, stall = dual, 0
        else:
            stall += 1
            if stall >= 3:
                theta, stall = theta / 2, 0
        priced_cost, over = ls.total, float(g.max(initial=0.0))
        # primal: make x_λ fit, then improve it under the hard limit
        if ls.repair(max_steps=20000):
            ls.descend(memory=True, max_sweeps=5)
            offer(ls)
        stats.setdefault("lagrangian_trace", []).append(
            (round(time.perf_counter() - t_start, 2), dual, priced_cost, over, ls.total if ls.feasible() else math.inf))
        best = get_best()
        upper = best[0] if best else 2 * abs(dual) + 1.0
        norm = float(g @ g)
        if norm == 0:
            break
        lam = np.maximum(0.0, lam + theta * max(upper - dual, 1e-9 * abs(upper)) / norm * g)
        if push and over > 0:  # keep raising prices where x_λ still overloads
            lam[g > 0] *= push
    stats["lagrangian_theta"] = theta


class _Stall:
    """``stalled()``: True once the search has gone ``stall_s`` without a better incumbent
    (``improved``) and at least as long as it ran before its last one — it stops at no less
    than twice the time its last improvement took (measured: GPT-175B's LM-head stage on
    (4, 8), 1,024 nodes, found its best at 0.6–1.8 s with limits of 1.5, 2, 3 and 10 s, then
    109 neighbourhoods in the 10 s run improved nothing). ``at``: when it first said so."""

    def __init__(self, stall_s: float | None, t0: float):
        self.stall_s, self.t0, self.last, self.at = stall_s, t0, t0, None

    def improved(self) -> None:
        self.last = time.perf_counter()

    def __call__(self) -> bool:
        if self.stall_s is None:
            return False
        now = time.perf_counter()
        if now - self.last >= max(self.stall_s, self.last - self.t0):
            self.at = self.at if self.at is not None else now
            return True
        return False
