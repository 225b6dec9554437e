"""Inputs of ``autopar.plan_training`` checked and traced: the options (``check_options``),
forced stages (``forced_stages``), one micro-batch's shapes (``microbatch_shapes``) and the
traced micro-batch loss (``trace_loss``). The first step of the data flow in
``autopar.pipeline.training``."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from autopar.cost import ClusterSpec, load_cluster

from .schedule import SCHEDULES
from ..trace import Program, TraceError, trace


def abstract(x):
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    raise TypeError(f"expected arrays or jax.ShapeDtypeStruct leaves, got {type(x).__name__}")


def microbatch_shapes(batch, num_microbatches: int):
    """ShapeDtypeStructs of one micro-batch: every batch leaf split along axis 0."""
    leaves, tree = jax.tree_util.tree_flatten(batch)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(batch)[0]]
    out = []
    for path, x in zip(paths, leaves):
        shape = tuple(getattr(x, "shape", ()))
        if not shape or shape[0] % num_microbatches:
            raise ValueError(
                f"batch leaf {path or '<batch>'} has shape {shape}: its leading (batch) dimension must be "
                f"divisible by num_microbatches={num_microbatches}; pick a divisor of the batch size")
        out.append(jax.ShapeDtypeStruct((shape[0] // num_microbatches,) + shape[1:], x.dtype))
    return jax.tree_util.tree_unflatten(tree, out)


def trace_loss(loss_fn, params, mb) -> Program:
    program = trace(loss_fn, params, mb)
    outs = program.outvars
    name = getattr(loss_fn, "__name__", "loss_fn")
    if len(outs) != 1 or not isinstance(outs[0], int) or program.values[outs[0]].shape != () \
            or not jnp.issubdtype(program.values[outs[0]].dtype, jnp.floating):
        raise TraceError(f"{name}(params, batch) must return one scalar floating loss (a mean over the "
                         "batch); it returned " + ", ".join(
                             f"{program.values[o].shape} {program.values[o].dtype}" if isinstance(o, int) else "a constant"
                             for o in outs))
    if not program.eqns or outs[0] in program.invars:
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


def forced_stages(stages, num_layers, shapes):
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
        out.append((a, b, sub, mesh))
    bounds = [(a, b) for a, b, _, _ in out]
    if bounds[0][0] != 0 or bounds[-1][1] != num_layers or any(x[1] != y[0] for x, y in zip(bounds, bounds[1:])) \
            or any(a >= b for a, b in bounds):
        raise ValueError(f"stages layer ranges {bounds} must tile [0, {num_layers}) in order (num_layers="
                         f"{num_layers}); pass num_layers= to set the layer count")
    return out
