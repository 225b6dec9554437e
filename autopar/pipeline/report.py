"""``format_training_report(plan) -> str``: stages table + schedule summary of a TrainingPlan."""
from __future__ import annotations

from ..emit import to_pspec
from ..report import _paths, _si, _time
from .loss_form import AUX_SHARE


def format_training_report(plan) -> str:
    p, s = plan.predicted, plan.search
    total = plan.nodes * plan.cluster.devices_per_node
    who = "autopar" if plan.strategy_name == "autopar" else f"baseline {plan.strategy_name}"
    lines = [f"{who} training plan: {plan.function} on {plan.cluster.name} × {plan.nodes} node(s) = {total} devices",
             f"{plan.num_stages} stage(s), {plan.num_microbatches} micro-batch(es), schedule {plan.schedule}"
             + (f" interleaved ×{plan.virtual_stages} (stage k on device group k mod {plan.num_groups}, "
                f"{plan.num_groups} groups)" if plan.virtual_stages > 1 else "") + "; "
             f"layers: {s.num_layers} ({'stage_boundary markers' if s.layers_from_markers else 'clustered'})",
             f"predicted step time: {_time(p.step_time_s)} (schedule simulation; "
             + (f"DP objective Σt + (B−1)·max t = {_time(p.dp_objective_s)}" if plan.virtual_stages == 1 else
                f"plain 1F1B stage DP's objective {_time(p.dp_objective_s)}") + f"), bubble {p.bubble_fraction:.1%}, "
             f"peak memory {_si(p.peak_memory_bytes, 'B')} per device (budget {_si(plan.memory_budget_bytes, 'B')})"]
    if plan.scan_split is not None:
        sc = plan.scan_split
        user = _paths(sc.param_tree, len(sc.param_shapes))
        lines.append(f"scanned layer stack split per iteration ({', '.join(map(str, sorted(set(sc.lengths))))} "
                     f"iterations, one layer each): stacked params {', '.join(user[i] for i in sc.stacked)} → one "
                     "slice per iteration, each on the stage that runs it (the step takes and returns them stacked)")
    if plan.has_aux:
        lines.append(f"aux outputs (has_aux): {len(plan.aux_grows)} leaves, {sum(plan.aux_grows)} per-example "
                     f"(concatenated), {sum(plan.aux_sums)} float sums over the batch (summed), "
                     f"{_si(plan.aux_bytes, 'B')} held over a step (at most {AUX_SHARE:.0%} of a "
                     "device, not in the memory above)")
        if plan.aux_inexact:
            lines.append(f"aux leaves {', '.join(plan.aux_inexact)}: nonlinear statistics over the batch (max, std, "
                         "a ratio of sums), averaged over the micro-batches: not jax.jit's value over the whole batch")
    if plan.batch_draws:
        lines.append(f"random draws over the batch (dropout masks …): {plan.batch_draws}, each micro-batch drawing its "
                     "rows of the whole batch's draw, as jax.jit of the loss over the batch does")
    if plan.grad_accum == "float32":
        lines.append("gradients accumulated over the micro-batches in float32 (grad_accum='float32'; cast to the "
                     "parameters' dtype once, before the update; the memory above counts the larger accumulators)")
    if plan.rows_check:
        lines.append(f"batch rows across micro-batches: {plan.rows_check}" + (
            "; each micro-batch computes them over its own rows (coupled_rows='per_microbatch'), not jax.jit's "
            "step over the whole batch" if plan.rows_meet else ""))
    lines.append("")
    head = (f"{'stage':>5}  {'layers':>7}  {'sub-mesh':>8}  {'devices':>9}  {'mesh':>6}  {'t/micro-batch':>13}  "
            f"{'fwd':>9}  {'bwd':>9}  {'send':>9}  {'params/dev':>10}  {'act/dev':>10}  {'in flight':>9}  {'memory/dev':>10}  "
            f"{'remat':>5}  {'zero':>4}")
    lines += [head, "-" * len(head)]
    for st in plan.stages:
        lines.append(
            f"{st.index:>5}  {f'{st.layers[0]}-{st.layers[1] - 1}':>7}  {'×'.join(map(str, st.submesh)):>8}  "
            f"{f'{st.devices[0]}-{st.devices[-1]}':>9}  {'×'.join(map(str, st.plan.mesh_shape)):>6}  "
            f"{_time(st.latency_s):>13}  {_time(st.fwd_s):>9}  {_time(st.bwd_s):>9}  {_time(st.send_s):>9}  "
            f"{_si(st.param_bytes_per_device, 'B'):>10}  {_si(st.activation_bytes_per_device, 'B'):>10}  "
            f"{st.inflight_microbatches:>9}  {_si(st.memory_bytes_per_device, 'B'):>10}  {st.remat:>5}  "
            f"{'1' if st.zero else '-':>4}")
    if any(st.remat != "none" for st in plan.stages):
        lines.append("remat: each layer of a stage under jax.checkpoint — dots: weight matmul outputs saved, the "
                     "rest recomputed in the backward; full: only each layer's input saved (act/dev: what is kept)")
    zero = [st for st in plan.stages if st.zero]
    if zero:
        lines.append("zero 1: optimizer state and update split over the axes the stage's parameters are replicated on "
                     "(ZeRO-1); the updated parameters are all-gathered once per step: " + ", ".join(
                         f"stage {st.index} {_time(st.gather_s)}, optimizer state "
                         f"{_si(st.optimizer_bytes_per_device or 0.0, 'B')}/dev" for st in zero)
                     + f"; the step ends {_time(p.zero_gather_s)} after the micro-batch schedule")
    lines.append("")
    paths = _paths(plan.param_tree, len(plan.param_shapes))
    w = max((len(x) for x in paths), default=0)
    lines.append("parameters (owner stage: sharding on its sub-mesh):")
    for st in plan.stages:
        specs = dict(zip(st.params, st.plan.input_specs_flat[:len(st.params)]))
        for i in st.owned_params:
            spec = to_pspec(specs[i]) if i in specs else "replicated (unused)"
            lines.append(f"  {paths[i]:<{w}}  {str(tuple(plan.param_shapes[i])):<18} stage {st.index}: {spec}")
    shared = [(i, [st.index for st in plan.stages if i in st.params]) for i in range(len(plan.param_shapes))]
    shared = [(i, ks) for i, ks in shared if len(ks) > 1]
    if shared:
        lines.append("shared parameters (copied forward, gradients sent back to the owner): " +
                     ", ".join(f"{paths[i]} → stages {ks}" for i, ks in shared))
    lines.append("")
    if s.custom_calls or s.checkpoints:
        lines.append(f"your calls bound whole in their stage's forward: {s.custom_calls} jax.custom_vjp/custom_jvp "
                     f"(their derivative rules hold), {s.checkpoints} jax.checkpoint (their recomputation holds)"
                     + (f"; {s.checkpoints_cut} checkpoint(s) cut by a stage or layer boundary run without "
                        "recomputation (mark layer boundaries outside them)" if s.checkpoints_cut else ""))
    lines.append(f"stage search: {s.costing} costing, {s.candidates} (layer range, sub-mesh) candidates, "
                 f"{s.ilp_solves} intra-op plans solved, {s.cache_hits} cache hits (identical layers), "
                 f"{s.infeasible} infeasible")
    if s.refined:
        lines.append("exactly planned splits (additive estimates → exact; the fastest that fits is the plan):")
        for r in s.refined:
            mark = "→" if r.chosen else " "
            if r.skipped:
                lines.append(f"  {mark} {r.source:<31} {r.stages:<40} estimate {r.estimate_s:.4g} s, "
                             "not planned (estimate above the best exact step)")
                continue
            fit = "" if r.fits else "  (does not fit)" if r.step_s is not None else "  (a stage does not fit)"
            step = f"{r.step_s:.4g} s" if r.step_s is not None else "–"
            lines.append(f"  {mark} {r.source:<31} {r.stages:<40} estimate {r.estimate_s:.4g} s, "
                         f"exact {step}{fit} [{r.plan_s:.1f} s]")
        if any(r.virtual > 1 for r in s.refined):
            lines.append("    (interleaved ×G ×v: G device groups, each holding v of the G·v chunks, chunk j on "
                         "group j mod G; memory/dev is the group's)")
    if plan.microbatch_search:
        lines.append("micro-batch counts tried (the fastest predicted step is the plan):")
        for m in plan.microbatch_search:
            out = f"step {m.step_s:.4g} s" if m.step_s is not None else f"no plan: {m.error}"
            lines.append(f"  {'→' if m.chosen else ' '} {m.num_microbatches:>5} micro-batches: {out} [{m.plan_s:.1f} s]")
    t = plan.timing
    lines.append(f"planning time: {t.total_s:.2f} s (trace + layers {t.trace_s:.2f} s, stage costing + DP {t.solve_s:.2f} s)")
    fb = sorted({f"{f.primitive} ×{f.count}" for st in plan.stages for f in st.plan.fallbacks})
    lines.append("fallback ops (replicated): " + (", ".join(fb) if fb else "none"))
    return "\n".join(lines)
