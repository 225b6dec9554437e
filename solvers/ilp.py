"""Exact ILP for the sharding problem (the marginal formulation), solved by HiGHS or CBC.

Variables (strategies whose cost is ``inf``, or that no finite edge entry supports, are
removed first by arc consistency; a node left with one strategy is a constant):

    s_v[i] ∈ {0,1}        node v picks strategy i                (``_node_vars``)
    e_uv[i,j] ∈ [0,1]     edge (u,v) picks the pair (i,j); only for finite E_uv[i,j]
                           (an ``inf`` pair is the variable fixed at 0, i.e. omitted)

    minimise  Σ_v Σ_i c_v[i] s_v[i] + Σ_(u,v) Σ_ij E_uv[i,j] e_uv[i,j]

    Σ_i s_v[i] = 1                                 one-hot         (``_node_vars``)
    Σ_j e_uv[i,j] = s_u[i]   for every i of u      marginal rows   (``_edge_vars``)
    Σ_i e_uv[i,j] = s_v[j]   for every j of v      marginal cols   (``_edge_vars``)
    Σ_{items covering p} use_j[i] s_{node_j}[i] ≤ limit − base[p]  (``_memory_rows``)

With binary s the marginals force e_uv = s_u ⊗ s_v (a transportation polytope with unit
margins has one vertex), so e may be continuous. Edges to a constant node fold into the
other node's costs; edges with a separable matrix E[i,j] = a_i + b_j fold into both nodes;
parallel edges are summed. Memory rows are built only at maximal time points that can bind
(``Compact.binding``); identical rows keep the tightest right-hand side.

The objective is scaled by a power of two so its largest coefficient is about 1e6 (costs in
seconds ~1e-6 and contest costs ~1e10 both solve well); memory rows stay in their own units
(integral byte counts then cannot be violated by the solver's tolerances). ``highs`` uses
highspy directly (the whole matrix in one call, and the MIP dual bound is readable);
``cbc`` goes through pulp's bundled CBC and reads the bound from its log.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from .compact import Compact
from .problem import Problem, Solution, evaluate


@dataclass
class SparseMILP:
    """min c·x + offset  s.t.  row_lo ≤ A x ≤ row_hi,  lb ≤ x ≤ ub, x[integer] ∈ Z (A as COO)."""

    c: list = field(default_factory=list)
    integer: list = field(default_factory=list)
    rows: list = field(default_factory=list)  # (indices, values, lo, hi)
    offset: float = 0.0
    scale: float = 1.0

    def add_var(self, cost: float, integer: bool) -> int:
        self.c.append(cost)
        self.integer.append(integer)
        return len(self.c) - 1

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
        self.edge_blocks: list[tuple[int, int, int, np.ndarray, np.ndarray]] = []  # (u, v, first, ii, jj)
        self.infeasible_reason = ""

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
    biggest = max([float(np.abs(c).max()) for c in node_c] + [float(np.abs(s[np.isfinite(s)]).max(initial=0)) for *_, s in edges] + [0.0])
    scale = 2.0 ** round(math.log2(1e6 / biggest)) if biggest > 0 else 1.0
    milp = b.milp
    milp.scale = scale
    for v, al in enumerate(b.allowed):
        if const[v]:
            offset += float(node_c[v][0])
            continue
        b.var0[v] = len(milp.c)
        for i in range(len(al)):
            milp.add_var(float(node_c[v][i]) * scale, integer)
        milp.add_row(np.arange(b.var0[v], b.var0[v] + len(al)), np.ones(len(al)), 1.0, 1.0)
    milp.offset = offset
    for u, v, sub in edges:
        first, ii, jj = _edge_vars(milp, b.var0[u], b.var0[v], sub, scale)
        b.edge_blocks.append((u, v, first, ii, jj))
    if memory and cp.limit is not None:
        _memory_rows(b, cp)
    return b


def _edge_vars(milp: SparseMILP, su: int, sv: int, sub: np.ndarray, scale: float):
    ii, jj = np.nonzero(np.isfinite(sub))
    first = len(milp.c)
    for i, j in zip(ii, jj):
        milp.add_var(float(sub[i, j]) * scale, False)
    ids = first + np.arange(len(ii))
    for i in range(sub.shape[0]):
        sel = ids[ii == i]
        milp.add_row(np.append(sel, su + i), np.append(np.ones(len(sel)), -1.0), 0.0, 0.0)
    for j in range(sub.shape[1]):
        sel = ids[jj == j]
        milp.add_row(np.append(sel, sv + j), np.append(np.ones(len(sel)), -1.0), 0.0, 0.0)
    return first, ii, jj


def _memory_rows(b: Built, cp: Compact) -> None:
    """One row per binding maximal point (after constant nodes moved into the base)."""
    base = cp.base.copy()
    terms = []  # (lo, hi, var indices, coefficients, max)
    for v, lo, hi, use in zip(cp.item_node, cp.item_lo, cp.item_hi, cp.item_use):
        u = use[b.allowed[v]]
        m = float(u.min())
        base[lo:hi] += m
        if b.var0[v] >= 0 and np.any(u > m):
            nz = np.flatnonzero(u > m)
            terms.append((lo, hi, b.var0[v] + nz, u[nz] - m, float((u - m).max())))
    rhs = cp.limit - base
    if np.any(rhs < -1e-9 * max(cp.limit, 1.0)):
        p = int(np.argmin(rhs))
        b.infeasible_reason = f"usage at time {int(cp.points[p])} is at least {base[p]:.6g} > limit {cp.limit:.6g}"
        return
    prof = np.zeros(len(cp.points) + 1)
    for lo, hi, *_, mx in terms:
        prof[lo] += mx
        prof[hi] -= mx
    binding = np.cumsum(prof)[:-1] > rhs
    # group points by their set of covering terms (changes only where a term starts or ends)
    cuts = sorted({0, len(cp.points)} | {t[0] for t in terms} | {t[1] for t in terms})
    by_segment = [[] for _ in range(len(cuts) - 1)]
    seg_of = {c: k for k, c in enumerate(cuts[:-1])}
    for k, (lo, hi, *_rest) in enumerate(terms):
        s = seg_of[lo]
        while cuts[s] < hi:
            by_segment[s].append(k)
            s += 1
    for s, members in enumerate(by_segment):
        pts = np.arange(cuts[s], cuts[s + 1])
        pts = pts[binding[pts]]
        if len(pts) == 0 or not members:
            continue
        idx = np.concatenate([terms[k][2] for k in members])
        val = np.concatenate([terms[k][3] for k in members])
        b.milp.add_row(idx, val, -np.inf, float(rhs[pts].min()))


def solve_ilp(problem: Problem, *, solver: str = "highs", time_limit_s: float | None = None,
              gap_rel: float = 0.0, threads: int | None = None, relax: bool = False,
              start: np.ndarray | None = None) -> Solution:
    """Solve ``problem`` exactly (or to ``gap_rel``) with ``solver`` in {"highs", "cbc"}.

    ``relax=True`` solves the LP relaxation (its value is a lower bound; the rounded choice
    is returned as-is). ``start`` (a choice) seeds HiGHS with an incumbent.
    Status: "optimal" (proven), "feasible" (limit hit with an incumbent), "infeasible"
    (proven), "unknown" (limit hit without an incumbent).
    """
    t0 = time.perf_counter()
    cp = Compact.from_problem(problem)
    b = build(cp, integer=not relax)
    stats = {"variables": len(b.milp.c), "rows": len(b.milp.rows)}
    if b.infeasible_reason:
        return Solution(choice=(), cost=math.inf, feasible=False, status="infeasible", solver=solver,
                        time_s=time.perf_counter() - t0, stats={**stats, "reason": b.infeasible_reason})
    stats["build_s"] = time.perf_counter() - t0
    if not b.milp.c:  # every node constant after arc consistency
        status, x, bound = "optimal", np.zeros(0), -math.inf
    elif solver == "highs":
        status, x, bound = _run_highs(b, time_limit_s, gap_rel, threads, start)
    elif solver == "cbc":
        status, x, bound = _run_cbc(b, time_limit_s, gap_rel, threads)
    else:
        raise ValueError(f"unknown ILP {solver=}; expected 'highs' or 'cbc'")
    elapsed = time.perf_counter() - t0
    if x is None:
        return Solution(choice=(), cost=math.inf, feasible=False, status=status, solver=solver,
                        lower_bound=bound, time_s=elapsed, stats=stats)
    choice = tuple(int(c) for c in b.decode(x))
    cost, feasible, peak = evaluate(problem, choice)
    if relax:
        status = "feasible" if feasible else "unknown"
    if status == "optimal" and not relax:
        bound = cost if not math.isfinite(bound) else min(bound, cost)
    stats["peak_usage"] = peak
    return Solution(choice=choice, cost=cost, feasible=feasible, status=status if feasible or relax else "unknown",
                    lower_bound=bound, solver=solver, time_s=elapsed, stats=stats)


def _run_highs(b: Built, time_limit_s, gap_rel, threads, start):
    import highspy

    milp, nv = b.milp, len(b.milp.c)
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("mip_rel_gap", float(gap_rel))
    if time_limit_s is not None:
        h.setOptionValue("time_limit", float(max(time_limit_s, 0.01)))
    if threads is not None:
        h.setOptionValue("threads", int(threads))
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = nv, len(milp.rows)
    lp.col_cost_ = np.asarray(milp.c, dtype=np.float64)
    lp.col_lower_ = np.zeros(nv)
    lp.col_upper_ = np.ones(nv)
    starts, idx, val = milp.csr()
    lp.row_lower_ = np.array([r[2] for r in milp.rows], dtype=np.float64)
    lp.row_upper_ = np.array([r[3] for r in milp.rows], dtype=np.float64)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = starts
    lp.a_matrix_.index_ = idx
    lp.a_matrix_.value_ = val
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = nv, len(milp.rows)
    if any(milp.integer):
        lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous for i in milp.integer]
    h.passModel(lp)
    if start is not None and any(milp.integer):
        x0 = _start_vector(b, start)
        if x0 is not None:
            sol = highspy.HighsSolution()
            sol.col_value = list(x0)
            sol.value_valid = True
            h.setSolution(sol)
    h.run()
    ms = h.getModelStatus()
    info = h.getInfo()
    S = highspy.HighsModelStatus
    mip = any(milp.integer)
    has_x = info.primal_solution_status == 2  # kSolutionStatusFeasible
    x = np.asarray(h.getSolution().col_value) if has_x else None
    raw_bound = info.mip_dual_bound if mip else info.objective_function_value
    bound = raw_bound / milp.scale + milp.offset if raw_bound is not None and math.isfinite(raw_bound) else -math.inf
    if ms == S.kOptimal:
        return "optimal", x, bound
    if ms in (S.kInfeasible, S.kUnboundedOrInfeasible):
        return "infeasible", None, math.inf
    return ("feasible" if x is not None else "unknown"), x, bound


def _start_vector(b: Built, choice) -> np.ndarray | None:
    """Full MILP vector for a choice (s one-hot, e = s_u ⊗ s_v), or None if a pick is not allowed."""
    x = np.zeros(len(b.milp.c))
    pos = np.zeros(b.cp.n, dtype=np.int64)
    for v, al in enumerate(b.allowed):
        where = np.flatnonzero(al == choice[v])
        if len(where) == 0:
            return None
        pos[v] = where[0]
        if b.var0[v] >= 0:
            x[b.var0[v] + pos[v]] = 1.0
    for u, v, first, ii, jj in b.edge_blocks:
        hit = np.flatnonzero((ii == pos[u]) & (jj == pos[v]))
        if len(hit) == 0:
            return None  # an inf pair
        x[first + hit[0]] = 1.0
    return x


def _run_cbc(b: Built, time_limit_s, gap_rel, threads):
    import pulp

    milp = b.milp
    prob = pulp.LpProblem("autopar", pulp.LpMinimize)
    xs = [pulp.LpVariable(f"x{i}", lowBound=0, upBound=1, cat=pulp.LpBinary if integ else pulp.LpContinuous)
          for i, integ in enumerate(milp.integer)]
    prob.setObjective(pulp.LpAffineExpression([(xs[i], c) for i, c in enumerate(milp.c)]))
    for r, (idx, val, lo, hi) in enumerate(milp.rows):
        expr = pulp.LpAffineExpression([(xs[i], float(a)) for i, a in zip(idx, val)])
        if lo == hi:
            prob.addConstraint(pulp.LpConstraint(expr, pulp.LpConstraintEQ, rhs=float(lo)), f"r{r}")
        else:
            prob.addConstraint(pulp.LpConstraint(expr, pulp.LpConstraintLE, rhs=float(hi)), f"r{r}")
    fd, log = tempfile.mkstemp(suffix=".log", prefix="autopar-cbc-")
    os.close(fd)
    try:
        cmd = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=gap_rel, threads=threads, logPath=log)
        prob.solve(cmd)
        with open(log) as f:
            text = f.read()
    finally:
        os.unlink(log)
    if prob.status == pulp.LpStatusInfeasible:
        return "infeasible", None, math.inf
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return "unknown", None, _cbc_bound(text, milp)
    x = np.array([v.varValue or 0.0 for v in xs])
    if prob.sol_status == pulp.LpSolutionOptimal and "Result - Optimal" in text:
        return "optimal", x, -math.inf
    return "feasible", x, _cbc_bound(text, milp)


def _cbc_bound(text: str, milp: SparseMILP) -> float:
    m = re.findall(r"Lower bound:\s*(-?[0-9.eE+-]+)", text) or re.findall(r"best possible (-?[0-9.eE+-]+)", text)
    if not m:
        return -math.inf
    return float(m[-1]) / milp.scale + milp.offset
