"""Stage plans that answer other stage requests without a new ILP (``StageCoster.served``).

A request is (program key, sub-mesh, logical mesh or None for every mesh, budget, ZeRO-1,
micro-batches in flight q); its ILP minimises the same objective c(x) over the layouts x
whose peak — with the residuals of q − 1 more micro-batches held (``build.held_usages``,
which leave the objective alone) — fits the budget. Three rules, each exact or within a
stated bound:

* **Smaller budget, more in flight** (same program, sub-mesh, ZeRO-1): a plan made within a
  budget at least as large, for at most as many micro-batches in flight (one of them
  tighter), whose peak with the request's q fits its budget is its plan. Both only remove
  layouts from the feasible set; the plan was optimal (within the MIP gap, against the lower
  bound of every mesh) over the larger set and is still in the smaller one, with the same
  certificate. (Its peak at q: its own, less the copies it held, plus q − 1 micro-batches'
  residuals in their kept layouts.)
* **Any budget, memory-free** (``StageCost.memory_free``: no mesh's solve depended on the
  budget — solved by the LP relaxation without memory rows, or no usage left after presolve
  that the budget could bind; ``autopar.planner.PlanHooks.outcomes``): the plan is the optimum
  of the problem without a memory limit, hence of every budget it fits, larger ones too.
* **ZeRO-1 from the plain plan** (``zero_of``): the ZeRO-1 ILP differs from the plain one only
  in what a parameter byte costs in memory (2 instead of 2 + r; r = optimizer bytes per
  parameter byte) and in its budget (less r·P/n, ``zero.reserved_bytes``). Parameters are
  inputs, live through the whole step, so a layout's ZeRO-1 peak is its plain peak − r·p(x),
  p(x) its parameter bytes per device (≤ P). A memory-free plain plan x is the optimum of the
  latency over all layouts; its ZeRO-1 stage, when that peak fits, has the same layout: it is
  the ZeRO-1 optimum up to the ILP's memory tie-break (τ = ``TIEBREAK_US_PER_BYTE`` per byte
  of usage in the objective, which ZeRO-1 charges less per parameter byte): its objective is
  within τ·r·P·(1 − 1/n) + the plain plan's own gap of the ZeRO-1 optimum. It is used only
  where that is within the MIP gap the ZeRO-1 ILP itself stops at (``planner.MIP_GAP``): the
  ILP could have returned it.

Every rule takes only plans made for at most the request's micro-batches in flight, so the
worker pool can tell which earlier request might serve a later one (``serves``).

A plan made for every mesh serves a request for the mesh it chose (it was the best there).
Among several plans that serve a request the one planned within the least budget, then for
the most micro-batches in flight, then the fastest, is taken (deterministic).
"""
from __future__ import annotations

import dataclasses
import math

from ..build_nodes import TIEBREAK_US_PER_BYTE
from ..planner import MIP_GAP


def serves(made, key) -> bool:
    """Whether the plan of cache key ``made`` might serve ``key`` (``served``, if it fits): the
    worker pool leaves such a ``key`` to be planned after ``made``, as one worker would."""
    return (made[0], made[1]) == (key[0], key[1]) and made[2] in (key[2], None) and made[4] in (key[4], False) \
        and made[5] <= key[5]


def _mesh_ok(base_mesh, mesh, res) -> bool:
    return base_mesh is not None or mesh is None or tuple(res.plan.mesh_shape) == mesh


def served(coster, i: int, j: int, key):
    """The stage cost an earlier plan gives ``key`` (a ``StageCoster`` cache key of layers
    i..j−1) by the rules of the module docstring, or None."""
    pkey, sub, mesh, budget, zero, q = key
    limit = coster.ilp_limit(i, j, sub, budget, zero)
    found = []
    for m in [mesh, None] if mesh is not None else [None]:
        for b1, q1, res in coster.planned.get((pkey, sub, m, zero), ()):
            looser = b1 >= budget and (b1, q1) != (budget, q)
            if q1 <= q and (looser or res.memory_free) and peak_at(res, q) <= limit and _mesh_ok(m, mesh, res):
                found.append((0, b1, -q1, res.latency, len(found), res))
        for b1, q1, res in coster.planned.get((pkey, sub, m, False), ()) if zero else ():
            if res.memory_free and res.held == 0 and _mesh_ok(m, mesh, res):
                z = zero_of(coster, i, j, sub, res, limit, q)
                if z is not None:
                    found.append((1, b1, -q1, z.latency, len(found), z))
    return min(found)[-1] if found else None


def peak_at(res, q: int) -> float:
    """The ILP peak of a planned stage cost with q micro-batches' residuals in flight."""
    return res.plan.predicted.peak_memory_bytes - res.held + (q - 1) * res.act


def zero_of(coster, i: int, j: int, submesh, plain, limit: float, inflight: int = 1):
    """The ZeRO-1 stage cost of a memory-free plain plan (module docstring), or None when its
    ZeRO-1 peak (with ``inflight`` micro-batches' residuals) exceeds the ILP's ``limit`` or
    the tie-break bound is not small enough."""
    sp = plain.plan
    st = coster.stage(i, j)[0]
    total = sum(coster.program.values[coster.program.invars[q]].nbytes for q in st.params)
    n = math.prod(sp.mesh_shape)
    peak = sp.predicted.peak_memory_bytes - coster.opt_ratio * plain.param_dev
    slack = TIEBREAK_US_PER_BYTE * coster.opt_ratio * total * (1 - 1 / n) / (sp.solver.objective_s * 1e6)
    if peak + (inflight - 1) * plain.act > limit or (sp.solver.gap or 0.0) + slack > MIP_GAP:
        return None
    plan = sp.model_copy(update={"memory_budget_bytes": limit,
                                 "predicted": sp.predicted.model_copy(update={"peak_memory_bytes": peak})})
    res = coster.stage_cost(i, j, submesh, plan, plain.remat, True, act=plain.act)  # (the same layouts)
    return dataclasses.replace(res, memory_free=False)


__all__ = ["serves", "served", "zero_of"]
