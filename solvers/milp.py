"""The marginal MILP of ``solvers.ilp`` (formulation in that module's docstring), built from
a ``Compact`` problem: variables and one-hot rows (``build``), edge variables over groups of
identical rows / columns (``_edge_vars``), memory rows at binding time points (``MemoryRows``).
``solvers.ilp`` solves it (lazy memory rows, back ends, bounds).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from .compact import Compact


@dataclass
class SparseMILP:
    """min c·x + offset  s.t.  row_lo ≤ A x ≤ row_hi,  lb ≤ x ≤ ub, x[integer] ∈ Z (A as COO)."""

    c: list = field(default_factory=list)
    integer: list = field(default_factory=list)
    rows: list = field(default_factory=list)  # (indices, values, lo, hi)
    offset: float = 0.0
    scale: float = 1.0

    def add_row(self, idx, val, lo: float, hi: float) -> None:
        self.rows.append((np.asarray(idx, dtype=np.int32), np.asarray(val, dtype=np.float64), lo, hi))

    def csr(self):
        starts = np.zeros(len(self.rows) + 1, dtype=np.int32)
        np.cumsum([len(r[0]) for r in self.rows], out=starts[1:])
        idx = np.concatenate([r[0] for r in self.rows]) if self.rows else np.zeros(0, np.int32)
        val = np.concatenate([r[1] for r in self.rows]) if self.rows else np.zeros(0)
        return starts, idx, val


class Built:
    """The MILP plus how to read a choice back from its variables."""

    def __init__(self, cp: Compact):
        self.cp = cp
        self.milp = SparseMILP()
        self.allowed: list[np.ndarray] = []  # allowed strategy indices per node
        self.var0: np.ndarray = np.full(cp.n, -1)  # first s variable of a node (-1: constant)
        # (u, v, first var, row group of each var, col group of each var, group of each u / v strategy)
        self.edge_blocks: list[tuple[int, int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.infeasible_reason = ""
        self.memory: MemoryRows | None = None

    def integral(self, x: np.ndarray, tol: float = 1e-6) -> bool:
        """Every node variable s_v[i] within ``tol`` of 0 or 1."""
        s = np.concatenate([x[self.var0[v]: self.var0[v] + len(al)] for v, al in enumerate(self.allowed)
                            if self.var0[v] >= 0] or [np.zeros(0)])
        return bool(np.all(np.minimum(s, 1 - s) <= tol))

    def integral_columns(self, x: np.ndarray, tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
        """(columns, values) fixing every node whose s_v is integral in ``x``."""
        cols, vals = [], []
        for v, al in enumerate(self.allowed):
            if self.var0[v] < 0:
                continue
            s = x[self.var0[v]: self.var0[v] + len(al)]
            if np.all(np.minimum(s, 1 - s) <= tol):
                cols.append(np.arange(self.var0[v], self.var0[v] + len(al)))
                vals.append(np.round(s))
        return (np.concatenate(cols), np.concatenate(vals)) if cols else (np.zeros(0, np.int64), np.zeros(0))

    def decode(self, x: np.ndarray) -> np.ndarray:
        choice = np.zeros(self.cp.n, dtype=np.int64)
        for v, al in enumerate(self.allowed):
            if self.var0[v] < 0:
                choice[v] = al[0]
            else:
                choice[v] = al[int(np.argmax(x[self.var0[v]: self.var0[v] + len(al)]))]
        return choice


def arc_consistent(cp: Compact) -> list[np.ndarray]:
    """Boolean masks of strategies that have finite cost and a finite partner on every edge."""
    ok = [np.isfinite(cp.cost[cp.off[v]: cp.off[v + 1]]) for v in range(cp.n)]
    fin = [np.isfinite(m) for m in cp.edge_costs]
    inc: list[list[int]] = [[] for _ in range(cp.n)]
    for e, (u, v) in enumerate(zip(cp.edge_u, cp.edge_v)):
        inc[u].append(e)
        inc[v].append(e)
    queue, queued = list(range(cp.n)), np.ones(cp.n, dtype=bool)
    while queue:
        w = queue.pop()
        queued[w] = False
        for e in inc[w]:
            u, v = cp.edge_u[e], cp.edge_v[e]
            if u == v:
                new_u = ok[u] & np.diag(fin[e])
                new_v = new_u
            else:
                sub = fin[e] & ok[u][:, None] & ok[v][None, :]
                new_u, new_v = ok[u] & sub.any(axis=1), ok[v] & sub.any(axis=0)
            for x, new in ((u, new_u), (v, new_v)):
                if new.sum() < ok[x].sum():
                    ok[x] = new
                    if not queued[x]:
                        queue.append(x)
                        queued[x] = True
    return ok


def build(cp: Compact, *, memory: bool = True, integer: bool = True) -> Built:
    b = Built(cp)
    masks = arc_consistent(cp)
    for v, m in enumerate(masks):
        if not m.any():
            b.infeasible_reason = f"node {v}: every strategy has infinite cost or no finite edge partner"
            return b
    b.allowed = [np.flatnonzero(m) for m in masks]
    # node costs restricted to allowed strategies (edge folds add to these)
    node_c = [cp.cost[cp.off[v] + al].copy() for v, al in enumerate(b.allowed)]
    const = [len(al) == 1 for al in b.allowed]
    offset = cp.offset
    merged: dict[tuple[int, int], np.ndarray] = {}
    for u, v, mat in zip(cp.edge_u, cp.edge_v, cp.edge_costs):
        sub = mat[np.ix_(b.allowed[u], b.allowed[v])]
        if u == v:
            node_c[u] += np.diag(sub)
        elif const[u] and const[v]:
            offset += float(sub[0, 0])
        elif const[v]:
            node_c[u] += sub[:, 0]
        elif const[u]:
            node_c[v] += sub[0, :]
        else:
            key, sub = ((u, v), sub) if u < v else ((v, u), sub.T)
            merged[key] = merged[key] + sub if key in merged else sub.copy()
    edges = []
    for (u, v), sub in merged.items():
        fin = np.isfinite(sub)
        if fin.all():
            a, bb = sub[:, 0] - sub[0, 0], sub[0, :]
            if np.allclose(sub, a[:, None] + bb[None, :], rtol=1e-12, atol=0):
                node_c[u] += a
                node_c[v] += bb
                continue
        edges.append((u, v, sub))
    # scale: largest finite objective coefficient ≈ 1e6 (a power of two keeps it exact)
    biggest = max([float(np.abs(c).max()) for c in node_c]
                  + [float(np.abs(s[np.isfinite(s)]).max(initial=0)) for *_, s in edges] + [0.0])
    scale = 2.0 ** round(math.log2(1e6 / biggest)) if biggest > 0 else 1.0
    milp = b.milp
    milp.scale = scale
    for v, al in enumerate(b.allowed):
        if const[v]:
            offset += float(node_c[v][0])
            continue
        b.var0[v] = len(milp.c)
        milp.c.extend((node_c[v] * scale).tolist())
        milp.integer.extend([integer] * len(al))
        milp.add_row(np.arange(b.var0[v], b.var0[v] + len(al)), np.ones(len(al)), 1.0, 1.0)
    milp.offset = offset
    for u, v, sub in edges:
        b.edge_blocks.append((u, v, *_edge_vars(milp, b.var0[u], b.var0[v], sub, scale)))
    if memory and cp.limit is not None:
        b.memory = MemoryRows(b, cp)
        b.infeasible_reason = b.memory.infeasible_reason
    return b


def unique_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(a, axis=0, return_inverse=True)`` for a 2-D float array without NaN (the
    same sorted rows and inverse), several times faster on the small matrices of edges."""
    n, k = a.shape
    if n == 0 or k == 0:
        return a[:min(n, 1)], np.zeros(n, dtype=np.int64)
    order = np.lexsort(a.T[::-1])  # first column primary
    srt = a[order]
    new = np.ones(n, dtype=bool)
    new[1:] = (srt[1:] != srt[:-1]).any(axis=1)
    inv = np.empty(n, dtype=np.int64)
    inv[order] = np.cumsum(new) - 1
    return srt[new], inv


def _edge_vars(milp: SparseMILP, su: int, sv: int, sub: np.ndarray, scale: float):
    """Marginal edge variables over *groups*: strategies of u whose rows of ``sub`` are
    identical form one row group (likewise columns), and the marginals are summed over a
    group — exact (binary s still forces one pair), and a 25×80 edge whose consumer has 16
    distinct input specs needs 25×16 variables, not 2000."""
    vals, gi, gj, rg, cg, sides = grouping(sub)
    first = len(milp.c)
    milp.c.extend((vals * scale).tolist())
    milp.integer.extend([False] * len(gi))
    for s0, (order, num_vars, ends) in zip((su, sv), sides):
        # row k of this side: the edge variables of group k (by id), then −1 × the node's
        # strategies in group k (by index), cut from one array in ``grouping``'s order
        var = np.where(order < num_vars, first + order, s0 - num_vars + order).astype(np.int32)
        val = np.where(order < num_vars, 1.0, -1.0)
        milp.rows.extend((var[a:b], val[a:b], 0.0, 0.0) for a, b in zip([0] + ends[:-1], ends))
    return first, gi, gj, rg, cg


GROUPINGS_MAX = 20_000
_groupings: dict = {}  # memo of ``grouping`` by the matrix's bytes (a pure function of them)


def grouping(sub: np.ndarray) -> tuple:
    """The edge variables of ``sub`` (see ``_edge_vars``), read only: (their costs, row group,
    column group, row group of each row, column group of each column, and per side (rows,
    then columns) (the order of [variables, strategies] by group, number of variables, ends
    of the groups)). A planner solves many problems holding the same edge matrices (the same
    layers in stages of different lengths, budgets and meshes): each is grouped once."""
    key = (sub.shape, sub.dtype.str, hashlib.blake2b(np.ascontiguousarray(sub).tobytes(), digest_size=16).digest())
    out = _groupings.get(key)
    if out is None:
        rows, rg = unique_rows(sub)
        colsT, cg = unique_rows(rows.T)
        cols = colsT.T
        gi, gj = np.nonzero(np.isfinite(cols))  # row-major: gi sorted
        sides = []
        for g, of, n in ((gi, rg, cols.shape[0]), (gj, cg, cols.shape[1])):
            owner = np.concatenate([g, of])
            order = np.argsort(owner, kind="stable")  # (edge variables precede strategies in a group)
            order.flags.writeable = False
            sides.append((order, len(g), np.cumsum(np.bincount(owner, minlength=n)).tolist()))
        out = (cols[gi, gj], gi, gj, rg, cg, tuple(sides))
        for a in out[:5]:
            a.flags.writeable = False
        if len(_groupings) >= GROUPINGS_MAX:
            _groupings.clear()
        _groupings[key] = out
    return out


class MemoryRows:
    """Memory rows Σ_j use_j[i] s[i] ≤ limit − base[p] at binding maximal points (see module doc)."""

    def __init__(self, b: Built, cp: Compact):
        self.points = cp.points
        base = cp.base.copy()
        lo, hi, var, coef, mx = [], [], [], [], []
        for v, l, h, use in zip(cp.item_node, cp.item_lo, cp.item_hi, cp.item_use):
            u = use[b.allowed[v]]
            m = float(u.min())
            base[l:h] += m
            if b.var0[v] >= 0 and np.any(u > m):
                nz = np.flatnonzero(u > m)
                lo.append(l), hi.append(h), var.append(b.var0[v] + nz)
                coef.append(u[nz] - m), mx.append(float((u - m).max()))
        self.lo, self.hi = np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64)
        self.var, self.coef = var, coef
        self.rhs = cp.limit - base
        self.infeasible_reason = ""
        if np.any(self.rhs < -1e-9 * max(cp.limit, 1.0)):
            p = int(np.argmin(self.rhs))
            self.infeasible_reason = f"usage at time {int(cp.points[p])} is at least {base[p]:.6g} > limit {cp.limit:.6g}"
        prof = np.zeros(len(cp.points) + 1)
        np.add.at(prof, self.lo, mx)
        np.add.at(prof, self.hi, -np.array(mx))
        self.binding = np.cumsum(prof)[:-1] > self.rhs
        # cost of writing every row: Σ_terms (nonzeros × binding points covered)
        cov = np.concatenate([[0], np.cumsum(self.binding)])
        sizes = np.array([len(x) for x in var], dtype=np.float64)
        self.total_nnz = float((sizes * (cov[self.hi] - cov[self.lo])).sum()) if len(var) else 0.0

    def row(self, terms) -> tuple[np.ndarray, np.ndarray]:
        idx = np.concatenate([self.var[k] for k in terms])
        val = np.concatenate([self.coef[k] for k in terms])
        uniq, inv = np.unique(idx, return_inverse=True)
        return uniq, np.bincount(inv, weights=val)

    def at(self, p: int):
        terms = np.flatnonzero((self.lo <= p) & (self.hi > p))
        return (*self.row(terms), float(self.rhs[p]))

    def all_rows(self):
        """Every binding row; points covered by the same terms share one row (tightest rhs)."""
        cuts = np.unique(np.concatenate([[0, len(self.points)], self.lo, self.hi]))
        order = np.argsort(self.lo, kind="stable")
        active: set[int] = set()
        ends: dict[int, list[int]] = {}
        k = 0
        for s in range(len(cuts) - 1):
            a, z = int(cuts[s]), int(cuts[s + 1])
            for t in ends.pop(a, []):
                active.discard(t)
            while k < len(order) and self.lo[order[k]] <= a:
                t = int(order[k])
                if self.hi[t] > a:
                    active.add(t)
                    ends.setdefault(int(self.hi[t]), []).append(t)
                k += 1
            pts = np.arange(a, z)
            pts = pts[self.binding[pts]]
            if len(pts) and active:
                yield (*self.row(sorted(active)), float(self.rhs[pts].min()))


def _add_memory_rows(b: Built, mem: MemoryRows) -> None:
    for idx, val, rhs in mem.all_rows():
        b.milp.add_row(idx, val, -np.inf, rhs)
