"""conv_general_dilated: each mesh axis splits the batch, the output channels, or the input
channels (contracted: partial sums → all-reduce), or nothing. Grouped convs: batch only;
XLA's partitioner gathers the operands of a grouped conv that is neither depthwise nor a
1×1 stride-1 window whatever their sharding, so such a conv is planned replicated."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from autopar.cost import ALL_REDUCE, MeshModel, shard_factor

from .base import Fallback, Strategy, role_assignments, spec_name, specs_from_roles
from .registry import num_elements, register

if TYPE_CHECKING:
    from ..graph import Node


def conv_flops(params: dict, operands: list, outputs: list) -> float:
    """2 · (output elements) · (kernel window · input channels)."""
    rhs, rhs_spec = operands[1].shape, params["dimension_numbers"].rhs_spec
    kernel = math.prod(rhs[d] for d in rhs_spec[2:]) * rhs[rhs_spec[1]]
    return 2.0 * num_elements(outputs) * kernel


@register("conv_general_dilated", flops=conv_flops)
def conv_rule(node: Node, mesh: MeshModel) -> list[Strategy]:
    lhs, rhs = node.operands[:2]
    out = node.outputs[0]
    dn = node.params["dimension_numbers"]
    lspec_dims, rspec_dims, ospec_dims = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    groups = node.params.get("feature_group_count", 1)
    grouped = groups > 1 or node.params.get("batch_group_count", 1) > 1
    if 1 < groups < lhs.shape[lspec_dims[1]] and not _pointwise(node, rhs, rspec_dims):
        # measured (CPU, jax 0.10; tests/test_fuzz.py): an all-gather of the whole lhs for a batch
        # split and for a channel split alike; the conv then runs replicated
        raise Fallback("XLA gathers the operands of a grouped (not depthwise) conv: replicated")
    # roles: (size, (lhs dim, rhs dim, out dim), contracted)
    roles = [] if node.params.get("batch_group_count", 1) > 1 else [
        (lhs.shape[lspec_dims[0]], (lspec_dims[0], None, ospec_dims[0]), False)]
    if not grouped:
        roles.append((rhs.shape[rspec_dims[0]], (None, rspec_dims[0], ospec_dims[1]), False))
        roles.append((lhs.shape[lspec_dims[1]], (lspec_dims[1], rspec_dims[1], None), True))
    ranks = (len(lhs.shape), len(rhs.shape), len(out.shape))
    res = []
    for per in role_assignments([r[0] for r in roles], mesh.shape):
        ls, rs, os_ = specs_from_roles(ranks, [r[1] for r in roles], per)
        contracted = tuple(sorted(a for r, axes in zip(roles, per) if r[2] for a in axes))
        comm = ()
        if contracted:
            local = out.nbytes / shard_factor(os_, mesh.shape)
            comm = ((ALL_REDUCE.name, contracted, local),)
        work = shard_factor(per, mesh.shape)
        res.append(Strategy(f"{spec_name(ls)}x{spec_name(rs)}" + ("-allreduce" if comm else ""),
                            (os_,), (ls, rs), comm, work))
    return res


def _pointwise(node: Node, rhs, rspec_dims) -> bool:
    """A 1×1 window, stride 1, no padding or dilation (XLA rewrites it into a dot)."""
    p = node.params
    return (all(rhs.shape[d] == 1 for d in rspec_dims[2:]) and all(s == 1 for s in p["window_strides"])
            and all(tuple(pd) == (0, 0) for pd in p["padding"])
            and all(d == 1 for d in (*p.get("lhs_dilation", ()), *p.get("rhs_dilation", ()))))
