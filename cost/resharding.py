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
    plan = Replay(tuple(shape), full, boundary)
    _, ops = plan.reshard(state_of(src, mesh.shape), state_of(dst, mesh.shape))
    seconds, colls = 0.0, []
    for kind, factors, nbytes in ops:
        axes = axes_of(factors)
        if not axes:
            continue
        seconds += collective_time(mesh, kind, axes, nbytes)
        colls.append((kind, axes, nbytes))
    return seconds, tuple(colls)
