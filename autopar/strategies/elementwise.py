"""Elementwise, reduction and layout primitives (families registered together)."""
from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

from autopar.cost import MeshModel, shard_factor

from ..trace import Lit
from .base import (Fallback, Strategy, enumerate_specs, follow_output, partial_sum_all_reduces,
                   replicate, spec_name)
from .registry import Fusion, operand_elements, register

if TYPE_CHECKING:
    from ..graph import Node

ELEMENTWISE = (
    "add", "add_any", "sub", "mul", "div", "rem", "pow", "integer_pow", "max", "min", "neg", "sign",
    "floor", "ceil", "round", "is_finite", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic",
    "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh",
    "sqrt", "rsqrt", "cbrt", "square", "abs", "erf", "erfc", "erf_inv", "lgamma", "digamma",
    "nextafter", "and", "or", "not", "xor", "eq", "ne", "lt", "le", "gt", "ge", "select_n", "clamp",
    "convert_element_type", "stop_gradient", "copy", "copy_p", "reduce_precision", "real", "imag",
    "conj", "shift_left", "shift_right_logical", "shift_right_arithmetic", "population_count",
    "threefry2x32", "sharding_constraint", "random_fold_in", "stage_boundary",
)
REDUCTIONS = ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
              "reduce_xor")


def def_elementwise(*names: str) -> None:
    """One FLOP per output element (the default)."""
    register(*names)(lambda node, mesh: follow_output(node, mesh))


def def_reduction(*names: str) -> None:
    """One FLOP per operand element."""
    register(*names, flops=operand_elements)(_reduction)


def _reduction(node: Node, mesh: MeshModel) -> list[Strategy]:
    (x,), out = node.operands, node.outputs[0]
    axes = set(node.params["axes"])
    res = []
    for spec in enumerate_specs(x.shape, mesh.shape):
        out_spec = tuple(s for d, s in enumerate(spec) if d not in axes)
        comm = partial_sum_all_reduces([spec[d] for d in sorted(axes)], out.nbytes / shard_factor(out_spec, mesh.shape))
        res.append(Strategy(spec_name(spec) + ("-allreduce" if comm else ""), (out_spec,), (spec,), comm))
    return res


def_elementwise(*ELEMENTWISE)
def_reduction(*REDUCTIONS)


def _prefix(node: Node, mesh: MeshModel, split_tail: bool = False) -> list[Strategy]:
    """One operand whose dims are the leading dims of the output or the other way round
    (bitcast to a narrower / wider type, random_wrap / unwrap, random_bits of batched keys):
    the shared leading dims have one spec; the extra trailing dims stay unsplit, or, with
    ``split_tail``, may be split on the output (each shard generates its own part)."""
    (x,), out = node.operands, node.outputs[0]
    n = min(len(x.shape), len(out.shape))
    if tuple(x.shape[:n]) != tuple(out.shape[:n]) or len(node.outputs) != 1:
        raise Fallback("operand and output share no leading dims: replicated")
    allowed = None if split_tail else frozenset(range(n))
    res = []
    for spec in enumerate_specs(tuple(out.shape), mesh.shape, allowed):
        in_spec = None if isinstance(x, Lit) else tuple(spec[:n]) + ((),) * (len(x.shape) - n)
        res.append(Strategy(spec_name(spec), (spec,), (in_spec,)))
    return res


@register("bitcast_convert_type", "random_wrap", "random_unwrap")
def _bitcast(node: Node, mesh: MeshModel) -> list[Strategy]:
    if node.operands[0].shape == node.outputs[0].shape:
        return follow_output(node, mesh)
    return _prefix(node, mesh)


MAX_COMBINATIONS = 256   # strategies of an optimization_barrier of differently-shaped operands


@register("optimization_barrier")
def _optimization_barrier(node: Node, mesh: MeshModel) -> list[Strategy]:
    """Identity on every operand: output i has operand i's spec. Operands of one shape share
    a spec; otherwise every combination (a product, capped)."""
    if len({tuple(v.shape) for v in node.outputs}) == 1:
        return follow_output(node, mesh)
    choices = [enumerate_specs(tuple(v.shape), mesh.shape) for v in node.outputs]
    if math.prod(map(len, choices)) > MAX_COMBINATIONS:
        raise Fallback("optimization_barrier of many differently-shaped operands: replicated")
    res = []
    for specs in itertools.product(*choices):
        ins = tuple(None if isinstance(o, Lit) else sp for o, sp in zip(node.operands, specs))
        res.append(Strategy("/".join(map(spec_name, specs)), tuple(specs), ins))
    return res


def _keep_dims(node: Node, mesh: MeshModel, frozen: set[int]) -> list[Strategy]:
    """Like elementwise, but dims in ``frozen`` stay unsplit (and may differ in size between
    the operands and the output: the padded / concatenated / windowed dims); every other
    dim has the same split on the operands and the output, so the op is local."""
    rank = len(node.outputs[0].shape)
    return follow_output(node, mesh, frozenset(d for d in range(rank) if d not in frozen))


@register("argmax", "argmin", flops=operand_elements)
def _argminmax(node, mesh):
    (x,), out = node.operands, node.outputs[0]
    axes = set(node.params["axes"])
    res = []
    for spec in enumerate_specs(x.shape, mesh.shape, frozenset(d for d in range(len(x.shape)) if d not in axes)):
        res.append(Strategy(spec_name(spec), (tuple(s for d, s in enumerate(spec) if d not in axes),), (spec,)))
    return res


@register("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", flops=operand_elements)
def _cumulative(node, mesh):
    return _keep_dims(node, mesh, {node.params["axis"]})


@register("sort")
def _sort(node, mesh):
    return _keep_dims(node, mesh, {node.params["dimension"]})


@register("top_k", flops=operand_elements)
def _top_k(node, mesh):
    """Every dim but ``axis`` (the one the k largest are taken along) has the same split on
    the operand and both outputs (values, indices): rows are independent, no collective.
    XLA's SPMD partitioner would all-gather a top_k's operand whatever its sharding (its
    TopK custom call, measured on CPU, jax 0.10), so ``emit.interpret`` runs a split top_k
    per shard under ``shard_map`` (``emit.PER_SHARD``), which compiles to no collective and
    gives jax.jit's values and indices bit for bit. FLOPs: one comparison per operand element."""
    rank = len(node.operands[0].shape)
    return _keep_dims(node, mesh, {node.params.get("axis", rank - 1) % rank})


# read only by elementwise ops / reductions: fused into each consumer (recomputed in the backward)
@register("broadcast_in_dim", fusion=Fusion(frozenset(ELEMENTWISE + REDUCTIONS)))
def _broadcast(node, mesh):
    out = node.outputs[0]
    operand = node.operands[0]
    bdims = node.params["broadcast_dimensions"]
    res = []
    for spec in enumerate_specs(out.shape, mesh.shape):
        if isinstance(operand, Lit):
            in_spec = None
        else:
            in_spec = tuple(spec[od] if operand.shape[i] == out.shape[od] else () for i, od in enumerate(bdims))
        ins = (in_spec,) + tuple(None if isinstance(o, Lit) else replicate(len(o.shape)) for o in node.operands[1:])
        res.append(Strategy(spec_name(spec), (spec,), ins))
    return res


# read only by dots: folded into the dot's dimension numbers
@register("transpose", fusion=Fusion(frozenset({"dot_general"})))
def _transpose(node, mesh):
    perm = node.params["permutation"]
    res = []
    for spec in enumerate_specs(node.outputs[0].shape, mesh.shape):
        in_spec = [()] * len(perm)
        for i, p in enumerate(perm):
            in_spec[p] = spec[i]
        res.append(Strategy(spec_name(spec), (spec,), (tuple(in_spec),)))
    return res


@register("squeeze")
def _squeeze(node, mesh):
    dims = sorted(d % len(node.operands[0].shape) for d in node.params["dimensions"])
    res = []
    for spec in enumerate_specs(node.outputs[0].shape, mesh.shape):
        in_spec = list(spec)
        for d in dims:
            in_spec.insert(d, ())
        res.append(Strategy(spec_name(spec), (spec,), (tuple(in_spec),)))
    return res


@register("expand_dims")
def _expand_dims(node, mesh):
    dims = sorted(node.params["dimensions"])
    res = []
    for spec in enumerate_specs(node.operands[0].shape, mesh.shape):
        out = list(spec)
        for d in dims:
            out.insert(d, ())
        res.append(Strategy(spec_name(spec), (tuple(out),), (spec,)))
    return res


@register("concatenate")
def _concatenate(node, mesh):
    """Every dim but the concatenated one: the same split on all operands and the output."""
    return _keep_dims(node, mesh, {node.params["dimension"]})


@register("split")
def _split(node, mesh):
    axis = node.params["axis"]
    x = node.operands[0]
    res = []
    for spec in enumerate_specs(x.shape, mesh.shape, frozenset(d for d in range(len(x.shape)) if d != axis)):
        res.append(Strategy(spec_name(spec), tuple(spec for _ in node.outputs), (spec,)))
    return res


@register("stack")
def _stack(node, mesh):
    """``jnp.stack`` (RoPE's rotated halves): the new dim ``axis`` stays unsplit; every other
    dim has the same split on each operand and the output (a local copy, no collective)."""
    axis = node.params["axis"]
    res = []
    for spec in enumerate_specs(tuple(node.outputs[0].shape), mesh.shape,
                                frozenset(d for d in range(len(node.outputs[0].shape)) if d != axis)):
        in_spec = spec[:axis] + spec[axis + 1:]
        res.append(Strategy(spec_name(spec), (spec,),
                            tuple(None if isinstance(o, Lit) else in_spec for o in node.operands)))
    return res


@register("unstack")
def _unstack(node, mesh):
    """``jnp.unstack`` (and stack's transpose in a gradient): the removed dim ``axis`` stays
    unsplit on the operand; every other dim has the same split on the operand and each output."""
    axis = node.params["axis"]
    (x,) = node.operands
    res = []
    for spec in enumerate_specs(tuple(x.shape), mesh.shape, frozenset(d for d in range(len(x.shape)) if d != axis)):
        out_spec = spec[:axis] + spec[axis + 1:]
        res.append(Strategy(spec_name(spec), tuple(out_spec for _ in node.outputs), (spec,)))
    return res


@register("pad")
def _pad(node, mesh):
    """Every dim with lo = hi = interior = 0: the same split on the operand and the output
    (the padding value is a scalar, replicated); padded dims stay unsplit."""
    cfg = node.params["padding_config"]
    return _keep_dims(node, mesh, {d for d, (lo, hi, it) in enumerate(cfg) if lo or hi or it})


REDUCE_WINDOWS = ("reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window")
SELECT_AND = ("select_and_scatter_add", "select_and_gather_add", "select_and_scatter")


@register(*SELECT_AND)
@register(*REDUCE_WINDOWS, flops=operand_elements)
def _windowed(node, mesh):
    """Pooling and its gradients: dims with a trivial window (size 1, stride 1, no padding or
    dilation: batch, channels) are split like pad's; windowed dims stay unsplit."""
    p = node.params
    rank = len(p["window_dimensions"])
    trivial = {"window_dimensions": 1, "window_strides": 1, "base_dilation": 1, "window_dilation": 1}
    frozen = {d for d in range(rank)
              if any(p[k][d] != v for k, v in trivial.items() if k in p) or tuple(p["padding"][d]) != (0, 0)}
    return _keep_dims(node, mesh, frozen)


def _changed_dims(a, b) -> set[int]:
    return {d for d, (x, y) in enumerate(zip(a, b)) if x != y}


@register("slice", "rev")
def _slice(node, mesh):
    if node.name == "rev":
        return _keep_dims(node, mesh, set(node.params["dimensions"]))
    frozen = _changed_dims(node.operands[0].shape, node.outputs[0].shape)
    res = []
    x = node.operands[0]
    for spec in enumerate_specs(node.outputs[0].shape, mesh.shape, frozenset(set(range(len(x.shape))) - frozen)):
        res.append(Strategy(spec_name(spec), (spec,), (spec,)))
    return res


@register("dynamic_slice")
def _dynamic_slice(node, mesh):
    x = node.operands[0]
    frozen = _changed_dims(x.shape, node.outputs[0].shape)
    res = []
    for spec in enumerate_specs(x.shape, mesh.shape, frozenset(set(range(len(x.shape))) - frozen)):
        idx = tuple(None if isinstance(o, Lit) else () for o in node.operands[1:])
        res.append(Strategy(spec_name(spec), (spec,), (spec,) + idx))
    return res


@register("dynamic_update_slice")
def _dynamic_update_slice(node, mesh):
    x, upd = node.operands[0], node.operands[1]
    frozen = _changed_dims(x.shape, upd.shape)
    res = []
    for spec in enumerate_specs(x.shape, mesh.shape, frozenset(set(range(len(x.shape))) - frozen)):
        idx = tuple(None if isinstance(o, Lit) else () for o in node.operands[2:])
        upd_spec = None if isinstance(upd, Lit) else spec
        res.append(Strategy(spec_name(spec), (spec,), (spec, upd_spec) + idx))
    return res


@register("iota", "rng_uniform", "full_like")
def _generator(node, mesh):
    """Outputs computed locally per shard; operands (scalars) replicated."""
    out = node.outputs[0]
    ins = tuple(None if isinstance(o, Lit) else replicate(len(o.shape)) for o in node.operands)
    if node.name != "iota" and any(len(o.shape) for o in node.operands if not isinstance(o, Lit)):
        raise Fallback("non-scalar operands: replicated")
    return [Strategy(spec_name(s), (s,), ins) for s in enumerate_specs(out.shape, mesh.shape)]


@register("random_bits", "random_seed")
def _random(node, mesh):
    """The output's leading dims are the keys' (seeds') dims: split alike; the generated
    trailing dims may be split too (each shard generates its part, as for a scalar key)."""
    return _prefix(node, mesh, split_tail=True)
