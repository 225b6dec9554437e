"""Solver back ends for the marginal MILP built by ``solvers.milp``.

``HighsBackend`` passes the whole matrix to highspy in one call, keeps the model between
runs (rows are added for lazy memory constraints, nodes can be fixed, the LP relaxation
can be solved first) and reads HiGHS's MIP dual bound. ``CbcBackend`` goes through pulp's
bundled CBC binary; the model is rebuilt for every run and the bound is read from CBC's log.
Both return (status, x, lower bound) with status in {"optimal", "feasible", "infeasible",
"unknown"}.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import sys
import tempfile

import numpy as np


class HighsBackend:
    """HiGHS through highspy: the whole matrix in one call; rows can be added between runs."""

    def __init__(self, b, gap_rel: float, threads: int | None):
        import highspy

        self.hs, self.b, self.relaxed, self.offset = highspy, b, False, 0.0
        milp, nv = b.milp, len(b.milp.c)
        _swallow_banner()
        h = self.h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("mip_rel_gap", float(gap_rel))
        if threads is not None:
            h.setOptionValue("threads", int(threads))
        self.c = np.zeros(0)
        if nv == 0:
            return
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = nv, len(milp.rows)
        lp.col_cost_ = self.c = np.asarray(milp.c, dtype=np.float64)
        # the constant part of the cost (fixed nodes, each node's least cost) goes in as HiGHS's
        # objective offset: ``mip_rel_gap`` is then a gap of the whole cost, as ``gap_rel`` says —
        # without it HiGHS measured the gap on the variable part alone, a far stricter gap (a
        # 2-layer stage under a tight budget ran to its 10 s limit at 0.08 % of the whole cost,
        # 0.7 % of the variable part, where 0.1 % was asked for)
        self.offset = float(milp.offset * milp.scale) if math.isfinite(milp.offset) else 0.0
        lp.offset_ = self.offset
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
        self.mip = any(milp.integer)
        # HiGHS's presolve is off, for LPs and MIPs (``solvers.presolve`` has reduced the problem
        # already). On LPs it costs more than it saves (measured on GPT-39B stage relaxations,
        # 83–455 nodes: 1.4–2.1× faster without it, same optimum). On MIPs HiGHS 1.16's presolve
        # ignored the time limit — a lean GPT-175B layer's MIP with 1.15 s left was still in
        # ``strengthenInequalities`` after 10 minutes (1.15.1 and 1.7.2 stop in time) — and on six
        # MIPs dumped from GPT-175B plans (3–5 s limits) it never helped: the same incumbent on
        # five; a 3-layer stage 414,029 with it, 57,107 (proven optimal in 4 s) without; the
        # LM-head layer's bound 13,463 with it, 21,956 without
        self.h.setOptionValue("presolve", "off")
        if self.mip:
            kinds = highspy.HighsVarType
            lp.integrality_ = [kinds.kInteger if i else kinds.kContinuous for i in milp.integer]
        h.passModel(lp)

    def add_row(self, idx, val, rhs: float) -> None:
        self.h.addRow(-self.hs.kHighsInf, rhs, len(idx), np.asarray(idx, dtype=np.int32), np.asarray(val, dtype=np.float64))

    def fix(self, cols_vals) -> None:
        cols, vals = cols_vals
        if len(cols):
            self.h.changeColsBounds(len(cols), np.asarray(cols, dtype=np.int32), vals, vals)

    def _consistent(self, x, objective: float) -> bool:
        """Whether ``x`` achieves the objective HiGHS reports (within its feasibility tolerances:
        each entry of ``x`` may be off by 1e-6)."""
        c = self.c
        objective -= self.offset
        return abs(float(np.dot(c, x)) - objective) <= 1e-6 * (max(1.0, abs(objective)) + float(np.abs(c).sum()))

    def set_relaxation(self, flag: bool) -> None:
        if self.relaxed and not flag:
            # HiGHS 1.16 keeps the relaxation's solution and basis into the MIP run, and its
            # presolved MIP then reports the right optimum with a stale, worse col_value
            # (tests/test_solvers.py seed 150: objective 395, returned x costs 402). A MIP
            # run starts from a clear solver.
            self.h.clearSolver()
        self.h.setOptionValue("solve_relaxation", bool(flag))
        self.relaxed = flag

    def solve(self, time_left, start):
        hs, h, milp = self.hs, self.h, self.b.milp
        h.setOptionValue("time_limit", float(max(time_left, 0.01)) if time_left is not None else hs.kHighsInf)
        if start is not None and self.mip:
            x0 = start_vector(self.b, start)
            if x0 is not None:
                sol = hs.HighsSolution()
                sol.col_value = list(x0)
                sol.value_valid = True
                h.setSolution(sol)
        h.run()
        ms, info = h.getModelStatus(), h.getInfo()
        S = hs.HighsModelStatus
        x = np.asarray(h.getSolution().col_value) if info.primal_solution_status == 2 else None
        if ms == S.kOptimal and x is not None and not self._consistent(x, info.objective_function_value):
            # a solution vector that does not achieve the reported optimum is stale solver
            # state (see set_relaxation): solve again from a clear solver, once
            h.clearSolver()
            h.run()
            ms, info = h.getModelStatus(), h.getInfo()
            x = np.asarray(h.getSolution().col_value) if info.primal_solution_status == 2 else None
            if ms == S.kOptimal and x is not None and not self._consistent(x, info.objective_function_value):
                ms = None  # still inconsistent: keep x as an unproven incumbent
        raw = info.mip_dual_bound if self.mip and not self.relaxed else info.objective_function_value
        bound = (raw - self.offset) / milp.scale + milp.offset if raw is not None and math.isfinite(raw) else -math.inf
        if ms == S.kOptimal:
            return "optimal", x, bound
        if ms in (S.kInfeasible, S.kUnboundedOrInfeasible):
            return "infeasible", None, math.inf
        return ("feasible" if x is not None else "unknown"), x, bound


@functools.cache
def _swallow_banner() -> None:
    """HiGHS ≥ 1.16 prints its banner ("Running HiGHS … Copyright …") to the C stdout when the
    first ``Highs`` of a process is made, before ``output_flag`` can be set: make that first one
    with file descriptor 1 pointed at /dev/null."""
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            with contextlib.suppress(Exception):
                highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def start_vector(b, choice) -> np.ndarray | None:
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
    for u, v, first, gi, gj, rg, cg in b.edge_blocks:
        hit = np.flatnonzero((gi == rg[pos[u]]) & (gj == cg[pos[v]]))
        if len(hit) == 0:
            return None  # an inf pair
        x[first + hit[0]] = 1.0
    return x


class CbcBackend:
    """CBC through pulp (bundled binary); the model is rebuilt for every run."""

    def __init__(self, b, gap_rel: float, threads: int | None):
        self.b, self.gap_rel, self.threads = b, gap_rel, threads
        self.extra: list[tuple] = []

    def add_row(self, idx, val, rhs: float) -> None:
        self.extra.append((idx, val, -np.inf, rhs))

    def solve(self, time_left, start):
        import pulp

        milp = self.b.milp
        prob = pulp.LpProblem("autopar", pulp.LpMinimize)
        xs = [prob.add_variable(f"x{i}", lowBound=0, upBound=1, cat=pulp.LpBinary if integ else pulp.LpContinuous)
              for i, integ in enumerate(milp.integer)]
        prob.setObjective(pulp.LpAffineExpression([(xs[i], c) for i, c in enumerate(milp.c)]))
        for r, (idx, val, lo, hi) in enumerate(milp.rows + self.extra):
            expr = pulp.LpAffineExpression([(xs[i], float(a)) for i, a in zip(idx, val)])
            sense = pulp.LpConstraintEQ if lo == hi else pulp.LpConstraintLE
            prob.addConstraint(pulp.LpConstraint(expr, sense, rhs=float(hi)), f"r{r}")
        fd, log = tempfile.mkstemp(suffix=".log", prefix="autopar-cbc-")
        os.close(fd)
        try:
            # CBC overshoots its limit (model loading, final cleanup): give it 85 % of the time left
            limit = None if time_left is None else max(0.5, 0.85 * time_left)
            cmd = pulp.PULP_CBC_CMD(msg=False, timeLimit=limit, gapRel=self.gap_rel, threads=self.threads,
                                    logPath=log, mip=any(milp.integer))
            prob.solve(cmd)
            with open(log) as f:
                text = f.read()
        finally:
            os.unlink(log)
        if prob.status == pulp.LpStatusInfeasible:
            return "infeasible", None, math.inf
        if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            return "unknown", None, self._bound(text)
        x = np.array([v.varValue or 0.0 for v in xs])
        if prob.sol_status == pulp.LpSolutionOptimal and ("Result - Optimal" in text or not any(milp.integer)):
            obj = pulp.value(prob.objective)
            return "optimal", x, (obj / milp.scale + milp.offset) if obj is not None else -math.inf
        return "feasible", x, self._bound(text)

    def _bound(self, text: str) -> float:
        m = re.findall(r"Lower bound:\s*(-?[0-9.eE+-]+)", text) or re.findall(r"best possible (-?[0-9.eE+-]+)", text)
        return float(m[-1]) / self.b.milp.scale + self.b.milp.offset if m else -math.inf
