"""conv_general_dilated: each mesh axis splits the batch, the output channels, or the input
channels (contracted: partial sums → all-reduce), or nothing. Grouped convs: batch only."""
from __future__ import annotations

import itertools
import math

from cost import MeshModel

from ..graph import Node
from .base import Strategy, live_axes, register, spec_name


@register("conv_general_dilated")
def conv_rule(node: Node, mesh: MeshModel) -> list[Strategy]:
    lhs, rhs = node.operands[:2]
    out = node.outputs[0]
    dn = node.params["dimension_numbers"]
    lspec_dims, rspec_dims, ospec_dims = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    grouped = node.params.get("feature_group_count", 1) > 1 or node.params.get("batch_group_count", 1) > 1
    # role: (lhs dim, rhs dim, out dim, size, contracted)
    roles = [(lspec_dims[0], None, ospec_dims[0], lhs.shape[lspec_dims[0]], False)]
    if not grouped:
        roles.append((None, rspec_dims[0], ospec_dims[1], rhs.shape[rspec_dims[0]], False))
        roles.append((lspec_dims[1], rspec_dims[1], None, lhs.shape[lspec_dims[1]], True))
    if node.params.get("batch_group_count", 1) > 1:
        roles = []
    axes = live_axes(mesh.shape)
    res = []
    for assign in itertools.product([None, *range(len(roles))], repeat=len(axes)):
        per = [[] for _ in roles]
        for ax, r in zip(axes, assign):
            if r is not None:
                per[r].append(ax)
        if any(roles[r][3] % math.prod(mesh.shape[a] for a in per[r]) for r in range(len(roles))):
            continue
        ls, rs, os_ = [()] * len(lhs.shape), [()] * len(rhs.shape), [()] * len(out.shape)
        contracted = []
        for r, (ld, rd, od, _, c) in enumerate(roles):
            t = tuple(per[r])
            if ld is not None:
                ls[ld] = t
            if rd is not None:
                rs[rd] = t
            if od is not None:
                os_[od] = t
            if c:
                contracted.extend(per[r])
        comm = ()
        if contracted:
            local = out.nbytes / math.prod(mesh.shape[a] for s in os_ for a in s)
            comm = (("all-reduce", tuple(sorted(contracted)), local),)
        work = math.prod(mesh.shape[a] for p in per for a in p)
        res.append(Strategy(f"{spec_name(ls)}x{spec_name(rs)}" + ("-allreduce" if comm else ""),
                            (tuple(os_),), (tuple(ls), tuple(rs)), comm, work))
    return res
