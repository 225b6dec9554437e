"""Cost of converting a tensor from one sharding to another.

A sharding ("spec") is a tuple with one entry per tensor dim: the tuple of mesh axes that
dim is split over (``()`` = not split). Axes not named anywhere replicate the tensor.

Conversion, in the cheapest order: axes only in the target slice locally (free); axes
that move between dims are all-to-alls; axes only in the source are gathered in one
all-gather over all of them.
"""
from __future__ import annotations

import math
from functools import lru_cache

from .comm import MeshModel, collective_time

Spec = tuple[tuple[int, ...], ...]
Collective = tuple[str, tuple[int, ...], float]  # (kind, mesh axes, bytes as in cost.comm)


def local_shape(shape: tuple[int, ...], spec: Spec, mesh_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n // math.prod(mesh_shape[a] for a in axes) for n, axes in zip(shape, spec))


def shard_factor(spec: Spec, mesh_shape: tuple[int, ...]) -> int:
    return math.prod(mesh_shape[a] for axes in spec for a in axes)


def _axis_dims(spec: Spec) -> dict[int, int]:
    return {a: d for d, axes in enumerate(spec) for a in axes}


@lru_cache(maxsize=1 << 18)
def resharding(mesh: MeshModel, shape: tuple[int, ...], itemsize: int, src: Spec, dst: Spec
               ) -> tuple[float, tuple[Collective, ...]]:
    """(seconds, collectives) to turn a tensor sharded as ``src`` into ``dst``.

    Within a dim, axes are major-to-minor: a dim split over ``(y,)`` holds contiguous halves,
    over ``(x, y)`` blocks ordered by x then y. Extra axes can be sliced locally only when the
    source's axes on that dim are a prefix of the target's; otherwise the shards have to be
    permuted between devices (one collective-permute of the target-sized shard).

    XLA's SPMD partitioner cannot move an axis to another dim when minor axes of its source
    dim are dropped (``(x, y)`` on dim 0 → ``x`` on dim 2): it replicates the whole tensor
    (one all-gather over every source axis, "Involuntary full rematerialization") and slices;
    priced as that (measured in tests/test_resharding_hlo.py).
    """
    if src == dst:
        return 0.0, ()
    full = math.prod(shape) * itemsize
    where_src, where_dst = _axis_dims(src), _axis_dims(dst)
    factor = math.prod(mesh.shape[a] for a in where_src)
    # slices first: axes only in dst shrink the local buffer for free
    for a in where_dst:
        if a not in where_src:
            factor *= mesh.shape[a]
    if _full_rematerialization(src, where_src, where_dst):
        axes = tuple(sorted(where_src))
        return collective_time(mesh, "all-gather", axes, full), (("all-gather", axes, full),)
    seconds, colls = 0.0, []
    for a, d in sorted(where_src.items()):
        if a in where_dst and where_dst[a] != d:
            nbytes = full / factor
            seconds += collective_time(mesh, "all-to-all", (a,), nbytes)
            colls.append(("all-to-all", (a,), nbytes))
    gathered = tuple(sorted(a for a in where_src if a not in where_dst))
    if gathered:
        factor //= math.prod(mesh.shape[a] for a in gathered)
        nbytes = full / factor
        seconds += collective_time(mesh, "all-gather", gathered, nbytes)
        colls.append(("all-gather", gathered, nbytes))
    kept = [a for a in where_src if where_dst.get(a) == where_src[a]]
    misplaced = {a for a in kept if not _in_prefix_position(src, dst, a, where_src[a])}
    misplaced |= _sliced_behind_moved(src, dst, where_src, where_dst)
    misplaced = tuple(sorted(misplaced))
    if misplaced:
        nbytes = full / math.prod(mesh.shape[a] for axes in dst for a in axes)
        seconds += collective_time(mesh, "collective-permute", misplaced, nbytes)
        colls.append(("collective-permute", misplaced, nbytes))
    return seconds, tuple(colls)


def _full_rematerialization(src: Spec, where_src: dict[int, int], where_dst: dict[int, int]) -> bool:
    """An axis moves to another dim while an axis minor to it in its source dim is gathered;
    or an axis is gathered from one dim while a new one is sliced on another (measured on
    every spec pair of a 2D tensor on a (2, 4) mesh: XLA replicates, then slices)."""
    gathered = {where_src[a] for a in where_src if a not in where_dst}
    sliced = {where_dst[b] for b in where_dst if b not in where_src}
    if any(g != s for g in gathered for s in sliced):
        return True
    for a, d in where_src.items():
        if a in where_dst and where_dst[a] != d:
            minor = src[d][src[d].index(a) + 1:]
            if any(b not in where_dst for b in minor):
                return True
    return False


def _sliced_behind_moved(src: Spec, dst: Spec, where_src: dict[int, int], where_dst: dict[int, int]) -> set[int]:
    """Axes that XLA leaves in the wrong order: an axis moved to another dim with a new (sliced)
    axis minor to it there. XLA slices first and moves after, so the moved axis ends up minor
    (``(∅, x)`` → ``(x y, ∅)`` comes out as ``(y x, ∅)``) and the shards are permuted back
    (measured: an all-to-all plus a collective-permute of the target shard)."""
    out = set()
    for a, d in where_src.items():
        e = where_dst.get(a)
        if e is not None and e != d:
            behind = [b for b in dst[e][dst[e].index(a) + 1:] if b not in where_src]
            if behind:
                out |= {a, *behind}
    return out


def _in_prefix_position(src: Spec, dst: Spec, axis: int, dim: int) -> bool:
    """Is ``axis`` at the same place in dim ``dim`` of both specs, behind the same axes?"""
    k = src[dim].index(axis)
    return src[dim][:k + 1] == dst[dim][:k + 1]
