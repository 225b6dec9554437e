"""Solvers against brute force on seeded random problems; presolve exactness; pipeline behaviour."""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest

from autopar.solvers import InfeasibleError, Problem, Solution, evaluate, solve
from autopar.solvers.brute import solve_brute
from autopar.solvers.compact import Compact
from autopar.solvers.heuristic import solve_heuristic
from autopar.solvers.backends import HighsBackend
from autopar.solvers.ilp import build, solve_compact, solve_ilp
from autopar.solvers.milp import _add_memory_rows
from autopar.solvers.mrf import TRWS
from autopar.solvers.presolve import presolve


def random_problem(seed: int, *, limit: bool = True, n_max: int = 7, k_max: int = 3, p_inf: float = 0.15,
                   structured: bool = True) -> Problem:
    """Small random problem; ``structured`` adds alias (functional) edges, separable edges,
    single-strategy nodes and constant-usage nodes so every presolve rule fires."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, n_max + 1))
    ks = rng.integers(1, k_max + 1, n)
    while np.prod(ks) > 20000:
        ks = np.maximum(1, ks - 1)
    costs = [rng.integers(0, 100, k).astype(float) for k in ks]
    for c in costs:
        if len(c) > 1 and rng.random() < p_inf:
            c[rng.integers(len(c))] = np.inf
    usages = [rng.integers(0, 20, k).astype(float) for k in ks]
    if structured:
        for v in range(n):
            if rng.random() < 0.2:
                usages[v][:] = usages[v][0]  # usage independent of the strategy
    intervals = []
    for _ in range(n):
        a = int(rng.integers(0, 10))
        intervals.append((a, a + int(rng.integers(0, 6))))
    edges, ecosts = [], []
    for _ in range(int(rng.integers(0, 2 * n))):
        u, v = (int(x) for x in rng.integers(0, n, 2))
        kind = rng.random() if structured else 1.0
        if kind < 0.15 and u != v:  # alias: v's strategy is a function of u's
            f = rng.integers(0, ks[v], ks[u])
            m = np.full((ks[u], ks[v]), np.inf)
            m[np.arange(ks[u]), f] = rng.integers(0, 10, ks[u])
        elif kind < 0.25:  # separable a_i + b_j
            m = rng.integers(0, 30, ks[u])[:, None] + rng.integers(0, 30, ks[v])[None, :]
        else:
            m = rng.integers(0, 60, (ks[u], ks[v])).astype(float)
            m[rng.random(m.shape) < p_inf] = np.inf
        edges.append((u, v))
        ecosts.append(np.asarray(m, dtype=float))
    p = Problem(costs, usages, intervals, edges, ecosts)
    if limit:
        lo = p.min_peak_usage()
        hi = Problem([np.zeros(k) for k in ks], [np.full(k, u.max()) for k, u in zip(ks, usages)],
                     intervals, [], []).min_peak_usage()
        p.usage_limit = float(rng.integers(int(lo), int(hi) + 2))
    return p


def hard_problem(seed: int = 7, n: int = 40, k: int = 8) -> Problem:
    """40 nodes × 8 strategies, dense random edges, a binding memory limit: HiGHS needs seconds."""
    rng = np.random.default_rng(seed)
    costs = [rng.integers(0, 1000, k).astype(float) for _ in range(n)]
    usages = [rng.integers(1, 50, k).astype(float) for _ in range(n)]
    edges = [(u, v) for u in range(n) for v in range(u + 1, n) if rng.random() < 0.3]
    ecosts = [rng.integers(0, 1000, (k, k)).astype(float) for _ in edges]
    p = Problem(costs, usages, [(0, 10)] * n, edges, ecosts)
    p.usage_limit = p.min_peak_usage() * 1.3
    return p


def _same(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= 1e-9 * max(1.0, abs(b))


@pytest.mark.parametrize("solver, lazy, lp_first", [("highs", False, False), ("highs", True, False),
                                                    ("highs", True, True), ("cbc", False, False)],
                         ids=["highs", "highs-lazy-rows", "highs-lp-first", "cbc"])
def test_ilp_matches_brute_force(solver, lazy, lp_first):
    for seed in range(200):
        p = random_problem(seed, limit=seed % 2 == 0)
        ref = solve_brute(p)
        if lp_first:
            got = solve_compact(Compact.from_problem(p), lazy=lazy, lp_first=True)
            got = dataclasses.replace(got, cost=evaluate(p, got.choice)[0]) if got.feasible else got
        else:
            got = solve_ilp(p, solver=solver, lazy=lazy)
        if ref.status == "infeasible":
            assert not got.feasible, f"{seed=}: brute force says infeasible, {solver} found {got}"
            continue
        assert got.status == "optimal" and got.feasible, f"{seed=}: {got}"
        assert _same(got.cost, ref.cost), f"{seed=}: {solver} {got.cost} vs brute force {ref.cost}"
        assert _same(got.lower_bound, got.cost)


@pytest.mark.parametrize("lazy", [False, True], ids=["rows", "lazy-rows"])
def test_lp_first_then_mip_proves_the_optimum(lazy):
    """Regression (highspy 1.16.0): after the LP relaxation's rounds, the MIP run on the same
    HiGHS model reported the optimum (395) but returned a stale vector costing 402."""
    import highspy

    p = random_problem(150, limit=True)
    got = solve_compact(Compact.from_problem(p), lazy=lazy, lp_first=True)
    assert got.status == "optimal", f"highspy {getattr(highspy, '__version__', '?')}: {got}"
    assert evaluate(p, got.choice)[0] == solve_brute(p).cost == 395.0


def test_a_relaxation_with_nothing_to_choose_bounds_at_its_one_choice():
    """A problem presolve settles (every node fixed, e.g. the memory-free presolve of a chain)
    leaves the LP no variable: its bound is the one choice's cost, not −∞."""
    for p in (Problem([], [], [], [], [], cost_offset=5.0),
              Problem([np.array([3.0])], [np.array([0.0])], [(0, 1)], [], [], cost_offset=5.0)):
        lp = solve_ilp(p, relax=True, lazy=True)
        assert lp.stats["relaxation"] == "optimal" and lp.lower_bound == evaluate(p, lp.choice)[0]


def test_edge_variables_come_out_integral():
    """Continuous e with marginal rows is exact: at a binary s every e is 0/1."""
    checked = 0
    for seed in range(60):
        p = random_problem(seed, limit=False, k_max=4, structured=False)
        b = build(Compact.from_problem(p), memory=False)
        if not b.milp.c or b.infeasible_reason:
            continue
        status, x, _ = HighsBackend(b, 0.0, None).solve(10.0, None)
        if x is None:
            continue
        assert np.allclose(x, np.round(x), atol=1e-6), f"{seed=}: fractional edge variables"
        checked += 1
    assert checked > 20


def test_highs_presolve_is_off_for_mips_and_lps():
    """HiGHS's MIP presolve (1.16) ran past the time limit for minutes on a lean GPT-175B layer
    and found worse incumbents on dumped stage MIPs (``backends.HighsBackend``): ours is used."""
    p = random_problem(150, limit=True)
    b = build(Compact.from_problem(p))
    _add_memory_rows(b, b.memory)
    backend = HighsBackend(b, 0.0, None)
    assert backend.mip and backend.h.getOptionValue("presolve")[1] == "off"
    backend.set_relaxation(True)
    backend.set_relaxation(False)
    assert backend.h.getOptionValue("presolve")[1] == "off"
    status, x, _ = backend.solve(10.0, None)
    assert status == "optimal" and evaluate(p, b.decode(x))[0] == solve_brute(p).cost


def test_highs_measures_the_gap_on_the_whole_cost():
    """``gap_rel`` is a gap of the whole cost: the constant part (fixed nodes, every node's
    least cost) is HiGHS's objective offset, so its ``mip_rel_gap`` sees it; the bound read
    back is the cost's, offset included."""
    found = 0
    for seed in range(40):
        p = dataclasses.replace(random_problem(seed, limit=False), cost_offset=1000.0)
        b = build(Compact.from_problem(p))
        if not b.milp.c:
            continue
        backend = HighsBackend(b, 1e-3, None)
        assert backend.h.getLp().offset_ == pytest.approx(b.milp.offset * b.milp.scale)
        assert b.milp.offset >= 1000.0
        status, x, bound = backend.solve(10.0, None)
        ref = solve_brute(p)
        if status == "optimal" and ref.status == "optimal":
            assert bound <= ref.cost * (1 + 1e-9) and evaluate(p, b.decode(x))[0] <= ref.cost * (1 + 1e-3) + 1e-9
            found += 1
    assert found > 20, found


def test_presolve_is_exact():
    rng = np.random.default_rng(0)
    for seed in range(300):
        p = random_problem(seed, limit=seed % 3 != 0, n_max=8, k_max=4)
        ref = solve_brute(p)
        try:
            ps = presolve(p)
        except InfeasibleError:
            assert ref.status == "infeasible", f"{seed=}: presolve says infeasible, brute force {ref}"
            continue
        red = solve_brute(ps.problem)
        if ref.status == "infeasible":
            assert red.status == "infeasible", f"{seed=}: reduced problem feasible, original not"
            continue
        assert red.status == "optimal" and _same(red.cost, ref.cost), f"{seed=}: {red.cost} vs {ref.cost}"
        cost, feasible, _ = evaluate(p, ps.restore(red.choice))
        assert feasible and _same(cost, ref.cost), f"{seed=}: restored {cost} vs {ref.cost}"
        for _ in range(3):  # any reduced choice maps to an original choice of equal cost
            x = [int(rng.integers(len(c))) for c in ps.problem.node_costs]
            c1, f1, _ = evaluate(ps.problem, x)
            c2, f2, _ = evaluate(p, ps.restore(x))
            if math.isfinite(c1):
                assert _same(c2, c1) and f1 == f2, f"{seed=}: reduced {c1, f1} restored {c2, f2}"


def _presolved_problems(count: int):
    """(seed, problem, its presolve) of the random problems presolve does not prove infeasible."""
    for seed in range(count):
        p = random_problem(seed, limit=seed % 3 != 0, n_max=8, k_max=4)
        try:
            yield seed, p, presolve(p)
        except InfeasibleError:
            continue


def test_presolve_forward_maps_a_choice_to_one_no_worse():
    """Presolved.forward (warm starts): every feasible original choice maps to a reduced
    choice whose restored cost is no higher and which still fits; dominated strategies are
    replaced by their dominators."""
    rng = np.random.default_rng(1)
    mapped = replaced = 0
    for seed, p, ps in _presolved_problems(300):
        for _ in range(20):
            x = [int(rng.integers(len(c))) for c in p.node_costs]
            cost, feasible, _ = evaluate(p, x)
            if not feasible:
                continue
            red = ps.forward(x)
            assert red is not None, f"{seed=}: a feasible choice {x} has no reduced counterpart"
            c2, f2, _ = evaluate(p, ps.restore(red))
            assert f2 and c2 <= cost + 1e-9 * max(1.0, abs(cost)), f"{seed=}: {x} cost {cost} mapped to {c2}"
            mapped += 1
            replaced += any(x[v] not in ps.strategies[r] for r, v in enumerate(ps.nodes))
    assert mapped > 100 and replaced > 5, (mapped, replaced)


def test_restore_sets_hold_every_restored_choice():
    """Presolved.restore_sets (the LP support mapped back): whatever each reduced node picks
    from its set, the restored choice picks from the restored sets; a kept node's set is its
    own strategies, mapped."""
    import itertools
    rng = np.random.default_rng(2)
    folded = 0
    for seed, p, ps in _presolved_problems(200):
        allowed = [rng.choice(len(c), size=int(rng.integers(1, len(c) + 1)), replace=False)
                   for c in ps.problem.node_costs]
        sets = ps.restore_sets(allowed)
        assert len(sets) == p.num_nodes
        for r, v in enumerate(ps.nodes):
            assert sorted(sets[v]) == sorted(ps.strategies[r][allowed[r]]), f"{seed=}"
        for x in itertools.islice(itertools.product(*allowed), 200):
            restored = ps.restore(x)
            assert all(restored[v] in sets[v] for v in range(p.num_nodes)), f"{seed=}: {x} → {restored}"
        folded += p.num_nodes - ps.problem.num_nodes
    assert folded > 100


def test_the_memory_free_relaxation_bounds_the_real_problem_and_maps_back():
    """``solvers.relaxation``: the problem presolved without its usage limit is no bigger than
    the one presolved with it, any of its choices restores to an original choice of the same
    cost, and its LP optimum bounds every fitting choice (``lower_bound``)."""
    from autopar.solvers.driver import lower_bound
    from autopar.solvers.relaxation import memory_free
    rng = np.random.default_rng(3)
    smaller = compared = 0
    for seed in range(150):
        p = random_problem(seed, limit=True, n_max=8, k_max=4)
        try:
            ref, free = solve_brute(p), memory_free(p)
            with_limit = presolve(p).problem
        except InfeasibleError:
            continue
        assert free.problem.usage_limit is None and not free.problem.extra_usages
        assert free.problem.num_nodes <= with_limit.num_nodes
        smaller += free.problem.num_nodes < with_limit.num_nodes
        for _ in range(3):
            x = [int(rng.integers(len(c))) for c in free.problem.node_costs]
            c1 = evaluate(free.problem, x)[0]
            if math.isfinite(c1):
                assert _same(evaluate(p, free.choice(x))[0], c1), f"{seed=}"
        if ref.status == "optimal":
            assert lower_bound(p) <= ref.cost * (1 + 1e-9) + 1e-9, f"{seed=}"
            compared += 1
    assert smaller > 10 and compared > 50, (smaller, compared)


def test_a_limit_that_cannot_bind_presolves_as_no_limit_and_the_relaxation_reuses_it():
    """``Presolved.memory_free``: where no choice can exceed the usage limit (every item at its
    largest usage fits) presolve makes the reductions of the problem without its limit, and
    ``memory_free(p, presolved)`` is that problem without presolving again; where the limit
    can bind the flag is off and the relaxation presolves without the limit itself."""
    from autopar.solvers.relaxation import memory_free
    free_seen = bound_seen = 0
    for seed in range(120):
        p = random_problem(seed, limit=True, n_max=8, k_max=4)
        peak = sum(float(np.max(u)) for u in p.node_usages) + sum(float(np.max(u)) for _, u, _ in p.extra_usages)
        for limit, binds in ((peak + sum(u for u, _ in p.fixed_usages) + 1.0, False), (p.usage_limit, None)):
            q = dataclasses.replace(p, usage_limit=limit)
            try:
                ps, ref = presolve(q), memory_free(q)
            except InfeasibleError:
                continue
            if binds is False:
                assert ps.memory_free, f"{seed=}"
            if not ps.memory_free:
                bound_seen += 1
                assert memory_free(q, ps).problem.num_nodes == ref.problem.num_nodes
                continue
            free_seen += 1
            got = memory_free(q, ps)
            assert got.problem.usage_limit is None and not got.problem.extra_usages
            assert got.problem.edges == ref.problem.edges and list(ps.nodes) == list(ref.presolved.nodes)
            for a, b in zip(got.problem.node_costs + got.problem.edge_costs,
                            ref.problem.node_costs + ref.problem.edge_costs):
                np.testing.assert_array_equal(a, b)
            assert got.problem.cost_offset == ref.problem.cost_offset
            x = [0] * got.problem.num_nodes
            assert got.choice(x) == ref.choice(x), f"{seed=}"
    assert free_seen > 50 and bound_seen > 20, (free_seen, bound_seen)


def test_forward_sets_maps_strategy_sets_as_forward_maps_choices():
    """``Presolved.forward_sets``: each original strategy of a set goes where ``forward``
    sends a choice using it (a dominated one to its dominator)."""
    rng = np.random.default_rng(5)
    dominated = 0
    for seed in range(120):
        p = random_problem(seed, limit=True, n_max=8, k_max=4)
        try:
            ps = presolve(p)
        except InfeasibleError:
            continue
        dominated += len(ps.dominated_by)
        sets = [np.flatnonzero(rng.random(len(c)) < 0.6) for c in p.node_costs]
        got = ps.forward_sets(sets)
        assert len(got) == ps.problem.num_nodes
        base = list(ps.restore([0] * ps.problem.num_nodes))  # (every other node's strategy usable)
        for r, v in enumerate(ps.nodes):
            want = set()
            for s in sets[v]:
                x = list(base)
                x[v] = int(s)
                y = ps.forward(x)
                want |= {y[r]} if y is not None else set()
            assert set(got[r].tolist()) == want, f"{seed=}"
    assert dominated > 10


def test_a_relaxation_cache_solves_each_problems_lp_once_whatever_its_limit_or_usages(monkeypatch):
    """``solvers.relaxation``: the memory-free LP depends on the costs alone. Solving a problem
    with a ``RelaxationCache`` gives what solving it without one gives; the same problem at
    another usage limit, with other usages, or bounded (``lower_bound``) then solves no LP."""
    import dataclasses

    import autopar.solvers.relaxation as rx
    from autopar.solvers.driver import lower_bound
    lps = []
    real = rx.solve_ilp
    monkeypatch.setattr(rx, "solve_ilp", lambda *a, **k: lps.append(1) or real(*a, **k))
    compared = 0
    for seed in range(24):
        p = random_problem(seed, limit=True, n_max=10, k_max=4) if seed % 3 == 0 else hard_problem(seed, n=12, k=4)
        cache = rx.RelaxationCache()
        try:
            plain = solve(p, gap_rel=1e-9)
        except InfeasibleError:
            continue
        lps.clear()
        got = solve(p, gap_rel=1e-9, relaxations=cache)
        assert (got.cost, got.status, got.solver) == (plain.cost, plain.status, plain.solver), f"{seed=}"
        solved = len(lps)
        looser = dataclasses.replace(p, usage_limit=p.usage_limit * 1.5,
                                     node_usages=[u * 0.5 for u in p.node_usages])
        assert solve(looser, gap_rel=1e-9, relaxations=cache).cost <= got.cost * (1 + 1e-9) + 1e-9
        assert lower_bound(p, relaxations=cache) == lower_bound(p)
        assert solved <= 1 and len(lps) == 2 * solved, f"{seed=}"  # (+ the uncached ``lower_bound``)
        compared += solved > 0
        # other costs: another relaxation
        dearer = dataclasses.replace(p, node_costs=[c + 1.0 for c in p.node_costs])
        assert rx.cost_key(dearer) != rx.cost_key(p) == rx.cost_key(looser)
    assert compared >= 10


def test_warm_start_is_never_beaten_by_the_time_limit(monkeypatch):
    """solve(start=…): when the solver stops without beating the warm start (simulated: it
    gives up at once), the start is returned, marked "+start"; the start seeds the ILP (mapped
    through presolve); a callable start is asked for once, with the seconds left, and only
    when the solve would not be exact at once; a start that does not fit is ignored."""
    import autopar.solvers.driver as pl
    p = hard_problem()
    good = solve_heuristic(p, time_limit_s=0.5, seed=1)
    seeds = []

    def give_up(problem, *a, start=None, **kw):
        seeds.append(start)
        return Solution(choice=(), cost=math.inf, feasible=False, status="unknown")
    monkeypatch.setattr(pl, "solve_ilp", give_up)
    monkeypatch.setattr(pl, "_relax", lambda *a, **kw: (None, 0.0))  # (the LP settles nothing, at once)
    monkeypatch.setattr(pl, "solve_heuristic", lambda *a, **kw: Solution(choice=(), cost=math.inf, feasible=False,
                                                                          status="unknown"))
    calls = []

    def start(left):
        calls.append(left)
        return good.choice
    got = solve(p, solver="auto", time_limit_s=5.0, start=start)
    assert len(calls) == 1 and 0 < calls[0] <= 5.0  # asked once, with the seconds left
    # (auto: the ILP, then the heuristic gave up)
    assert got.choice == good.choice and got.cost == good.cost and got.solver == "auto:heuristic+start"
    assert got.status == "feasible" and got.lower_bound <= got.cost
    ps = presolve(p)  # the ILP was seeded with the start's reduced counterpart
    assert seeds[0] == ps.forward(good.choice) and evaluate(p, ps.restore(seeds[0]))[0] <= good.cost
    assert solve(p, solver="highs", start=good.choice).solver == "highs+start"  # a plain choice works too
    # a start that does not fit is ignored (nothing found: the error says so)
    worst = tuple(int(np.argmax(u)) for u in p.node_usages)
    assert not evaluate(p, worst)[1]
    assert not solve(p, solver="highs", time_limit_s=1.0, start=worst).feasible
    monkeypatch.undo()
    # an LP-integral problem settles exactly: the start is never asked for
    chain = Problem([np.array([1.0, 2.0])] * 4, [np.array([1.0, 5.0])] * 4, [(0, 1)] * 4, [(0, 1), (1, 2), (2, 3)],
                    [np.array([[0.0, 5.0], [5.0, 0.0]])] * 3, usage_limit=10.0)
    sol = solve(chain, start=lambda left: calls.append(left) or (1, 1, 1, 1))
    assert sol.solver == "auto:highs-lp" and sol.cost == 4.0 and len(calls) == 1


def test_presolve_reduces_aliases_and_leaves():
    # chain 0 -alias- 1 - 2 (leaf, no varying usage): everything folds away
    alias = np.array([[0.0, np.inf], [np.inf, 0.0]])
    p = Problem([[1, 5], [3, 0], [2, 2]], [[1, 2], [1, 1], [4, 4]], [(0, 5), (0, 5), (1, 2)],
                [(0, 1), (1, 2)], [alias, [[0, 9], [9, 0]]], usage_limit=10)
    ps = presolve(p)
    assert ps.problem.num_nodes == 0
    assert ps.problem.cost_offset == 6.0 and ps.restore(()) == (0, 0, 0)
    assert evaluate(p, (0, 0, 0)) == (6.0, True, 6.0)


def test_pipeline_every_solver_matches_brute_force():
    for seed in range(40):
        p = random_problem(1000 + seed, limit=True)
        ref = solve_brute(p)
        for solver in ("auto", "highs", "cbc", "brute", "heuristic"):
            for pre in (True, False):
                if ref.status == "infeasible" and solver == "heuristic":  # cannot prove it, finds nothing
                    try:
                        assert not solve(p, solver=solver, presolve=pre, time_limit_s=1).feasible
                    except InfeasibleError:
                        pass
                    continue
                if ref.status == "infeasible":
                    with pytest.raises(InfeasibleError):
                        solve(p, solver=solver, presolve=pre, time_limit_s=5)
                    continue
                got = solve(p, solver=solver, presolve=pre, time_limit_s=5)
                assert got.feasible and len(got.choice) == p.num_nodes, f"{seed=} {solver=} {pre=}: {got}"
                cost, feasible, _ = evaluate(p, got.choice)
                assert feasible and _same(cost, got.cost)
                if solver != "heuristic":
                    assert _same(got.cost, ref.cost), f"{seed=} {solver=} {pre=}: {got.cost} vs {ref.cost}"


def test_heuristic_is_feasible_and_close():
    ratios = []
    for seed in range(60):
        p = random_problem(2000 + seed, limit=True, n_max=9, k_max=4, p_inf=0.0)
        ref = solve_brute(p)
        if ref.status == "infeasible":
            continue
        for lns in (False, True):
            got = solve_heuristic(p, time_limit_s=2.0, lns=lns, seed=seed)
            assert got.feasible, f"{seed=} {lns=}: heuristic found nothing; brute force {ref.cost}"
            assert got.cost >= ref.cost - 1e-9
            if lns:
                ratios.append(got.cost / max(ref.cost, 1e-9))
            else:
                assert got.cost <= 3 * ref.cost + 100, f"{seed=}: ICM alone {got.cost} vs {ref.cost}"
    assert max(ratios) <= 1.0 + 1e-9, "an ILP neighbourhood covering a tiny problem is exact"


def test_heuristic_stops_once_it_stalls():
    # stall_s: the Lagrangian phase and LNS end once nothing better has come for stall_s and
    # for as long as the last improvement took; without it they run to the limit
    p = random_problem(2101, limit=True, n_max=40, k_max=4, p_inf=0.0)
    kw = dict(time_limit_s=4.0, budget=6.0, seed=0)  # (budget: many small neighbourhoods, not one ILP)
    stalled = solve_heuristic(p, stall_s=0.3, **kw)
    last = stalled.stats["trace"][-1][0]
    assert stalled.feasible and last + max(0.3, last) - 0.02 <= stalled.stats["stalled_s"] < 4.0
    assert stalled.time_s < 4.0 and stalled.stats["lns_steps"] > 0
    full = solve_heuristic(p, **kw)
    assert "stalled_s" not in full.stats and full.stats["lns_steps"] > stalled.stats["lns_steps"]


def test_trws_is_exact_on_a_tree():
    rng = np.random.default_rng(3)
    n = 12
    unary = [rng.random(3) for _ in range(n)]
    edges = [(int(rng.integers(v)), v, rng.random((3, 3))) for v in range(1, n)]
    t = TRWS(unary, edges)
    for _ in range(5):
        t.sweep()
    x = t.decode()
    p = Problem(unary, [np.zeros(3)] * n, [(0, 0)] * n, [(u, v) for u, v, _ in edges], [m for *_, m in edges])
    ref = solve_ilp(p)
    assert _same(evaluate(p, x)[0], ref.cost)


def test_limit_below_min_peak_raises_with_the_minimum():
    p = Problem([[1, 2], [3, 4]], [[5, 3], [4, 6]], [(0, 2), (1, 3)], [(0, 1)], [[[0, 1], [1, 0]]], usage_limit=6)
    assert p.min_peak_usage() == 7.0
    with pytest.raises(InfeasibleError, match="min_peak_usage=7") as err:
        solve(p)
    assert err.value.min_peak_usage == 7.0
    p.usage_limit = 7
    sol = solve(p)
    assert sol.feasible and sol.choice == (1, 0) and sol.cost == 6.0


def test_all_forbidden_raises():
    p = Problem([[1, 2], [3, 4]], [[0, 0], [0, 0]], [(0, 1), (0, 1)], [(0, 1)], [[[np.inf, 1], [np.inf, np.inf]]])
    p.edge_costs[0][0, 1] = np.inf
    with pytest.raises(InfeasibleError):
        solve(p)


def test_time_limited_solve_reports_bound_and_gap():
    p = hard_problem()
    sol = solve(p, solver="highs", time_limit_s=1.0)
    assert sol.status == "feasible" and sol.feasible
    assert math.isfinite(sol.lower_bound) and sol.lower_bound < sol.cost
    assert sol.gap == pytest.approx((sol.cost - sol.lower_bound) / sol.cost) and 0 < sol.gap < 1
    assert sol.time_s < 5.0
    cbc = solve(p, solver="cbc", time_limit_s=1.0)
    assert cbc.status == "feasible" and cbc.feasible and cbc.lower_bound <= cbc.cost


def test_evaluate_counts_merged_and_fixed_usage():
    p = Problem([[1, 2]], [[3, 5]], [(0, 4)], [], [], usage_limit=8,
                extra_usages=[(0, [4, 0], (2, 6))], fixed_usages=[(2.0, (3, 5))], cost_offset=7)
    assert evaluate(p, [0]) == (8.0, False, 3 + 4 + 2)  # at t = 3
    assert evaluate(p, [1]) == (9.0, True, 5 + 0 + 2)
    assert solve_brute(p).choice == (1,)


def test_brute_force_refuses_big_problems():
    p = Problem([np.zeros(10)] * 7, [np.zeros(10)] * 7, [(0, 1)] * 7, [], [])
    with pytest.raises(ValueError, match="brute force needs"):
        solve_brute(p)


def test_importing_solvers_does_not_import_jax():
    code = ("import sys, autopar.solvers, autopar.solvers.ilp, autopar.solvers.backends, autopar.solvers.heuristic, "
            "autopar.solvers.local, autopar.solvers.lns, autopar.solvers.presolve, autopar.solvers.iopddl, "
            "autopar.solvers.driver, autopar.solvers.mrf, autopar.solvers.brute, autopar.solvers.__main__, autopar.cost; "
            "assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_auto_above_the_milp_size_tries_the_lp_relaxation(monkeypatch):
    # above AUTO_ILP_VARIABLES (set to 0 here) "auto" skips the MILP: the LP relaxation is kept
    # when it is integral and fits memory (then it is the optimum: equal to brute force) and
    # otherwise the heuristic runs; above AUTO_LP_VARIABLES it is the heuristic directly
    import autopar.solvers.driver as sp
    monkeypatch.setattr(sp, "AUTO_ILP_VARIABLES", 0)
    names = set()
    for seed in range(30):
        p = random_problem(3000 + seed, limit=False, n_max=12, p_inf=0.0, structured=False)
        ref = solve_brute(p)
        got = solve(p, solver="auto", time_limit_s=5)
        names.add(got.solver)
        cost, feasible, _ = evaluate(p, got.choice)
        assert feasible and _same(cost, got.cost)
        if got.solver == "auto:highs-lp":
            assert got.status == "optimal" and _same(got.cost, ref.cost), f"{seed=}: {got.cost} vs {ref.cost}"
            big = p
    assert "auto:highs-lp" in names
    monkeypatch.setattr(sp, "AUTO_LP_VARIABLES", 0)
    assert solve(big, solver="auto", time_limit_s=1).solver == "auto:heuristic"


@pytest.mark.parametrize("solver", ["auto", "highs"])
def test_cutoff_stops_only_when_nothing_is_cheaper(solver):
    """``solve(cutoff=c)``: below the optimum → "cutoff" (proved: nothing cheaper, no choice);
    above it → the same optimum as without a cutoff (brute force)."""
    stopped = 0
    for seed in range(120):
        p = random_problem(seed, limit=seed % 2 == 0)
        ref = solve_brute(p)
        if ref.status == "infeasible":
            continue
        below = solve(p, solver=solver, cutoff=ref.cost * (1 - 1e-6) - 1e-6)
        assert below.status == "cutoff" and not below.feasible and below.lower_bound >= ref.cost * (1 - 1e-6) - 1e-6, \
            f"{seed=}: {below}"
        above = solve(p, solver=solver, cutoff=ref.cost * 1.01 + 1.0)
        assert above.status == "optimal" and _same(above.cost, ref.cost), f"{seed=}: {above} vs {ref.cost}"
        stopped += 1
    assert stopped > 50


def test_lp_time_outside_the_limit_leaves_the_heuristic_its_whole_limit(monkeypatch):
    # an ILP too big for the MILP: with lp_time_s the LP relaxation gets that long of its own
    # and the heuristic, when the LP does not settle it, still gets the whole time limit;
    # without it the LP takes 30 % of the limit from the heuristic
    import time as _time

    import autopar.solvers.driver as sp
    monkeypatch.setattr(sp, "AUTO_ILP_VARIABLES", -1)   # (every ILP too big; not presolved: presolve empties it)
    seen = {}
    real_lp, real_heuristic = sp.relax, sp.solve_heuristic

    def slow_unsettled_lp(problem, time_left, *a, **k):
        seen["lp"] = time_left
        r = real_lp(problem, time_left, *a, **k)
        _time.sleep(0.6)
        return dataclasses.replace(r, choice=None, support=None)  # as if it settled nothing: the heuristic runs

    def heuristic(problem, *, time_limit_s, **k):
        seen["heuristic"] = time_limit_s
        return real_heuristic(problem, time_limit_s=min(time_limit_s, 0.2), **k)
    monkeypatch.setattr(sp, "relax", slow_unsettled_lp)
    monkeypatch.setattr(sp, "solve_heuristic", heuristic)
    p = random_problem(3001, limit=False, n_max=12, p_inf=0.0, structured=False)
    got = solve(p, solver="auto", time_limit_s=1.0, lp_time_s=7.0, presolve=False)
    assert seen["lp"] == 7.0 and seen["heuristic"] > 0.7 and got.feasible
    got = solve(p, solver="auto", time_limit_s=1.0, presolve=False)
    assert seen["lp"] == pytest.approx(0.3, abs=0.05) and seen["heuristic"] < 0.4 and got.feasible


def test_lp_time_outside_the_limit_settles_a_small_ilp_whatever_the_load(monkeypatch):
    # the MILP path: an LP that takes longer than the limit (a loaded machine) still settles the
    # ILP given lp_time_s of its own, and the limit is left whole to what follows it
    import time as _time

    import autopar.solvers.driver as sp
    seen = []
    real_lp = sp.relax

    def slow_lp(problem, time_left, *a, **k):
        seen.append(time_left)
        _time.sleep(0.4)
        return real_lp(problem, time_left, *a, **k)
    monkeypatch.setattr(sp, "relax", slow_lp)
    # (not presolved: presolve alone solves it, and a problem it empties needs no LP)
    p = random_problem(3001, limit=False, n_max=12, p_inf=0.0, structured=False)
    ref = solve_brute(p)
    got = solve(p, solver="auto", time_limit_s=0.3, lp_time_s=7.0, presolve=False)
    assert seen == [7.0] and got.solver == "auto:highs-lp" and got.status == "optimal" and _same(got.cost, ref.cost)
    seen.clear()
    solve(p, solver="auto", time_limit_s=0.3, presolve=False)  # the LP's time comes from the limit
    assert seen[0] <= 0.3


def _frustrated_k4(base: float) -> Problem:
    """K4 of two-strategy nodes whose every edge costs 1 when both ends agree: any choice
    pays ≥ 2, the LP (each node half of each) pays 0 — presolve cannot reduce it."""
    agree = np.array([[1.0, 0.0], [0.0, 1.0]])
    edges = [(u, v) for u in range(4) for v in range(u + 1, 4)]
    return Problem([np.array([base, base])] * 4, [np.array([1.0, 1.0])] * 4, [(0, 1)] * 4, edges, [agree] * 6,
                   usage_limit=10.0)


def test_a_fractional_lp_is_settled_on_its_support_when_within_the_gap():
    p = _frustrated_k4(1000.0)  # LP bound 4000, optimum 4002: within 0.1 %
    best = solve_brute(p)
    assert presolve(p).problem.num_nodes == 4 and best.cost == 4002.0
    sol = solve(p, gap_rel=1e-3)
    # (HiGHS may stop the support's ILP anywhere within the gap: 1.7.2 returns 4003)
    assert sol.solver == "auto:highs-lp+support" and best.cost <= sol.cost <= 4000.0 * (1 + 1e-3)
    assert sol.status == "feasible" and evaluate(p, sol.choice)[0] == sol.cost
    assert sol.lower_bound == pytest.approx(4000.0) and sol.stats["support"]["support_nodes"] == 4
    # outside the gap (exact solve asked, or a looser LP): the MILP decides, from the support's choice
    for q, gap in ((p, 0.0), (_frustrated_k4(1.0), 1e-3)):
        sol = solve(q, gap_rel=gap)
        assert sol.solver == "auto:highs" and sol.status == "optimal" and sol.cost == solve_brute(q).cost
        assert "support_lns" not in sol.stats  # no time limit: the MILP alone
    # under a time limit the local search runs from the support's choice first, within the limit
    sol = solve(_frustrated_k4(1.0), gap_rel=1e-3, time_limit_s=5.0)
    assert sol.stats["support_lns"] == {"from": 6.0, "to": 6.0} and sol.cost == 6.0 and sol.status == "optimal"


def test_a_time_limited_milp_reports_the_lp_bound_when_its_own_is_weaker(monkeypatch):
    from autopar.solvers import driver
    real = driver.solve_ilp

    def stopped(problem, **kw):  # a MILP stopped before its root: its incumbent, a trivial bound
        sol = real(problem, **kw)
        return sol if kw.get("relax") else dataclasses.replace(sol, status="feasible", lower_bound=0.0)
    monkeypatch.setattr(driver, "solve_ilp", stopped)
    sol = solve(_frustrated_k4(1.0), gap_rel=1e-3)  # LP bound 4, optimum 6: outside the gap
    assert sol.solver == "auto:highs" and sol.cost == 6.0 and sol.lower_bound == pytest.approx(4.0)


def test_a_milp_with_too_little_time_left_for_its_root_is_not_started(monkeypatch):
    # the LP relaxation took a quarter of a second: with < MILP_MIN_LP_TIMES of it left, the MILP
    # is not started (measured: on GPT-175B plans such MILPs ended in their root node, returning
    # their start): the best incumbent is the answer, with the LP's bound
    import time as _time

    from autopar.solvers import driver
    real_lp, real_ilp, milps = driver.relax, driver.solve_ilp, []

    def slow_lp(*a, **k):
        sol = real_lp(*a, **k)
        _time.sleep(0.25)
        return sol

    def counted(problem, **kw):
        milps.extend([] if kw.get("relax") or "[LP support]" in problem.name else [kw.get("time_limit_s")])
        return real_ilp(problem, **kw)
    monkeypatch.setattr(driver, "relax", slow_lp)
    monkeypatch.setattr(driver, "solve_ilp", counted)
    p = _frustrated_k4(1.0)  # LP bound 4, optimum 6 (the support's choice): outside the gap
    sol = solve(p, gap_rel=1e-3, time_limit_s=2.0)
    assert milps == [] and sol.solver == "auto:highs-lp+start" and sol.cost == 6.0 and sol.status == "feasible"
    assert sol.lower_bound == pytest.approx(4.0) and evaluate(p, sol.choice)[0] == 6.0
    assert sol.stats["milp_skipped"]["lp_s"] >= 0.25 and sol.stats["milp_skipped"]["left_s"] < 2.5
    # enough time left (or no limit): the MILP runs and proves the optimum
    for limit in (30.0, None):
        sol = solve(p, gap_rel=1e-3, time_limit_s=limit)
        assert sol.solver == "auto:highs" and sol.status == "optimal" and "milp_skipped" not in sol.stats
    assert len(milps) == 2


def test_an_ilp_too_big_for_the_milp_keeps_its_lp_and_its_start_outside_the_limit(monkeypatch):
    # "auto" on an ILP above AUTO_ILP_VARIABLES: the LP relaxation gets ``lp_time_s`` of its own
    # and the warm start's time is not counted either, so the heuristic has the whole limit
    # (it had the limit less the LP's time once a start was asked: the start's exclusion
    # replaced the LP's)
    import time as _time

    from autopar.solvers import driver
    real_lp, given = driver.relax, []

    def slow_lp(*a, **k):
        _time.sleep(0.4)
        return real_lp(*a, **k)

    def heuristic(problem, *, time_limit_s=None, **kw):
        given.append(time_limit_s)
        return solve_brute(problem)

    def start(left):
        _time.sleep(0.2)
        return (0, 1, 0, 1)
    monkeypatch.setattr(driver, "AUTO_ILP_VARIABLES", 0)
    monkeypatch.setattr(driver, "relax", slow_lp)
    monkeypatch.setattr(driver, "solve_heuristic", heuristic)
    sol = solve(_frustrated_k4(1.0), time_limit_s=1.0, lp_time_s=5.0, start=start)
    assert sol.solver.startswith("auto:heuristic") and sol.cost == 6.0
    # (the last call: the support's own ILP asks the quick heuristic for a start first)
    assert given[-1] > 0.8  # the limit less the bookkeeping ``_heuristic_time`` keeps


def test_a_start_that_takes_a_cutoff_is_told_the_best_incumbent_and_may_decline():
    p = _frustrated_k4(1.0)  # LP bound 4, optimum 6: outside the gap, so the start is asked
    told = []

    def declining(left, cutoff=None):  # e.g. a rule whose LP bound proves it has nothing cheaper
        told.append(cutoff)
        return None
    sol = solve(p, gap_rel=1e-3, start=declining)
    # (the support's choice, already optimal: a start could neither seed nor win)
    assert told == [6.0] and sol.stats["start_cutoff"] == 6.0
    assert sol.cost == 6.0 and sol.status == "optimal" and not sol.solver.endswith("+start")
    plain = []
    solve(p, gap_rel=1e-3, start=lambda left: plain.append(left) or None)  # (no cutoff keyword: not passed)
    assert len(plain) == 1


def test_above_the_milp_size_the_heuristic_starts_from_the_support_and_the_start_gets_a_cutoff(monkeypatch):
    # an ILP too big for the MILP whose LP is fractional and whose support's choice is outside
    # the gap: the warm start is asked with that choice's cost as its cutoff (measured on
    # GPT-175B's 3-layer LM-head stage on 4 × 8: the rule's own 9.3 s heuristic skipped, its
    # LP bound above the support's choice), and the heuristic starts from the better of them
    import autopar.solvers.driver as sp
    monkeypatch.setattr(sp, "AUTO_ILP_VARIABLES", -1)
    starts, told = [], []
    real = sp.solve_heuristic

    def heuristic(problem, *, start=None, **k):
        starts.append(None if start is None else tuple(int(x) for x in start))
        return real(problem, start=start, **k)
    monkeypatch.setattr(sp, "solve_heuristic", heuristic)
    p = _frustrated_k4(1.0)  # LP bound 4, optimum 6 (the support's choice): outside the gap

    def declining(left, cutoff=None):
        told.append(cutoff)
        return None
    sol = solve(p, gap_rel=1e-3, time_limit_s=2.0, start=declining)
    assert told == [6.0] and sol.solver == "auto:heuristic" and sol.cost == 6.0
    # (the last heuristic run is the fallback's: it starts from the support's choice)
    assert starts[-1] is not None and evaluate(presolve(p).problem, starts[-1])[0] == 6.0

