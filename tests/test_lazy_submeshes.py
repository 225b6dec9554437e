"""Sub-meshes of several nodes enter the additive stage search as lower bounds and are planned
only once a stage DP solution uses them (``autopar.pipeline.additive.LAZY_SUBMESHES``): the
plan is the unpruned search's, every bound is below the plan it stands for, and fewer stage
ILPs are solved."""
from __future__ import annotations

import math

import numpy as np
import optax
import pytest

from autopar import plan_training
from autopar.pipeline import additive, stage_cost
from autopar.solvers import InfeasibleError, solve
from autopar.solvers.driver import lower_bound
from conftest import make_cluster
from examples import gpt
from test_solvers import hard_problem, random_problem

SKIP = {"timing": True, "stages": {"__all__": {"plan": {"timing"}}},
        "search": {"refined": True, "ilp_solves": True, "cache_hits": True}}


def refined(tp) -> list:
    """The splits refined, without timings; a skipped split's estimate (a lower bound, which
    bounds of unplanned sub-meshes can lower further) left out."""
    return [r.model_dump(exclude={"plan_s"} | ({"estimate_s"} if r.skipped else set())) for r in tp.search.refined]


def test_the_lp_lower_bound_is_below_every_solution():
    compared = 0
    for seed in range(40):
        p = random_problem(seed)
        try:
            opt = solve(p, solver="brute").cost
        except InfeasibleError:  # (the bound may still be finite: it ignores memory)
            continue
        assert lower_bound(p) <= opt * (1 + 1e-9) + 1e-9
        compared += 1
    assert compared >= 20
    p = hard_problem()
    assert lower_bound(p) <= solve(p, solver="highs", time_limit_s=1.0).cost
    p.usage_limit = 0.5 * p.min_peak_usage()
    assert lower_bound(p) == math.inf


def _coster_log(monkeypatch):
    made = []
    init = stage_cost.StageCoster.__init__

    def record(self, *a, **k):
        init(self, *a, **k)
        made.append(self)
    monkeypatch.setattr(stage_cost.StageCoster, "__init__", record)
    return made


@pytest.mark.parametrize("nodes, dpn, batch", [(4, 2, 16), (3, 2, 12)])
def test_lazy_submeshes_give_the_unpruned_plan(devices8, monkeypatch, nodes, dpn, batch):
    params, data = gpt.params_and_batch(batch=batch, hidden=64, layers=4, seq=32)
    kw = dict(optimizer=optax.adam(1e-3), cluster=make_cluster(dpn), nodes=nodes, num_microbatches=4,
              costing="additive", remat="auto", zero="auto", time_limit_s=60.0, workers=1)
    made = _coster_log(monkeypatch)
    lazy = plan_training(gpt.loss_fn, params, data, **kw)
    monkeypatch.setattr(additive, "LAZY_SUBMESHES", False)
    full = plan_training(gpt.loss_fn, params, data, **kw)
    assert lazy.model_dump(exclude=SKIP) == full.model_dump(exclude=SKIP)
    assert refined(lazy) == refined(full)
    assert lazy.search.ilp_solves < full.search.ilp_solves
    # every bound (recomputed without the plan it stands for) is at most that plan's latency
    coster, checked = made[-1], 0
    for key, res in list(coster.cache.items()):
        pkey, sub, mesh, budget, zero, inflight = key
        if mesh is not None or budget != coster.budget or zero or inflight > 1 or not isinstance(pkey, str) \
                or not res.fits:
            continue
        i, j = next(ij for ij, (_, k) in coster.stages.items() if k == pkey)
        del coster.cache[key]
        coster.bounds.pop(key, None)
        assert coster.bound(i, j, sub) <= res.latency * (1 + 1e-9), (i, j, sub)
        coster.cache[key] = res
        checked += 1
    assert checked >= 3 * (nodes + 1)


def test_a_bound_is_the_latency_once_planned(devices8, monkeypatch):
    params, data = gpt.params_and_batch(batch=8, hidden=32, layers=2, seq=16)
    made = _coster_log(monkeypatch)
    plan_training(gpt.loss_fn, params, data, optimizer=optax.sgd(0.1), cluster=make_cluster(2), nodes=2,
                  num_microbatches=2, costing="additive", remat="none", zero="none", workers=1)
    coster = made[-1]
    c = coster.cost(0, 1, (2, 2))
    assert coster.bound(0, 1, (2, 2)) == c.latency
    assert np.isfinite(c.latency)
