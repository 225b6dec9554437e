"""Optimizer-state sharding (ZeRO-1, Megatron's distributed optimizer) of a pipeline stage.

A stage's parameters keep the sharding its intra-op plan gave them (``spec``). With ZeRO-1
the optimizer state of each parameter — and the update that reads and writes it — is
additionally split over the mesh axes along which the parameter is replicated (the stage's
data-parallel axes): ``zero_spec`` adds each such axis to a dim it divides. After the update
the new parameters are all-gathered back to ``spec`` once per step (not per micro-batch);
gradients are still all-reduced inside the stage's backward as planned, and the update
slices them (free).

Costs per stage (bytes per device, seconds; r = optimizer-state bytes per parameter byte,
``TrainingInputs.opt_ratio``; P = the stage's parameter bytes, n = its devices):

* memory: parameters and gradient accumulators (1 + a)× their bytes under ``spec`` (the
  intra-op ILP's ``input_usage_scale`` 1 + a instead of 1 + a + r; a: ``inputs.acc_ratio``), optimizer state r × Σ bytes / shards of
  ``zero_spec`` (``optimizer_bytes``) — r·P/n when every replicated axis divides a dim, which
  the ILP's budget reserves up front (``reserved_bytes``);
* time: one all-gather per parameter leaf over the axes ``zero_spec`` added, of the
  parameter's bytes under ``spec`` (``gather_time``: ``autopar.cost.collective_time`` on the
  stage's logical mesh mapped onto the cluster), after the stage's last backward
  (``costs.step_time``).

Options (``plan_training(zero=…)``): ``"auto"`` lets the stage search choose per stage
(``zero_options``: without first, ties prefer it since ZeRO-1 only adds an all-gather),
``"none"`` never, ``"1"`` on every stage.
"""
from __future__ import annotations

import math

from autopar.cost import ALL_GATHER, ClusterSpec, collective_time, mesh_model, shard_factor

ZERO_OPTIONS = {"auto": (False, True), "none": (False,), "1": (True,)}


def zero_options(zero: str) -> tuple[bool, ...]:
    """Whether the optimizer state is sharded (ZeRO-1): the choices the stage search has."""
    if zero not in ZERO_OPTIONS:
        raise ValueError(f"zero must be one of {tuple(ZERO_OPTIONS)}, got {zero!r}")
    return ZERO_OPTIONS[zero]


def zero_spec(shape, spec, sizes: dict[str, int]) -> list[list[str]]:
    """``spec`` (axis names per dim) with every mesh axis (of size > 1) it does not use added
    to the largest dim whose current split times the axis size divides it (as the minor
    axis of that dim); an axis no dim can take stays replicated."""
    out = [list(axes) for axes in spec] + [[] for _ in range(len(shape) - len(spec))]
    used = {a for axes in out for a in axes}
    for name, size in sizes.items():
        if size == 1 or name in used:
            continue
        fits = [d for d, n in enumerate(shape)
                if n % (math.prod(sizes[a] for a in out[d]) * size) == 0]
        if fits:
            out[max(fits, key=lambda d: (shape[d] // math.prod(sizes[a] for a in out[d]), -d))].append(name)
    return out


def added_axes(spec, zspec) -> list[str]:
    """Mesh axes ``zero_spec`` added to ``spec`` (what the all-gather runs over)."""
    used = {a for axes in spec for a in axes}
    return [a for axes in zspec for a in axes if a not in used]


def optimizer_bytes(params, specs, sizes: dict[str, int], opt_ratio: float) -> float:
    """Optimizer-state bytes per device of ``params`` (shape, bytes) under ZeRO-1."""
    return sum(opt_ratio * nbytes / shard_factor(zero_spec(shape, spec, sizes), sizes)
               for (shape, nbytes), spec in zip(params, specs))


def reserved_bytes(param_bytes: float, num_devices: int, opt_ratio: float) -> float:
    """The least optimizer-state bytes per device under ZeRO-1: r·P/n (every axis divides)."""
    return opt_ratio * param_bytes / num_devices


def gather_time(cluster: ClusterSpec, nodes: int, axis_names, mesh_shape, params, specs) -> float:
    """Seconds of the per-step all-gathers: each parameter leaf (shape, bytes) from its
    ``zero_spec`` back to ``spec`` over the added axes, on the stage's logical mesh
    (``nodes`` × the cluster's devices per node)."""
    mesh = mesh_model(cluster, nodes, tuple(mesh_shape))
    sizes = dict(zip(axis_names, mesh_shape))
    index = {a: k for k, a in enumerate(axis_names)}
    total = 0.0
    for (shape, nbytes), spec in zip(params, specs):
        axes = added_axes(spec, zero_spec(shape, spec, sizes))
        if axes:
            total += collective_time(mesh, ALL_GATHER, tuple(sorted(index[a] for a in axes)),
                                     nbytes / shard_factor(spec, sizes))
    return total


__all__ = ["ZERO_OPTIONS", "zero_options", "zero_spec", "added_axes", "optimizer_bytes", "reserved_bytes",
           "gather_time"]
