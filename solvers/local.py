"""Incremental state for local search: choice x, usage at every maximal point, local costs.

For node v with neighbours w the *local cost* of strategy i is

    lc_v[i] = c_v[i] + Σ_w E_vw[i, x_w]

kept up to date on every move (a move of w adds E_vw[:, new] − E_vw[:, old] to each
neighbour's vector), so a move's cost change is lc_v[i] − lc_v[x_v]. Usage is the load
vector over the maximal time points (``Compact``); for v the items' boundaries cut its
lifetime into segments s, and strategy i fits when for every segment

    max_{p∈s} load[p] + Σ_{items j ⊇ s} (use_j[i] − use_j[x_v])  ≤  limit

(or the segment's usage does not grow — a move never makes an overload worse).
"""
from __future__ import annotations

import math

import numpy as np

from .compact import Compact

EPS = 1e-9


class LocalSearch:
    def __init__(self, cp: Compact, seed: int = 0):
        self.cp, n = cp, cp.n
        self.rng = np.random.default_rng(seed)
        # forbidden (inf) entries become BIG, larger than any finite total, so that local
        # costs can be updated by differences
        fin = cp.cost[np.isfinite(cp.cost)]
        big = float(np.abs(fin).sum()) + sum(float(np.abs(m[np.isfinite(m)]).max(initial=0)) for m in cp.edge_costs)
        self.big = big = 2.0 * (big + abs(cp.offset)) + 1.0
        self.costs = [np.where(np.isfinite(c), c, big) for c in (cp.cost[cp.off[v]: cp.off[v + 1]] for v in range(n))]
        self.nbrs: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(n)]
        for u, v, m in zip(cp.edge_u, cp.edge_v, cp.edge_costs):
            m = np.where(np.isfinite(m), m, big)
            if u == v:
                self.costs[u] += np.diag(m)
            else:
                self.nbrs[u].append((int(v), m))
                self.nbrs[v].append((int(u), m.T))
        self.limit = math.inf if cp.limit is None else cp.limit * (1 + EPS)
        self.items: list[list[int]] = [[] for _ in range(n)]
        for j, v in enumerate(cp.item_node):
            self.items[v].append(j)
        self.seg = [self._segments(v) for v in range(n)]
        self.set_choice(np.zeros(n, dtype=np.int64))

    def _segments(self, v: int):
        js = self.items[v]
        if not js:
            return None
        lo, hi = self.cp.item_lo[js], self.cp.item_hi[js]
        bps = np.unique(np.concatenate([lo, hi]))
        use = np.stack([self.cp.item_use[j] for j in js])  # items × k
        return bps, np.searchsorted(bps, lo), np.searchsorted(bps, hi), use

    def clone(self, seed: int) -> "LocalSearch":
        """Another state over the same (shared, read-only) problem data."""
        other = object.__new__(LocalSearch)
        state = ("x", "load", "lc_flat", "lc", "total")
        other.__dict__.update({k: v for k, v in self.__dict__.items() if k not in state})
        other.rng = np.random.default_rng(seed)
        other.set_choice(self.x)
        return other

    # -- state ---------------------------------------------------------------------------
    def set_choice(self, x) -> None:
        self.x = np.asarray(x, dtype=np.int64).copy()
        self.load = self.cp.load(self.x) if len(self.cp.points) else self.cp.base.copy()
        off = self.cp.off
        self.lc_flat = np.concatenate(self.costs) if self.cp.n else np.zeros(0)
        self.lc = [self.lc_flat[off[v]: off[v + 1]] for v in range(self.cp.n)]  # views
        for v in range(self.cp.n):
            for w, m in self.nbrs[v]:
                self.lc[v] += m[:, self.x[w]]
        self.total = self.cp.offset + sum(float(c[self.x[v]]) for v, c in enumerate(self.costs))
        self.total += 0.5 * sum(float(self.lc[v][self.x[v]] - self.costs[v][self.x[v]]) for v in range(self.cp.n))

    def move(self, v: int, i: int) -> None:
        old = self.x[v]
        if old == i:
            return
        for j in self.items[v]:
            u = self.cp.item_use[j]
            self.load[self.cp.item_lo[j]: self.cp.item_hi[j]] += u[i] - u[old]
        self.total += float(self.lc[v][i] - self.lc[v][old])
        for w, m in self.nbrs[v]:  # m is v×w: w's local cost holds E_vw[x_v, :]
            self.lc[w] += m[i, :] - m[old, :]
        self.x[v] = i

    def cost(self) -> float:
        return self.cp.total_cost(self.x)

    def overload(self) -> float:
        return float(self.load.max(initial=-math.inf) - self.limit) if len(self.load) else -math.inf

    def feasible(self) -> bool:
        """Fits the limit and uses no forbidden strategy or pair (incremental total < BIG)."""
        return self.overload() <= 0 and self.total < 0.5 * self.big

    def increments(self, v: int):
        """(max load per segment, usage change per segment × strategy) for node v, or None."""
        s = self.seg[v]
        if s is None:
            return None
        bps, slo, shi, use = s
        segmax = np.maximum.reduceat(self.load[bps[0]: bps[-1]], bps[:-1] - bps[0])
        delta = use - use[:, self.x[v]][:, None]  # items × k
        d = np.zeros((len(bps), use.shape[1]))
        np.add.at(d, slo, delta)
        np.add.at(d, shi, -delta)
        return segmax, np.cumsum(d, axis=0)[:-1]

    def fits(self, v: int) -> np.ndarray:
        inc = self.increments(v)
        if inc is None:
            return np.ones(len(self.costs[v]), dtype=bool)
        segmax, d = inc
        return ((segmax[:, None] + d <= self.limit) | (d <= 0)).all(axis=0)

    # -- moves ---------------------------------------------------------------------------
    def sweep(self, price: np.ndarray | None = None, memory: bool = True) -> int:
        """One pass of iterated conditional modes over the nodes that have a cheaper strategy
        (found for all nodes at once with a segmented min), in random order; returns the
        number of improving moves. ``price`` (flat, per strategy) adds Lagrangian usage
        prices; ``memory`` keeps every move within the usage limit."""
        if not self.cp.n:
            return 0
        off = self.cp.off
        flat = self.lc_flat if price is None else self.lc_flat + price
        cur = flat[off[:-1] + self.x]
        cand = np.flatnonzero(np.minimum.reduceat(flat, off[:-1]) < cur - 1e-12 * np.maximum(1.0, np.abs(cur)))
        moved = 0
        for v in self.rng.permutation(cand):
            c = self.lc[v] if price is None else self.lc[v] + price[off[v]: off[v + 1]]
            i = int(np.argmin(c))
            cur = c[self.x[v]]
            if not c[i] < cur - 1e-12 * max(1.0, abs(cur)):
                continue  # an earlier move changed this node's local costs
            if memory and self.seg[v] is not None:
                c = np.where(self.fits(v), c, np.inf)
                i = int(np.argmin(c))
            if c[i] < cur - 1e-12 * max(1.0, abs(cur)):
                self.move(v, i)
                moved += 1
        return moved

    def descend(self, max_sweeps: int = 50, **kw) -> None:
        for _ in range(max_sweeps):
            if self.sweep(**kw) == 0:
                return

    def repair(self, max_steps: int = 200000) -> bool:
        """Greedy: at the most overloaded point apply the move with the least extra cost per
        unit of usage freed there (a move must not overload any other point)."""
        cp = self.cp
        if cp.limit is None or not len(cp.points):
            return True
        if not hasattr(self, "_flat_use"):
            self._prepare_flat_use()
        off = cp.off
        for _ in range(max_steps):
            p = int(np.argmax(self.load))
            if self.load[p] <= self.limit:
                return True
            at_p = np.flatnonzero((cp.item_lo <= p) & (cp.item_hi > p))
            nodes = cp.item_node[at_p]
            ks = cp.k[nodes]
            rep = np.repeat(np.arange(len(at_p)), ks)
            strat = np.arange(ks.sum()) - np.repeat(np.cumsum(ks) - ks, ks)
            use = self._flat_use[self._item_off[at_p][rep] + strat]
            cur = self._flat_use[self._item_off[at_p] + self.x[nodes]][rep]
            key = off[nodes][rep] + strat  # global strategy index
            freed = np.bincount(key, weights=cur - use, minlength=len(self.lc_flat))
            cand = np.flatnonzero(freed > 0)
            owner = np.searchsorted(off, cand, side="right") - 1
            extra = self.lc_flat[cand] - self.lc_flat[off[owner] + self.x[owner]]
            ok = self.lc_flat[cand] < 0.5 * self.big
            cand, owner, ratio = cand[ok], owner[ok], extra[ok] / freed[cand[ok]]
            for c in np.argsort(ratio, kind="stable")[:64]:
                v, i = int(owner[c]), int(cand[c] - off[owner[c]])
                if self.fits(v)[i]:
                    self.move(v, i)
                    break
            else:
                return False
        return self.overload() <= 0

    def least_usage(self) -> np.ndarray:
        """Per node the strategy with the least peak usage (ties: total usage, then cost)."""
        x = np.zeros(self.cp.n, dtype=np.int64)
        for v in range(self.cp.n):
            s, c = self.seg[v], self.costs[v]
            c = np.where(np.isfinite(c), c, np.inf)
            if s is None:
                x[v] = int(np.argmin(c))
                continue
            use = s[3]
            width = (self.cp.item_hi[self.items[v]] - self.cp.item_lo[self.items[v]]).astype(np.float64)
            x[v] = int(np.lexsort((c, (use * width[:, None]).sum(axis=0), use.sum(axis=0)))[0])
        return x

    def prices(self, lam: np.ndarray) -> np.ndarray:
        """Flat, per strategy i of node v: Σ_items use[i] · Σ_{p ∈ item} λ_p."""
        cp = self.cp
        cum = np.concatenate([[0.0], np.cumsum(lam)])
        per_item = cum[cp.item_hi] - cum[cp.item_lo]
        if not hasattr(self, "_flat_use"):
            self._prepare_flat_use()
        out = np.zeros(int(cp.off[-1]))
        ks = cp.k[cp.item_node]
        rep = np.repeat(np.arange(len(ks)), ks)
        strat = np.arange(ks.sum()) - np.repeat(np.cumsum(ks) - ks, ks)
        np.add.at(out, cp.off[cp.item_node][rep] + strat, self._flat_use * per_item[rep])
        return out

    def _prepare_flat_use(self) -> None:
        cp = self.cp
        self._flat_use = np.concatenate(cp.item_use) if cp.item_use else np.zeros(0)
        self._item_off = np.concatenate([[0], np.cumsum([len(u) for u in cp.item_use])]).astype(np.int64)
