"""dot_general: every mesh axis splits one role — a batch dim, an lhs free dim, an rhs free
dim, or a contracting dim pair (partial sums → all-reduce, or reduce-scatter onto an
output dim) — or nothing.
"""
from __future__ import annotations

import itertools
import math

from cost import MeshModel

from ..graph import Node
from .base import Strategy, live_axes, register, spec_name


def _roles(lhs_rank, rhs_rank, dn):
    (lc, rc), (lb, rb) = dn
    lfree = [d for d in range(lhs_rank) if d not in lc and d not in lb]
    rfree = [d for d in range(rhs_rank) if d not in rc and d not in rb]
    return list(lc), list(rc), list(lb), list(rb), lfree, rfree


@register("dot_general")
def dot_general_rule(node: Node, mesh: MeshModel) -> list[Strategy]:
    lhs, rhs = node.operands[:2]
    out = node.outputs[0]
    lc, rc, lb, rb, lfree, rfree = _roles(len(lhs.shape), len(rhs.shape), node.params["dimension_numbers"])
    # role -> (lhs dim or None, rhs dim or None, out dim or None, size)
    roles = []
    nb = len(lb)
    for i, (a, b) in enumerate(zip(lb, rb)):
        roles.append(("b", a, b, i, lhs.shape[a]))
    for j, a in enumerate(lfree):
        roles.append(("l", a, None, nb + j, lhs.shape[a]))
    for k, b in enumerate(rfree):
        roles.append(("r", None, b, nb + len(lfree) + k, rhs.shape[b]))
    for a, b in zip(lc, rc):
        roles.append(("c", a, b, None, lhs.shape[a]))
    axes = live_axes(mesh.shape)
    res = []
    seen = set()
    for assign in itertools.product([None, *range(len(roles))], repeat=len(axes)):
        per_role = [[] for _ in roles]
        for ax, r in zip(axes, assign):
            if r is not None:
                per_role[r].append(ax)
        if any(roles[r][4] % math.prod(mesh.shape[a] for a in per_role[r]) for r in range(len(roles))):
            continue
        lspec = [()] * len(lhs.shape)
        rspec = [()] * len(rhs.shape)
        ospec = [()] * len(out.shape)
        contracted = []
        for r, (kind, ld, rd, od, _) in enumerate(roles):
            t = tuple(per_role[r])
            if ld is not None:
                lspec[ld] = t
            if rd is not None:
                rspec[rd] = t
            if od is not None:
                ospec[od] = t
            if kind == "c":
                contracted.extend(per_role[r])
        contracted = tuple(sorted(contracted))
        ins = (tuple(lspec), tuple(rspec))
        work = math.prod(mesh.shape[a] for a in axes if a in {x for p in per_role for x in p})
        if not contracted:
            res.append(Strategy(f"{spec_name(ins[0])}x{spec_name(ins[1])}", (tuple(ospec),), ins, (), work))
            continue
        out_local = out.nbytes / math.prod(mesh.shape[a] for s in ospec for a in s)
        base = f"{spec_name(ins[0])}x{spec_name(ins[1])}"
        res.append(Strategy(base + "-allreduce", (tuple(ospec),), ins,
                            (("all-reduce", contracted, out_local),), work))
        p = math.prod(mesh.shape[a] for a in contracted)
        for d in range(len(out.shape)):
            local_d = out.shape[d] // math.prod(mesh.shape[a] for a in ospec[d])
            if local_d % p == 0 and local_d >= p:
                rs = list(ospec)
                rs[d] = tuple(sorted(ospec[d] + contracted))
                key = (tuple(rs), ins)
                if key in seen:
                    continue
                seen.add(key)
                res.append(Strategy(base + f"-reducescatter{d}", (tuple(rs),), ins,
                                    (("reduce-scatter", contracted, out_local),), work))
    return res
