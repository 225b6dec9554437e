"""The problem the LP relaxation is solved on: the problem presolved as if it had no usage limit.

"auto" (``lp_first``, below) and ``driver.lower_bound`` solve the marginal LP without memory
rows: it bounds the cost of every choice, fitting or not. That LP need not see memory at
all, and neither need the presolve in front of it: without a usage limit every node may be
folded as a leaf or a series node and dominance compares costs only (``solvers.presolve``,
items 5–8), so the LP is smaller. Its optimum is still a lower bound of the real problem:

    LP(memory-free presolved) ≤ min cost without the limit (presolve is exact) ≤ min cost with it.

Measured on twelve LPs of a GPT-175B plan on 1,024 H100s (layers and 3-layer stages, already
presolved with memory: 219–832 nodes): 0–61 % fewer nodes, 93k–166k instead of 93k–246k
columns, 0.44–2.12 s instead of 0.93–3.81 s (plus 0.03–0.21 s of presolve), and the same
optimum on all twelve.

The LP's answer is mapped back with the presolve's own restore: its rounded choice becomes
a choice of the original problem with the same cost (``choice``; whether it fits is the
caller's question), its support (the strategies with a positive LP value) becomes a set of
strategies per original node (``support``: a folded node gets each value its restore table
gives over its neighbours' sets).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np

from .ilp import solve_ilp
from .presolve import Presolved, presolve
from .problem import Problem, Solution, evaluate


@dataclass(frozen=True)
class MemoryFree:
    """``problem`` presolved without its usage limit (``presolved.problem``: the LP's problem)."""
    presolved: Presolved

    @property
    def problem(self) -> Problem:
        return self.presolved.problem

    def choice(self, reduced_choice) -> tuple[int, ...]:
        """The original problem's choice for a choice of the reduced one: the same cost."""
        return self.presolved.restore(reduced_choice)

    def support(self, reduced_support) -> list[np.ndarray]:
        """Strategies per original node for the reduced problem's LP support (one array of
        reduced strategy indices per reduced node)."""
        return self.presolved.restore_sets(reduced_support)


def memory_free(problem: Problem) -> MemoryFree:
    """``problem`` presolved as if it had no usage limit (InfeasibleError as ``presolve``:
    a node with no finite-cost strategy)."""
    free = dataclasses.replace(problem, usage_limit=None) if problem.usage_limit is not None else problem
    return MemoryFree(presolve(free))


def lp_first(problem: Problem, time_left: float | None, gap_rel: float,
             cutoff: float | None = None, rounded: list | None = None,
             relaxed: dict | None = None) -> Solution | None:
    """The marginal LP relaxation is often integral on sharding problems (measured: every GPT
    mesh in benchmarks/plan_time.py), and the memory limit rarely binds. The LP is solved
    without memory rows; its rounded choice is returned when it fits the memory limit and is
    within ``gap_rel`` of the LP bound (that bound proves it); a "cutoff" solution when the
    bound reaches ``cutoff``; otherwise None → the MILP (``solvers.driver``'s "auto", as
    ``driver._lp_first``). ``rounded`` gets the rounded choice (a start for the MILP),
    ``relaxed`` the LP's bound and support (``driver._support_solve``) when it is optimal."""
    if problem.num_nodes == 0:
        return None
    # without memory rows, on the problem presolved without its limit (``memory_free``):
    # still a lower bound of the real problem, and when the rounded choice fits memory nothing
    # else is needed
    t0 = time.perf_counter()
    free = memory_free(problem)
    lp = solve_ilp(free.problem, solver="highs", relax=True, time_limit_s=time_left, lazy=True)
    support = lp.stats.pop("support", None)  # (kept out of the answer's stats: one array per node)
    lp.stats["memory_free_nodes"] = free.problem.num_nodes
    if cutoff is not None and lp.stats.get("relaxation") == "optimal" and lp.lower_bound >= cutoff:
        return Solution(choice=(), cost=math.inf, feasible=False, status="cutoff", lower_bound=lp.lower_bound,
                        solver="highs-lp", time_s=time.perf_counter() - t0, stats=lp.stats)
    choice = free.choice(lp.choice) if lp.choice or free.problem.num_nodes == 0 else ()
    if rounded is not None and choice:  # (the MILP's caller may start from it)
        rounded.append(choice)
    if relaxed is not None and lp.stats.get("relaxation") == "optimal" and math.isfinite(lp.lower_bound) \
            and support is not None:
        relaxed.update(support=free.support(support), bound=float(lp.lower_bound))
    if not choice or not math.isfinite(lp.lower_bound):
        return None
    cost, fits, _ = evaluate(problem, choice)
    if not fits or not math.isfinite(cost) or cost - lp.lower_bound > max(gap_rel * abs(cost), 1e-9 * max(1.0, abs(cost))):
        return None
    status = "optimal" if cost - lp.lower_bound <= 1e-9 * max(1.0, abs(cost)) else "feasible"
    return Solution(choice=choice, cost=cost, feasible=True, status=status, lower_bound=lp.lower_bound,
                    solver="highs-lp", time_s=time.perf_counter() - t0, stats=lp.stats)
