"""Mesh-axis factors and the reshard states built from them (the data ``cost.reshard_replay``
steps through).

A *factor* ``(axis, stride, size)`` is the digit ``(index // stride) % size`` of a device's
index along mesh ``axis``; a whole axis of size n is ``(axis, 1, n)``. An all-to-all may split
an axis, so the part of size k of an axis is a factor of its own. A :class:`State` is the list
of factors on each tensor dim (major to minor) plus the replicated factors, major first;
the dim's tile count is the product of its factors' sizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from .spec import Spec

Factor = tuple[int, int, int]


def norm_factors(factors) -> tuple[Factor, ...]:
    """Merge neighbouring factors of one axis (major (a, s·k, m), minor (a, s, k)) into one."""
    out: list[Factor] = []
    for f in factors:
        if f[2] == 1:
            continue
        if out and out[-1][0] == f[0] and out[-1][1] == f[1] * f[2]:
            a, _, m = out.pop()
            f = (a, f[1], m * f[2])
        out.append(f)
    return tuple(out)


def factors_size(factors) -> int:
    """Devices the factors span: ∏ size."""
    n = 1
    for f in factors:
        n *= f[2]
    return n


def split_factors(factors, major: int):
    """Split a factor list into a major part of ``major`` devices and the minor rest, or None."""
    head, rest = [], list(factors)
    while major > 1:
        if not rest:
            return None
        a, s, n = rest.pop(0)
        if major >= n:
            if major % n:
                return None
            head.append((a, s, n))
            major //= n
        else:
            if n % major:
                return None
            head.append((a, s * (n // major), major))
            rest.insert(0, (a, s, n // major))
            major = 1
    return norm_factors(head), norm_factors(rest)


@dataclass(frozen=True)
class State:
    """A tensor's layout as factors: per dim, and replicated."""

    dims: tuple[tuple[Factor, ...], ...]
    rep: tuple[Factor, ...]      # replicated factors, major first
    group: int = 1               # devices per tile held by grouping (rule 7), for the bytes

    def __post_init__(self):  # the counts the replay asks for again and again, once (not fields)
        sizes = tuple(factors_size(d) for d in self.dims)
        object.__setattr__(self, "_sizes", sizes)
        object.__setattr__(self, "_tiles", math.prod(sizes))
        object.__setattr__(self, "_partial", self._tiles != 1 and factors_size(self.rep) > 1)

    def sizes(self):
        return self._sizes

    def tiles(self):
        return self._tiles

    def replicated(self):
        return self._tiles == 1

    def partial(self):
        return self._partial

    def with_dims(self, dims, rep):
        return State(tuple(norm_factors(d) for d in dims), norm_factors(rep), self.group)


@lru_cache(maxsize=1 << 16)
def state_of(spec: Spec, mesh_shape) -> State:
    dims = tuple(norm_factors((a, 1, mesh_shape[a]) for a in axes) for axes in spec)
    used = {a for axes in spec for a in axes}
    rep = norm_factors((a, 1, n) for a, n in enumerate(mesh_shape) if a not in used)
    return State(dims, rep)


def axes_of(factor_lists) -> tuple[int, ...]:
    """The mesh axes the factor lists touch, sorted."""
    return tuple(sorted({f[0] for fl in factor_lists for f in fl}))
