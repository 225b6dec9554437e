"""Inputs of ``autopar.plan_training`` checked and traced (the first step of its data flow):
the options (``check_options``), one micro-batch's shapes (``microbatch_shapes``), the traced
micro-batch loss (``trace_loss``), all gathered in :class:`TrainingInputs` by
``prepare_inputs``; forced stages (``forced_stages``)."""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from autopar.cost import ClusterSpec, load_cluster
from autopar.solvers.stage_dp import submesh_shapes

from .costs import StageOption
from .loss_form import aux_grows, aux_sums, check_aux_size, check_form, check_microbatched
from .remat import remat_options
from .rng_form import RowsLoss, doubled, per_microbatch, whole_leaf
from .row_form import COUPLED_ROWS, check_coupled_rows, judge_loss, output_tags
from .zero import zero_options
from .schedule import SCHEDULES
from ..trace import Program, TraceError, dtype_itemsize, trace
from .unscan import ScanSplit, find_scan_split, loss_jaxpr, split_loss, split_tree
from .unscan_step import check_split_optimizer


@dataclass(frozen=True, eq=False)
class TrainingInputs:
    """What ``plan_training`` knows before it costs any stage."""
    loss_fn: Any
    optimizer: Any
    name: str                       # the loss function's name, for messages
    spec: ClusterSpec
    nodes: int
    num_microbatches: int
    schedule: str                   # a ``solvers.schedules.SCHEDULES`` value
    budget: float                   # bytes per device
    p_leaves: tuple                 # ShapeDtypeStructs of the parameters (flat)
    p_tree: Any
    b_leaves: tuple                 # … of the full batch
    b_tree: Any
    microbatch_size: int
    program: Program                # the traced loss of one micro-batch
    opt_ratio: float                # optimizer-state bytes per parameter byte
    shapes: tuple                   # candidate sub-meshes (``submesh_shapes``)
    # a scanned layer stack split per iteration (``autopar.pipeline.unscan``): the parameters
    # above (p_leaves, p_tree) and the traced program are the split form; the user's are these
    scan_split: ScanSplit | None = None
    user_p_leaves: tuple = ()
    user_p_tree: Any = None
    # activation rematerialisation options the stage search chooses among per stage
    # (``autopar.pipeline.remat``), the preferred first
    remat: tuple = ("none",)
    # whether the optimizer state may be / is sharded (ZeRO-1, ``autopar.pipeline.zero``)
    zero: tuple = (False,)
    # random draws over the batch made per micro-batch as over the whole batch (``rng_form``)
    batch_draws: int = 0
    # the loss returns (loss, aux); per aux leaf, whether its axis 0 is the batch's
    has_aux: bool = False
    aux_grows: tuple = ()
    aux_sums: tuple = ()            # per aux leaf: a float sum over the batch, summed over micro-batches
    aux_inexact: tuple = ()         # paths of aux leaves no combination gives exactly (averaged)
    aux_bytes: float = 0.0          # aux bytes held over a step (all micro-batches), not in the plan's memory
    # whether the loss keeps the batch's rows apart (``row_form``; "" with one micro-batch), and
    # whether rows meeting runs per micro-batch (``coupled_rows="per_microbatch"``)
    rows_check: str = ""
    rows_meet: bool = False
    # the dtype gradients accumulate in over the micro-batches: the parameters' or float32
    grad_accum: str = "params"

    @property
    def num_params(self) -> int:
        return len(self.p_leaves)

    @property
    def options(self) -> tuple[StageOption, ...]:
        """The stage options the search chooses among, the preferred first (ties go to the
        earlier): every remat option without ZeRO-1, then with it."""
        return tuple(StageOption(r, z) for z in self.zero for r in self.remat)


def nbytes(x) -> float:
    return float(np.prod(x.shape, dtype=np.int64)) * dtype_itemsize(x.dtype)


GRAD_ACCUM = ("params", "float32")


def acc_ratio(dtype, grad_accum: str) -> float:
    """Gradient-accumulator bytes per parameter byte: 1 (accumulated in the parameter's dtype),
    or float32's over a lower-precision parameter's with ``grad_accum="float32"`` (2 for
    bfloat16)."""
    if grad_accum == "float32" and dtype_itemsize(dtype) < 4:
        return 4.0 / dtype_itemsize(dtype)
    return 1.0


def resident_bytes(leaves, opt_ratio: float, grad_accum: str) -> float:
    """Bytes a stage's parameter ``leaves`` hold all step: themselves, their gradient
    accumulators (``acc_ratio``) and optimizer state (``opt_ratio`` × their bytes)."""
    return sum(nbytes(x) * (1.0 + acc_ratio(x.dtype, grad_accum) + opt_ratio) for x in leaves)


def prepare_inputs(loss_fn, params, batch, *, optimizer, cluster, nodes, num_microbatches, schedule,
                   memory_budget_bytes, costing="auto", mesh_search="auto", split_scans=True,
                   remat: str = "none", zero: str = "none", has_aux: bool = False,
                   coupled_rows: str = "refuse", grad_accum: str = "params") -> TrainingInputs:
    """Check the options, abstract the arguments, trace one micro-batch's loss and measure
    the optimizer state (``optimizer.init`` under ``jax.eval_shape``). With ``split_scans``
    a scanned layer stack is unrolled into one layer per iteration, its stacked parameters
    split per iteration (``autopar.pipeline.unscan``). ``remat``: "auto" (the search chooses
    per stage) or one option for every stage (``autopar.pipeline.remat``); ``zero`` likewise
    for ZeRO-1 ("auto", "none", "1"; ``autopar.pipeline.zero``). ``coupled_rows``: what to do
    with a loss whose batch rows meet (BatchNorm …; ``autopar.pipeline.row_form``)."""
    options, zeros = remat_options(remat), zero_options(zero)
    check_signature(loss_fn)
    if coupled_rows not in COUPLED_ROWS:
        raise ValueError(f"coupled_rows must be one of {COUPLED_ROWS}, got {coupled_rows!r}")
    if grad_accum not in GRAD_ACCUM:
        raise ValueError(f"grad_accum must be one of {GRAD_ACCUM}, got {grad_accum!r}")
    spec = check_options(cluster, nodes, num_microbatches, schedule, optimizer, memory_budget_bytes, costing,
                         mesh_search)
    params_abs, batch_abs = abstract_tree(params, "params"), abstract_tree(batch, "batch")
    p_leaves, p_tree = jax.tree_util.tree_flatten(params_abs)
    b_leaves, b_tree = jax.tree_util.tree_flatten(batch_abs)
    bad = [jax.tree_util.keystr(k) for k, x in jax.tree_util.tree_flatten_with_path(params_abs)[0]
           if not jnp.issubdtype(x.dtype, jnp.floating)]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"every params leaf is trained and must be floating; got non-float leaves {bad[:5]}{more}. "
                         "Move integer data into the batch or close over it")
    microbatch = microbatch_shapes(batch_abs, num_microbatches)
    rows = next((int(x.shape[0]) for x in jax.tree_util.tree_leaves(microbatch) if not whole_leaf(x)), 1)
    try:
        opt_abs = jax.eval_shape(optimizer.init, params_abs)
    except Exception as err:
        raise ValueError(f"optimizer.init(params) failed: {type(err).__name__}: {err}") from err
    p_bytes = sum(nbytes(x) for x in p_leaves)
    o_bytes = sum(nbytes(x) for x in jax.tree_util.tree_leaves(opt_abs))
    traced = loss_jaxpr(loss_fn, params_abs, microbatch) if split_scans or num_microbatches > 1 else None
    user_traced = traced
    # draws over the batch made per micro-batch as over the whole batch (a dropout mask):
    # the loss then takes the micro-batch's rows too (``autopar.pipeline.rng_form``)
    wrapped, microbatch = per_microbatch(loss_fn, params_abs, microbatch, num_microbatches, traced)
    if wrapped is not loss_fn:
        traced = loss_jaxpr(wrapped, params_abs, microbatch)
    split = find_scan_split(wrapped, params_abs, microbatch, traced) if split_scans else None
    user_leaves, user_tree, traced_loss = tuple(p_leaves), p_tree, wrapped
    if split is not None:
        check_split_optimizer(optimizer, split, p_tree, p_leaves)
        traced_loss = split_loss(wrapped, split, params_abs, microbatch, traced)
        params_abs = split_tree(split, p_tree, p_leaves)
        p_leaves, p_tree = jax.tree_util.tree_flatten(params_abs)
    program = trace_loss(traced_loss, params_abs, microbatch, has_aux)
    user_mb = microbatch_shapes(batch_abs, num_microbatches)   # (``microbatch`` may carry the rows leaf now)
    grows, aux_bytes = aux_grows(loss_fn, user_tree.unflatten(user_leaves), user_mb, doubled(user_mb),
                                 traced) if has_aux else ((), 0.0)
    budget = float(memory_budget_bytes or spec.device.memory_bytes)
    name = getattr(loss_fn, "__name__", "loss_fn")
    check_aux_size(name, aux_bytes, num_microbatches, budget)
    check_microbatched(program, len(p_leaves), name, num_microbatches, rows, has_aux)
    found, sums, inexact = None, (), ()
    if num_microbatches > 1:   # micro-batching is exact only where the loss keeps rows apart
        loss_leaves = program.out_tree.children()[0].num_leaves if has_aux else program.out_tree.num_leaves
        tags = output_tags(user_traced[0], jax.tree_util.tree_leaves(user_mb), len(user_leaves))
        found = judge_loss(tags[:loss_leaves])
        check_coupled_rows(found, name, num_microbatches, rows, coupled_rows)
        if has_aux:   # aux float sums are summed over the micro-batches, nonlinear statistics flagged
            sums, inexact = aux_sums(program, len(p_leaves), rows, grows, tags[loss_leaves:])
            paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(
                user_traced[1].unflatten(range(user_traced[1].num_leaves))[1])[0]]
            inexact = tuple(f"aux{paths[j]}" for j in inexact)
    return TrainingInputs(
        loss_fn=loss_fn, optimizer=optimizer, name=getattr(loss_fn, "__name__", "loss_fn"), spec=spec, nodes=nodes,
        num_microbatches=num_microbatches, schedule=schedule,
        budget=budget, p_leaves=tuple(p_leaves), p_tree=p_tree,
        b_leaves=tuple(b_leaves), b_tree=b_tree,
        microbatch_size=rows,
        program=program, opt_ratio=o_bytes / p_bytes if p_bytes else 0.0,
        shapes=tuple(submesh_shapes(nodes, spec.devices_per_node)), scan_split=split,
        user_p_leaves=user_leaves if split is not None else (), user_p_tree=user_tree if split is not None else None,
        remat=options, zero=zeros, batch_draws=wrapped.count if isinstance(wrapped, RowsLoss) else 0,
        has_aux=has_aux, aux_grows=tuple(grows), aux_bytes=num_microbatches * aux_bytes,
        rows_check=found.line() if found is not None else "", rows_meet=bool(found and found.coupled),
        grad_accum=grad_accum, aux_sums=tuple(sums), aux_inexact=inexact)


def check_signature(loss_fn) -> None:
    """``loss_fn`` must take ``(params, batch)``: a training step ``(params, opt_state, batch)``
    given instead is refused with what to pass."""
    try:
        inspect.signature(loss_fn).bind(None, None)
    except TypeError:
        name = getattr(loss_fn, "__name__", "loss_fn")
        raise ValueError(
            f"{name}{inspect.signature(loss_fn)} cannot be called as {name}(params, batch): plan_training takes the "
            "loss, loss_fn(params, batch) -> scalar loss, and builds the training step itself from it and "
            "optimizer= (to plan a whole train_step function on one mesh, use autopar.plan)") from None
    except ValueError:   # (no signature to read: a builtin or C callable) — tracing will tell
        pass


def abstract_tree(tree, what: str):
    """``tree``'s leaves as ShapeDtypeStructs; a leaf that is no array (a Python float, a list
    of numbers) is refused naming it."""
    def one(path, x):
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
        raise TypeError(f"{what} leaf {jax.tree_util.keystr(path) or '<root>'} is not an array ({type(x).__name__}): "
                        "pass arrays (jnp.asarray / np.asarray of a list) or jax.ShapeDtypeStruct")
    return jax.tree_util.tree_map_with_path(one, tree)


def microbatch_shapes(batch, num_microbatches: int):
    """ShapeDtypeStructs of one micro-batch: every batch leaf split along axis 0 but scalars (a
    PRNG key), given whole to every micro-batch (``rng_form.whole_leaf``)."""
    leaves, tree = jax.tree_util.tree_flatten(batch)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(batch)[0]]
    out = []
    for path, x in zip(paths, leaves):
        shape = tuple(getattr(x, "shape", ()))
        if whole_leaf(x):
            out.append(jax.ShapeDtypeStruct(shape, x.dtype))
            continue
        if shape[0] % num_microbatches:
            key = (" (a PRNG key? pass a typed key, jax.random.key(seed): every micro-batch gets it whole)"
                   if shape == (2,) and np.dtype(x.dtype) == np.uint32 else "")
            raise ValueError(
                f"batch leaf {path or '<batch>'} has shape {shape}: its leading (batch) dimension must be "
                f"divisible by num_microbatches={num_microbatches}; pick a divisor of the batch size{key}")
        out.append(jax.ShapeDtypeStruct((shape[0] // num_microbatches,) + shape[1:], x.dtype))
    sizes = {(p or "<batch>"): int(x.shape[0]) for p, x in zip(paths, leaves) if not whole_leaf(x)}
    if num_microbatches > 1 and len(set(sizes.values())) > 1:
        (a, n), (b, m) = sorted(sizes.items(), key=lambda kv: -kv[1])[0], min(sizes.items(), key=lambda kv: kv[1])
        raise ValueError(
            f"batch leaf {b} has {m} along axis 0 where {a} has {n}: every batch leaf is cut into "
            f"{num_microbatches} micro-batches along axis 0, which must be the batch's examples in all of them. Give "
            "it the batch axis (grouped items as (batch, k, …), not (batch·k, …)), or close over values every "
            "example shares (positions, a causal mask) instead of passing them in the batch")
    return jax.tree_util.tree_unflatten(tree, out)


def trace_loss(loss_fn, params, mb, has_aux: bool = False) -> Program:
    """One micro-batch's loss traced, its form checked (``autopar.pipeline.loss_form``)."""
    program = trace(loss_fn, params, mb, calls=True)  # (stages bind its custom calls whole)
    name = getattr(loss_fn, "__name__", "loss_fn")
    check_form(program, len(jax.tree_util.tree_leaves(params)), name, has_aux)
    if not program.eqns or program.outvars[0] in program.invars:
        raise TraceError(f"{name}'s loss does not depend on any computation; nothing to plan")
    return program


def check_options(cluster, nodes, num_microbatches, schedule, optimizer, memory_budget_bytes, costing,
           mesh_search) -> ClusterSpec:
    spec = load_cluster(cluster)
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise ValueError(f"nodes must be a positive int, got {nodes!r}")
    if not isinstance(num_microbatches, int) or isinstance(num_microbatches, bool) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be a positive int, got {num_microbatches!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise ValueError("optimizer must be an optax.GradientTransformation (with .init and .update), "
                         f"got {type(optimizer).__name__}")
    if memory_budget_bytes is not None and not memory_budget_bytes > 0:
        raise ValueError(f"memory_budget_bytes must be > 0, got {memory_budget_bytes!r}")
    if costing not in ("auto", "exact", "additive"):
        raise ValueError(f"costing must be 'auto', 'exact' or 'additive', got {costing!r}")
    if mesh_search not in ("auto", "full"):
        raise ValueError(f"mesh_search must be 'auto' or 'full', got {mesh_search!r}")
    return spec


@dataclass(frozen=True)
class ForcedStage:
    """A stage the user fixed: layers [start, end) on ``submesh`` (nodes, devices per node)."""
    start: int
    end: int
    submesh: tuple[int, int]
    mesh: tuple[int, ...] | None     # the logical mesh; None: the usual candidates


def forced_stages(stages, num_layers, shapes) -> list[ForcedStage]:
    """``plan_training(stages=[(layer_start, layer_end, submesh[, logical_mesh]), …])`` checked."""
    out = []
    for k, s in enumerate(stages):
        s = tuple(s)
        if len(s) not in (3, 4):
            raise ValueError(f"stages[{k}]={s!r}: expected (layer_start, layer_end, submesh) or "
                             "(layer_start, layer_end, submesh, logical_mesh_shape)")
        a, b, sub = int(s[0]), int(s[1]), tuple(s[2])
        if sub not in shapes:
            raise ValueError(f"stages[{k}]: sub-mesh {sub} is not one of {shapes}")
        mesh = tuple(s[3]) if len(s) == 4 and s[3] is not None else None
        if mesh is not None and math.prod(mesh) != sub[0] * sub[1]:
            raise ValueError(f"stages[{k}]: logical mesh {mesh} has {math.prod(mesh)} devices, sub-mesh {sub} "
                             f"has {sub[0] * sub[1]}")
        out.append(ForcedStage(a, b, sub, mesh))
    bounds = [(f.start, f.end) for f in out]
    if bounds[0][0] != 0 or bounds[-1][1] != num_layers or any(x[1] != y[0] for x, y in zip(bounds, bounds[1:])) \
            or any(a >= b for a, b in bounds):
        raise ValueError(f"stages layer ranges {bounds} must tile [0, {num_layers}) in order (num_layers="
                         f"{num_layers}); pass num_layers= to set the layer count")
    return out
