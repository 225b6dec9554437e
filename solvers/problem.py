"""The intra-op sharding problem in plain numbers (the IOPDDL contest's shape).

Pick one strategy ``s_v`` per node to minimise

    Σ_v node_costs[v][s_v] + Σ_(u,v) edge_costs[e][s_u, s_v]

subject to, at every time point t,  Σ_{v live at t} node_usages[v][s_v] ≤ usage_limit,
where node v is live on the half-open interval ``intervals[v] = [start, end)``.
A cost of ``inf`` forbids that strategy (or pair). The planner fills this from a traced
program (costs in microseconds, usages in bytes); ``solvers.iopddl`` reads contest files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


class InfeasibleError(ValueError):
    """No assignment satisfies the usage limit (or every assignment has infinite cost)."""

    def __init__(self, message: str, *, min_peak_usage: float | None = None):
        super().__init__(message)
        self.min_peak_usage = min_peak_usage


@dataclass
class Problem:
    node_costs: list[np.ndarray]
    node_usages: list[np.ndarray]
    intervals: list[tuple[int, int]]
    edges: list[tuple[int, int]]
    edge_costs: list[np.ndarray]
    usage_limit: float | None = None
    name: str = ""

    def __post_init__(self) -> None:
        self.node_costs = [np.asarray(c, dtype=np.float64).reshape(-1) for c in self.node_costs]
        self.node_usages = [np.asarray(u, dtype=np.float64).reshape(-1) for u in self.node_usages]
        self.intervals = [(int(a), int(b)) for a, b in self.intervals]
        self.edges = [(int(u), int(v)) for u, v in self.edges]
        n = len(self.node_costs)
        if not (len(self.node_usages) == len(self.intervals) == n):
            raise ValueError(f"{len(self.node_costs)=}, {len(self.node_usages)=}, {len(self.intervals)=} must be equal")
        if len(self.edge_costs) != len(self.edges):
            raise ValueError(f"{len(self.edges)=} but {len(self.edge_costs)=}")
        for v, (c, u) in enumerate(zip(self.node_costs, self.node_usages)):
            if len(c) == 0 or len(c) != len(u):
                raise ValueError(f"node {v}: {len(c)} costs vs {len(u)} usages (need ≥1, equal)")
        fixed = []
        for e, ((u, v), m) in enumerate(zip(self.edges, self.edge_costs)):
            m = np.asarray(m, dtype=np.float64).reshape(len(self.node_costs[u]), len(self.node_costs[v]))
            fixed.append(m)
        self.edge_costs = fixed

    @property
    def num_nodes(self) -> int:
        return len(self.node_costs)

    @property
    def num_edges(self) -> int:
        return len(self.edges)

    def time_points(self) -> list[list[int]]:
        """Maximal sets of simultaneously live nodes (one per interval start where the set grows)."""
        events = sorted({a for a, b in self.intervals if b > a})
        starts = sorted((a, v) for v, (a, b) in enumerate(self.intervals) if b > a)
        out, live, i = [], set(), 0
        ends = {}
        for v, (a, b) in enumerate(self.intervals):
            if b > a:
                ends.setdefault(b, []).append(v)
        end_times = sorted(ends)
        j = 0
        for t in events:
            while j < len(end_times) and end_times[j] <= t:
                live.difference_update(ends[end_times[j]])
                j += 1
            while i < len(starts) and starts[i][0] == t:
                live.add(starts[i][1])
                i += 1
            out.append(sorted(live))
        # keep only sets not contained in the next one (the next start only adds nodes)
        return [s for k, s in enumerate(out) if k + 1 == len(out) or not set(s) <= set(out[k + 1])]

    def min_peak_usage(self) -> float:
        """Smallest achievable peak usage (each node alone picks its least-usage strategy)."""
        mins = [float(u.min()) if len(u) else 0.0 for u in self.node_usages]
        return max((sum(mins[v] for v in s) for s in self.time_points()), default=0.0)


@dataclass(frozen=True)
class Solution:
    choice: tuple[int, ...]
    cost: float
    feasible: bool
    status: str  # "optimal" | "feasible" (limit hit, incumbent) | "infeasible"
    lower_bound: float = -math.inf
    solver: str = ""
    time_s: float = 0.0
    stats: dict = field(default_factory=dict)

    @property
    def gap(self) -> float:
        if not math.isfinite(self.lower_bound) or not math.isfinite(self.cost):
            return math.inf
        return max(0.0, self.cost - self.lower_bound) / max(abs(self.cost), 1e-12)


def evaluate(problem: Problem, choice) -> tuple[float, bool, float]:
    """(total cost, feasible, peak usage) of ``choice`` — independent of every solver."""
    choice = [int(c) for c in choice]
    if len(choice) != problem.num_nodes:
        raise ValueError(f"choice has {len(choice)} entries for {problem.num_nodes} nodes")
    for v, c in enumerate(choice):
        if not 0 <= c < len(problem.node_costs[v]):
            raise ValueError(f"node {v}: strategy {c} out of range 0..{len(problem.node_costs[v]) - 1}")
    cost = sum(float(problem.node_costs[v][c]) for v, c in enumerate(choice))
    cost += sum(float(m[choice[u], choice[v]]) for (u, v), m in zip(problem.edges, problem.edge_costs))
    # sweep: +usage at start, -usage at end (half-open, so ends before starts at equal t)
    events = []
    for v, (a, b) in enumerate(problem.intervals):
        if b > a:
            use = float(problem.node_usages[v][choice[v]])
            events.append((a, 1, use))
            events.append((b, 0, -use))
    events.sort()
    peak = cur = 0.0
    for _, _, d in events:
        cur += d
        peak = max(peak, cur)
    feasible = math.isfinite(cost) and (problem.usage_limit is None or peak <= problem.usage_limit * (1 + 1e-9))
    return cost, feasible, peak
