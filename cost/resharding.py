"""Cost of converting a tensor from one sharding to another, as XLA's SPMD partitioner does it.

A sharding ("spec", ``cost.spec``) is a tuple with one entry per tensor dim: the tuple of
mesh axes that dim is split over (``()`` = not split), major to minor. Axes not named
anywhere replicate the tensor. The collectives come from replaying XLA's decision sequence
(``cost.reshard_replay``, whose docstring lists the rules and how they were measured).
"""
from __future__ import annotations

import math
from functools import lru_cache

from .comm import CollectiveOp, MeshModel, collective_time
from .mesh_factors import axes_of, state_of
from .reshard_replay import Replay
from .spec import Spec


@lru_cache(maxsize=1 << 18)
def resharding(mesh: MeshModel, shape: tuple[int, ...], itemsize: int, src: Spec, dst: Spec,
               boundary: bool = False) -> tuple[float, tuple[CollectiveOp, ...]]:
    """(seconds, collectives) to turn a tensor sharded as ``src`` into ``dst`` (rules: ``cost.reshard_replay``).

    ``boundary``: the reshard happens between jit's ``in_shardings`` and ``out_shardings``
    (no sharding constraint in between), where XLA also takes rules 6b and 6d to a partly
    replicated target; the default prices a reshard at a ``with_sharding_constraint``,
    which is how plans are emitted."""
    if src == dst:
        return 0.0, ()
    full = math.prod(shape) * itemsize
    seconds, colls = 0.0, []
    for kind, axes, divisor in _replayed(mesh.shape, tuple(shape), src, dst, boundary):
        nbytes = full / divisor
        seconds += collective_time(mesh, kind, axes, nbytes)
        colls.append((kind, axes, nbytes))
    return seconds, tuple(colls)


@lru_cache(maxsize=1 << 18)
def _replayed(mesh_shape: tuple[int, ...], shape: tuple[int, ...], src: Spec, dst: Spec,
              boundary: bool) -> tuple[tuple[str, tuple[int, ...], int], ...]:
    """The collectives of the reshard as (kind, mesh axes, divisor of the full bytes): the
    same on every mesh of this shape and for every dtype (only the pricing differs)."""
    _, ops = Replay(shape, boundary).reshard(state_of(src, mesh_shape), state_of(dst, mesh_shape))
    return tuple((kind, axes_of(factors), divisor) for kind, factors, divisor in ops if axes_of(factors))
