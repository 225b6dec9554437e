"""``autopar plan|run … --train``: a training step's pipeline plan on the command line — the
optimizer and stages from the flags, the plan with its report (and ``--bound``), and the run
checked against the single-device step (one process, or one per host under
``jax.distributed``)."""
from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def progress_for_cli(ns):
    """A live display on stderr while planning (``--quiet``: none)."""
    from .progress import Progress, RichProgress
    progress = Progress() if ns.quiet else RichProgress()
    try:
        yield progress
    finally:
        progress.close()


def optimizer_from(ns, module):
    """--optimizer NAME:LR (sgd, momentum, adam, adamw), else the module's OPTIMIZER, else
    adam:1e-3; after optax.clip_by_global_norm(--clip-norm) if given."""
    import optax
    opt = _optimizer(ns, module)
    if ns.clip_norm is None:
        return opt
    if not ns.clip_norm > 0:
        raise SystemExit(f"autopar: --clip-norm must be a positive number, got {ns.clip_norm}")
    return optax.chain(optax.clip_by_global_norm(ns.clip_norm), opt)


def _optimizer(ns, module):
    import optax
    if ns.optimizer:
        name, _, lr = ns.optimizer.partition(":")
        makers = {"sgd": optax.sgd, "adam": optax.adam, "adamw": optax.adamw,
                  "momentum": lambda lr: optax.sgd(lr, momentum=0.9)}
        if name not in makers:
            raise SystemExit(f"autopar: --optimizer must be one of {sorted(makers)}[:LR], got {ns.optimizer!r}")
        try:
            return makers[name](float(lr or 1e-3))
        except ValueError:
            raise SystemExit(f"autopar: --optimizer learning rate must be a number, got {lr!r}") from None
    return getattr(module, "OPTIMIZER", None) or optax.adam(1e-3)


def parse_stages(text):
    """"0-2:1x4,2-4:1x4" → [(0, 2, (1, 4)), (2, 4, (1, 4))] (layer ranges, sub-meshes)."""
    if not text:
        return None
    out = []
    try:
        for part in text.split(","):
            rng, sub = part.split(":")
            a, b = rng.split("-")
            n, m = sub.lower().split("x")
            out.append((int(a), int(b), (int(n), int(m))))
    except ValueError:
        raise SystemExit(f"autopar: --stages must look like 0-2:1x4,2-4:1x4 (layer range:sub-mesh), got {text!r}") from None
    return out


def _plan(ns, module, fn, args):
    import autopar
    if len(args) != 2:
        raise SystemExit(f"autopar: --train needs a loss function FOO(params, batch); FOO_args returned {len(args)} "
                         "arguments")
    with progress_for_cli(ns) as progress:
        return autopar.plan_training(
            fn, *args, optimizer=optimizer_from(ns, module), cluster=ns.cluster, nodes=ns.nodes,
            num_microbatches=ns.microbatches, schedule=ns.schedule, num_stages=ns.num_stages,
            stages=parse_stages(ns.stages), num_layers=ns.layers, memory_budget_bytes=ns.budget,
            solver=ns.solver, time_limit_s=ns.time_limit, remat=ns.remat, zero=ns.zero, has_aux=ns.has_aux,
            coupled_rows=ns.coupled_rows, grad_accum=ns.grad_accum, virtual_stages=ns.virtual_stages,
            verbose=progress)


def _bound(ns, fn, args, plan) -> None:
    """``--bound``: the step no plan beats (``autopar.step_lower_bound``) and this plan over it."""
    if not ns.bound:
        return
    import autopar
    lb = autopar.step_lower_bound(fn, *args, cluster=ns.cluster, nodes=ns.nodes, num_microbatches=ns.microbatches,
                                  has_aux=ns.has_aux)
    print(f"\ncompute bound: {lb:.4g} s per step (one micro-batch's forward + backward on one device × "
          f"micro-batches / devices; no plan is faster); this plan's {plan.predicted.step_time_s:.4g} s is "
          f"{plan.predicted.step_time_s / lb:.2f}× it")


def plan_training_from(ns, module, fn, args):
    """``--train``: plan, print the report (and ``--bound``), write ``--json`` / ``--timeline``."""
    plan = _plan(ns, module, fn, args)
    print(plan.report())
    _bound(ns, fn, args, plan)
    _finish_training(ns, plan)
    return plan


def _finish_training(ns, plan) -> None:
    if ns.json:
        Path(ns.json).write_text(plan.to_json())
        print(f"\nplan written to {ns.json}")
    if ns.timeline:
        print(f"timeline written to {plan.timeline(ns.timeline)}")


def run_training(ns, module, fn, args) -> int:
    import jax
    import numpy as np
    import optax

    import autopar
    opt = optimizer_from(ns, module)
    multi = jax.process_count() > 1  # a jax.distributed job: process 0 plans, every process runs its stages

    def make():
        return plan_training_from(ns, module, fn, args)
    if ns.plan:
        plan = autopar.TrainingPlan.from_json(Path(ns.plan).read_text())
    elif multi:
        from .pipeline.multistep import share_plan
        plan = share_plan(make, autopar.TrainingPlan)
    else:
        plan = make()
    params, batch = args
    state = opt.init(params)

    from .pipeline.loss_form import full_batch_loss, per_microbatch_loss
    # rows meeting per micro-batch (coupled_rows): the reference is the same micro-batches' mean
    ref_loss = (per_microbatch_loss(fn, plan.num_microbatches, plan.has_aux, plan.aux_grows, plan.aux_sums)
                if plan.rows_meet else full_batch_loss(fn, plan.has_aux))

    def reference(p, o, b):
        loss, g = jax.value_and_grad(ref_loss, has_aux=plan.has_aux)(p, b)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o, loss
    from .verify import compare_loops, host, run_loop
    n_state = len(jax.tree_util.tree_leaves((params, state)))
    carried = [(i, i) for i in range(n_state)]  # (params, state, batch) -> (params, state, loss)
    first = [host(x) for x in jax.tree_util.tree_leaves((params, state, batch))]
    lead = jax.process_index() == 0  # (the only process in a one-process run) computes the reference, checks
    want = run_loop(jax.jit(reference), (params, state, batch), carried, ns.steps) if lead else None
    fetch = None
    if multi:
        from .pipeline.multistep import to_host
        fetch = to_host
    if multi and plan.scan_split is not None:  # a split scan runs in the split form here: converted per call
        step = _converting(plan.apply(fn, opt, stacked=False), fetch)
    else:
        step = plan.apply(fn, opt)
    got = run_loop(step, (params, state, batch), carried, ns.steps, fetch=fetch)
    if not lead:
        return 0
    split = step.split_update.split if step.split_update is not None else None
    if split is not None:
        print(f"\noptimizer update across stages (a global norm): {split.num_rounds} rounds, "
              f"{len(split.partials)} small values sent in {split.sends_per_step} pack(s) per step")
    outs = ["loss"]
    if plan.has_aux:   # (loss, aux): loss[0], loss[1]['accuracy'] …
        shapes = jax.eval_shape(full_batch_loss(fn, True), params, batch)
        outs = [f"loss{jax.tree_util.keystr(k)}" for k, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
    # aux leaves no combination of micro-batches gives exactly (the report names them): not compared
    skip = {n_state + k for k, name in enumerate(outs) if name.startswith("loss[1]")
            and f"aux{name[len('loss[1]'):]}" in plan.aux_inexact}
    if skip:
        print(f"\nnot compared (nonlinear over the batch, averaged over micro-batches): "
              f"{', '.join(outs[k - n_state] for k in sorted(skip))}")
        got, want = ([[x for k, x in enumerate(call) if k not in skip] for call in run] for run in (got, want))
        outs = [name for k, name in enumerate(outs) if n_state + k not in skip]
    result = compare_loops(got, want, first, carried, rtol=ns.rtol, atol=ns.atol,
                           paths=[f"params/state leaf {k}" for k in range(n_state)] + outs)
    where = f" in {jax.process_count()} processes" if multi else ""
    print(f"\nran {plan.num_stages} stage(s) × {plan.num_microbatches} micro-batch(es) ({plan.schedule}) on "
          f"{plan.nodes * plan.cluster.devices_per_node} {jax.devices()[0].platform} devices{where} vs the "
          f"single-device step{' over the same micro-batches' if plan.rows_meet else ''}, {result.summary()}")
    return 0 if result.ok else 1


class _converting:
    """A split-form step (``tplan.apply(stacked=False)``) called with, and returning, the
    stacked form as host arrays — for the check against the single-device loop (small models)."""

    def __init__(self, inner, fetch):
        self.inner, self.fetch = inner, fetch
        self.split_update = inner.split_update

    def __call__(self, params, opt_state, batch):
        p, o, loss = self.inner(self.inner.split(params), self.inner.split(opt_state), batch)
        return self.inner.stack(self.fetch(p)), self.inner.stack(self.fetch(o)), loss
