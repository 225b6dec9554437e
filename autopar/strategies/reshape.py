"""reshape: dims are grouped (split / merge); a split of a group's major output dim maps to
its major input dim; splits of minor dims cannot be expressed on the input, so the input
is gathered along them and the output sliced locally."""
from __future__ import annotations

from typing import TYPE_CHECKING

from autopar.cost import MeshModel, axes_size

from .base import Fallback, Strategy, enumerate_specs, spec_name
from .registry import register

if TYPE_CHECKING:
    from ..graph import Node


def dim_groups(in_shape, out_shape):
    """[(in dims, out dims)] with equal products, in order; None if not decomposable."""
    groups, i, j = [], 0, 0
    while i < len(in_shape) or j < len(out_shape):
        gi, go, pi, po = [], [], 1, 1
        if i < len(in_shape):
            gi.append(i); pi *= in_shape[i]; i += 1
        if j < len(out_shape):
            go.append(j); po *= out_shape[j]; j += 1
        while pi != po:
            if pi < po and i < len(in_shape):
                gi.append(i); pi *= in_shape[i]; i += 1
            elif po < pi and j < len(out_shape):
                go.append(j); po *= out_shape[j]; j += 1
            else:
                return None
        groups.append((gi, go))
    return groups


@register("reshape")
def reshape_rule(node: Node, mesh: MeshModel) -> list[Strategy]:
    x, out = node.operands[0], node.outputs[0]
    if node.params.get("dimensions") is not None:
        raise Fallback("reshape with dimensions (a transpose first): replicated")
    groups = dim_groups(x.shape, out.shape)
    if groups is None:
        raise Fallback("reshape not decomposable into dim groups: replicated")
    res = []
    for spec in enumerate_specs(out.shape, mesh.shape):
        in_spec = [()] * len(x.shape)
        for gi, go in groups:
            major_in = next((d for d in gi if x.shape[d] > 1), None)
            major_out = next((d for d in go if out.shape[d] > 1), None)
            if major_in is None or major_out is None:
                continue
            axes = spec[major_out]
            if axes and x.shape[major_in] % axes_size(axes, mesh.shape) == 0:
                in_spec[major_in] = axes
        res.append(Strategy(spec_name(spec), (spec,), (tuple(in_spec),)))
    return res
