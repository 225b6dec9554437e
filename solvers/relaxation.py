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

The relaxation is a function of the problem's costs alone — not of its usages nor of its
limit —, so ``relax`` solves it on the problem as given (not on the problem already presolved
with its limit, which differs with the limit) and a :class:`RelaxationCache` keeps it by a
digest of those costs (``cost_key``): one stage planned at several memory budgets, with
ZeRO-1 or without, with its in-flight residuals held or not, and bounded first
(``driver.lower_bound``) solves one LP (measured on GPT-175B on 1,024 H100s: 41 of 212 LPs,
13.8 of 56 s CPU, repeated one already solved). ``Relaxation.onto`` maps it onto the problem
presolved with the limit (``presolve.Presolved.forward``, ``forward_sets``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass

import numpy as np

from .handoff import HandoffCache
from .ilp import solve_ilp
from .presolve import presolve
from .presolved import Presolved
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


def memory_free(problem: Problem, presolved: Presolved | None = None) -> MemoryFree:
    """``problem`` presolved as if it had no usage limit (InfeasibleError as ``presolve``:
    a node with no finite-cost strategy) — ``presolved`` itself when it is ``problem``'s
    presolve and its limit could not bind (``Presolved.memory_free``: the same reductions)."""
    if presolved is not None and presolved.memory_free:
        return MemoryFree(dataclasses.replace(presolved, problem=dataclasses.replace(presolved.problem,
                                                                                    usage_limit=None)))
    free = dataclasses.replace(problem, usage_limit=None) if problem.usage_limit is not None else problem
    return MemoryFree(presolve(free))


@dataclass(frozen=True)
class Relaxation:
    """The memory-free LP relaxation of a problem (``relax``), in that problem's terms."""
    optimal: bool  # solved to optimality (else its time ran out: no support)
    # a lower bound on every choice, fitting or not: the LP optimum when optimal, else the best
    # the unfinished LP had (``ilp.solve_ilp``: at least the trivial bound)
    bound: float
    choice: tuple | None  # the LP optimum rounded: a choice of the problem (None: none, or unusable)
    support: list | None  # per node, the strategies with a positive LP value (optimal only)
    seconds: float  # what presolving and solving it took, when it was solved
    stats: dict

    def onto(self, forward, forward_sets) -> "Relaxation":
        """The same relaxation in the terms of a presolve of its problem (``forward``: a
        choice, ``forward_sets``: the support; ``presolve.Presolved``): the presolve is exact,
        the bound holds for it too."""
        choice = forward(self.choice) if self.choice else None
        support = forward_sets(self.support) if self.support is not None else None
        return dataclasses.replace(self, choice=choice, support=support)


class RelaxationCache(HandoffCache):
    """Optimal relaxations by ``cost_key`` (module docstring); a worker process hands its new
    ones back (``solvers.handoff``). Only optimal ones: a time-limited LP's outcome depends on
    the time it had. An entry holds a choice and a support set per node (29 kB pickled
    for a 603-node stage); GPT-175B on 1,024 H100s keeps 171."""

    def __init__(self, max_entries: int = 1024):
        super().__init__(max_entries)


def cost_key(problem: Problem) -> bytes:
    """A digest of what the memory-free relaxation depends on: the costs and the edges."""
    h = hashlib.blake2b(digest_size=20)
    h.update(repr((problem.num_nodes, [tuple(e) for e in problem.edges], float(problem.cost_offset))).encode())
    for c in problem.node_costs:
        h.update(np.ascontiguousarray(c, dtype=np.float64).tobytes())
        h.update(b"|")
    for m in problem.edge_costs:
        h.update(repr(np.shape(m)).encode())
        h.update(np.ascontiguousarray(m, dtype=np.float64).tobytes())
    return h.digest()


def relax(problem: Problem, time_left: float | None, cache: RelaxationCache | None = None,
          presolved: Presolved | None = None) -> Relaxation:
    """The LP relaxation of ``problem`` without memory rows, on ``problem`` presolved without
    its limit (``memory_free``, given ``problem``'s ``presolved``; InfeasibleError as
    ``presolve``), mapped back to ``problem``'s nodes; from ``cache`` when it holds it (and
    kept there when optimal)."""
    key = cost_key(problem) if cache is not None else None
    if key is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit
    t0 = time.perf_counter()
    free = memory_free(problem, presolved)
    if free.problem.num_nodes == 0:  # nothing left to choose: the one choice's cost
        return Relaxation(optimal=True, bound=float(free.problem.cost_offset), choice=free.choice(()),
                          support=free.support([]), seconds=time.perf_counter() - t0, stats={"memory_free_nodes": 0})
    lp = solve_ilp(free.problem, solver="highs", relax=True, time_limit_s=time_left, lazy=True)
    support = lp.stats.pop("support", None)  # (kept out of the answer's stats: one array per node)
    lp.stats["memory_free_nodes"] = free.problem.num_nodes
    optimal = lp.stats.get("relaxation") == "optimal" and math.isfinite(lp.lower_bound)
    out = Relaxation(optimal=optimal, bound=float(lp.lower_bound),
                     choice=free.choice(lp.choice) if lp.choice else None,
                     support=free.support(support) if optimal and support is not None else None,
                     seconds=time.perf_counter() - t0, stats=lp.stats)
    if key is not None and optimal:
        cache.put(key, out)
    return out


def lp_first(problem: Problem, relaxation: Relaxation, gap_rel: float,
             cutoff: float | None = None, rounded: list | None = None,
             relaxed: dict | None = None) -> Solution | None:
    """The marginal LP relaxation is often integral on sharding problems (measured: every GPT
    mesh in benchmarks/plan_time.py), and the memory limit rarely binds. Given ``problem``'s
    ``relaxation`` (``relax``, ``Relaxation.onto``: solved without memory rows — still a lower
    bound of the real problem, and when the rounded choice fits memory nothing else is
    needed): its rounded choice is returned when it fits the memory limit and is within
    ``gap_rel`` of the LP bound (that bound proves it); a "cutoff" solution when the bound
    reaches ``cutoff``; otherwise None → the MILP (``solvers.driver``'s "auto"). ``rounded``
    gets the rounded choice (a start for the MILP), ``relaxed`` the LP's bound and support
    (``driver._support_solve``) when it is optimal."""
    r = relaxation
    if cutoff is not None and r.optimal and r.bound >= cutoff:
        return Solution(choice=(), cost=math.inf, feasible=False, status="cutoff", lower_bound=r.bound,
                        solver="highs-lp", time_s=r.seconds, stats=dict(r.stats))  # (r may be cached: a copy)
    if rounded is not None and r.choice:  # (the MILP's caller may start from it)
        rounded.append(r.choice)
    if relaxed is not None and r.optimal and r.support is not None:
        relaxed.update(support=r.support, bound=r.bound)
    if not r.choice or not math.isfinite(r.bound):
        return None
    cost, fits, _ = evaluate(problem, r.choice)
    if not fits or not math.isfinite(cost) or cost - r.bound > max(gap_rel * abs(cost), 1e-9 * max(1.0, abs(cost))):
        return None
    status = "optimal" if cost - r.bound <= 1e-9 * max(1.0, abs(cost)) else "feasible"
    return Solution(choice=r.choice, cost=cost, feasible=True, status=status, lower_bound=r.bound,
                    solver="highs-lp", time_s=r.seconds, stats=dict(r.stats))
