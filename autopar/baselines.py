"""Hand-written parallelism baselines as ordinary :class:`~autopar.Plan` objects.

Each baseline is costed, reported (``plan.report()`` says which baseline made it),
validated (``plan.validate``) and executed (``plan.apply``) exactly like ``autopar.plan``'s
result, so the two can be compared number for number:

* :func:`data_parallel` — 1D mesh over all devices; batch dim 0 split over it, every
  parameter / optimizer-state leaf replicated.
* :func:`fsdp` — ZeRO-3: batch as in data parallel; every parameter *and* optimizer-state
  leaf split over all devices on one dim that divides (replicated only where none does).
* :func:`megatron` — tensor parallel on a 1D mesh: batch replicated; every weight (rank ≥ 2)
  split over the mesh on one dim (column or row, whichever dim divides); vectors (biases,
  layer-norm scales) split or replicated — Megatron's choice space.
* :func:`dp_tp` — 2D mesh ``(dp, tp)``: batch dim 0 over axis ``x``; weights as in
  ``megatron`` over axis ``y`` (replicated over ``x``).
* :func:`dp_tp_pp` — Megatron-LM's 3D grid for a training step: ``pp`` pipeline stages with
  the same number of layers each, every stage on an equal sub-mesh laid out as ``dp_tp``
  (``tp`` inside a node); the best grid point ``pp × dp × tp`` is returned as a
  :class:`~autopar.TrainingPlan`, executed by ``tplan.apply()`` like ``plan_training``'s;
  with Megatron's recompute (none/selective/full), distributed optimizer (ZeRO-1) and
  micro-batch count choices per grid point.

"Batch" leaves are those of the positional arguments in ``batch_argnums`` (default: the
last one); every other leaf is "state" (parameters, optimizer state).

Mechanism: a baseline **fixes or restricts the shardings of the program inputs** to the rule
above (``build_problem(allowed=...)``) and makes their consumers use them as laid out
(``allowed_reshard``: no slicing or gathering an input on its way into an op, except that
FSDP's consumers may all-gather a parameter whole) — what GSPMD's propagation does at the
first op. Autopar's ILP then chooses every other operator given those inputs.

Caveat (honest, measured): the ILP is a stand-in for GSPMD's propagation and it is the
*best* completion under autopar's cost model, so the baselines are optimistic. Where the rule
fits the model badly the completion mixes in other parallelism after the first op (the
data-parallel baseline of a batch-128 / hidden-1024 MLP all-gathers activations and runs
Megatron-style matmuls), so real data parallelism would be slower than reported. Because
every baseline's choice set is a subset of autopar's on the same mesh, autopar's ILP
objective is never higher (up to the solver's MIP gap). ``predicted.step_time_s`` is not the
objective: it counts a value resharded to one spec once, the objective charges every
consuming edge, so a baseline's step time can come out slightly below autopar's (measured:
FSDP 0.46 % below autopar on a batch-1024 / hidden-128 MLP whose objective is 2.3 % above).
Memory: the baseline must fit the same per-device budget, else the same ``PlanError`` as
``autopar.plan`` with the minimum bytes per device under that baseline's restriction.
"""
from __future__ import annotations

import math
from dataclasses import replace

import jax
import numpy as np

from autopar.cost import load_cluster
from autopar.solvers.stage_dp import uniform_stages, uniform_submeshes

from .planner import PlanError, PlanHooks, plan_with
from .rules import as_is, as_is_or_gathered, batch_layout, stage_rules, state_layout
from .strategies.base import live_axes
from .pipeline.costs import StageOption
from .pipeline.inputs import ForcedStage, prepare_inputs
from .pipeline.layers import layers_of
from .pipeline.remat import REMAT_OPTIONS
from .pipeline.search import estimate_forced
from .pipeline.stage_cost import CostOptions, StageCoster
from .pipeline.training import microbatch_counts, plan_pipeline
from .pipeline.training_plan import GridPoint
from .progress import Progress

__all__ = ["data_parallel", "fsdp", "megatron", "dp_tp", "dp_tp_pp", "pipeline_grid", "uniform_stages", "BASELINES"]


def _leaf_shapes(args, batch_argnums) -> tuple[list[tuple[int, ...]], list[bool]]:
    """Per flat input leaf: its shape and whether it belongs to a batch argument."""
    n = len(args)
    nums = (batch_argnums,) if isinstance(batch_argnums, int) else tuple(batch_argnums)
    bad = [a for a in nums if not isinstance(a, int) or not -n <= a < n]
    if bad or not nums:
        raise ValueError(f"batch_argnums={nums} must name positional arguments of the function "
                         f"(it got {n}); e.g. batch_argnums=({n - 1},) for the last one")
    nums = {a % n for a in nums}
    shapes, is_batch = [], []
    for a, arg in enumerate(args):
        for leaf in jax.tree_util.tree_leaves(arg):
            shapes.append(tuple(np.shape(leaf)))
            is_batch.append(a in nums)
    return shapes, is_batch


def layout_rule(name, args, *, mesh_shape, batch_axes, state_kind, batch_argnums) -> dict:
    """The ``build_problem`` filters (``allowed`` / ``allowed_reshard``) of a baseline's input
    layouts for ``args`` on ``mesh_shape``: batch leaves dim 0 over ``batch_axes``, state leaves
    by ``state_kind`` ("replicated", "sharded" (FSDP), "tensor" (Megatron, last axis))."""
    shapes, is_batch = _leaf_shapes(args, batch_argnums)
    mesh_shape = tuple(mesh_shape)
    live = set(live_axes(mesh_shape))
    b_axes = tuple(a for a in batch_axes if a in live)
    s_axes = {"replicated": (), "sharded": tuple(sorted(live)), "tensor": (len(mesh_shape) - 1,)}[state_kind]
    s_axes = tuple(a for a in s_axes if a in live)
    layouts = [batch_layout(s, mesh_shape, b_axes, name, i) if b else state_layout(s, mesh_shape, s_axes, state_kind)
               for i, (s, b) in enumerate(zip(shapes, is_batch))]
    uses = [as_is_or_gathered if state_kind == "sharded" and not b else as_is for b in is_batch]
    return {"allowed": lambda i, strategy: layouts[i](strategy.out_specs[0]),
            "allowed_reshard": lambda i, src, dst: uses[i](src, dst)}


def _restricted_plan(name, fn, args, *, cluster, nodes, mesh_shape, batch_axes, state_kind, batch_argnums,
                     donate_argnums, memory_budget_bytes, solver, time_limit_s):
    mesh_shape = tuple(mesh_shape)
    rule = layout_rule(name, args, mesh_shape=mesh_shape, batch_axes=batch_axes, state_kind=state_kind,
                       batch_argnums=batch_argnums)

    def restrict(shape):
        if tuple(shape) != mesh_shape:
            raise AssertionError(f"{name} was set up for mesh {mesh_shape}, asked for {shape}")
        return rule

    return plan_with(fn, args, cluster=cluster, nodes=nodes, mesh_shape=mesh_shape,
                     memory_budget_bytes=memory_budget_bytes, solver=solver, time_limit_s=time_limit_s,
                     donate_argnums=donate_argnums, hooks=PlanHooks(restrict=restrict, strategy_name=name))


def _devices(cluster, nodes) -> int:
    return load_cluster(cluster).devices_per_node * nodes


def _last(args) -> tuple[int, ...]:
    return (len(args) - 1,) if args else ()


def data_parallel(fn, *args, cluster="cpu-8", nodes: int = 1, batch_argnums=None, donate_argnums=(),
                  memory_budget_bytes: float | None = None, solver: str = "auto",
                  time_limit_s: float | None = None):
    """Data parallel: 1D mesh of all devices, batch dim 0 split, state replicated."""
    return _restricted_plan("data_parallel", fn, args, cluster=cluster, nodes=nodes,
                            mesh_shape=(_devices(cluster, nodes),), batch_axes=(0,), state_kind="replicated",
                            batch_argnums=_last(args) if batch_argnums is None else batch_argnums,
                            donate_argnums=donate_argnums, memory_budget_bytes=memory_budget_bytes,
                            solver=solver, time_limit_s=time_limit_s)


def fsdp(fn, *args, cluster="cpu-8", nodes: int = 1, batch_argnums=None, donate_argnums=(),
         memory_budget_bytes: float | None = None, solver: str = "auto", time_limit_s: float | None = None):
    """Fully sharded data parallel (ZeRO-3): batch dim 0 split over all devices; every
    parameter and optimizer-state leaf split over all devices on one dim that divides."""
    return _restricted_plan("fsdp", fn, args, cluster=cluster, nodes=nodes,
                            mesh_shape=(_devices(cluster, nodes),), batch_axes=(0,), state_kind="sharded",
                            batch_argnums=_last(args) if batch_argnums is None else batch_argnums,
                            donate_argnums=donate_argnums, memory_budget_bytes=memory_budget_bytes,
                            solver=solver, time_limit_s=time_limit_s)


def megatron(fn, *args, cluster="cpu-8", nodes: int = 1, batch_argnums=None, donate_argnums=(),
             memory_budget_bytes: float | None = None, solver: str = "auto", time_limit_s: float | None = None):
    """Megatron tensor parallel on a 1D mesh of all devices: batch replicated; each weight
    split on one dim (column or row), vectors split or replicated."""
    return _restricted_plan("megatron", fn, args, cluster=cluster, nodes=nodes,
                            mesh_shape=(_devices(cluster, nodes),), batch_axes=(), state_kind="tensor",
                            batch_argnums=_last(args) if batch_argnums is None else batch_argnums,
                            donate_argnums=donate_argnums, memory_budget_bytes=memory_budget_bytes,
                            solver=solver, time_limit_s=time_limit_s)


def dp_tp(fn, *args, mesh_shape=None, cluster="cpu-8", nodes: int = 1, batch_argnums=None, donate_argnums=(),
          memory_budget_bytes: float | None = None, solver: str = "auto", time_limit_s: float | None = None):
    """Data parallel × Megatron on a 2D mesh ``(dp, tp)``: batch dim 0 over axis ``x``;
    weights split on one dim over axis ``y`` (replicated over ``x``). Default mesh:
    ``(nodes, devices_per_node)`` on several nodes (tensor parallel inside a node),
    ``(2, devices / 2)`` on one."""
    total = _devices(cluster, nodes)
    if mesh_shape is None:
        mesh_shape = (nodes, total // nodes) if nodes > 1 else (2, total // 2)
    mesh_shape = tuple(mesh_shape)
    if len(mesh_shape) != 2:
        raise ValueError(f"dp_tp needs a 2D mesh_shape=(dp, tp), got {mesh_shape}")
    return _restricted_plan("dp_tp", fn, args, cluster=cluster, nodes=nodes, mesh_shape=mesh_shape,
                            batch_axes=(0,), state_kind="tensor",
                            batch_argnums=_last(args) if batch_argnums is None else batch_argnums,
                            donate_argnums=donate_argnums, memory_budget_bytes=memory_budget_bytes,
                            solver=solver, time_limit_s=time_limit_s)


BASELINES = {"data_parallel": data_parallel, "fsdp": fsdp, "megatron": megatron, "dp_tp": dp_tp}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def pipeline_grid(num_layers: int, nodes: int, devices_per_node: int, microbatch_size: int):
    """Megatron-style grid points ``(pp, submesh, (dp, tp))``: the equal splits of
    :func:`solvers.stage_dp.uniform_submeshes` (``pp`` ≤ the layers divides the devices; each
    stage gets ``N / pp`` devices as whole nodes ``(k, M)`` or an aligned part of one node
    ``(1, m)``); ``tp`` divides the devices of a node (tensor parallelism stays inside a node)
    and ``dp`` divides the micro-batch. Stages get ``num_layers / pp`` layers each
    (:func:`uniform_stages`; ±1 where ``pp`` does not divide the layers)."""
    out = []
    for pp, sub in uniform_submeshes(num_layers, nodes, devices_per_node):
        d = sub[0] * sub[1]
        for tp in _divisors(min(d, devices_per_node)):
            dp = d // tp
            if d % tp == 0 and microbatch_size % dp == 0:
                out.append((pp, sub, (dp, tp)))
    return out


def _microbatch_counts(microbatches, num_microbatches: int, batch) -> list[int]:
    """``dp_tp_pp(microbatches=…)``: None (only ``num_microbatches``), "divisors" (every divisor
    of the global batch) or counts."""
    if microbatches is None:
        return microbatch_counts(num_microbatches)
    if microbatches == "divisors":
        leaves = jax.tree_util.tree_leaves(batch)
        return _divisors(int(np.shape(leaves[0])[0])) if leaves and np.shape(leaves[0]) else [1]
    counts = sorted({int(b) for b in microbatches})
    if not counts or counts[0] < 1:
        raise ValueError(f"microbatches must be None, 'divisors' or positive counts, got {microbatches!r}")
    return counts


def _options(remat, zero) -> list[StageOption]:
    """Megatron's recompute × distributed-optimizer choices, the plain one first."""
    remat, zero = tuple(remat), tuple(bool(z) for z in zero)
    bad = [r for r in remat if r not in REMAT_OPTIONS]
    if bad or not remat or not zero:
        raise ValueError(f"remat must be options among {REMAT_OPTIONS} and zero among (False, True); got "
                         f"remat={remat!r}, zero={zero!r}")
    opts = [StageOption(r, z) for z in dict.fromkeys(zero) for r in dict.fromkeys(remat)]
    return sorted(opts, key=lambda o: (o != StageOption(), opts.index(o)))


def _virtual(virtual, pp: int, num_layers: int, num_microbatches: int) -> list[int]:
    """The chunk counts per stage a grid point takes (Megatron's rule: the layers split into
    pp·v equal chunks; the micro-batches a multiple of pp): 1, and each v > 1 of ``virtual``
    that fits."""
    vs = [int(v) for v in ((virtual,) if isinstance(virtual, int) else virtual)]
    if not vs or any(v < 1 for v in vs):
        raise ValueError(f"virtual must be chunk counts ≥ 1 per pipeline stage, got {virtual!r}")
    return [v for v in sorted(set(vs) | {1}) if v == 1 or (
        pp >= 2 and num_layers % (pp * v) == 0 and num_microbatches % pp == 0)]


def dp_tp_pp(loss_fn, params, batch, *, optimizer, cluster="cpu-8", nodes: int = 1, num_microbatches=1,
             schedule: str = "1f1b", num_layers: int | None = None, memory_budget_bytes: float | None = None,
             solver: str = "auto", time_limit_s: float | None = None, refine: int = 2, grid=None,
             remat=REMAT_OPTIONS, zero=(False, True), microbatches=None, grad_accum: str = "params",
             coupled_rows: str = "refuse", virtual=(1,)):
    """The best Megatron-LM 3D grid (data × tensor × pipeline parallel, uniform stages) for a
    training step, as a :class:`~autopar.TrainingPlan` (``strategy_name="dp_tp_pp"``), with
    Megatron's practice on top of the grid, each the same on every stage of a point:

    * ``remat``: activation recompute — "none", "dots" (selective: weight matmul outputs
      saved, attention and elementwise recomputed), "full" (``autopar.pipeline.remat``);
    * ``zero``: the distributed optimizer (ZeRO-1: optimizer state split over the data-parallel
      axis, one all-gather of the parameters per step; ``autopar.pipeline.zero``);
    * ``microbatches``: micro-batch counts tried (None: ``num_microbatches``, an int or a
      sequence of counts as in ``plan_training``; "divisors":
      every divisor of the global batch; or a tuple), each traced and costed apart;
    * ``grad_accum``: the gradient accumulators' dtype, as for ``plan_training`` (Megatron's
      fp32 ``main_grad``: "float32"); ``coupled_rows`` as for ``plan_training`` too;
    * ``virtual``: model chunks per pipeline stage tried (Megatron's interleaved schedule,
      ``--num-layers-per-virtual-pipeline-stage``): for v > 1, a point with pp ≥ 2 whose
      layers divide into pp·v equal chunks and whose micro-batch count is a multiple of pp
      is also costed interleaved (``autopar.pipeline.interleave``).

    Same inputs as :func:`autopar.plan_training`. Every grid point of :func:`pipeline_grid`
    (or ``grid=[(pp, submesh, (dp, tp)), …]``) is costed layer by layer (each layer's
    forward + backward planned by the ILP under the ``dp_tp`` input rules on ``(dp, tp)``,
    summed over a stage) with no recompute and no distributed optimizer; only where that does
    not fit are the other (recompute, ZeRO-1) combinations costed — in the cost model each
    only adds work (recomputed FLOPs, an all-gather), so where the plain point fits it is the
    point's best. The ``refine`` best estimates are planned stage by stage exactly and the
    fastest predicted step is returned. ``tplan.baseline_grid`` lists every (point,
    micro-batches, option) costed with its estimate (or why it was dropped).

    Sequence parallelism is not a grid option: Megatron's SP shards the activations of the
    LayerNorm/dropout regions along the sequence over the tp axis. The rule
    (``rules.stage_rules``) fixes only a stage's inputs; the ILP completing each stage may
    already lay out those regions sequence-sharded over tp wherever its cost model finds that
    cheaper, and a stage's boundary send is charged by the activation's full bytes over all
    devices of the sub-mesh whatever its layout (``StageCoster.cost_within``), so a rule
    forcing SP on the stage inputs could only remove completions, never a cost."""
    counts = _microbatch_counts(microbatches, num_microbatches, batch)
    options = _options(remat, zero)
    rows, cands = [], []   # cands: (row index, inputs, layering, coster, forced)
    progress = Progress()
    for B in counts:
        inputs = prepare_inputs(loss_fn, params, batch, optimizer=optimizer, cluster=cluster, nodes=nodes,
                                num_microbatches=B, schedule=schedule, memory_budget_bytes=memory_budget_bytes,
                                grad_accum=grad_accum, coupled_rows=coupled_rows)
        layering = layers_of(inputs.program, num_layers)
        mb_size = inputs.microbatch_size
        L, M = len(layering.layers), inputs.spec.devices_per_node
        points = [(int(pp), tuple(sub), tuple(mesh)) for pp, sub, mesh in grid] if grid is not None \
            else pipeline_grid(L, nodes, M, mb_size)
        if not points and len(counts) == 1:
            raise PlanError(f"no Megatron grid point for {L} layers on {nodes} node(s) × {M} with micro-batch "
                            f"{mb_size}: pp must divide the layers and devices, dp the micro-batch")
        coster = StageCoster(inputs, layering.eqn_ranges(inputs.program),
                             CostOptions(solver=solver, time_limit_s=time_limit_s, restrict=stage_rules(mb_size),
                                         strategy_name="dp_tp_pp"), progress)
        for pp, sub, mesh in points:
            if not 1 <= pp <= L or sub not in inputs.shapes or math.prod(mesh) != sub[0] * sub[1] \
                    or pp * sub[0] * sub[1] != nodes * M:
                raise ValueError(f"grid point pp={pp}, submesh={sub}, mesh={mesh} does not fit {L} layers on "
                                 f"{nodes} node(s) × {M} (sub-meshes {list(inputs.shapes)})")
            for v in _virtual(virtual, pp, L, B):
                forced = [ForcedStage(a, b, sub, mesh) for a, b in uniform_stages(L, pp * v)]
                for k, opt in enumerate(options):
                    row = {"pp": pp, "submesh": list(sub), "dp": mesh[0], "tp": mesh[1], "num_microbatches": B,
                           "remat": opt.remat, "zero": opt.zero, "virtual": v}
                    try:
                        row["estimate_s"] = estimate_forced(coster, inputs, L, forced, progress, options=(opt,),
                                                            name=f"{inputs.name} (baseline dp_tp_pp)",
                                                            virtual=v).objective_s
                    except PlanError as err:
                        row["error"] = str(err).split(";")[0]
                    rows.append(row)
                    cands.append((replace(inputs, remat=(opt.remat,), zero=(opt.zero,)), layering, coster, forced, v))
                    if k == 0 and "estimate_s" in row and opt == StageOption():
                        break   # the plain point fits: recompute and ZeRO-1 only add work
    ok = sorted((k for k, r in enumerate(rows) if "estimate_s" in r), key=lambda k: rows[k]["estimate_s"])
    best, errors = None, []
    for k in ok[:max(1, refine)]:
        inputs, layering, coster, forced, v = cands[k]
        try:
            tp_ = plan_pipeline(inputs, layering, coster, progress, mode="exact", forced=forced,
                                strategy_name="dp_tp_pp", virtual=(v,))
        except PlanError as err:
            rows[k]["error"] = str(err).split(";")[0]
            errors.append(err)
            continue
        rows[k]["step_s"] = tp_.predicted.step_time_s
        if best is None or tp_.predicted.step_time_s < best.predicted.step_time_s:
            best = tp_
    if best is None:
        M = load_cluster(cluster).devices_per_node
        need = [e.min_bytes_per_device for e in errors if e.min_bytes_per_device] + [
            c.min_need for _, _, c, _, _ in cands if math.isfinite(c.min_need)]
        raise PlanError(f"no Megatron DP×TP×PP grid point of {getattr(loss_fn, '__name__', 'loss_fn')} fits "
                        f"memory_budget_bytes={cands[0][0].budget if cands else memory_budget_bytes:.0f} per device on "
                        f"{nodes} node(s) × {M} ({len(rows)} points tried)"
                        + (f"; {min(need):.0f} bytes per device is the smallest a stage needs" if need else "")
                        + ". Raise the budget, add nodes or use more micro-batches.",
                        min_bytes_per_device=min(need) if need else None)
    out = best.model_copy(update={"baseline_grid": [GridPoint(**r) for r in rows]})
    return out
