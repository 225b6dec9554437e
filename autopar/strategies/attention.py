"""Fused attention (``autopar.attention``): ``dot_product_attention`` and its backward.

Per mesh axis one role: the batch dim, the kv-head dim (GQA: query heads n = kv head ·
group + g, so a block split of the K kv heads is a block split of the N query heads; the
axes must divide K), or — forward only — the query sequence dim (each shard attends its
queries to the whole k/v: no collective). Never the head_dim (a contraction: partial sums
of the scores) or the kv sequence (a softmax over a split dim): those would need
collectives inside the kernel, so they are not offered; the backward does not split the
query sequence either (dk/dv would be partial sums). A mask follows q's batch / head /
sequence split on its dims of full size.

Memory: on a GPU cluster (``MeshModel.device_kind``) the op is costed flash-style — no
S×S buffer; elsewhere (the XLA implementation on CPU) the local S×S scores are scratch live
during the op (``Strategy.temp_bytes``; twice that in the backward: scores and their grad).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from autopar.cost import MeshModel, shard_factor

from ..trace import Lit
from .base import Fallback, Strategy, role_assignments, spec_name
from .registry import register

if TYPE_CHECKING:
    from ..graph import Node

FWD, BWD = "dot_product_attention", "dot_product_attention_bwd"


def attention_flops(params: dict, operands: list, outputs: list) -> float:
    """QKᵀ and PV: 2·B·N·T·S·(H + Hv) (= 4·B·N·T·S·H)."""
    (b, t, n, h), s, hv = operands[0].shape, operands[1].shape[1], operands[2].shape[-1]
    return 2.0 * b * n * t * s * (h + hv)


def attention_bwd_flops(params: dict, operands: list, outputs: list) -> float:
    """Five matmuls (the scores recomputed): 2.5 × the forward's."""
    return 2.5 * attention_flops(params, operands, outputs)


@register(BWD, flops=attention_bwd_flops)
@register(FWD, flops=attention_flops)
def attention_rule(node: Node, mesh: MeshModel) -> list[Strategy]:
    bwd = node.name == BWD
    q, k, v = node.operands[:3]
    n_mask = len(node.operands) - (5 if bwd else 3)
    mask = node.operands[3] if n_mask else None
    if any(isinstance(o, Lit) for o in node.operands[:3]) or len(q.shape) != 4:
        raise Fallback("attention of literal or non-4D operands: replicated")
    b, t, n, _ = q.shape
    s, kh = k.shape[1], k.shape[2]
    roles = [("batch", b, 0), ("heads", kh, 2)] + ([] if bwd else [("qseq", t, 1)])
    mask_dim = {"batch": (0, b), "heads": (1, n), "qseq": (2, t)}
    res = []
    for per in role_assignments([r[1] for r in roles], mesh.shape):
        qs, kvs = [()] * 4, [()] * 4
        ms = [()] * 4 if mask is not None else None
        for (role, _, d), axes in zip(roles, per):
            qs[d] = axes
            if role != "qseq":
                kvs[d] = axes
            if ms is not None and not isinstance(mask, Lit):
                md, size = mask_dim[role]
                if mask.shape[md] == size:
                    ms[md] = axes
                elif axes and mask.shape[md] != 1:
                    break
        else:
            qs, kvs = tuple(qs), tuple(kvs)
            mspec = () if mask is None else (None if isinstance(mask, Lit) else tuple(ms),)
            factor = shard_factor(per, mesh.shape)
            temp = 0.0 if mesh.device_kind == "gpu" else b * n * t * s * q.itemsize / factor * (2 if bwd else 1)
            if bwd:
                ins, outs = (qs, kvs, kvs) + mspec + (qs, qs), (qs, kvs, kvs)
            else:
                ins, outs = (qs, kvs, kvs) + mspec, (qs,)
            label = "/".join(f"{r[0]}:{''.join(map(str, a))}" for r, a in zip(roles, per) if a) or "replicated"
            impl = node.params.get("implementation")
            res.append(Strategy(f"{spec_name(qs)}[{label}]" + (f" ({impl})" if impl else ""), outs, ins, (),
                                factor, temp))
    return res
