"""Strategy type, spec enumeration and the helpers rules share.

A spec gives, per tensor dim, the sorted tuple of mesh axes that dim is split over.
A rule maps a node on a mesh to its list of :class:`Strategy`; ``registry.STRATEGY_RULES``
is keyed by primitive name; anything missing gets :func:`replicated_rule`, and so does a
node whose rule raises :class:`Fallback` (both counted in the report).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from autopar.cost import ALL_REDUCE, CollectiveOp, MeshModel, Spec, axes_size, shard_factor

from ..trace import Lit

if TYPE_CHECKING:
    from ..graph import Node


@dataclass(frozen=True)
class Strategy:
    name: str
    out_specs: tuple[Spec, ...]
    in_specs: tuple[Spec | None, ...]     # per operand; None for literals
    comm: tuple[CollectiveOp, ...] = ()   # collectives inside the op (partial sums)
    work_div: int | None = None           # devices sharing the work (default: max shard factor)
    temp_bytes: float = 0.0               # local scratch live only during the op (attention's S×S scores)


def replicate(rank: int) -> Spec:
    return ((),) * rank


def live_axes(mesh_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(a for a, n in enumerate(mesh_shape) if n > 1)


@lru_cache(maxsize=4096)
def enumerate_specs(shape: tuple[int, ...], mesh_shape: tuple[int, ...],
                    allowed_dims: frozenset | None = None) -> tuple[Spec, ...]:
    """Every spec of ``shape``: each mesh axis unused or on one dim that its size divides."""
    axes = live_axes(mesh_shape)
    dims = [d for d in range(len(shape)) if allowed_dims is None or d in allowed_dims]
    out = []
    for assign in itertools.product([None, *dims], repeat=len(axes)):
        per_dim = [[] for _ in shape]
        for a, d in zip(axes, assign):
            if d is not None:
                per_dim[d].append(a)
        if all(shape[d] % axes_size(per_dim[d], mesh_shape) == 0 for d in range(len(shape))):
            out.append(tuple(tuple(p) for p in per_dim))
    return tuple(out)


def role_assignments(sizes, mesh_shape):
    """Every way to give each live mesh axis to one *role* (a group of tensor dims split
    together, e.g. a contracting pair) or to none, such that each role's size is divisible
    by the product of its axes. Yields one axis tuple per role."""
    axes = live_axes(mesh_shape)
    for assign in itertools.product([None, *range(len(sizes))], repeat=len(axes)):
        per = [[] for _ in sizes]
        for ax, r in zip(axes, assign):
            if r is not None:
                per[r].append(ax)
        if all(sizes[r] % axes_size(per[r], mesh_shape) == 0 for r in range(len(sizes))):
            yield [tuple(p) for p in per]


def specs_from_roles(ranks, role_dims, per) -> list[Spec]:
    """Specs of several tensors: ``role_dims[r][t]`` is the dim of tensor t that role r
    splits (None: that tensor has no such dim); ``per[r]`` the role's mesh axes."""
    specs = [[()] * rank for rank in ranks]
    for dims, axes in zip(role_dims, per):
        for t, d in enumerate(dims):
            if d is not None:
                specs[t][d] = axes
    return [tuple(sp) for sp in specs]


def partial_sum_all_reduces(reduced_axes, nbytes: float) -> tuple[CollectiveOp, ...]:
    """The all-reduces of partial sums whose reduced dims are split over ``reduced_axes`` (the
    mesh axes of each reduced dim, in dim order), ``nbytes`` the reduced local buffer: XLA's
    partitioner emits one all-reduce per split dim (the last dim's first), each of the whole
    buffer, not one over all their axes (measured on a (2, 4) mesh: a sum over dims split on
    x and y is an all-reduce over y, then one over x; tests/test_fuzz.py)."""
    return tuple((ALL_REDUCE.name, tuple(sorted(axes)), nbytes) for axes in reversed(list(reduced_axes)) if axes)


def spec_name(spec: Spec) -> str:
    """Alpa-style short name: R = replicated dim, S01 = split over axes 0 and 1."""
    return "".join("R" if not axes else "S" + "".join(map(str, axes)) for axes in spec) or "scalar"


def local_nbytes(value, spec: Spec | None, mesh_shape) -> float:
    if spec is None or isinstance(value, Lit):
        return 0.0
    return value.nbytes / shard_factor(spec, mesh_shape)


def replicated_rule(node: Node, mesh: MeshModel) -> list[Strategy]:
    ins = tuple(None if isinstance(o, Lit) else replicate(len(o.shape)) for o in node.operands)
    outs = tuple(replicate(len(v.shape)) for v in node.outputs)
    return [Strategy("replicated", outs, ins)]


class Fallback(Exception):
    """Raised by a rule that cannot split its node: the node is planned replicated and the
    message (the reason) is listed among the report's fallback ops. A rule must never return
    ``replicated_rule`` silently: that hides a needless all-gather from the report."""


def follow_output(node: Node, mesh: MeshModel, allowed_dims=None, label="") -> list[Strategy]:
    """Elementwise-style: the output's spec on every operand and output of its rank.

    Dims outside ``allowed_dims`` stay unsplit and may differ in size between the operands
    and the output (pad, concatenate, windowed reductions); on the others an operand either
    has the output's size (it gets the output's split) or size 1 (broadcast: unsplit).
    Scalars are replicated, literals take no spec. Anything else raises :class:`Fallback`.
    """
    out_shape = tuple(node.outputs[0].shape)
    rank = len(out_shape)
    free = set(range(rank)) if allowed_dims is None else set(allowed_dims)

    def fits(shape, size_one_ok):
        return len(shape) == rank and all(
            d not in free or a == b or (size_one_ok and a == 1) for d, (a, b) in enumerate(zip(shape, out_shape)))

    for o in node.operands:
        if not isinstance(o, Lit) and len(o.shape) and not fits(tuple(o.shape), True):
            raise Fallback("operand shape does not follow the output: replicated")
    for v in node.outputs[1:]:
        if len(v.shape) and not fits(tuple(v.shape), False):
            raise Fallback("outputs of different shapes: replicated")
    res = []
    for spec in enumerate_specs(out_shape, mesh.shape, None if allowed_dims is None else frozenset(free)):
        ins = tuple(None if isinstance(o, Lit) else
                    tuple(s if a == b else () for s, a, b in zip(spec, o.shape, out_shape)) for o in node.operands)
        outs = tuple(tuple(s if a == b else () for s, a, b in zip(spec, v.shape, out_shape))
                     for v in node.outputs)
        res.append(Strategy(label + spec_name(spec), outs, ins))
    return res
