"""ILP neighbourhoods for large-neighbourhood search (LNS) around a feasible choice.

A neighbourhood S is freed while every other node keeps its strategy x_w. The sub-problem
has node costs c_v + Σ_{w∉S} E_vw[:, x_w], the edges inside S, and memory rows over the
points S's items cover, with base = load − (S's own usage at x): it is a :class:`Compact`
solved exactly by ``ilp.solve_compact`` with x[S] as the incumbent, so an accepted step
never loses feasibility and never raises the cost.
"""
from __future__ import annotations

import numpy as np

from .compact import Compact
from .local import LocalSearch


def sub_problem(ls: LocalSearch, nodes) -> tuple[Compact, np.ndarray]:
    """The problem over ``nodes`` (sorted, returned) with every other node fixed at ls.x."""
    cp, x = ls.cp, ls.x
    nodes = np.unique(np.asarray(nodes, dtype=np.int64))
    pos = {int(v): r for r, v in enumerate(nodes)}
    costs, eu, ev, ec = [], [], [], []
    for r, v in enumerate(nodes):
        c = ls.costs[v].copy()
        for w, m in ls.nbrs[v]:
            q = pos.get(w)
            if q is None:
                c += m[:, x[w]]
            elif r < q:
                eu.append(r), ev.append(q), ec.append(np.where(m >= ls.big, np.inf, m))
        costs.append(np.where(c >= ls.big, np.inf, c))
    k = np.array([len(c) for c in costs], dtype=np.int64)
    off = np.zeros(len(k) + 1, dtype=np.int64)
    np.cumsum(k, out=off[1:])
    js = np.array([j for v in nodes for j in ls.items[v]], dtype=np.int64)
    empty_i = np.zeros(0, dtype=np.int64)
    sub = Compact(k=k, off=off, cost=np.concatenate(costs) if costs else np.zeros(0),
                  edge_u=np.array(eu, dtype=np.int64), edge_v=np.array(ev, dtype=np.int64), edge_costs=ec,
                  limit=None, points=empty_i, base=np.zeros(0), item_node=empty_i, item_lo=empty_i,
                  item_hi=empty_i, item_use=[])
    if len(js) and cp.limit is not None:
        lo, hi = cp.item_lo[js], cp.item_hi[js]
        mark = np.zeros(len(cp.points) + 1)
        np.add.at(mark, lo, 1)
        np.add.at(mark, hi, -1)
        pts = np.flatnonzero(np.cumsum(mark)[:-1] > 0)
        own = np.zeros(len(cp.points) + 1)
        cur = np.array([cp.item_use[j][x[cp.item_node[j]]] for j in js])
        np.add.at(own, lo, cur)
        np.add.at(own, hi, -cur)
        sub.limit, sub.points = cp.limit, cp.points[pts]
        sub.base = (ls.load - np.cumsum(own)[:-1])[pts]
        sub.item_node = np.array([pos[int(cp.item_node[j])] for j in js], dtype=np.int64)
        sub.item_lo, sub.item_hi = np.searchsorted(pts, lo), np.searchsorted(pts, hi)
        sub.item_use = [cp.item_use[j] for j in js]
    return sub, nodes


def size_of(ls: LocalSearch, v: int) -> float:
    """ILP size contributed by v: its strategies times (1 + its degree)."""
    return len(ls.costs[v]) * (1 + len(ls.nbrs[v]))


def ball(ls: LocalSearch, seed: int, budget: float) -> list[int]:
    """Breadth-first nodes around ``seed`` (random order within a layer) up to ``budget``."""
    seen, order, size, head = {seed}, [seed], size_of(ls, seed), 0
    while head < len(order) and size < budget:
        v = order[head]
        head += 1
        nb = [w for w, _ in ls.nbrs[v] if w not in seen]
        ls.rng.shuffle(nb)
        for w in nb:
            if size + size_of(ls, w) > budget:
                continue
            seen.add(w)
            order.append(w)
            size += size_of(ls, w)
    return order


def tight_set(ls: LocalSearch, budget: float) -> list[int]:
    """Nodes whose usage can change at one of the tightest points, plus neighbours."""
    cp = ls.cp
    if cp.limit is None or not len(cp.item_node):
        return []
    top = np.argsort(-ls.load)[: max(1, len(ls.load) // 100)]
    p = int(ls.rng.choice(top))
    live = np.unique(cp.item_node[(cp.item_lo <= p) & (cp.item_hi > p)])
    ls.rng.shuffle(live)
    out, size, seen = [], 0.0, set()
    for v in live:
        if size > budget:
            break
        for w in [int(v)] + [w for w, _ in ls.nbrs[v]][:3]:
            if w not in seen:
                seen.add(w)
                out.append(w)
                size += size_of(ls, w)
    return out
