"""Exact problem reductions before solving, with a map back to the original choices
(``solvers.presolved.Presolved``).

Every reduction keeps the optimum: the reduced problem's optimal cost (its ``cost_offset``
included) equals the original's, and ``Presolved.restore`` turns any reduced choice into an
original choice of the same cost and the same feasibility.

Notation: node v has strategies i with cost c_v[i], edge (u,v) the matrix E[i,j], usage
items (use[i], [a,b)) on v (a node's own usage is its first item; merged nodes carry
several). An item's variable part is use − min use; the min moves to ``fixed_usages``.

1. *Forbidden strategies*: c_v[i] = ∞, or row i of some E_v· is all ∞ (arc consistency).
2. *Fixed node* (one strategy j): c_w += E_vw[j, :] for each neighbour w; items → fixed.
3. *Separable edge* E[i,j] = a_i + b_j (all finite): c_u += a, c_v += b, drop the edge
   (an all-zero edge is the special case). Parallel edges are summed when created.
4. *Functional edge*: every row i of E_uv has exactly one finite entry f(i) (so s_v =
   f(s_u) in every finite solution): merge v into u, c_u[i] += c_v[f(i)] + E[i, f(i)],
   v's other edges E_vw become E_uw[i,:] = E_vw[f(i),:], v's items become u's items
   use[f(i)] with v's interval (``_merge``). Alias constraints are such edges.
5. *Memory-free leaf* (one edge, no variable usage): c_u[i] += min_j E[i,j] + c_v[j]
   (``_leaf``). A node whose usage varies is never folded: the min may pick a strategy
   that uses more memory.
6. *Memory-free series node* (two edges u–v–w, no variable usage): replace by one edge
   E_uw[i,l] = min_j E_uv[i,j] + c_v[j] + E_vw[j,l] (``_series``), when k_u·k_v·k_w is small.
7. *Dominated strategy*: a is dropped if some b has c[b] ≤ c[a], E_v·[b,:] ≤ E_v·[a,:] on
   every incident edge and use[b] ≤ use[a] on every item (ties keep the lower index):
   swapping a for b never costs more nor uses more memory anywhere.
8. *Irrelevant usage*: an item whose interval covers only time points that cannot exceed
   the limit even with every item at its largest usage loses its variable part
   (``drop_slack_items``); with no usage limit all items go. When no item is relevant from
   the start they all go before any other reduction: the reductions are then exactly those
   of the problem without its limit (``Presolved.memory_free``: the LP relaxation, presolved
   without the limit, reuses them).
"""
from __future__ import annotations

import math
import time
from collections import deque
from functools import lru_cache

import numpy as np

from .presolved import Presolved
from .problem import InfeasibleError, Problem, maximal_points

SERIES_MAX = 2_000_000  # k_u·k_v·k_w limit for series reduction
DOMINANCE_MAX = 20_000_000  # k²·(features) limit for the dominance test


class _State:
    def __init__(self, problem: Problem):
        n = problem.num_nodes
        self.n = n
        self.korig = [len(c) for c in problem.node_costs]
        self.strat = [np.arange(k) for k in self.korig]
        self.cost = [c.astype(np.float64).copy() for c in problem.node_costs]
        self.alive = np.ones(n, dtype=bool)
        self.dominated_by: dict = {}
        self.adj: list[dict[int, np.ndarray]] = [dict() for _ in range(n)]  # adj[u][w] = E_uw (u×w)
        self.items: list[list[list]] = [[] for _ in range(n)]  # [use, (a, b)] with min(use) == 0
        self.fixed: list[tuple[float, tuple[int, int]]] = list(problem.fixed_usages)
        self.offset = float(problem.cost_offset)
        self.limit = problem.usage_limit
        self.ops: list[tuple] = []
        # (v, w) → (E_vw known all finite, whether it is neither separable nor functional)
        self.finite: dict[tuple[int, int], tuple[np.ndarray, bool]] = {}
        self.queue: deque[int] = deque(range(n))
        self.queued = np.ones(n, dtype=bool)
        self.counts = {k: 0 for k in ("forbidden", "fixed", "separable", "merged", "leaf", "series", "dominated",
                                      "slack_items")}
        for (u, v), m in zip(problem.edges, problem.edge_costs):
            if u == v:
                self.cost[u] = self.cost[u] + np.diag(m)
            else:
                self._add_edge(u, v, m.astype(np.float64))
        if self.limit is not None:
            for v, use, iv in problem.usage_items():
                if v >= 0:
                    self._add_item(v, np.asarray(use, dtype=np.float64).copy(), iv)
        # no choice can exceed the limit anywhere: every item is slack from the start, and the
        # reductions are those of the problem without its limit (``Presolved.memory_free``)
        self.memory_free = self.limit is None or not self._relevant_items()[1].any()
        if not self.memory_free:
            return
        for v in range(n):
            self.counts["slack_items"] += len(self.items[v])
            self.items[v] = []

    # -- bookkeeping ---------------------------------------------------------------------
    def _push(self, v: int) -> None:
        if self.alive[v] and not self.queued[v]:
            self.queued[v] = True
            self.queue.append(v)

    def _add_edge(self, u: int, w: int, m: np.ndarray) -> None:
        if w in self.adj[u]:
            m = self.adj[u][w] + m
        self.adj[u][w] = m
        self.adj[w][u] = m.T

    def _del_edge(self, u: int, w: int) -> None:
        del self.adj[u][w]
        del self.adj[w][u]

    def _add_item(self, v: int, use: np.ndarray, iv: tuple[int, int]) -> None:
        if iv[1] <= iv[0]:
            return
        m = float(use.min())
        if m != 0.0:
            self.fixed.append((m, iv))
            use = use - m
        if np.any(use > 0):
            self.items[v].append([use, iv])

    def _varying(self, v: int) -> bool:
        return bool(self.items[v])

    def _items_to_fixed(self, v: int, j: int | None = None) -> None:
        for use, iv in self.items[v]:
            amount = float(use[j]) if j is not None else float(use.min())
            if amount:
                self.fixed.append((amount, iv))
        self.items[v] = []

    def _restrict(self, v: int, keep: np.ndarray) -> None:
        if not keep.any():
            raise InfeasibleError(f"presolve: node {v} has no strategy with finite cost compatible with its neighbours")
        self.strat[v] = self.strat[v][keep]
        self.cost[v] = self.cost[v][keep]
        old, self.items[v] = self.items[v], []
        for use, iv in old:
            self._add_item(v, use[keep], iv)
        for w, m in list(self.adj[v].items()):
            self.adj[v][w] = m[keep, :]
            self.adj[w][v] = self.adj[v][w].T
            self._push(w)
        self._push(v)

    def _kill(self, v: int) -> None:
        self.alive[v] = False
        for w in list(self.adj[v]):
            self._del_edge(v, w)
            self._push(w)

    # -- reductions ----------------------------------------------------------------------
    def _all_finite(self, v: int, w: int, m: np.ndarray) -> bool:
        """Whether E_vw (``m``) is all finite: known for a matrix seen before (a changed edge is
        a new array), else one reduction (a sum is finite iff every entry is)."""
        seen = self.finite.get((v, w))
        if seen is not None and seen[0] is m:
            return True
        if np.isfinite(m.sum()):
            self.finite[v, w] = (m, False)
            return True
        return False

    def examine(self, v: int) -> None:
        keep = np.isfinite(self.cost[v])
        for w, m in self.adj[v].items():
            if not self._all_finite(v, w, m):
                keep &= np.isfinite(m).any(axis=1)
        if not keep.all():
            self.counts["forbidden"] += int((~keep).sum())
            self._restrict(v, keep)
        if len(self.cost[v]) == 1:
            return self._fix(v)
        for w in list(self.adj[v]):
            if w not in self.adj[v]:
                continue
            m = self.adj[v][w]
            if self._all_finite(v, w, m):
                if self.finite[v, w][1]:  # this matrix was found neither separable nor functional
                    continue
                a, b = m[:, 0] - m[0, 0], m[0, :]
                sep = a[:, None] + b[None, :]
                if (np.abs(m - sep) <= 1e-13 * np.abs(sep)).all():  # np.allclose(rtol=1e-13, atol=0)
                    self.cost[v] = self.cost[v] + a
                    self.cost[w] = self.cost[w] + b
                    self._del_edge(v, w)
                    self._push(w)
                    self.counts["separable"] += 1
                    continue
                # all finite: one entry per row means one column (and per column, one row)
                rows1, cols1 = m.shape[1] == 1, m.shape[0] == 1
                if not (rows1 or cols1):
                    self.finite[v, w] = (m, True)
                    continue
                fin = np.ones(m.shape, dtype=bool)
            else:
                fin = np.isfinite(m)
                rows1, cols1 = (fin.sum(axis=1) == 1).all(), (fin.sum(axis=0) == 1).all()
            if rows1 and cols1 and len(self.adj[v]) < len(self.adj[w]):
                rows1 = False  # a bijection: keep the node with more edges (hubs stay put)
            if rows1:  # s_w = f(s_v)
                self._merge(w, v, np.argmax(fin, axis=1))
            elif cols1:  # s_v = g(s_w)
                self._merge(v, w, np.argmax(fin, axis=0))
                return
        deg = len(self.adj[v])
        if not self._varying(v):
            if deg == 0:
                best = int(np.argmin(self.cost[v]))
                self._restrict(v, np.arange(len(self.cost[v])) == best)
                return self._fix(v)
            if deg == 1:
                return self._leaf(v)
            if deg == 2:
                u, w = self.adj[v]
                if len(self.cost[u]) * len(self.cost[v]) * len(self.cost[w]) <= SERIES_MAX:
                    return self._series(v, u, w)
        self._dominance(v)

    def _fix(self, v: int) -> None:
        self.offset += float(self.cost[v][0])
        for w, m in list(self.adj[v].items()):
            self.cost[w] = self.cost[w] + m[0, :]
        self._items_to_fixed(v, 0)
        self.ops.append(("fix", v, int(self.strat[v][0])))
        self.counts["fixed"] += 1
        self._kill(v)

    def _table(self, u: int, values: np.ndarray) -> np.ndarray:
        table = np.full(self.korig[u], -1, dtype=np.int64)
        table[self.strat[u]] = values
        return table

    def _merge(self, v: int, u: int, f: np.ndarray) -> None:
        """Merge v into u where s_v = f(s_u) (f indexes v's current strategies)."""
        e = self.adj[u][v]
        self.cost[u] = self.cost[u] + self.cost[v][f] + e[np.arange(len(f)), f]
        self._del_edge(u, v)
        for w, m in list(self.adj[v].items()):
            self._del_edge(v, w)
            self._add_edge(u, w, m[f, :])
            self._push(w)
        for use, iv in self.items[v]:
            self._add_item(u, use[f], iv)
        self.items[v] = []
        self.ops.append(("map", v, u, self._table(u, self.strat[v][f])))
        self.alive[v] = False
        self.counts["merged"] += 1
        self._push(u)

    def _leaf(self, v: int) -> None:
        (u, m), = self.adj[v].items()  # m is v×u
        t = m.T + self.cost[v][None, :]
        f = np.argmin(t, axis=1)
        self.cost[u] = self.cost[u] + t[np.arange(len(f)), f]
        self._items_to_fixed(v)
        self.ops.append(("map", v, u, self._table(u, self.strat[v][f])))
        self.counts["leaf"] += 1
        self._kill(v)

    def _series(self, v: int, u: int, w: int) -> None:
        t = self.adj[u][v][:, :, None] + self.cost[v][None, :, None] + self.adj[v][w][None, :, :]
        f = np.argmin(t, axis=1)
        best = np.take_along_axis(t, f[:, None, :], axis=1)[:, 0, :]
        self._items_to_fixed(v)
        self.ops.append(("map2", v, u, w, self.strat[u].copy(), self.strat[w].copy(), self.strat[v][f]))
        self.counts["series"] += 1
        self._kill(v)
        self._add_edge(u, w, best)

    def _dominance(self, v: int) -> None:
        k = len(self.cost[v])
        if k * k * (1 + len(self.items[v]) + len(self.adj[v])) > DOMINANCE_MAX:
            return
        width = 1 + len(self.items[v]) + sum(m.shape[1] for m in self.adj[v].values())
        if k * k * width > DOMINANCE_MAX:
            return
        feats = np.concatenate([self.cost[v][:, None]] + [use[:, None] for use, _ in self.items[v]]
                               + list(self.adj[v].values()), axis=1)
        le = (feats[:, None, :] <= feats[None, :, :]).all(axis=2)  # le[b, a]: b ≤ a everywhere
        better = le & (~le.T | _upper(k))
        dominated = better.any(axis=0)
        if dominated.any():
            for a in np.flatnonzero(dominated):  # a dominator that stays (``better`` is a strict order)
                b = int(np.flatnonzero(better[:, a] & ~dominated)[0])
                self.dominated_by[(v, int(self.strat[v][a]))] = int(self.strat[v][b])
            self.counts["dominated"] += int(dominated.sum())
            self._restrict(v, ~dominated)

    def _relevant_items(self) -> tuple[list[tuple[int, int]], np.ndarray]:
        """The live items (node, index) and, for each, whether its interval covers a time point
        that can exceed the limit with every item at its largest usage."""
        live = [(v, j) for v in np.flatnonzero(self.alive) for j in range(len(self.items[v]))]
        if not live:
            return live, np.zeros(0, dtype=bool)
        ivs = [self.items[v][j][1] for v, j in live] + [iv for _, iv in self.fixed]
        starts, ends = np.array([a for a, _ in ivs]), np.array([b for _, b in ivs])
        points = maximal_points(starts, ends)
        lo = np.searchsorted(points, starts, side="left")
        hi = np.searchsorted(points, ends, side="left")
        amount = np.array([float(self.items[v][j][0].max()) for v, j in live] + [u for u, _ in self.fixed])
        prof = np.zeros(len(points) + 1)
        np.add.at(prof, lo, amount)
        np.add.at(prof, hi, -amount)
        binding = np.cumsum(prof)[:-1] > self.limit
        covered = np.concatenate([[0], np.cumsum(binding)])
        return live, covered[hi[: len(live)]] > covered[lo[: len(live)]]

    def drop_slack_items(self) -> bool:
        """Drop variable usage on items that cover no time point able to exceed the limit."""
        live, relevant = self._relevant_items()
        changed = False
        for (v, j), rel in sorted(zip(live, relevant), key=lambda x: (x[0][0], -x[0][1])):
            if not rel:
                del self.items[v][j]
                self.counts["slack_items"] += 1
                self._push(v)
                changed = True
        return changed

    def run(self) -> None:
        while True:
            while self.queue:
                v = self.queue.popleft()
                self.queued[v] = False
                if self.alive[v]:
                    self.examine(v)
            if self.limit is None or not self.drop_slack_items():
                return


@lru_cache(maxsize=256)
def _upper(k: int) -> np.ndarray:
    """k×k: b < a strictly (read only)."""
    m = np.arange(k)[:, None] < np.arange(k)[None, :]
    m.flags.writeable = False
    return m


def presolve(problem: Problem) -> Presolved:
    """Reduce ``problem`` exactly; raises InfeasibleError when a node has no usable strategy."""
    t0 = time.perf_counter()
    st = _State(problem)
    st.run()
    nodes = np.flatnonzero(st.alive)
    index = {int(v): r for r, v in enumerate(nodes)}
    edges, ecosts, extra = [], [], []
    for v in nodes:
        for w, m in st.adj[v].items():
            if v < w:
                edges.append((index[int(v)], index[w]))
                ecosts.append(m)
        for use, iv in st.items[v]:
            extra.append((index[int(v)], use, iv))
    reduced = Problem(
        node_costs=[st.cost[v] for v in nodes],
        node_usages=[np.zeros(len(st.cost[v])) for v in nodes],
        intervals=[(0, 0)] * len(nodes),
        edges=edges, edge_costs=ecosts, usage_limit=problem.usage_limit,
        name=problem.name, extra_usages=extra, fixed_usages=st.fixed, cost_offset=st.offset,
    )
    if problem.usage_limit is not None and st.fixed:
        fixed_peak = Problem([], [], [], [], [], fixed_usages=st.fixed).min_peak_usage()
        if fixed_peak > problem.usage_limit * (1 + 1e-9):
            raise InfeasibleError(
                f"usage at least {fixed_peak:.6g} > usage_limit {problem.usage_limit:.6g} whatever the choice",
                min_peak_usage=problem.min_peak_usage())
    stats = dict(st.counts, nodes=len(nodes), edges=len(edges), strategies=int(sum(len(st.cost[v]) for v in nodes)),
                 items=len(extra), time_s=time.perf_counter() - t0)
    return Presolved(problem=reduced, nodes=nodes, strategies=[st.strat[v] for v in nodes], ops=st.ops,
                     num_original=problem.num_nodes, stats=stats, dominated_by=st.dominated_by,
                     memory_free=st.memory_free)
