"""The intra-op sharding problem in plain numbers (the IOPDDL contest's shape).

Pick one strategy ``s_v`` per node to minimise

    cost_offset + Σ_v node_costs[v][s_v] + Σ_(u,v) edge_costs[e][s_u, s_v]

subject to, at every time point t,

    Σ_{v live at t} node_usages[v][s_v] + Σ_{extra items live at t} usage[s_node]
        + Σ_{fixed items live at t} usage  ≤  usage_limit,

where node v is live on the half-open interval ``intervals[v] = [start, end)``.
A cost of ``inf`` forbids that strategy (or pair). The planner fills this from a traced
program (costs in seconds or microseconds, usages in bytes); ``solvers.iopddl`` reads
contest files.

``extra_usages`` (node, usages per strategy, interval), ``fixed_usages`` (usage, interval)
and ``cost_offset`` are empty for problems built from a program; ``solvers.presolve``
produces them when it merges one node into another (the merged node keeps its own
lifetime) or fixes a node (its usage becomes a constant).
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
    extra_usages: list[tuple[int, np.ndarray, tuple[int, int]]] = field(default_factory=list)
    fixed_usages: list[tuple[float, tuple[int, int]]] = field(default_factory=list)
    cost_offset: float = 0.0

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
        for e, (u, v) in enumerate(self.edges):
            if not (0 <= u < n and 0 <= v < n):
                raise ValueError(f"edge {e} = {(u, v)} names a node outside 0..{n - 1}")
        self.edge_costs = [
            np.asarray(m, dtype=np.float64).reshape(len(self.node_costs[u]), len(self.node_costs[v]))
            for (u, v), m in zip(self.edges, self.edge_costs)
        ]
        extra = []
        for v, use, (a, b) in self.extra_usages:
            use = np.asarray(use, dtype=np.float64).reshape(-1)
            if len(use) != len(self.node_costs[v]):
                raise ValueError(f"extra usage on node {v}: {len(use)} usages for {len(self.node_costs[v])} strategies")
            extra.append((int(v), use, (int(a), int(b))))
        self.extra_usages = extra
        self.fixed_usages = [(float(use), (int(a), int(b))) for use, (a, b) in self.fixed_usages]
        self.cost_offset = float(self.cost_offset)

    @property
    def num_nodes(self) -> int:
        return len(self.node_costs)

    @property
    def num_edges(self) -> int:
        return len(self.edges)

    def usage_items(self):
        """Every usage term as (node or -1 for a constant, usages (array, or float), (start, end))."""
        for v, (use, iv) in enumerate(zip(self.node_usages, self.intervals)):
            yield v, use, iv
        yield from self.extra_usages
        for use, iv in self.fixed_usages:
            yield -1, use, iv

    def time_points(self) -> list[list[int]]:
        """Maximal sets of simultaneously live nodes, one per interval start where the set
        stops growing (an interval ends before the next start). Every memory constraint is
        implied by one of these (usages are ≥ 0)."""
        items = [(v, iv) for v, _, iv in self.usage_items() if v >= 0 and iv[1] > iv[0]]
        if not items:
            return []
        starts = np.array([a for _, (a, _) in items])
        ends = np.array([b for _, (_, b) in items])
        points = maximal_points(starts, ends)
        order_s, order_e = np.argsort(starts, kind="stable"), np.argsort(ends, kind="stable")
        count: dict[int, int] = {}
        out, i, j = [], 0, 0
        for t in points:  # sweep: add items starting ≤ t, drop items ending ≤ t
            while i < len(items) and starts[order_s[i]] <= t:
                v = items[order_s[i]][0]
                count[v] = count.get(v, 0) + 1
                i += 1
            while j < len(items) and ends[order_e[j]] <= t:
                v = items[order_e[j]][0]
                count[v] -= 1
                if not count[v]:
                    del count[v]
                j += 1
            out.append(sorted(count))
        return out

    def min_peak_usage(self) -> float:
        """Smallest achievable peak usage: each usage term at its least-usage strategy.

        Exact when every node has one usage term (problems built from programs and contest
        files); a lower bound after presolve merges (terms of one node at different times
        might want different strategies)."""
        starts, ends, mins = [], [], []
        for v, use, (a, b) in self.usage_items():
            if b > a:
                starts.append(a)
                ends.append(b)
                mins.append(float(np.min(use)) if v >= 0 else float(use))
        if not starts:
            return 0.0
        starts, ends, mins = np.array(starts), np.array(ends), np.array(mins)
        points = maximal_points(starts, ends)
        lo = np.searchsorted(points, starts, side="left")
        hi = np.searchsorted(points, ends, side="left")
        prof = np.zeros(len(points) + 1)
        np.add.at(prof, lo, mins)
        np.add.at(prof, hi, -mins)
        return float(np.cumsum(prof)[:-1].max(initial=0.0))


def maximal_points(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Sorted start times t_k whose live set is not contained in the next start's set,
    i.e. some interval ends in (t_k, t_{k+1}] (or t_k is the last start). Intervals are
    half-open [start, end) and assumed non-empty."""
    s = np.unique(np.asarray(starts))
    if len(s) == 0:
        return s
    e = np.unique(np.asarray(ends))
    nxt = np.append(s[1:], np.iinfo(np.int64).max)
    i = np.searchsorted(e, s, side="right")  # first end > t_k
    has_end = (i < len(e)) & (e[np.minimum(i, len(e) - 1)] <= nxt)
    has_end[-1] = True
    return s[has_end]


@dataclass(frozen=True)
class Solution:
    choice: tuple[int, ...]
    cost: float
    feasible: bool
    status: str  # "optimal" | "feasible" (limit hit, incumbent) | "infeasible" (proven) | "unknown" (nothing found)
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
    cost = problem.cost_offset + sum(float(problem.node_costs[v][c]) for v, c in enumerate(choice))
    cost += sum(float(m[choice[u], choice[v]]) for (u, v), m in zip(problem.edges, problem.edge_costs))
    # sweep: +usage at start, -usage at end (half-open, so ends before starts at equal t)
    events = []
    for v, use, (a, b) in problem.usage_items():
        if b > a:
            amount = float(use[choice[v]]) if v >= 0 else float(use)
            events.append((a, 1, amount))
            events.append((b, 0, -amount))
    events.sort()
    peak = cur = 0.0
    for _, _, d in events:
        cur += d
        peak = max(peak, cur)
    feasible = math.isfinite(cost) and (problem.usage_limit is None or peak <= problem.usage_limit * (1 + 1e-9))
    return cost, feasible, peak
