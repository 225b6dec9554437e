"""Sharding specs and how many ways they split a tensor: the one place that counts shards.

A spec has one entry per tensor dim: the tuple of mesh axes that dim is split over (``()`` =
not split), major to minor; axes named nowhere replicate the tensor. ``mesh_shape`` is
anything indexed by the spec's axes: the mesh shape (a tuple) for axis indices, a
``{name: size}`` dict for axis names (plans store names).

    axes_size(A)     = ∏_{a ∈ A} mesh_shape[a]                   (ways one dim is split)
    shard_factor(S)  = ∏_{dim} axes_size(S[dim])                 (shards of the tensor)
    local_shape(S)_d = shape_d / axes_size(S[d])
"""
from __future__ import annotations

import math
from functools import lru_cache

Spec = tuple[tuple[int, ...], ...]


def axes_size(axes, mesh_shape) -> int:
    """Devices a dim split over ``axes`` is split across (1 for ``()``)."""
    return math.prod(mesh_shape[a] for a in axes)


def shard_factor(spec, mesh_shape) -> int:
    """Shards of a tensor laid out as ``spec``: the product over its dims of their split."""
    if type(mesh_shape) is tuple and type(spec) is tuple:  # (the planner's hot path: cached)
        try:
            return _shard_factor(spec, mesh_shape)
        except TypeError:  # a dim's axes in a list: not hashable
            pass
    return axes_size((a for axes in spec for a in axes), mesh_shape)


@lru_cache(maxsize=1 << 16)
def _shard_factor(spec: Spec, mesh_shape: tuple[int, ...]) -> int:
    return axes_size((a for axes in spec for a in axes), mesh_shape)


def local_shape(shape: tuple[int, ...], spec: Spec, mesh_shape) -> tuple[int, ...]:
    return tuple(n // axes_size(axes, mesh_shape) for n, axes in zip(shape, spec))
