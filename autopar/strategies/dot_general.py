"""dot_general: every mesh axis splits one role — a batch dim, an lhs free dim, an rhs free
dim, or a contracting dim pair (partial sums → all-reduce, or reduce-scatter onto an
output dim) — or nothing.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from autopar.cost import REDUCE_SCATTER, MeshModel, axes_size, shard_factor

from .base import Strategy, partial_sum_all_reduces, role_assignments, spec_name, specs_from_roles
from .registry import Fusion, num_elements, register

if TYPE_CHECKING:
    from ..graph import Node


def _roles(lhs_shape, rhs_shape, dn, rhs_unsplit=(), first: int = 0) -> list:
    """A dot's roles, (kind, size, (lhs dim, rhs dim, out dim)): batch pairs, lhs free dims,
    rhs free dims (but ``rhs_unsplit``), contracting pairs; out dims counted from ``first``
    (the output dims before it belong to no role)."""
    (lc, rc), (lb, rb) = dn
    lfree = [d for d in range(len(lhs_shape)) if d not in lc and d not in lb]
    rfree = [d for d in range(len(rhs_shape)) if d not in rc and d not in rb and d not in rhs_unsplit]
    nb = len(lb)
    roles = [("b", lhs_shape[a], (a, b, first + i)) for i, (a, b) in enumerate(zip(lb, rb))]
    roles += [("l", lhs_shape[a], (a, None, first + nb + j)) for j, a in enumerate(lfree)]
    roles += [("r", rhs_shape[b], (None, b, first + nb + len(lfree) + k)) for k, b in enumerate(rfree)]
    return roles + [("c", lhs_shape[a], (a, b, None)) for a, b in zip(lc, rc)]


def dot_flops(params: dict, operands: list, outputs: list) -> float:
    """2 · (output elements) · (contracted size): one multiply and one add per term."""
    (lc, _), _ = params["dimension_numbers"]
    k = math.prod(operands[0].shape[d] for d in lc)
    return 2.0 * num_elements(outputs) * k


# a dot read only by one transpose writes in the transposed layout (jax's weight gradients are
# (xᵀg)ᵀ): the transpose's buffer is the one charged
@register("dot_general", flops=dot_flops, fusion=Fusion(frozenset({"transpose"}), single_consumer=True))
def dot_general_rule(node: Node, mesh: MeshModel) -> list[Strategy]:
    lhs, rhs = node.operands[:2]
    out = node.outputs[0]
    roles = _roles(lhs.shape, rhs.shape, node.params["dimension_numbers"])
    ranks = (len(lhs.shape), len(rhs.shape), len(out.shape))
    res, seen = [], set()
    for per in role_assignments([r[1] for r in roles], mesh.shape):
        lspec, rspec, ospec = specs_from_roles(ranks, [r[2] for r in roles], per)
        contracted = tuple(sorted(a for r, axes in zip(roles, per) if r[0] == "c" for a in axes))
        ins = (lspec, rspec)
        work = shard_factor(per, mesh.shape)
        base = f"{spec_name(lspec)}x{spec_name(rspec)}"
        if not contracted:
            res.append(Strategy(base, (ospec,), ins, (), work))
            continue
        out_local = out.nbytes / shard_factor(ospec, mesh.shape)
        # one all-reduce per split contracting dim (XLA's partitioner), one reduce-scatter in all
        split_c = [axes for r, axes in zip(roles, per) if r[0] == "c"]
        res.append(Strategy(base + "-allreduce", (ospec,), ins, partial_sum_all_reduces(split_c, out_local), work))
        p = axes_size(contracted, mesh.shape)
        for d in range(len(out.shape)):
            local_d = out.shape[d] // axes_size(ospec[d], mesh.shape)
            if local_d % p == 0 and local_d >= p:
                rs = list(ospec)
                rs[d] = ospec[d] + contracted  # scattered axes minor to the dim's own split (XLA's order)
                key = (tuple(rs), ins)
                if key in seen:
                    continue
                seen.add(key)
                res.append(Strategy(base + f"-reducescatter{d}", (tuple(rs),), ins,
                                    ((REDUCE_SCATTER.name, contracted, out_local),), work))
    return res


def _ragged_roles(node: Node):
    """``ragged_dot_general``'s roles as a dot's: (kind, size, (lhs dim, rhs dim, out dim));
    the rhs group dim (one weight per group) is no role, nor is the output's group dim a
    ragged contraction makes (the weight gradient: (groups, free…), out dims after it)."""
    lhs, rhs = node.operands[:2]
    rdn = node.params["ragged_dot_dimension_numbers"]
    lc = rdn.dot_dimension_numbers[0][0]
    first = 1 if any(d in lc for d in rdn.lhs_ragged_dimensions) else 0   # a ragged contraction's group dim
    return _roles(lhs.shape, rhs.shape, rdn.dot_dimension_numbers, rdn.rhs_group_dimensions, first)


def ragged_dot_flops(params: dict, operands: list, outputs: list) -> float:
    """2 · M · K · N: every lhs row meets one group's weight (not all of them)."""
    rdn = params["ragged_dot_dimension_numbers"]
    (_, rc), (_, rb) = rdn.dot_dimension_numbers
    rhs = operands[1]
    n = math.prod(s for d, s in enumerate(rhs.shape) if d not in rc and d not in rb
                  and d not in rdn.rhs_group_dimensions)
    return 2.0 * math.prod(operands[0].shape) * n


@register("ragged_dot_general", flops=ragged_dot_flops)
def ragged_dot_rule(node: Node, mesh: MeshModel) -> list[Strategy]:
    """``jax.lax.ragged_dot`` (a dropless MoE's grouped matmul) and its gradients: every mesh
    axis splits one of a dot's roles — lhs rows (the ragged dim, however the groups fall),
    an lhs or rhs free dim, a contracting pair (partial sums → one all-reduce per split dim)
    — never the groups; the group sizes replicated. XLA's partitioner keeps each of these
    local but the all-reduce (checked in the compiled HLO: tests/test_strategies.py).

    jax lowers ``ragged_dot`` to XLA's grouped matmul on GPU and TPU; elsewhere (CPU) to a
    dense dot of the lhs expanded to every group (G × its bytes as scratch, and the rhs too
    for a ragged contraction; G × the FLOPs: ``build_nodes.ragged_efficiency``)."""
    lhs, rhs, sizes = node.operands[:3]
    out = node.outputs[0]
    roles = _ragged_roles(node)
    rdn = node.params["ragged_dot_dimension_numbers"]
    groups = int(sizes.shape[-1])
    dense = mesh.device_kind == "cpu"
    contracting = any(d in rdn.dot_dimension_numbers[0][0] for d in rdn.lhs_ragged_dimensions)
    ranks = (len(lhs.shape), len(rhs.shape), len(out.shape))
    res = []
    for per in role_assignments([r[1] for r in roles], mesh.shape):
        lspec, rspec, ospec = specs_from_roles(ranks, [r[2] for r in roles], per)
        ins = (lspec, rspec, ((),) * len(sizes.shape))
        work = shard_factor(per, mesh.shape)
        base = f"{spec_name(lspec)}x{spec_name(rspec)}"
        temp = groups * (lhs.nbytes / shard_factor(lspec, mesh.shape) + (
            rhs.nbytes / shard_factor(rspec, mesh.shape) if contracting else 0.0)) if dense else 0.0
        split_c = [axes for r, axes in zip(roles, per) if r[0] == "c"]
        if not any(split_c):
            res.append(Strategy(base, (ospec,), ins, (), work, temp))
            continue
        out_local = out.nbytes / shard_factor(ospec, mesh.shape)
        res.append(Strategy(base + "-allreduce", (ospec,), ins, partial_sum_all_reduces(split_c, out_local), work,
                            temp))
    return res
