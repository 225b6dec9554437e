"""Heuristic for large problems: feasible start, memory-aware local search, ILP neighbourhoods.

Works on the flat :class:`Compact` view. With x the current choice and load[p] the usage
at maximal point p:

* *Start* — every node takes its least-usage strategy (ties: cheapest), the choice that
  fits whenever anything fits for problems with one usage term per node; ``repair`` then
  removes remaining excess: at the most overloaded point it applies the single-node change
  with the best (extra cost) / (usage freed there) ratio.
* *ICM with memory* (``LocalSearch.sweep``) — visit nodes, move v to
  argmin_i c_v[i] + Σ_w E_vw[i, x_w] over the strategies that keep every point it covers
  within the limit: for each segment s between v's item boundaries
  max_{p∈s} load[p] + Σ_{items ⊇ s} (use[i] − use[x_v]) ≤ limit.
* *Lagrangian guidance* — multipliers λ_p ≥ 0 on tight points (subgradient on load − limit)
  price usage: node v pays Σ_items use[i]·Σ_{p ∈ item} λ_p. A sweep on the priced costs
  moves memory to where it is cheapest; ``repair`` + plain sweeps restore feasibility.
* *ILP neighbourhoods* (LNS) — free a set S of nodes (a breadth-first ball, or the nodes
  live at a tight point), fix the rest, and solve the sub-problem exactly with HiGHS:
  costs c_v + Σ_{w∉S} E_vw[:, x_w], edges inside S, memory rows with the rest's load as
  base. The incumbent is the start, so every accepted step keeps the choice feasible.
"""
from __future__ import annotations

import math
import time

import numpy as np

from .compact import Compact
from .problem import Problem, Solution, evaluate

EPS = 1e-9


class LocalSearch:
    def __init__(self, cp: Compact, seed: int = 0):
        self.cp, n = cp, cp.n
        self.rng = np.random.default_rng(seed)
        self.costs = [cp.cost[cp.off[v]: cp.off[v + 1]].copy() for v in range(n)]
        self.nbrs: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(n)]
        for u, v, m in zip(cp.edge_u, cp.edge_v, cp.edge_costs):
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
        self.x = np.zeros(n, dtype=np.int64)
        self.load = cp.base.copy()

    def _segments(self, v: int):
        js = self.items[v]
        if not js:
            return None
        lo, hi = self.cp.item_lo[js], self.cp.item_hi[js]
        bps = np.unique(np.concatenate([lo, hi]))
        use = np.stack([self.cp.item_use[j] for j in js])  # items × k
        return bps, np.searchsorted(bps, lo), np.searchsorted(bps, hi), use

    # -- state ---------------------------------------------------------------------------
    def set_choice(self, x) -> None:
        self.x = np.asarray(x, dtype=np.int64).copy()
        self.load = self.cp.load(self.x) if len(self.cp.points) else self.cp.base.copy()

    def move(self, v: int, i: int) -> None:
        old = self.x[v]
        if old == i:
            return
        for j in self.items[v]:
            u = self.cp.item_use[j]
            self.load[self.cp.item_lo[j]: self.cp.item_hi[j]] += u[i] - u[old]
        self.x[v] = i

    def cost(self) -> float:
        return self.cp.total_cost(self.x)

    def local_costs(self, v: int) -> np.ndarray:
        c = self.costs[v].copy()
        for w, m in self.nbrs[v]:
            c += m[:, self.x[w]]
        return c

    def increments(self, v: int):
        """(segment max load, usage increment per strategy × segment) for node v, or None."""
        s = self.seg[v]
        if s is None:
            return None
        bps, slo, shi, use = s
        segmax = np.maximum.reduceat(self.load[bps[0]: bps[-1]], bps[:-1] - bps[0])
        delta = use - use[:, self.x[v]][:, None]  # items × k
        d = np.zeros((len(bps), use.shape[1]))
        np.add.at(d, slo, delta)
        np.add.at(d, shi, -delta)
        return segmax, np.cumsum(d, axis=0)[:-1]  # (segs,), (segs × k)

    def fits(self, v: int) -> np.ndarray:
        inc = self.increments(v)
        if inc is None:
            return np.ones(len(self.costs[v]), dtype=bool)
        segmax, d = inc
        return ((segmax[:, None] + d <= self.limit) | (d <= 0)).all(axis=0)

    # -- moves ---------------------------------------------------------------------------
    def sweep(self, order=None, price: list[np.ndarray] | None = None, memory: bool = True) -> int:
        """One ICM pass; returns the number of improving moves."""
        moved = 0
        for v in (order if order is not None else self.rng.permutation(self.cp.n)):
            if len(self.costs[v]) == 1:
                continue
            c = self.local_costs(v)
            if price is not None:
                c = c + price[v]
            if memory:
                c = np.where(self.fits(v), c, np.inf)
            i = int(np.argmin(c))
            cur = c[self.x[v]]
            if (math.isfinite(c[i]) and not math.isfinite(cur)) or c[i] < cur - 1e-12 * max(1.0, abs(cur)):
                self.move(v, i)
                moved += 1
        return moved

    def repair(self, max_steps: int = 100000) -> bool:
        """Greedy usage reduction at the most overloaded point until everything fits."""
        cp = self.cp
        if cp.limit is None or not len(cp.points):
            return True
        cover_order = np.argsort(cp.item_lo)
        for _ in range(max_steps):
            p = int(np.argmax(self.load))
            if self.load[p] <= self.limit:
                return True
            live = cp.item_node[(cp.item_lo <= p) & (cp.item_hi > p)]
            best, pick = math.inf, None
            for v in np.unique(live):
                inc = self.increments(v)
                if inc is None:
                    continue
                segmax, d = inc
                bps = self.seg[v][0]
                sp = np.searchsorted(bps, p, side="right") - 1
                freed = -d[sp]
                ok = freed > 0
                # no new overload elsewhere (overloaded segments must not grow)
                ok &= ((segmax[:, None] + d <= self.limit) | (d <= 0)).all(axis=0)
                if not ok.any():
                    continue
                c = self.local_costs(v)
                extra = c - c[self.x[v]]
                ratio = np.where(ok, np.maximum(extra, 0) / np.maximum(freed, 1e-300) + (extra < 0) * -1e-300, np.inf)
                i = int(np.argmin(ratio))
                if ratio[i] < best:
                    best, pick = ratio[i], (int(v), i)
            if pick is None:
                return False
            self.move(*pick)
        del cover_order
        return bool(self.load.max() <= self.limit)

    def start(self) -> None:
        """Least-usage strategy per node (ties: cheapest own cost)."""
        x = np.zeros(self.cp.n, dtype=np.int64)
        for v in range(self.cp.n):
            s = self.seg[v]
            c = self.costs[v]
            if s is None:
                x[v] = int(np.argmin(c)) if np.isfinite(c).any() else 0
                continue
            bps, slo, shi, use = s
            width = (self.cp.item_hi[self.items[v]] - self.cp.item_lo[self.items[v]]).astype(np.float64)
            total = (use * width[:, None]).sum(axis=0)
            peak = use.sum(axis=0)
            key = np.lexsort((np.where(np.isfinite(c), c, np.inf), total, peak))
            x[v] = int(key[0])
        self.set_choice(x)

    def prices(self, lam: np.ndarray) -> list[np.ndarray]:
        """Per node, Σ_items use[i] · Σ_{p ∈ item} λ_p."""
        cum = np.concatenate([[0.0], np.cumsum(lam)])
        per_item = cum[self.cp.item_hi] - cum[self.cp.item_lo]
        out = []
        for v in range(self.cp.n):
            s = self.seg[v]
            out.append(np.zeros(len(self.costs[v])) if s is None else per_item[self.items[v]] @ s[3])
        return out


def sub_problem(ls: LocalSearch, nodes: np.ndarray) -> tuple[Compact, np.ndarray]:
    """The problem over ``nodes`` with every other node fixed at ls.x (and its start)."""
    cp, x = ls.cp, ls.x
    nodes = np.asarray(sorted(set(int(v) for v in nodes)), dtype=np.int64)
    pos = {int(v): r for r, v in enumerate(nodes)}
    costs, eu, ev, ec = [], [], [], []
    for r, v in enumerate(nodes):
        c = ls.costs[v].copy()
        for w, m in ls.nbrs[v]:
            q = pos.get(w)
            if q is None:
                c += m[:, x[w]]
            elif r < q:
                eu.append(r), ev.append(q), ec.append(m)
        costs.append(c)
    k = np.array([len(c) for c in costs], dtype=np.int64)
    off = np.zeros(len(k) + 1, dtype=np.int64)
    np.cumsum(k, out=off[1:])
    js = [j for v in nodes for j in ls.items[v]]
    if js and cp.limit is not None:
        js = np.array(js)
        lo, hi = cp.item_lo[js], cp.item_hi[js]
        mark = np.zeros(len(cp.points) + 1)
        np.add.at(mark, lo, 1)
        np.add.at(mark, hi, -1)
        pts = np.flatnonzero(np.cumsum(mark)[:-1] > 0)
        own = np.zeros(len(cp.points) + 1)
        cur = np.array([cp.item_use[j][x[cp.item_node[j]]] for j in js])
        np.add.at(own, lo, cur)
        np.add.at(own, hi, -cur)
        base = (ls.load - np.cumsum(own)[:-1])[pts]
        sub = Compact(k=k, off=off, cost=np.concatenate(costs), edge_u=np.array(eu, dtype=np.int64),
                      edge_v=np.array(ev, dtype=np.int64), edge_costs=ec, limit=cp.limit, points=cp.points[pts],
                      base=base, item_node=np.array([pos[int(cp.item_node[j])] for j in js], dtype=np.int64),
                      item_lo=np.searchsorted(pts, lo), item_hi=np.searchsorted(pts, hi),
                      item_use=[cp.item_use[j] for j in js])
    else:
        sub = Compact(k=k, off=off, cost=np.concatenate(costs), edge_u=np.array(eu, dtype=np.int64),
                      edge_v=np.array(ev, dtype=np.int64), edge_costs=ec, limit=None,
                      points=np.zeros(0, dtype=np.int64), base=np.zeros(0), item_node=np.zeros(0, dtype=np.int64),
                      item_lo=np.zeros(0, dtype=np.int64), item_hi=np.zeros(0, dtype=np.int64), item_use=[])
    return sub, nodes


def ball(ls: LocalSearch, seed: int, budget: float) -> list[int]:
    """Breadth-first set of nodes around ``seed`` until the ILP size budget (variables) is spent."""
    seen, order, size, head = {seed}, [seed], 0.0, 0
    while head < len(order) and size < budget:
        v = order[head]
        head += 1
        size += len(ls.costs[v])
        nb = [w for w, _ in ls.nbrs[v] if w not in seen]
        ls.rng.shuffle(nb)
        for w in nb:
            m_size = len(ls.costs[w]) * len(ls.costs[v])
            if size + m_size > budget * 1.5:
                continue
            seen.add(w)
            order.append(w)
            size += m_size
    return order


def tight_set(ls: LocalSearch, budget: float) -> list[int]:
    """Nodes whose usage varies at one of the tightest points (a random one among the top)."""
    cp = ls.cp
    if cp.limit is None or not len(cp.item_node):
        return []
    top = np.argsort(-ls.load)[: max(1, len(ls.load) // 50)]
    p = int(ls.rng.choice(top))
    live = np.unique(cp.item_node[(cp.item_lo <= p) & (cp.item_hi > p)])
    ls.rng.shuffle(live)
    out, size = [], 0.0
    for v in live:
        out.append(int(v))
        size += len(ls.costs[v]) * (1 + len(ls.nbrs[v]))
        if size > budget:
            break
    return out


def solve_heuristic(problem: Problem, *, time_limit_s: float = 60.0, seed: int = 0, start=None,
                    lns: bool = True, budget: float = 4000.0) -> Solution:
    """Best feasible choice found within ``time_limit_s``: status "feasible", "optimal" when one
    ILP neighbourhood covered the whole problem, "unknown" if nothing that fits was found."""
    from .ilp import solve_compact

    t0 = time.perf_counter()
    deadline = t0 + time_limit_s
    cp = Compact.from_problem(problem)
    ls = LocalSearch(cp, seed=seed)
    stats = {"sweeps": 0, "lns_steps": 0, "lns_improved": 0}
    if start is not None:
        ls.set_choice(start)
    else:
        ls.start()
    if not ls.repair():
        ls.start()
    ok = ls.repair()
    if not ok:
        return Solution(choice=(), cost=math.inf, feasible=False, status="unknown", solver="heuristic",
                        time_s=time.perf_counter() - t0, stats=stats)
    while time.perf_counter() < deadline and ls.sweep() > 0:
        stats["sweeps"] += 1
    stats["start_cost"] = ls.cost()
    best_x, best_cost, status = ls.x.copy(), ls.cost(), "feasible"
    kind = 0
    whole = sum(len(c) * (1 + len(nb)) for c, nb in zip(ls.costs, ls.nbrs)) <= budget
    while lns and cp.n and time.perf_counter() < deadline - 0.05:
        kind += 1
        if whole:
            nodes = list(range(cp.n))
        elif kind % 3 == 0:
            nodes = tight_set(ls, budget)
        else:
            nodes = ball(ls, int(ls.rng.integers(cp.n)), budget)
        if len(nodes) < 2:
            if kind > 10 * cp.n:
                break
            continue
        sub, nodes = sub_problem(ls, np.array(nodes))
        left = deadline - time.perf_counter()
        sol = solve_compact(sub, time_limit_s=min(left, max(1.0, time_limit_s / 20)), start=ls.x[nodes])
        stats["lns_steps"] += 1
        if len(nodes) == cp.n and sol.status in ("optimal", "infeasible"):
            if sol.status == "infeasible":  # proven: no choice has finite cost and fits
                return Solution(choice=(), cost=math.inf, feasible=False, status="infeasible", solver="heuristic",
                                time_s=time.perf_counter() - t0, stats=stats)
            ls.set_choice(np.array(sol.choice, dtype=np.int64))
            best_x, best_cost, status = ls.x.copy(), ls.cost(), "optimal"
            break
        if sol.choice and sol.feasible:
            before = ls.cost()
            old = ls.x[nodes].copy()
            for v, i in zip(nodes, sol.choice):
                ls.move(int(v), int(i))
            after = ls.cost()
            if after < before - 1e-12 * max(1.0, abs(before)) and ls.load.max() <= ls.limit:
                stats["lns_improved"] += 1
            elif after > before or ls.load.max() > ls.limit:
                for v, i in zip(nodes, old):
                    ls.move(int(v), int(i))
        if ls.cost() < best_cost and ls.load.max() <= ls.limit:
            best_x, best_cost = ls.x.copy(), ls.cost()
    choice = tuple(int(c) for c in best_x)
    cost, feasible, _ = evaluate(problem, choice)
    return Solution(choice=choice, cost=cost, feasible=feasible, status=status if feasible else "unknown",
                    lower_bound=cost if status == "optimal" else -math.inf, solver="heuristic", time_s=time.perf_counter() - t0, stats=stats)
