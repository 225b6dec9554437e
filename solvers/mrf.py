"""TRW-S message passing for the memory-free part: min Σ_v θ_v(x_v) + Σ_(v,w) θ_vw(x_v, x_w).

Sequential tree-reweighted message passing (Kolmogorov 2006) over the node order 0..n−1.
With m_{w→v} the message into v from neighbour w,

    θ̂_v        = θ_v + Σ_{w ∈ N(v)} m_{w→v}
    m_{v→w}(y) = min_x [ γ_v θ̂_v(x) − m_{w→v}(x) + θ_vw(x, y) ]  − (its minimum)
    γ_v        = 1 / max(#neighbours before v, #neighbours after v)

sent to later neighbours in the forward pass and to earlier ones in the backward pass.
For *any* messages the reparametrisation θ'_v = θ̂_v, θ'_vw = θ_vw − m_{w→v} − m_{v→w}
gives the lower bound  Σ_v min θ'_v + Σ_vw min θ'_vw  (``lower_bound``). A choice is
decoded in order: x_v = argmin θ_v + Σ_{w<v} θ_vw(·, x_w) + Σ_{w>v} m_{w→v} (``decode``).

``solvers.heuristic`` adds Lagrangian usage prices to θ_v and re-runs a few passes with
the messages kept (warm start). Forbidden (``inf``) entries become a large finite penalty.
"""
from __future__ import annotations

import numpy as np


class TRWS:
    def __init__(self, unary: list[np.ndarray], edges: list[tuple[int, int, np.ndarray]]):
        n = len(unary)
        finite = [np.abs(u[np.isfinite(u)]).max(initial=0.0) for u in unary]
        finite += [np.abs(m[np.isfinite(m)]).max(initial=0.0) for _, _, m in edges]
        self.big = 1e6 * max(max(finite, default=1.0), 1.0)
        merged: dict[tuple[int, int], np.ndarray] = {}
        self.self_cost = [np.zeros(len(u)) for u in unary]
        for u, v, m in edges:
            m = np.where(np.isfinite(m), m, self.big)
            if u == v:
                self.self_cost[u] += np.diag(m)
                continue
            key, m = ((u, v), m) if u < v else ((v, u), m.T)
            merged[key] = merged[key] + m if key in merged else m.copy()
        self.n = n
        # per node: neighbours as (w, θ_vw oriented v×w, slot of m_{w→v}, slot of m_{v→w})
        self.nbrs: list[list[tuple[int, np.ndarray, int, int]]] = [[] for _ in range(n)]
        self.msg: list[np.ndarray] = []
        self.pairs = []
        for (u, v), m in merged.items():
            into_v, into_u = len(self.msg), len(self.msg) + 1
            self.msg.append(np.zeros(len(unary[v])))
            self.msg.append(np.zeros(len(unary[u])))
            self.nbrs[u].append((v, m, into_u, into_v))
            self.nbrs[v].append((u, m.T, into_v, into_u))
            self.pairs.append((u, v, m, into_u, into_v))
        for v in range(n):
            self.nbrs[v].sort(key=lambda t: t[0])
        before = np.array([sum(w < v for w, *_ in self.nbrs[v]) for v in range(n)])
        after = np.array([len(self.nbrs[v]) for v in range(n)]) - before
        self.gamma = 1.0 / np.maximum(np.maximum(before, after), 1)
        self.set_unary(unary)

    def set_unary(self, unary: list[np.ndarray]) -> None:
        self.unary = [np.where(np.isfinite(u), u, self.big) + s for u, s in zip(unary, self.self_cost)]

    def _belief(self, v: int) -> np.ndarray:
        b = self.unary[v].copy()
        for _, _, slot_in, _ in self.nbrs[v]:
            b += self.msg[slot_in]
        return b

    def sweep(self) -> None:
        """One forward and one backward pass."""
        for order, forward in ((range(self.n), True), (range(self.n - 1, -1, -1), False)):
            for v in order:
                nb = self.nbrs[v]
                if not nb:
                    continue
                scaled = self.gamma[v] * self._belief(v)
                for w, m, slot_in, slot_out in nb:
                    if (w > v) != forward:
                        continue
                    h = (scaled - self.msg[slot_in])[:, None] + m
                    out = h.min(axis=0)
                    self.msg[slot_out] = out - out.min()

    def lower_bound(self) -> float:
        lb = sum(float(self._belief(v).min()) for v in range(self.n))
        for u, v, m, into_u, into_v in self.pairs:
            lb += float((m - self.msg[into_u][:, None] - self.msg[into_v][None, :]).min())
        return lb

    def decode(self, order=None) -> np.ndarray:
        x = np.full(self.n, -1, dtype=np.int64)
        for v in (range(self.n) if order is None else order):
            c = self.unary[v].copy()
            for w, m, slot_in, _ in self.nbrs[v]:
                c += m[:, x[w]] if x[w] >= 0 else self.msg[slot_in]
            x[v] = int(np.argmin(c))
        return x
