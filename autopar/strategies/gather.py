"""gather / scatter-add (embedding lookups and their gradients).

gather, per mesh axis: split an index batch dim (output batch dim follows, table
replicated), a passthrough dim of the table (full-size slices; output offset dim follows),
or the indexed (vocab) dim of the table (vocab-parallel: masked local lookup, then an
all-reduce of the output). scatter-add is the transpose: split an update batch dim
(partial sums → all-reduce), a window dim, or the indexed dim of the operand.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from autopar.cost import ALL_REDUCE, MeshModel, shard_factor

from .base import Fallback, Strategy, role_assignments, spec_name, specs_from_roles
from .registry import register

if TYPE_CHECKING:
    from ..graph import Node


@register("gather")
def gather_rule(node: Node, mesh: MeshModel) -> list[Strategy]:
    operand, indices = node.operands[:2]
    out = node.outputs[0]
    dn = node.params["dimension_numbers"]
    sizes = node.params["slice_sizes"]
    idx_batch = list(range(len(indices.shape) - 1))
    out_batch = [d for d in range(len(out.shape)) if d not in dn.offset_dims]
    op_offset = [d for d in range(len(operand.shape))
                 if d not in dn.collapsed_slice_dims and d not in dn.operand_batching_dims]
    if len(out_batch) != len(idx_batch) or len(op_offset) != len(dn.offset_dims):
        raise Fallback("gather dims not understood: replicated")
    paired = dict(zip(dn.start_indices_batching_dims, dn.operand_batching_dims))  # take_along_axis
    roles = []  # (size, (operand dim, indices dim, out dim), vocab)
    for i, od in zip(idx_batch, out_batch):
        roles.append((indices.shape[i], (paired.get(i), i, od), False))
    for d, od in zip(op_offset, dn.offset_dims):
        if sizes[d] == operand.shape[d]:
            roles.append((operand.shape[d], (d, None, od), False))
    if len(dn.start_index_map) == 1 and dn.start_index_map[0] in dn.collapsed_slice_dims:
        roles.append((operand.shape[dn.start_index_map[0]], (dn.start_index_map[0], None, None), True))
    ranks = (len(operand.shape), len(indices.shape), len(out.shape))
    rest = tuple(None if not hasattr(o, "id") else ((),) * len(o.shape) for o in node.operands[2:])
    res = []
    for per in role_assignments([r[0] for r in roles], mesh.shape):
        ospec, ispec, outspec = specs_from_roles(ranks, [r[1] for r in roles], per)
        vocab = tuple(sorted(a for r, axes in zip(roles, per) if r[2] for a in axes))
        comm = ()
        if vocab:
            local = out.nbytes / shard_factor(outspec, mesh.shape)
            comm = ((ALL_REDUCE.name, vocab, local),)
        res.append(Strategy(spec_name(ospec) + "[" + spec_name(ispec) + "]" + ("-vocab" if vocab else ""),
                            (outspec,), (ospec, ispec) + rest, comm))
    return res


@register("scatter-add", "scatter_add")
def scatter_add_rule(node: Node, mesh: MeshModel) -> list[Strategy]:
    operand, indices, updates = node.operands[:3]
    out = node.outputs[0]
    dn = node.params["dimension_numbers"]
    if not hasattr(updates, "id"):
        raise Fallback("scatter-add of literal updates: replicated")
    upd_scatter = [d for d in range(len(updates.shape)) if d not in dn.update_window_dims]
    idx_batch = list(range(len(indices.shape) - 1))
    op_window = [d for d in range(len(operand.shape))
                 if d not in dn.inserted_window_dims and d not in dn.operand_batching_dims]
    if len(upd_scatter) != len(idx_batch) or len(op_window) != len(dn.update_window_dims):
        raise Fallback("scatter-add dims not understood: replicated")
    paired = dict(zip(dn.scatter_indices_batching_dims, dn.operand_batching_dims))
    roles = []  # (size, (operand/out dim, indices dim, updates dim), kind)
    for i, ud in zip(idx_batch, upd_scatter):
        # a batching pair writes only its own operand slice: no partial sums
        roles.append((updates.shape[ud], (paired.get(i), i, ud), "paired" if i in paired else "batch"))
    for d, ud in zip(op_window, dn.update_window_dims):
        if updates.shape[ud] == operand.shape[d]:
            roles.append((operand.shape[d], (d, None, ud), "window"))
    if len(dn.scatter_dims_to_operand_dims) == 1 and dn.scatter_dims_to_operand_dims[0] in dn.inserted_window_dims \
            and math.prod(updates.shape[d] for d in upd_scatter) > 1:
        # not for a single index: XLA (CPU, jax 0.10) turns that scatter into a dynamic-update-slice
        # and, when the operand's split comes from a replicated value, writes the update into every
        # shard at the local offset (wrong result; tests/test_fuzz.py regression)
        roles.append((operand.shape[dn.scatter_dims_to_operand_dims[0]],
                      (dn.scatter_dims_to_operand_dims[0], None, None), "indexed"))
    ranks = (len(operand.shape), len(indices.shape), len(updates.shape))
    res = []
    for per in role_assignments([r[0] for r in roles], mesh.shape):
        ospec, ispec, uspec = specs_from_roles(ranks, [r[1] for r in roles], per)
        partial = tuple(sorted(a for r, axes in zip(roles, per) if r[2] == "batch" for a in axes))
        comm = ()
        if partial:
            local = out.nbytes / shard_factor(ospec, mesh.shape)
            comm = ((ALL_REDUCE.name, partial, local),)
        res.append(Strategy(spec_name(ospec) + "[" + spec_name(uspec) + "]" + ("-allreduce" if partial else ""),
                            (ospec,), (ospec, ispec, uspec), comm))
    return res
