"""Input layout rules of hand-written parallelism, shared by the baselines
(``autopar.baselines``: they restrict a plan to them) and the planner (``StageCoster``:
the rule's plan of a stage is the warm start its ILP must not do worse than).

A rule maps a program input's shape to a predicate on its sharding spec; ``stage_rules``
is Megatron's DP × TP layout of a pipeline stage's inputs as ``build_problem`` keyword
arguments (``allowed`` / ``allowed_reshard``).
"""
from __future__ import annotations

from autopar.cost import axes_size

from .strategies.base import live_axes


def one_dim(spec, axes) -> bool:
    """``spec`` splits exactly one dim, over exactly ``axes``, and nothing else."""
    split = [d for d in spec if d]
    return len(split) == 1 and tuple(split[0]) == tuple(axes)


def replicated(spec) -> bool:
    return not any(spec)


def divides(shape, mesh_shape, axes) -> list[int]:
    k = axes_size(axes, mesh_shape)
    return [d for d, n in enumerate(shape) if n % k == 0]


def batch_layout(shape, mesh_shape, axes, name, leaf):
    """Batch leaves: dim 0 split over ``axes`` (scalars and ``axes == ()``: replicated)."""
    if not shape or not axes:
        return replicated
    k = axes_size(axes, mesh_shape)
    if shape[0] % k:
        raise ValueError(f"{name}: batch leaf {leaf} has shape {shape}; its dim 0 ({shape[0]}) is not divisible "
                         f"by the {k} data-parallel devices. Use a batch size divisible by {k}, or name the "
                         f"batch arguments with batch_argnums=")
    want = (tuple(axes),) + ((),) * (len(shape) - 1)
    return lambda spec: spec == want


def state_layout(shape, mesh_shape, axes, kind):
    """State leaves. kind 'replicated'; 'sharded' (FSDP: one dim over ``axes`` wherever a dim
    divides); 'tensor' (Megatron: weights of rank ≥ 2 split on one dim, vectors split or not)."""
    if kind == "replicated" or not axes or not divides(shape, mesh_shape, axes):
        return replicated
    if kind == "sharded" or len(shape) >= 2:
        return lambda spec: one_dim(spec, axes)
    return lambda spec: replicated(spec) or one_dim(spec, axes)


def as_is(src, dst) -> bool:
    return src == dst


def as_is_or_gathered(src, dst) -> bool:  # FSDP: a consumer all-gathers the whole parameter
    return src == dst or replicated(dst)


def stage_rules(microbatch_size: int):
    """Megatron's layout of a stage's (params, activations in, batch, cotangents) on mesh
    (dp, tp): params as in Megatron over ``y``; micro-batch-major leaves dim 0 over ``x``, the
    rest replicated; every input consumed as laid out. A function (stage args, mesh shape) →
    ``build_problem`` filters, which ``StageCoster`` applies as a restriction (the dp_tp_pp
    baseline) or as a warm start (``autopar.warm_start``; autopar's own stage plans)."""
    def restrict(stage_args, mesh_shape):
        p, rest = stage_args[0], [x for group in stage_args[1:] for x in group]
        live = set(live_axes(mesh_shape))
        b_axes, s_axes = tuple(a for a in (0,) if a in live), tuple(a for a in (1,) if a in live)
        layouts = [state_layout(tuple(x.shape), mesh_shape, s_axes, "tensor") for x in p]
        for k, x in enumerate(rest):
            shape = tuple(x.shape)
            layouts.append(batch_layout(shape, mesh_shape, b_axes, "dp_tp_pp", len(p) + k)
                           if shape and shape[0] == microbatch_size else replicated)
        return {"allowed": lambda i, strategy: layouts[i](strategy.out_specs[0]),
                "allowed_reshard": lambda i, src, dst: src == dst}
    return restrict
