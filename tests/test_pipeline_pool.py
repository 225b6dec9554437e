"""Stage ILPs planned by a pool of worker processes (autopar/pipeline/pool.py): the plan, the
search record and its counters are the same with one worker and with two."""
from __future__ import annotations

import gc

import optax
import pytest

from autopar import plan_training
from autopar.pipeline import pool
from autopar.pipeline.pool import resolve_workers
from conftest import make_cluster
from examples import gpt, mlp

SKIP = {"timing": True, "stages": {"__all__": {"plan": {"timing"}}},
        "search": {"refined": {"__all__": {"plan_s"}}}}


@pytest.mark.parametrize("costing", ["additive", "exact"])
def test_one_and_two_workers_give_the_same_plan(devices8, costing):
    if costing == "additive":
        model, (params, batch) = gpt, gpt.params_and_batch(batch=16, hidden=64, layers=4, seq=32)
    else:
        model, (params, batch) = mlp, mlp.params_and_batch(batch=32, hidden=64, layers=4)
    kw = dict(optimizer=optax.adam(1e-3), cluster=make_cluster(4), nodes=2, num_microbatches=4,
              costing=costing, remat="none", zero="auto", time_limit_s=60.0)
    one = plan_training(model.loss_fn, params, batch, workers=1, **kw)
    frozen = []
    freeze = pool.gc.freeze
    pool.gc.freeze = lambda: frozen.append(gc.get_freeze_count()) or freeze()
    try:
        two = plan_training(model.loss_fn, params, batch, workers=2, **kw)
    finally:
        pool.gc.freeze = freeze
    # every round's fork froze the parent's objects (``pool._freeze``); the search's end thawed them
    assert frozen and gc.get_freeze_count() == 0
    assert one.model_dump(exclude=SKIP) == two.model_dump(exclude=SKIP)
    assert one.search.ilp_solves == two.search.ilp_solves > 1


def test_workers_option(devices8):
    assert resolve_workers(3, 8) == 3
    assert resolve_workers("auto", 8) == 1  # small clusters: the ILPs are too quick to fork for
    assert resolve_workers("auto", 1024) >= 1
    with pytest.raises(ValueError, match="workers"):
        resolve_workers(0, 8)
    params, batch = mlp.params_and_batch(batch=16, hidden=32, layers=2)
    with pytest.raises(ValueError, match="workers"):
        plan_training(mlp.loss_fn, params, batch, optimizer=optax.sgd(0.1), workers="two")


def test_a_worker_forked_after_a_mip_still_solves_mips():
    """HiGHS's task scheduler does not survive ``fork``: without the pool's initializer a
    worker's MIP after one in the parent hung (measured: small MIPs, killed after 60 s)."""
    import multiprocessing
    from autopar.pipeline.pool import _fresh_solver_threads
    from test_solvers import hard_problem
    from autopar.solvers.ilp import solve_ilp
    solve_ilp(hard_problem(), solver="highs", time_limit_s=0.5)  # the parent's MIP starts the scheduler
    want = _solve_small(0)
    with multiprocessing.get_context("fork").Pool(2, initializer=_fresh_solver_threads) as pool:
        assert pool.map_async(_solve_small, range(2), chunksize=1).get(timeout=120) == [want, want]


def _solve_small(_):
    from test_solvers import random_problem
    from autopar.solvers.ilp import solve_ilp
    return [solve_ilp(random_problem(s), solver="highs").cost for s in range(0, 20, 2)]


class _Coster:
    """Just what ``pool.prefetch`` uses of a ``StageCoster``: a request is (program, budget);
    ``serve(key, cache)`` says whether the cached plans serve ``key`` (``StageCoster.served``)."""
    workers = 2

    def __init__(self, serve=lambda key, cache: False):
        import math

        from autopar.build_edges import ReshardCache
        from autopar.progress import Progress
        self.cache, self.prefetched, self.serve = {}, set(), serve
        self.solves, self.infeasible, self.min_need, self.progress = 0, 0, math.inf, Progress()
        self.handoffs = (ReshardCache(),)

    def plan_key(self, prog, budget=1.0, share=1.0, inflight=1):
        return prog, (1, 8), None, budget, False, inflight

    def is_cached(self, prog, budget=1.0, share=1.0, inflight=1):
        key = self.plan_key(prog, budget, inflight=inflight)
        return key in self.cache or self.serve(key, self.cache)

    def cost(self, prog, budget=1.0, share=1.0, inflight=1):
        from autopar.pipeline.costs import StageCost
        self.solves += 1
        self.cache[self.plan_key(prog, budget, inflight=inflight)] = StageCost(latency=budget)
        return self.cache[self.plan_key(prog, budget, inflight=inflight)]

    def remember(self, key, value):
        self.cache[key] = value


def test_a_request_an_earlier_one_may_serve_is_planned_in_the_next_round():
    """``prefetch``: the second budget of a stage program waits until the first is merged, then
    is served by it or planned with the other waiting ones — as one worker would have it."""
    from autopar.pipeline.pool import prefetch
    requests = [((p,), {"budget": b}) for p, b in (("A", 10.0), ("A", 20.0), ("B", 10.0), ("B", 20.0))]
    coster = _Coster()
    prefetch(coster, requests)
    assert [(k[0], k[3]) for k in coster.cache] == [("A", 10.0), ("B", 10.0), ("A", 20.0), ("B", 20.0)]
    assert coster.solves == 4 and len(coster.prefetched) == 4
    # A at 20 is served by A at 10 once that is merged: B at 20 alone is left to the caller
    served = _Coster(serve=lambda key, cache: key[0] == "A" and ("A", (1, 8), None, 10.0, False, 1) in cache)
    prefetch(served, requests)
    assert [(k[0], k[3]) for k in served.cache] == [("A", 10.0), ("B", 10.0)] and served.solves == 2


def test_a_plan_for_more_micro_batches_in_flight_does_not_hold_back_one_for_fewer(monkeypatch):
    """It cannot serve it (``reuse.served``): both are planned in one pool round; the other way
    round the second waits for the first."""
    from autopar.pipeline import pool
    rounds, run = [], pool._map
    monkeypatch.setattr(pool, "_map", lambda coster, fn, todo: rounds.append(len(todo)) or run(coster, fn, todo))
    coster = _Coster()
    pool.prefetch(coster, [(("A",), {"inflight": 17}), (("A",), {"inflight": 16}), (("B",), {})])
    assert rounds == [3] and coster.solves == 3
    rounds.clear()
    pool.prefetch(_Coster(), [(("A",), {"inflight": 16}), (("A",), {"inflight": 17}), (("B",), {}), (("C",), {})])
    assert rounds == [3]  # A for 17 waits for A for 16, then is left to the caller (alone)


def test_run_tasks_goes_on_within_a_task_and_merges_in_task_order():
    """``run_tasks``: each task's requests, the later ones made from the earlier ones' plans, in
    one worker; the plans merged into the parent in task order, the counters summed."""
    from autopar.pipeline.pool import run_tasks

    def task(coster, progs):
        first = coster.cost(progs[0])  # (a later request depends on the earlier plan)
        for prog in progs[1:]:
            coster.cost(prog, budget=first.latency / 2)
    coster = _Coster()
    run_tasks(coster, task, [("A", "A2"), ("B",), ("C", "C2", "C3")])  # (C, the largest, starts first)
    assert [(k[0], k[3]) for k in coster.cache] == [("A", 1.0), ("A2", 0.5), ("B", 1.0), ("C", 1.0), ("C2", 0.5),
                                                   ("C3", 0.5)]
    assert coster.solves == 6 and len(coster.prefetched) == 6
    single = _Coster()
    single.workers = 1
    run_tasks(single, task, [("A", "A2"), ("B",)])  # one worker: nothing here, the caller plans
    assert single.cache == {} and single.solves == 0


def test_a_plan_an_earlier_one_served_in_a_worker_is_a_cache_hit_at_its_first_use():
    """A worker's request answered by an earlier plan (``StageCoster.served``) is a cache hit
    when the caller first asks for it, as it is with one worker; a plan the worker made is not
    (one worker would have made it there): the search record's counters match."""
    from autopar.pipeline.pool import run_tasks

    class Serving(_Coster):
        def __init__(self):
            super().__init__()
            self.reused = set()

        def cost(self, prog, budget=1.0, share=1.0, inflight=1):
            key = self.plan_key(prog, budget, inflight=inflight)
            if budget < 1.0 and self.plan_key(prog) in self.cache:  # (a looser plan fits: served)
                self.reused.add(key)
                self.cache[key] = self.cache[self.plan_key(prog)]
                return self.cache[key]
            return super().cost(prog, budget, share, inflight)

    def task(coster, prog):
        coster.cost(prog)
        coster.cost(prog, budget=0.5)
    coster = Serving()
    run_tasks(coster, task, ["A", "B"])
    assert coster.solves == 2 and len(coster.cache) == 4
    assert coster.prefetched == {coster.plan_key("A"), coster.plan_key("B")}


def test_a_stage_lp_runs_outside_autopar_s_own_time_limits():
    # whether a stage's LP relaxation finishes (and settles its ILP exactly) must not depend
    # on the load: under a layer's 1 s or the stage default it has STAGE_LP_TIME_S of its own
    # (at most the user's limit); under the user's own limit it counts against it
    from types import SimpleNamespace

    from autopar.pipeline.stage_cost import LAYER_TIME_LIMIT_S, STAGE_LP_TIME_S, STAGE_TIME_LIMIT_S, StageCoster
    lp_time = StageCoster._lp_time
    assert lp_time(SimpleNamespace(time_limit_s=None), LAYER_TIME_LIMIT_S) == STAGE_LP_TIME_S
    assert lp_time(SimpleNamespace(time_limit_s=None), STAGE_TIME_LIMIT_S) == STAGE_LP_TIME_S
    assert lp_time(SimpleNamespace(time_limit_s=60.0), LAYER_TIME_LIMIT_S) == 60.0
    assert lp_time(SimpleNamespace(time_limit_s=60.0), 60.0) is None
    assert lp_time(SimpleNamespace(time_limit_s=0.5), 0.5) is None


def test_workers_hand_back_the_resharding_matrices_and_relaxations_they_made(devices8):
    """Each round forks fresh workers from the parent: the matrices a worker's problem builds
    made and the LP relaxations its solves solved come back with its plans
    (``solvers.handoff``: ``made_since`` → ``absorb``), so a later round's build and solve of
    the same problem, at another budget, makes none again."""
    from autopar.build_edges import ReshardCache
    from autopar.pipeline.pool import prefetch
    from test_stage_reuse import SUB, coster

    c = coster()
    c.workers = 2
    assert not c.reshard_cache.made_since(c.reshard_cache.mark())
    prefetch(c, [((i, i + 1, SUB), {}) for i in range(2)])
    held = c.reshard_cache.made_since((0, 0))
    assert held and all(not m.flags.writeable for m in held.values())
    assert c.relaxations.made_since((0, 0))
    assert all(k in c.cache for k in (c.plan_key(i, i + 1, SUB) for i in range(2)))
    # the same layers planned again within another budget, here: the builds find every matrix
    made = []
    build = ReshardCache._build
    ReshardCache._build = lambda self, *a: made.append(a) or build(self, *a)
    try:
        marks = [h.mark() for h in c.handoffs]
        for i in range(2):
            c.cost(i, i + 1, SUB, budget=c.budget * 0.999)
    finally:
        ReshardCache._build = build
    assert c.solves >= 1 and not made and not any(h.made_since(m) for h, m in zip(c.handoffs, marks))


def test_a_reshard_cache_absorbs_what_another_made():
    """(``solvers.handoff.HandoffCache``, as a reshard cache: what it absorbs is frozen too.)"""
    from autopar.build_edges import ReshardCache
    import numpy as np

    a, b = ReshardCache(max_entries=3), ReshardCache(max_entries=3)
    mark = a.mark()
    for k in range(2):
        a.put(("k", k), np.full((2, 2), float(k)))
    got = a.made_since(mark)
    assert list(got) == [("k", 0), ("k", 1)]
    b.absorb(got)
    assert b.made_since((0, 0)).keys() == got.keys() and b.mark() == (0, 2)
    b.absorb({("k", 0): np.zeros(1), ("k", 2): np.ones(1)})  # a key held stays as it was
    assert b.get(("k", 0)).shape == (2, 2) and b.mark() == (0, 3) and not b.get(("k", 2)).flags.writeable
    b.absorb({("k", 3): np.ones(1)})  # full: cleared first, then held
    assert b.mark() == (1, 1) and b.made_since((0, 3)) == {("k", 3): b.get(("k", 3))}


def test_the_refinements_stage_tasks_go_out_longest_first_by_their_layers_plans():
    """``search._task_work`` (the order ``prefetch_stages`` hands its tasks out): a stage's
    single-layer plans weighted by strategies, ×``HARD_LAYER`` where the LP did not prove them,
    × the solves a stage that likely overflows with its micro-batches in flight takes."""
    from types import SimpleNamespace

    from autopar.pipeline.costs import StageCost, StageOption
    from autopar.pipeline.search import HARD_LAYER, IN_FLIGHT_REPLANS, SUMS_FIT, _task_work

    def layer(status, strategies=100, static=1.0, act=1.0):
        plan = SimpleNamespace(solver=SimpleNamespace(status=status, strategies=strategies))
        return StageCost(plan=plan, latency=1.0, static=static, persist=static, act=act)
    cache = {0: layer("optimal"), 1: layer("feasible"), 2: layer("feasible", static=40.0), 3: layer("optimal")}
    coster = SimpleNamespace(cache=cache, plan_key=lambda i, j, sub, remat, zero: i)
    inputs = SimpleNamespace(schedule="1f1b", num_microbatches=64, budget=100.0)

    def task(a, b, remaining, stages=1):
        return [(a, b, (1, 8), None, remaining - k, StageOption()) for k in range(stages)]
    assert _task_work(coster, inputs, task(0, 1, 1)) == 100.0
    assert _task_work(coster, inputs, task(1, 2, 1)) == 100.0 * HARD_LAYER  # not proven: a longer solve
    assert _task_work(coster, inputs, task(0, 2, 1)) == 100.0 * (1 + HARD_LAYER)
    # layers 1-2: 41 static + 2 per micro-batch in flight (1F1B: as many as the stages left, here
    # 1 or 30): within SUMS_FIT of the budget one solve, beyond it a replan per stage too
    assert 41.0 + 2 * 1 <= SUMS_FIT * 100 < 41.0 + 2 * 30
    assert _task_work(coster, inputs, task(1, 3, 1, stages=1)) == 200.0 * HARD_LAYER
    assert _task_work(coster, inputs, task(1, 3, 30, stages=5)) == 200.0 * HARD_LAYER * (1 + IN_FLIGHT_REPLANS)
    assert _task_work(coster, inputs, task(1, 3, 30, stages=1)) == 200.0 * HARD_LAYER * 2
    assert _task_work(coster, inputs, task(3, 5, 1)) == 0.0  # a layer not planned: no estimate
