"""The last step of ``autopar.plan_training``: chosen stages → devices (``place_submeshes``),
parameter owners, the simulated timeline → a :class:`TrainingPlan`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..plan_types import Timing
from ..planner import PlanError
from ..pytree_json import treedef_to_json
from .costs import FWD_SHARE, ChosenStage, simulate_stages, stage_memory, step_time
from .inputs import TrainingInputs
from .layers import Layering
from .rng_form import dtype_name
from .stages import owners, split_program
from .training_plan import (PredictedTraining, RefinedSplit, ScanSplitRecord, StagePlan, StageSearch,
                            TrainingPlan)


def place_submeshes(shapes, num_nodes: int, devices_per_node: int) -> list[list[int]]:
    """Global device indices per stage: whole nodes for (k, M); an aligned block inside one
    node for (1, m) (buddy placement, larger sub-meshes first, so power-of-two tilings fit)."""
    free = [[True] * devices_per_node for _ in range(num_nodes)]
    out: list[list[int] | None] = [None] * len(shapes)
    for s in sorted(range(len(shapes)), key=lambda s: (-shapes[s][0] * shapes[s][1], s)):
        n, m = shapes[s]
        if m == devices_per_node:
            nodes = [k for k in range(num_nodes) if all(free[k])][:n]
            if len(nodes) < n:
                raise PlanError(f"cannot place sub-mesh {shapes[s]} on {num_nodes} nodes × {devices_per_node}")
            for k in nodes:
                free[k] = [False] * devices_per_node
            out[s] = [k * devices_per_node + d for k in nodes for d in range(devices_per_node)]
            continue
        out[s] = _place_in_node(free, m, devices_per_node)
        if out[s] is None:
            raise PlanError(f"cannot place sub-mesh {shapes[s]} on {num_nodes} nodes × {devices_per_node}")
    return out  # type: ignore[return-value]


def _place_in_node(free, m: int, devices_per_node: int) -> list[int] | None:
    for step in (m, 1):  # aligned first, then any contiguous block
        for k, node in enumerate(free):
            for off in range(0, devices_per_node - m + 1, step):
                if all(node[off:off + m]):
                    node[off:off + m] = [False] * m
                    return [k * devices_per_node + d for d in range(off, off + m)]
    return None


@dataclass(frozen=True)
class SearchRecord:
    """How the stages were found, for the plan's ``search`` field."""
    costing: str                          # "exact" | "additive"
    objective_s: float                    # the stage DP's objective
    candidates: int                       # (layer range, sub-mesh) pairs costed
    refined: tuple[RefinedSplit, ...] = ()
    strategy_name: str = "autopar"
    virtual: int = 1                      # interleaved: stages per device group


def custom_call_counts(program, stages, layer_eqns) -> dict:
    """How many custom-derivative and checkpoint calls the loss has, and how many checkpoints
    the executed blocks cut (a stage's range; with remat, each of its layers: ``remat_forward``)."""
    block = {}
    for (a, b), remat in stages:
        for k, (s, e) in enumerate([(a, b)] if remat == "none" else [r for r in layer_eqns if a <= r[0] < b]):
            block.update((i, (a, k)) for i in range(s, e))
    spans: dict = {}
    for i, e in enumerate(program.eqns):
        if e.custom is not None:
            spans.setdefault(e.custom, set()).add(block.get(i))
    calls = program.customs
    return {"custom_calls": sum(c.rule for c in calls.values()),
            "checkpoints": sum(not c.rule for c in calls.values()),
            "checkpoints_cut": sum(len(spans.get(k, ())) > 1 for k, c in calls.items() if not c.rule)}


def assemble(inputs: TrainingInputs, layering: Layering, chosen: list[ChosenStage], coster, record: SearchRecord,
             timing: Timing) -> TrainingPlan:
    P, spec, B = inputs.num_params, inputs.spec, inputs.num_microbatches
    eqns = layering.eqn_ranges(inputs.program)
    split = split_program(inputs.program, P, [(eqns[c.start][0], eqns[c.end - 1][1]) for c in chosen])
    own = owners(split, P)
    v = record.virtual
    G = len(chosen) // v   # device groups: stage k on group k mod G
    if any(c.submesh != chosen[k % G].submesh for k, c in enumerate(chosen)):
        raise PlanError(f"interleaved stages on {G} device groups need stage k's sub-mesh to be stage k mod {G}'s; "
                        f"got {[c.submesh for c in chosen]}")
    groups = place_submeshes([c.submesh for c in chosen[:G]], inputs.nodes, spec.devices_per_node)
    devices = [groups[k % G] for k in range(len(chosen))]
    stage_plans = []
    for k, (c, st, (inflight, memory)) in enumerate(zip(chosen, split, stage_memory(chosen, inputs.schedule, B, v))):
        if not c.cost.fits:
            raise PlanError(f"stage {k} (layers {c.start}..{c.end - 1}) does not fit sub-mesh {c.submesh}")
        t, send = c.cost.latency, c.cost.send
        stage_plans.append(StagePlan(
            index=k, layers=[c.start, c.end], eqns=list(st.eqns), submesh=list(c.submesh), devices=devices[k],
            plan=c.cost.plan, latency_s=t, fwd_s=(t - send) * FWD_SHARE, bwd_s=(t - send) * (1 - FWD_SHARE),
            send_s=send, params=list(st.params), owned_params=[p for p in range(P) if own[p] == k],
            batch=list(st.batch), param_bytes_per_device=c.cost.param_dev, activation_bytes_per_device=c.cost.act,
            inflight_microbatches=inflight, memory_bytes_per_device=memory, remat=c.cost.remat, zero=c.cost.zero,
            optimizer_bytes_per_device=c.cost.optimizer, gather_s=c.cost.gather_s))
    timeline = simulate_stages(chosen, inputs.schedule, B, v)
    step = step_time(timeline, [c.cost.gather_s for c in chosen])
    predicted = PredictedTraining(step_time_s=step, dp_objective_s=record.objective_s,
                                  bubble_fraction=timeline.bubble_fraction,
                                  peak_memory_bytes=max(s.memory_bytes_per_device for s in stage_plans),
                                  zero_gather_s=step - timeline.makespan)
    search = StageSearch(num_layers=len(eqns), layer_flops=list(layering.flops), layer_eqns=[list(x) for x in eqns],
                         layers_from_markers=layering.from_markers, candidates=record.candidates,
                         ilp_solves=coster.solves, cache_hits=coster.hits, infeasible=coster.infeasible,
                         costing=record.costing, refined=list(record.refined),
                         **custom_call_counts(inputs.program, [(st.eqns, c.cost.remat) for st, c in zip(split, chosen)],
                                              eqns))
    result = TrainingPlan(
        function=getattr(inputs.loss_fn, "__qualname__", inputs.name), fingerprint=inputs.program.fingerprint,
        cluster=spec, nodes=inputs.nodes, num_microbatches=B, schedule=inputs.schedule,
        memory_budget_bytes=inputs.budget, optimizer_state_ratio=inputs.opt_ratio,
        param_tree=treedef_to_json(inputs.p_tree), batch_tree=treedef_to_json(inputs.b_tree),
        param_shapes=[list(x.shape) for x in inputs.p_leaves],
        param_dtypes=[str(np.dtype(x.dtype)) for x in inputs.p_leaves],
        batch_shapes=[list(x.shape) for x in inputs.b_leaves],
        batch_dtypes=[dtype_name(x.dtype) for x in inputs.b_leaves],
        stages=stage_plans, predicted=predicted, search=search, strategy_name=record.strategy_name, timing=timing,
        scan_split=_scan_split_record(inputs), batch_draws=inputs.batch_draws, has_aux=inputs.has_aux,
        aux_grows=list(inputs.aux_grows), aux_bytes=inputs.aux_bytes, rows_check=inputs.rows_check,
        rows_meet=inputs.rows_meet, grad_accum=inputs.grad_accum, aux_sums=list(inputs.aux_sums),
        aux_inexact=list(inputs.aux_inexact), virtual_stages=v)
    result._loss_fn, result._optimizer = inputs.loss_fn, inputs.optimizer
    result._param_treedef = inputs.user_p_tree if inputs.scan_split is not None else inputs.p_tree
    result._batch_treedef = inputs.b_tree
    return result


def _scan_split_record(inputs: TrainingInputs) -> ScanSplitRecord | None:
    split = inputs.scan_split
    if split is None:
        return None
    return ScanSplitRecord(stacked=list(split.stacked), lengths=list(split.lengths),
                           param_tree=treedef_to_json(inputs.user_p_tree),
                           param_shapes=[list(x.shape) for x in inputs.user_p_leaves],
                           param_dtypes=[str(np.dtype(x.dtype)) for x in inputs.user_p_leaves])
