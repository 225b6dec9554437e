"""The time and the incumbents a solve starts from (``solvers.driver``): its clock, the
caller's warm start (asked once, its own time excluded from the clock), the quick heuristic's
choice, and the cheapest of those the ILP or the heuristic starts from."""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass

from .heuristic import solve_heuristic
from .problem import Problem, evaluate


class Clock:
    """Seconds left of ``time_limit_s`` (None: no limit); the warm start's own solve
    (``excluded_s``) is not counted against it."""

    def __init__(self, time_limit_s: float | None):
        self.t0, self.time_limit_s, self.excluded_s = time.perf_counter(), time_limit_s, 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float | None:
        if self.time_limit_s is None:
            return None
        return max(0.0, self.time_limit_s + self.excluded_s - self.elapsed())


@dataclass(frozen=True)
class Scored:
    """A choice of the original problem with its ``evaluate`` result."""
    choice: tuple
    cost: float
    fits: bool
    peak: float


class WarmStart:
    """The caller's ``start``, asked for at most once (when first needed) and kept only when
    it has finite cost and fits; the time it takes is excluded from the clock."""

    def __init__(self, problem: Problem, start, clock: Clock, stats: dict):
        self.problem, self.start, self.clock, self.stats = problem, start, clock, stats
        self.asked, self.value = False, None  # value: Scored or None

    def ask(self, cutoff: float | None = None) -> Scored | None:
        """The start; ``cutoff``: the cost of the best incumbent the solve has without it
        (passed on to a start function that takes it, ``driver``'s module docstring)."""
        if self.start is None or self.asked:
            return self.value
        self.asked, ts = True, time.perf_counter()
        if not callable(self.start):
            choice = self.start
        elif cutoff is not None and math.isfinite(cutoff) and _takes_cutoff(self.start):
            choice = self.start(self.clock.left(), cutoff=cutoff)
            self.stats["start_cutoff"] = cutoff
        else:
            choice = self.start(self.clock.left())
        if choice is not None:
            cost, feasible, peak = evaluate(self.problem, choice)
            self.value = Scored(tuple(int(c) for c in choice), cost, True, peak) if feasible else None
        self.stats["start_s"] = time.perf_counter() - ts
        self.clock.excluded_s += self.stats["start_s"]  # (besides an LP kept outside the limit)
        return self.value


def _takes_cutoff(fn) -> bool:
    try:
        return "cutoff" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def ilp_start(reduced, warm: WarmStart, clock: Clock, extra=(), quick: bool = True):
    """The ILP's incumbent on ``reduced.problem`` (``driver._Reduced``: its ``restore`` and
    ``forward`` map choices to and from the original problem, ``warm``'s): the cheapest that has finite cost and fits
    of the warm start, the quick heuristic's (``quick``) and ``extra`` (reduced choices: the
    rounded LP optimum, a floor under a time-limited MIP that does not depend on the machine's
    load). The warm start is asked last, with the others' best cost as its ``cutoff``."""
    own = [c for c in ([quick_start(reduced.problem, clock.left())] if quick else []) + list(extra) if c is not None]
    own = [(r[0], c) for r, c in ((evaluate(reduced.problem, c), c) for c in own) if r[1]]
    # (in the original problem's terms, as the start is scored)
    best = min((evaluate(warm.problem, reduced.restore(c))[0] for _, c in own), default=None)
    w = warm.ask(cutoff=best)
    seed = reduced.forward(w.choice) if w is not None else None
    scored = [(r[0], seed) for r in [evaluate(reduced.problem, seed)] if r[1]] if seed is not None else []
    scored += own  # (the start first: it wins ties)
    return min(scored, key=lambda x: x[0])[1] if scored else None


def quick_start(problem: Problem, time_left: float | None):
    """A feasible incumbent for a time-limited ILP (least-usage start + memory-aware ICM)."""
    if time_left is None or problem.num_nodes == 0:
        return None
    sol = solve_heuristic(problem, time_limit_s=min(5.0, 0.1 * time_left), lns=False)
    return sol.choice if sol.feasible else None
