"""Flat array view of a :class:`Problem` shared by the ILP and the heuristic.

Strategies are numbered globally: strategy i of node v is ``off[v] + i``. Memory is
compressed onto the *maximal time points* P (see ``problem.maximal_points``): every
usage term becomes an *item* covering the contiguous point range ``[lo, hi)``, split as

    usage(s_v) = min_i usage[i]  +  (usage(s_v) − min_i usage[i])
                 └ constant: added to base[p] ┘   └ variable part, ≥ 0 ┘

so the memory constraint at point p reads

    Σ_{items j covering p} var_j[s_{node_j}]  ≤  limit − base[p].

Items whose variable part is zero are dropped; points where even the largest variable
usages fit (``base + Σ max var ≤ limit``) can never bind (``binding`` mask).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .problem import Problem, maximal_points


@dataclass
class Compact:
    k: np.ndarray  # strategies per node
    off: np.ndarray  # (n+1,) offsets into the flat strategy arrays
    cost: np.ndarray  # (K,) node costs
    edge_u: np.ndarray
    edge_v: np.ndarray
    edge_costs: list[np.ndarray]
    limit: float | None
    points: np.ndarray  # (P,) time values of the maximal points
    base: np.ndarray  # (P,) constant usage at each point
    item_node: np.ndarray  # (I,)
    item_lo: np.ndarray  # (I,) first covered point
    item_hi: np.ndarray  # (I,) one past the last covered point
    item_use: list[np.ndarray]  # variable usage per strategy of item_node (≥ 0, min 0)
    offset: float = 0.0

    @property
    def n(self) -> int:
        return len(self.k)

    @classmethod
    def from_problem(cls, problem: Problem) -> "Compact":
        k = np.array([len(c) for c in problem.node_costs], dtype=np.int64)
        off = np.zeros(len(k) + 1, dtype=np.int64)
        np.cumsum(k, out=off[1:])
        cost = np.concatenate(problem.node_costs) if len(k) else np.zeros(0)
        eu = np.array([u for u, _ in problem.edges], dtype=np.int64)
        ev = np.array([v for _, v in problem.edges], dtype=np.int64)
        terms = [(v, use, iv) for v, use, iv in problem.usage_items() if iv[1] > iv[0]]
        if terms and problem.usage_limit is not None:
            starts = np.array([a for _, _, (a, _) in terms])
            ends = np.array([b for _, _, (_, b) in terms])
            points = maximal_points(starts, ends)
            lo = np.searchsorted(points, starts, side="left")
            hi = np.searchsorted(points, ends, side="left")
        else:
            points, terms = np.zeros(0, dtype=np.int64), []
            lo = hi = np.zeros(0, dtype=np.int64)
        const = np.zeros(len(points) + 1)
        inode, ilo, ihi, iuse = [], [], [], []
        for j, (v, use, _) in enumerate(terms):
            if lo[j] >= hi[j]:
                continue
            m = float(np.min(use)) if v >= 0 else float(use)
            const[lo[j]] += m
            const[hi[j]] -= m
            if v >= 0:
                var = use - m
                if np.any(var > 0):
                    inode.append(v), ilo.append(lo[j]), ihi.append(hi[j]), iuse.append(var)
        return cls(
            k=k, off=off, cost=cost, edge_u=eu, edge_v=ev, edge_costs=list(problem.edge_costs),
            limit=problem.usage_limit, points=np.asarray(points), base=np.cumsum(const)[:-1],
            item_node=np.array(inode, dtype=np.int64), item_lo=np.array(ilo, dtype=np.int64),
            item_hi=np.array(ihi, dtype=np.int64), item_use=iuse, offset=problem.cost_offset,
        )

    def item_max(self) -> np.ndarray:
        return np.array([float(u.max()) for u in self.item_use])

    def profile(self, per_item: np.ndarray) -> np.ndarray:
        """Σ over items covering each point of ``per_item`` (one number per item)."""
        prof = np.zeros(len(self.points) + 1)
        np.add.at(prof, self.item_lo, per_item)
        np.add.at(prof, self.item_hi, -per_item)
        return np.cumsum(prof)[:-1]

    def binding(self) -> np.ndarray:
        """Points whose constraint can be violated by some choice."""
        if self.limit is None:
            return np.zeros(len(self.points), dtype=bool)
        return self.base + self.profile(self.item_max()) > self.limit * (1 + 1e-12)

    def load(self, choice: np.ndarray) -> np.ndarray:
        """Usage at each point for ``choice`` (base included)."""
        per = np.array([u[choice[v]] for v, u in zip(self.item_node, self.item_use)])
        return self.base + self.profile(per if len(per) else np.zeros(0))

    def node_cost(self, choice: np.ndarray) -> float:
        return float(self.cost[self.off[:-1] + choice].sum())

    def total_cost(self, choice: np.ndarray) -> float:
        c = self.offset + self.node_cost(choice)
        for u, v, m in zip(self.edge_u, self.edge_v, self.edge_costs):
            c += m[choice[u], choice[v]]
        return float(c)
