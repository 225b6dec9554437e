"""TrainingPlan: a pipeline (or single-stage) training plan, frozen pydantic, JSON round trip.

Each stage carries its own intra-op :class:`~autopar.plan_types.Plan` (the stage's forward +
backward for one micro-batch, planned on the stage's sub-mesh), so a stage is costed,
reported and executed with the same machinery as a single-mesh plan.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field, PrivateAttr

from autopar.cost import ClusterSpec

from ..plan_types import Plan, Timing, _Document, _Frozen


class StagePlan(_Frozen):
    index: int
    layers: list[int]                 # [start, end) layer indices
    eqns: list[int]                   # [start, end) equation positions in the traced loss
    submesh: list[int]                # (nodes, devices per node) of the sub-mesh
    devices: list[int]                # global device indices, in mesh order
    plan: Plan                        # intra-op plan of the stage's forward + backward
    latency_s: float                  # fwd + bwd of one micro-batch incl. the stage's sends
    fwd_s: float
    bwd_s: float
    send_s: float                     # activations in + their gradients back, per micro-batch
    params: list[int]                 # flat param leaves read by the stage
    owned_params: list[int]           # flat param leaves updated by the stage (first reader)
    batch: list[int]                  # flat batch leaves read by the stage
    param_bytes_per_device: float
    activation_bytes_per_device: float  # residuals of one micro-batch on one device, in the planned layouts
    inflight_microbatches: int
    memory_bytes_per_device: float    # static (params, grads, accumulators, optimizer state) + in-flight activations
    remat: str = "none"               # activation rematerialisation of its layers: "none" | "dots" | "full"
    zero: bool = False                # optimizer state (and update) split over the replicated axes (ZeRO-1)
    optimizer_bytes_per_device: float | None = None  # optimizer state (⊆ memory; None: plans before ZeRO-1)
    gather_s: float = 0.0             # ZeRO-1: all-gather of the updated parameters, once per step


class PredictedTraining(_Frozen):
    step_time_s: float                # simulated schedule makespan (the timeline) + zero_gather_s
    dp_objective_s: float             # Σ t_i + (B − 1)·max t_i (the stage DP's objective)
    bubble_fraction: float
    peak_memory_bytes: float          # max over stages, per device
    # ZeRO-1: how much later the step ends than the micro-batch schedule, for the stages'
    # all-gathers of their updated parameters after their last backward
    zero_gather_s: float = 0.0


class RefinedSplit(_Frozen):
    """A split of the additive search planned exactly (``autopar.pipeline.refine``)."""
    source: str                       # "stage DP" | "equal stages ×pp"
    stages: str                       # e.g. "2×6L@1x8/2x4 1×3L@1x4/4"
    estimate_s: float                 # the additive estimate of its step
    step_s: float | None = None       # simulated step, planned exactly (None: not planned or a stage does not fit)
    peak_bytes: float | None = None
    fits: bool = False
    chosen: bool = False              # the fastest that fits: the plan
    skipped: bool = False             # estimate above the best exact step: not planned
    plan_s: float = 0.0               # planning time
    virtual: int = Field(default=1, exclude_if=lambda v: v == 1)  # interleaved: stages per device group


class MicrobatchTrial(_Frozen):
    """One micro-batch count ``plan_training`` tried (``num_microbatches`` given as a sequence)."""
    num_microbatches: int
    step_s: float | None = None       # the predicted step of that count's plan (None: ``error``)
    error: str | None = None          # why that count has no plan
    plan_s: float = 0.0               # planning time of that count
    chosen: bool = False              # the fastest: the plan


class GridPoint(_Frozen):
    """A Megatron DP×TP×PP grid point the ``dp_tp_pp`` baseline tried, with its options
    (the same on every stage; plans saved before them: the defaults)."""
    pp: int
    submesh: list[int]
    dp: int
    tp: int
    num_microbatches: int | None = None   # None: the plan's
    remat: str = "none"               # activation recompute: "none" | "dots" (selective) | "full"
    zero: bool = False                # distributed optimizer (ZeRO-1)
    virtual: int = Field(default=1, exclude_if=lambda v: v == 1)   # interleaved: model chunks per stage
    estimate_s: float | None = None   # additive estimate (None: ``error``)
    error: str | None = None          # why it was dropped
    step_s: float | None = None       # planned exactly (the best estimates only)


class ScanSplitRecord(_Frozen):
    """A scanned layer stack pipelined per iteration (``autopar.pipeline.unscan``): the plan's
    ``param_*`` fields describe the split parameters; the user passes and gets these."""
    stacked: list[int]                # flat indices of the user's stacked parameter leaves
    lengths: list[int]                # iterations of each
    param_tree: Any                   # the user's parameter structure and leaves
    param_shapes: list[list[int]]
    param_dtypes: list[str]


class StageSearch(_Frozen):
    num_layers: int
    layer_flops: list[float]
    layer_eqns: list[list[int]]
    layers_from_markers: bool
    candidates: int                   # (layer range, sub-mesh) pairs costed
    ilp_solves: int                   # distinct stage programs planned (after structural-hash cache)
    cache_hits: int
    infeasible: int
    costing: str                      # "exact" | "additive"
    refined: list[RefinedSplit] = []  # additive costing: the splits planned exactly
    # the loss's jax.custom_vjp / custom_jvp calls and jax.checkpoint calls, each bound whole in
    # its stage's forward (trace.CustomCall); checkpoints_cut: split by a stage or remat-layer
    # boundary, so replayed without their recomputation
    custom_calls: int = 0
    checkpoints: int = 0
    checkpoints_cut: int = 0


class TrainingPlan(_Document):
    version: int = 1
    kind: str = "training"
    function: str
    fingerprint: str                  # of the traced micro-batch loss
    cluster: ClusterSpec
    nodes: int
    num_microbatches: int
    schedule: str
    memory_budget_bytes: float
    optimizer_state_ratio: float      # optimizer-state bytes per parameter byte
    param_tree: Any
    batch_tree: Any
    param_shapes: list[list[int]]
    param_dtypes: list[str]
    batch_shapes: list[list[int]]     # full batch
    batch_dtypes: list[str]
    stages: list[StagePlan]
    predicted: PredictedTraining
    search: StageSearch
    strategy_name: str = Field(default="autopar", exclude_if=lambda v: v == "autopar")  # or the baseline's name
    # dp_tp_pp baseline: every grid point tried
    baseline_grid: list[GridPoint] | None = Field(default=None, exclude_if=lambda v: v is None)
    # num_microbatches given as a sequence: every count tried (the plan is the fastest)
    microbatch_search: list[MicrobatchTrial] | None = Field(default=None, exclude_if=lambda v: v is None)
    scan_split: ScanSplitRecord | None = Field(default=None, exclude_if=lambda v: v is None)
    # random draws over the batch (dropout masks) each micro-batch makes as its rows of the
    # whole batch's draw (``autopar.pipeline.rng_form``)
    batch_draws: int = Field(default=0, exclude_if=lambda v: v == 0)
    # the loss returns (loss, aux) (``plan_training(has_aux=True)``); per aux leaf, whether its
    # axis 0 is the batch's (concatenated over micro-batches, else averaged / summed)
    has_aux: bool = Field(default=False, exclude_if=lambda v: not v)
    aux_grows: list[bool] = Field(default_factory=list, exclude_if=lambda v: not v)
    aux_bytes: float = Field(default=0.0, exclude_if=lambda v: not v)   # held over a step, all micro-batches
    # per aux leaf: a float sum over the batch (summed over the micro-batches, not averaged)
    aux_sums: list[bool] = Field(default_factory=list, exclude_if=lambda v: not any(v))
    # aux leaves that are nonlinear statistics over the batch (max, std, ratio of sums): averaged,
    # which is not jax.jit's value (``loss_form.aux_sums``)
    aux_inexact: list[str] = Field(default_factory=list, exclude_if=lambda v: not v)
    # whether the loss keeps the batch's rows apart, so micro-batching it is exact
    # (``autopar.pipeline.row_form``; "" with one micro-batch), and whether rows meeting run per
    # micro-batch (``plan_training(coupled_rows="per_microbatch")``)
    rows_check: str = Field(default="", exclude_if=lambda v: not v)
    rows_meet: bool = Field(default=False, exclude_if=lambda v: not v)
    # gradients accumulated over the micro-batches in the parameters' dtype ("params") or, for
    # lower-precision parameters, in float32 (``plan_training(grad_accum="float32")``)
    grad_accum: str = Field(default="params", exclude_if=lambda v: v == "params")
    # interleaved 1F1B (``autopar.pipeline.interleave``): the stages are model chunks on
    # len(stages) / virtual_stages device groups, stage j on group j mod G (its ``devices``)
    virtual_stages: int = Field(default=1, exclude_if=lambda v: v == 1)
    timing: Timing = Timing()
    _loss_fn: Any = PrivateAttr(default=None)
    _optimizer: Any = PrivateAttr(default=None)
    # the params' (user form) and batch's own PyTreeDefs (equinox Modules, nnx.State …) when
    # planned in this process; a JSON load keeps containers and namedtuples only
    _param_treedef: Any = PrivateAttr(default=None)
    _batch_treedef: Any = PrivateAttr(default=None)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_groups(self) -> int:
        """Device groups the stages run on (the stages, unless interleaved)."""
        return len(self.stages) // self.virtual_stages

    def report(self) -> str:
        from .report import format_training_report
        return format_training_report(self)

    def simulate(self):
        """The predicted schedule (``autopar.pipeline.schedule.Timeline``) of one training step."""
        from .schedule import simulate, stage_orders
        orders = stage_orders(len(self.stages), self.num_microbatches, self.schedule, self.virtual_stages)
        return simulate(orders, [s.fwd_s for s in self.stages], [s.bwd_s for s in self.stages],
                        [s.send_s / 2 for s in self.stages[1:]])

    def timeline(self, path: str) -> str:
        """Draw the pipeline schedule per stage/devices to ``path`` (.svg or .png)."""
        from .timeline import draw_timeline
        G = self.num_groups
        labels = [f"stage {s.index} · devices {s.devices[0]}-{s.devices[-1]} "
                  f"{'×'.join(map(str, s.plan.mesh_shape))}" + (f" · remat {s.remat}" if s.remat != "none" else "")
                  for s in self.stages] if G == len(self.stages) else [
                  f"stages {', '.join(str(j) for j in range(g, len(self.stages), G))} · devices "
                  f"{self.stages[g].devices[0]}-{self.stages[g].devices[-1]}" for g in range(G)]
        return draw_timeline(self.simulate(), path, stage_labels=labels, recompute=[s.remat for s in self.stages],
                             title=f"{self.function}: {self.num_stages} stage(s), {self.num_microbatches} "
                                   f"micro-batches, {self.schedule}"
                                   + (f" interleaved ×{self.virtual_stages}" if self.virtual_stages > 1 else ""))

    def apply(self, loss_fn=None, optimizer=None, *, params_like=None, devices=None, donate: bool = True,
              stacked: bool = True):
        """``step(params, opt_state, batch) -> (params, opt_state, loss)`` running the plan.

        ``loss_fn``/``optimizer`` default to the ones planned in this process (required for a
        plan loaded from JSON). ``params_like`` (the parameters, or their ShapeDtypeStructs)
        gives their pytree structure; needed only for a plan loaded from JSON whose parameters
        are custom pytree nodes (equinox Modules, dataclasses), which JSON does not rebuild.
        ``opt_state`` is ``optimizer.init(params)``; with ``donate``
        the params and optimizer-state buffers passed in are reused (as ``jax.jit``'s
        ``donate_argnums``).

        In a multi-controller job (``jax.distributed``, ``jax.process_count() > 1``) every
        process calls this with the same plan and gets its part of the step
        (``autopar.pipeline.multistep``): values of stages on other processes' devices are
        returned as arrays without shards here; ``multistep.to_host`` reads them everywhere.

        A plan of a scanned layer stack split per iteration (``tplan.scan_split``): by default
        the step takes and returns your stacked parameters and state, gathering the updated
        slices on one device each step; ``stacked=False`` gives the stages' own step, taking and
        returning the split form — each stacked leaf a list of its slices, each on the stage
        running it — with ``step.split(tree)`` / ``step.stack(tree)`` converting params or
        optimizer state (``autopar.pipeline.unscan_step``): the form for full-size models, and the
        one that runs under ``jax.distributed``."""
        from .runtime import PipelineStep
        loss_fn = loss_fn if loss_fn is not None else self._loss_fn
        optimizer = optimizer if optimizer is not None else self._optimizer
        if loss_fn is None or optimizer is None:
            raise ValueError("this plan does not hold its loss function/optimizer (it was loaded from JSON): "
                             "call plan.apply(loss_fn, optimizer)")
        import jax
        user_def = self._user_param_treedef(params_like)
        b_def = self._batch_treedef if self._batch_treedef is not None else _rebuilt(self.batch_tree, "batch")
        multi = jax.process_count() > 1  # a multi-controller job: this process's part of the step
        if multi and self.scan_split is not None and stacked:
            raise ValueError("a pipeline plan of a scanned layer stack (split per iteration) runs in a multi-process "
                             "job in the split form: tplan.apply(..., stacked=False), with step.split(params) / "
                             "step.split(opt_state) to convert your stacked trees")
        if multi:
            from .multistep import MultiProcessStep as cls
        else:
            cls = PipelineStep
        if self.scan_split is None:
            return cls(self, loss_fn, optimizer, devices=devices, donate=donate, trees=(user_def, b_def))
        return self._split_step(loss_fn, optimizer, devices, donate, user_def, b_def, cls, stacked)

    def batch_abs(self, tree_def):
        """The planned batch as ShapeDtypeStructs in ``tree_def``."""
        import jax

        from .rng_form import dtype_of
        return tree_def.unflatten([jax.ShapeDtypeStruct(tuple(s), dtype_of(d))
                                   for s, d in zip(self.batch_shapes, self.batch_dtypes)])

    def _user_param_treedef(self, params_like):
        """The PyTreeDef of the params the user passes: ``params_like``'s (checked against the
        plan), else the one planned in this process, else the JSON's."""
        import jax

        from ..runtime import PlanMismatchError
        rec = self.scan_split if self.scan_split is not None else self
        if params_like is not None:
            leaves, tdef = jax.tree_util.tree_flatten(params_like)
            got = [list(np.shape(x)) for x in leaves]
            if got != [list(s) for s in rec.param_shapes]:
                raise PlanMismatchError(f"params_like does not match the plan: planned shapes {rec.param_shapes}, "
                                        f"given {got} ({len(leaves)} leaves)")
            return tdef
        if self._param_treedef is not None:
            return self._param_treedef
        return _rebuilt(rec.param_tree, "params")

    def _split_step(self, loss_fn, optimizer, devices, donate, user_def, b_def, cls, stacked):
        """A scanned layer stack: the stages (a ``cls`` step) run the split form
        (``autopar.pipeline.unscan``); ``stacked``: wrapped to take the user's form."""
        import jax

        from .inputs import microbatch_shapes
        from .rng_form import RowsLoss, per_microbatch
        from .unscan import ScanSplit, split_loss, split_tree
        from .unscan_step import SplitForms, SplitStep, check_split_optimizer
        rec = self.scan_split
        split = ScanSplit(stacked=tuple(rec.stacked), lengths=tuple(rec.lengths))
        user_abs = [jax.ShapeDtypeStruct(tuple(s), d) for s, d in zip(rec.param_shapes, rec.param_dtypes)]
        check_split_optimizer(optimizer, split, user_def, user_abs)
        params_abs = user_def.unflatten(user_abs)
        batch_abs = self.batch_abs(b_def)
        mb_abs = microbatch_shapes(batch_abs, self.num_microbatches)
        loss_fn, mb_abs = per_microbatch(loss_fn, params_abs, mb_abs, self.num_microbatches)
        split_def = jax.tree_util.tree_structure(split_tree(split, user_def, user_abs))
        inner = cls(self, split_loss(loss_fn, split, params_abs, mb_abs), optimizer, devices=devices,
                    donate=donate, trees=(split_def, b_def), rows=isinstance(loss_fn, RowsLoss))
        if not stacked:
            forms = SplitForms(split, user_def, rec.param_shapes)
            inner.split, inner.stack = forms.split, forms.stack
            return inner
        device = list(jax.devices() if devices is None else devices)[self.stages[0].devices[0]]
        return SplitStep(inner, split, user_def, rec.param_shapes, device)


def _rebuilt(tree_json, what: str):
    """A PyTreeDef from a plan's JSON tree; a clear error where it holds custom nodes."""
    from ..pytree_json import custom_nodes, treedef_from_json
    custom = custom_nodes(tree_json)
    if custom:
        fix = ("pass params_like=params (the parameters or their ShapeDtypeStructs) to apply" if what == "params"
               else "apply it in the process that planned it")
        raise ValueError(f"this plan's {what} are custom pytree nodes ({', '.join(custom)}), which a plan loaded "
                         f"from JSON cannot rebuild: {fix}")
    return treedef_from_json(tree_json)
