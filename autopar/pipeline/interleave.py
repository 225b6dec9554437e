"""Interleaved 1F1B in ``autopar.plan_training`` (``virtual_stages``): v model chunks per
device group, Megatron's virtual pipeline (``autopar.pipeline.schedule.interleaved_orders``).

With G device groups of one sub-mesh each and B micro-batches, v chunks per group shrink the
1F1B bubble from (G − 1) to (G − 1)/v stage-times for more activations held (group 0: G +
(G − 1)/v stages' worth against G) and v times the boundary sends. The candidates are
Megatron's: G equal groups (``uniform_submeshes``) holding G·v equal chunks of layers, chunk
j on group j mod G, the micro-batch count a multiple of G, and two unequal splits of the same
groups: the equal chunks moved toward equal group times (``balanced``) and the chunks whose
passes are even (``pass_chunks``: where one layer is heavy). Each is estimated from the search's
cost arrays — every group on the fastest stage option (remat, ZeRO-1) its memory allows, the
step simulated on the interleaved order —, the best ``PLANNED`` by estimate are moved a layer
boundary at a time while the simulated step drops (``polished``), and the best are planned
exactly (``refine.planned``) when within ``REFINE_MARGIN`` of the best step so far; the fastest
plan that fits wins, interleaved or not (``virtual_stages="auto"``), or among the interleaved
ones (an int v > 1). A device group's memory is its chunks' static parts (parameters of every
chunk, the largest transient part) and the most activations they hold at once on the
simulated order (``costs.stage_memory``).
"""
from __future__ import annotations

import math

import numpy as np

from autopar.solvers.chunks import pass_chunks
from autopar.solvers.stage_dp import StageSolution, uniform_stages, uniform_submeshes

from ..planner import PlanError
from .costs import FWD_SHARE, ChosenStage, chosen_step, stage_memory
from .inputs import TrainingInputs
from .refine import REFINE_MARGIN, planned, runs
from .schedule import interleaving_error, peak_held, simulate, stage_orders
from .search import plan_stages
from .training_plan import RefinedSplit

# chunks per device group "auto" tries besides none
AUTO = (2, 4)
# interleaved splits planned exactly, the best by estimate
PLANNED = 2
# rounds of single-boundary moves those get on the simulated step (``polished``), for splits
# of at most POLISH_TASKS chunk micro-batches (S·B: 16 × 48 takes 6 ms a simulation here)
POLISH_ROUNDS = 8
POLISH_TASKS = 2048


def virtual_options(virtual_stages) -> tuple[int, ...]:
    """The chunk counts per device group ``virtual_stages`` asks for: 1, an int v (only v),
    or "auto" (1 and ``AUTO``)."""
    if virtual_stages == "auto":
        return (1,) + AUTO
    if isinstance(virtual_stages, bool) or not isinstance(virtual_stages, (int, np.integer)) or virtual_stages < 1:
        raise ValueError(f"virtual_stages must be a positive int (model chunks per device group, interleaved 1F1B) "
                         f"or 'auto', got {virtual_stages!r}")
    return (int(virtual_stages),)


def interleaved_splits(inputs: TrainingInputs, num_layers: int, options: tuple[int, ...],
                       num_stages: int | None) -> list[tuple[str, list, int]]:
    """(source, stages (start, end, sub-mesh), v) of every equal interleaved split: G ≥ 2
    groups (``num_stages``: exactly that many), G·v ≤ layers chunks, B a multiple of G."""
    out = []
    for v in options:
        if v == 1:
            continue
        for G, sub in uniform_submeshes(num_layers, inputs.nodes, inputs.spec.devices_per_node):
            if G < 2 or G * v > num_layers or (num_stages is not None and G != num_stages):
                continue
            if interleaving_error(G, v, inputs.num_microbatches) is None:
                out.append((f"interleaved ×{G} ×{v}", [(a, b, sub) for a, b in uniform_stages(num_layers, G * v)], v))
    return out


def _fastest(inputs: TrainingInputs, arrays, sub) -> np.ndarray:
    """The arrays' latency of every layer range on sub-mesh ``sub``, at its fastest option."""
    lat = arrays.latency if arrays.latency.ndim == 3 else arrays.latency.min(axis=0)
    return lat[:, :, list(inputs.shapes).index(tuple(sub))]


def _moves(bounds: list[int]):
    """The chunk bounds one layer boundary away from ``bounds`` (every chunk kept non-empty)."""
    for c in range(1, len(bounds) - 1):
        for d in (-1, 1):
            if bounds[c - 1] < bounds[c] + d < bounds[c + 1]:
                yield bounds[:c] + [bounds[c] + d] + bounds[c + 1:]


def _chunks(bounds: list[int], sub) -> list:
    return [(a, b, sub) for a, b in zip(bounds, bounds[1:])]


def balanced(inputs: TrainingInputs, arrays, stages, v: int) -> list | None:
    """The chunks of an equal interleaved split moved toward equal device-group times (None:
    no better), by single-layer boundary moves on the cost arrays (each chunk at its fastest
    option): a move is kept when it lowers B·max_g T_g + Σ t·(G − 1)/(G·v) — the steady
    state of the busiest group and the fill on uniform chunks (``schedule``'s formula) —, or
    keeps it and lowers Σ_g T_g² (toward balance, where one layer cannot move the maximum
    alone). Megatron's equal chunks put a heavy last layer (an LM head) or alternating layer
    kinds (dense / MoE) on some groups more than others; autopar's plain stage DP already
    balances stages this way."""
    lat = _fastest(inputs, arrays, stages[0][2])
    S, B = len(stages), inputs.num_microbatches
    G = S // v
    bounds = [a for a, _, _ in stages] + [stages[-1][1]]

    def score(bs):
        t = [float(lat[bs[c], bs[c + 1]]) for c in range(S)]
        if not all(map(math.isfinite, t)):
            return (math.inf, math.inf)
        groups = [sum(t[g::G]) for g in range(G)]
        return (B * max(groups) + sum(t) * (G - 1) / (G * v), sum(x * x for x in groups))

    best, start = score(bounds), bounds
    for _ in range(4 * S * S):   # (each kept move lowers the score: no cycles; a cap all the same)
        scored = min(((score(m), m) for m in _moves(bounds)), default=None)
        if scored is None or not scored[0] < best:
            break
        best, bounds = scored
    return None if bounds == start else _chunks(bounds, stages[0][2])


def even_passes(inputs: TrainingInputs, arrays, stages, v: int) -> list | None:
    """The G·v chunks of an equal interleaved split's sub-mesh (``pass_chunks`` on the
    arrays, each range at its fastest option); None where none is finite."""
    bounds = pass_chunks(_fastest(inputs, arrays, stages[0][2]), len(stages) // v, v)
    return None if bounds is None else _chunks(bounds, stages[0][2])


def polished(inputs: TrainingInputs, arrays, stages, v: int, step_s: float) -> list | None:
    """``stages`` moved a layer boundary at a time while the simulated step (``estimate``)
    drops, the best move each round, at most ``POLISH_ROUNDS`` rounds (None: no move helps,
    or a split of more than ``POLISH_TASKS`` chunk micro-batches, whose simulations would
    take too long). Neither proxy of the candidates — equal group times (``balanced``), even
    passes — is the interleaved step, which also depends on how the chunks' times line up
    along the order (measured on a stem-heavy 24-layer profile, 4 groups × 2: 160.2 → 148.3)."""
    bounds, sub, S = [a for a, _, _ in stages] + [stages[-1][1]], stages[0][2], len(stages)
    if S * inputs.num_microbatches > POLISH_TASKS:
        return None
    best, moved = step_s, None
    for _ in range(POLISH_ROUNDS):
        round_best = None
        for b in _moves(bounds):
            est = estimate(inputs, arrays, _chunks(b, sub), v)
            if est is not None and est.objective_s < best * (1 - 1e-9) and (
                    round_best is None or est.objective_s < round_best[0]):
                round_best = (est.objective_s, b)
        if round_best is None:
            break
        best, bounds = round_best
        moved = bounds
    return None if moved is None else _chunks(moved, sub)


def estimate(inputs: TrainingInputs, arrays, stages, v: int) -> StageSolution | None:
    """The step of an interleaved split from the cost arrays (None: a group fits in no
    option): each device group on the stage option fastest over its chunks among those whose
    static parts and activations held fit (``peak_held`` on the interleaved order); the step
    simulated with the arrays' latencies (sends inside them)."""
    lat, mem, act = (x if x.ndim == 4 else x[None] for x in (arrays.latency, arrays.memory, arrays.activation))
    s = list(inputs.shapes).index(tuple(stages[0][2]))
    S, B = len(stages), inputs.num_microbatches
    orders = stage_orders(S, B, inputs.schedule, v)
    G = len(orders)
    variant = [0] * S
    for g in range(G):
        mine = list(range(g, S, G))
        best = None
        for r in range(lat.shape[0]):
            t = sum(lat[r, stages[k][0], stages[k][1], s] for k in mine)
            if not math.isfinite(t):
                continue
            held = peak_held([orders[g]], {k: act[r, stages[k][0], stages[k][1], s] for k in mine})[0]
            if sum(mem[r, stages[k][0], stages[k][1], s] for k in mine) + held > inputs.budget:
                continue
            if best is None or t < best[0]:
                best = (t, r)
        if best is None:
            return None
        for k in mine:
            variant[k] = best[1]
    t = [float(lat[variant[k], a, b, s]) for k, (a, b, _) in enumerate(stages)]
    tl = simulate(orders, [x * FWD_SHARE for x in t], [x * (1 - FWD_SHARE) for x in t])
    return StageSolution(stages=[(a, b, s, sub, x) for (a, b, sub), x in zip(stages, t)], total_latency_s=sum(t),
                         t_max=max(t), objective_s=tl.makespan, num_stages=S, status="interleaved",
                         variants=tuple(variant))


def interleave(coster, inputs: TrainingInputs, num_layers: int, costs, progress, options: tuple[int, ...],
               num_stages: int | None, chosen: list[ChosenStage] | None, refined: list[RefinedSplit],
               estimate_s: float) -> tuple[list[ChosenStage], list[RefinedSplit], int]:
    """The interleaved splits worth it planned exactly beside the plain search's ``chosen``
    (its splits ``refined``, the DP's ``estimate_s``; None: only interleaved plans count) →
    the fastest that fits, every split tried (the chosen marked) and its chunks per group."""
    if chosen is None:
        refined, exact = [], []
    else:
        if not refined:   # (exact costing: the plain split as planned)
            refined = [RefinedSplit(source="stage DP", estimate_s=estimate_s, step_s=chosen_step(chosen, inputs.schedule, inputs.num_microbatches),
                                    stages=runs(f"{c.end - c.start}L@{c.submesh[0]}x{c.submesh[1]}" for c in chosen),
                                    fits=True, chosen=True)]
        exact = [(chosen, 1) if r.chosen else None for r in refined]
        refined = [r.model_copy(update={"chosen": False}) for r in refined]
    ests = []
    splits = []
    for source, stages, v in interleaved_splits(inputs, num_layers, options, num_stages):
        splits.append((source, stages, v))
        even = balanced(inputs, costs.arrays, stages, v)
        if even is not None:
            splits.append((source + " balanced", even, v))
        passes = even_passes(inputs, costs.arrays, stages, v)
        if passes is not None and passes not in (stages, even):
            splits.append((source + " even passes", passes, v))

    def scored(source, stages, v):
        est = estimate(inputs, costs.arrays, stages, v)
        lower = costs.placeholders(est) if est is not None else None
        if lower:   # lower bounds of options not planned yet: planned, then estimated for real
            costs.resolve(lower)
            est = estimate(inputs, costs.arrays, stages, v)
        if est is not None:
            ests.append((est.objective_s, len(ests), est, source, stages, v))
    for source, stages, v in splits:
        scored(source, stages, v)
    ests.sort(key=lambda e: e[:2])
    top, made = ests[:PLANNED], len(ests)
    for _, _, est, source, stages, v in top:   # the best moved on the simulated step
        better = polished(inputs, costs.arrays, stages, v, est.objective_s)
        if better is not None and all(better != e[4] for e in ests):
            scored(source + " polished", better, v)
    # planned exactly: the best and their polished splits, besides, not instead — an estimate
    # is not the exact step (GPT-6.7B on 16 H100s, ×4: polished 8.026 s estimated and 7.921 s
    # planned, the equal chunks 8.042 s and 7.904 s)
    todo = sorted(top + ests[made:], key=lambda e: e[:2])
    progress.phase("plan interleaved splits exactly", total=len(todo))
    for _, _, est, source, stages, v in todo:
        best = min((r.step_s for r in refined if r.fits), default=math.inf)
        if est.objective_s > best * (1 + REFINE_MARGIN):
            refined.append(RefinedSplit(source=source, estimate_s=est.objective_s, skipped=True, virtual=v,
                                        stages=runs(f"{b - a}L@{x}x{y}" for a, b, (x, y) in stages)))
            exact.append(None)
            progress.advance(detail=f"{source}: not planned (estimate above the best step)")
            continue
        split, ch = planned(coster, inputs, costs, source, stages, est, v)
        refined.append(split)
        exact.append((ch, v))
        progress.advance(detail=source)
    fitting = [k for k, r in enumerate(refined) if r.fits and exact[k] is not None]
    if not fitting:
        if chosen is not None:
            return chosen, refined, 1
        raise PlanError(_none_fits(inputs, num_layers, options, num_stages, ests))
    k = min(fitting, key=lambda k: (refined[k].step_s, k))
    refined[k] = refined[k].model_copy(update={"chosen": True})
    return exact[k][0], refined, exact[k][1]


def _none_fits(inputs: TrainingInputs, num_layers: int, options, num_stages, ests) -> str:
    v = options[-1]
    if not interleaved_splits(inputs, num_layers, options, num_stages):
        groups = [G for G, _ in uniform_submeshes(num_layers, inputs.nodes, inputs.spec.devices_per_node) if G >= 2]
        return (f"no interleaved split with virtual_stages={v}: it needs G ≥ 2 equal device groups (here G in "
                f"{groups or 'none'}) with G·{v} ≤ {num_layers} layers and num_microbatches "
                f"({inputs.num_microbatches}) a multiple of G" + (f", G = num_stages={num_stages}" if num_stages else "")
                + "; use fewer virtual stages, more layers (num_layers=) or another micro-batch count")
    what = "fits by estimate" if not ests else "fits when planned"
    return (f"no interleaved split with virtual_stages={v} {what} memory_budget_bytes={inputs.budget:.0f}; "
            "interleaving holds more activations than 1F1B: use virtual_stages=1 or 'auto', or more memory")


def forced_interleaved(coster, inputs: TrainingInputs, forced, v: int) -> list[ChosenStage]:
    """The given stages (``plan_training(stages=…)``, chunk k on group k mod G) planned whole,
    every chunk on the first stage option (``inputs.options``: remat, ZeRO-1) with which all
    device groups fit."""
    S = len(forced)
    if S % v or S // v < 1:
        raise ValueError(f"with virtual_stages={v} the {S} given stages must be {v} chunks per device group: "
                         f"a multiple of {v}")
    G = S // v
    bad = [k for k, f in enumerate(forced) if f.submesh != forced[k % G].submesh]
    if bad:
        raise ValueError(f"with virtual_stages={v}, stage k runs on device group k mod {G}: stages {bad} need the "
                         f"sub-mesh of stage k mod {G}, got {[tuple(f.submesh) for f in forced]}")
    error = interleaving_error(G, v, inputs.num_microbatches)
    if error:
        raise ValueError(error + "; choose a multiple, or virtual_stages=1")
    mesh_of = {(f.start, f.end): f.mesh for f in forced}
    stages = [(f.start, f.end, tuple(f.submesh)) for f in forced]
    tries = []
    for option in inputs.options:
        chosen = plan_stages(coster, inputs, stages, lambda a, b, sub: mesh_of[a, b], lambda a, b, sub: option)
        if all(c.cost.fits for c in chosen):
            peak = max(m for _, m in stage_memory(chosen, inputs.schedule, inputs.num_microbatches, v))
            if peak <= inputs.budget * (1 + 1e-9):
                return chosen
            tries.append(peak)
    raise PlanError(f"the given interleaved stages do not fit memory_budget_bytes={inputs.budget:.0f}"
                    + (f" (least peak {min(tries):.0f} bytes per device)" if tries else " (a stage has no plan)"),
                    min_bytes_per_device=min(tries) if tries else None)
