"""The per-primitive rules of the rows check (``autopar.pipeline.row_form``): the tags an
array may carry — :class:`Rows` (an axis whose index says which row of the batch an element
comes from), ``SUM`` (added up over rows), :class:`Stat` (a nonlinear function of such sums),
:class:`Moved` (rows moved along the batch: reversed, rolled) and :class:`Part` (a slice of
the rows), :class:`Unknown` and :class:`Coupled` (findings), ``None`` (not from the batch) — and, per
structural primitive, the tag of its outputs from its inputs' (``RULES``; elementwise ones by
``ELEMENTWISE`` / ``after``). A rule takes the walk ``w`` for ``w.unknown(eqn)`` (no rule
fits), ``w.couple(eqn, why)`` (rows meet) and ``w.where(eqn)``."""
from __future__ import annotations

import math
from typing import NamedTuple

from ..jaxpr_eval import CALLS as EVAL_CALLS


class Rows(NamedTuple):
    """Along ``axis`` the array holds ``count`` rows of the batch, each a contiguous block."""
    axis: int
    count: int


class Moved(NamedTuple):
    """Along ``axis`` the batch's rows moved along it, first at ``where`` (``x[::-1]``,
    ``jnp.roll`` along the batch): row i holds another row's values — of another row of the
    whole batch, where a micro-batch would move only its own rows. Elementwise with the rows
    in place, rows meet (mixup, shifted negatives); summed over, it is the rows' sum."""
    axis: int
    where: str


class Part(NamedTuple):
    """Along ``axis`` a contiguous part of a rows axis of ``size`` (a slice of the batch,
    first at ``where``): judged only when put back together to ``size`` rows in another order
    (``jnp.roll``: ``Moved``)."""
    axis: int
    size: int
    where: str


class Stat(NamedTuple):
    """A nonlinear function of sums over the rows (a variance, a product of two means),
    first made at ``where``."""
    where: str


class Unknown(NamedTuple):
    """Rows that went through a primitive without a rule (``where``; None: a loop's carry
    the walk could not settle, named by the caller)."""
    where: str | None


class Coupled(NamedTuple):
    """Computed where rows met (``why``, with the primitive and the user's line)."""
    why: str


SUM = "sum"   # a sum (or mean) over the rows of per-row values: additive over micro-batches

ELEMENTWISE = frozenset("""
abs acos acosh add add_any and asin asinh atan atan2 atanh bessel_i0e bessel_i1e cbrt ceil clamp clz complex
conj convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma
igammac imag integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or polygamma
population_count pow real reduce_precision rem round rsqrt select_n shift_left shift_right_arithmetic
shift_right_logical sign sin sinh sqrt square sub tan tanh xor zeta threefry2x32 random_gamma_grad
""".split())
_LINEAR = frozenset("add add_any sub neg convert_element_type copy copy_p reduce_precision".split())
PASS = frozenset("optimization_barrier sharding_constraint mesh_cast reshard stop_gradient stage_boundary".split())
# calls walked into: the evaluator's (pjit, closed_call …) and those with a derivative rule of their own
CALLS = {**EVAL_CALLS, "remat2": "jaxpr", "checkpoint": "jaxpr", "custom_jvp_call": "call_jaxpr",
         "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}
_REDUCE_SUM = frozenset({"reduce_sum"})
_REDUCE_OTHER = frozenset("reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin".split())
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())


def shape_of(v) -> tuple:
    return tuple(getattr(v.aval, "shape", ()))


def gcd_rows(rows) -> Rows | None:
    if len({r.axis for r in rows}) != 1:
        return None
    return Rows(rows[0].axis, math.gcd(*[r.count for r in rows]))


def after(w, eqn, ins, stats):
    """The tag of a primitive's output on sums and statistics (no rows): a sum through linear
    primitives, else a statistic."""
    name = eqn.primitive.name
    first_stat = next((t for t in stats if isinstance(t, Stat)), None)
    if first_stat is not None:
        return first_stat
    n_stat = sum(1 for t in ins if t is not None)
    linear = (name in _LINEAR or (name == "mul" and n_stat == 1)
              or (name == "div" and ins[0] == SUM and ins[1] is None)
              or (name == "select_n" and ins[0] is None))
    return SUM if linear else Stat(w.where(eqn))



# -- structural primitives -------------------------------------------------------------
def _broadcast(w, eqn, ins):
    t = ins[0]
    if not isinstance(t, Rows):
        return t if len(ins) == 1 else w.unknown(eqn)
    dims = eqn.params["broadcast_dimensions"]
    k = dims[t.axis]
    if shape_of(eqn.outvars[0])[k] != shape_of(eqn.invars[0])[t.axis]:
        return w.unknown(eqn)
    return Rows(k, t.count)


def _reshape(w, eqn, ins):
    t = ins[0]
    if not isinstance(t, Rows):
        return t if len(ins) == 1 else w.unknown(eqn)
    if eqn.params.get("dimensions") is not None:
        return w.unknown(eqn)
    s, new = shape_of(eqn.invars[0]), shape_of(eqn.outvars[0])
    prefix = math.prod(s[:t.axis])
    block = (s[t.axis] // t.count) * math.prod(s[t.axis + 1:])   # elements of one row, contiguous
    for j in range(len(new)):
        if math.prod(new[:j]) == prefix and block % math.prod(new[j + 1:]) == 0:
            return Rows(j, t.count)
    return w.unknown(eqn)


def _squeeze(w, eqn, ins):
    t = ins[0]
    if not isinstance(t, Rows):
        return t
    dims = [d % len(shape_of(eqn.invars[0])) for d in eqn.params["dimensions"]]
    if t.axis in dims:
        return w.unknown(eqn)
    return Rows(t.axis - sum(1 for d in dims if d < t.axis), t.count)


def _transpose(w, eqn, ins):
    t = ins[0]
    if not isinstance(t, Rows):
        return t
    return Rows(list(eqn.params["permutation"]).index(t.axis), t.count)


def _reduce(w, eqn, ins):
    t, axes = ins[0], tuple(eqn.params["axes"])
    name = eqn.primitive.name
    if isinstance(t, Rows):
        if t.axis in axes:
            return SUM if name in _REDUCE_SUM else Stat(w.where(eqn))
        return Rows(t.axis - sum(1 for a in axes if a < t.axis), t.count)
    return t if (name in _REDUCE_SUM or isinstance(t, Stat)) else Stat(w.where(eqn))


def _dot(w, eqn, ins):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    ls, rs = shape_of(eqn.invars[0]), shape_of(eqn.invars[1])
    lfree = [d for d in range(len(ls)) if d not in lc and d not in lb]
    rfree = [d for d in range(len(rs)) if d not in rc and d not in rb]

    def place(t, contract, batch, free, offset):
        # where an operand's rows land in the output: ("batch", i), ("free", pos), ("contracted", i)
        if t.axis in batch:
            return ("batch", list(batch).index(t.axis))
        if t.axis in contract:
            return ("contracted", list(contract).index(t.axis))
        return ("free", offset + free.index(t.axis))
    a, b = ins
    stats = [t for t in ins if t == SUM or isinstance(t, Stat)]
    rows = [t for t in ins if isinstance(t, Rows)]
    if rows and stats:
        return w.couple(eqn, "a statistic over the batch's rows is multiplied with per-row values")
    if not rows:
        if len(stats) == 1 and stats[0] == SUM:
            return SUM   # bilinear: a sum times a value not from the batch stays a sum
        return next((t for t in stats if isinstance(t, Stat)), None) or Stat(w.where(eqn))
    places = []
    if isinstance(a, Rows):
        places.append(place(a, lc, lb, lfree, len(lb)))
    if isinstance(b, Rows):
        places.append(place(b, rc, rb, rfree, len(lb) + len(lfree)))
    count = math.gcd(*[t.count for t in rows])
    if len(places) == 1:
        kind, i = places[0]
        return SUM if kind == "contracted" else Rows(i, count)
    (ka, ia), (kb, ib) = places
    if ka == kb == "batch" and ia == ib:
        return Rows(ia, count)
    if ka == kb == "contracted" and ia == ib:
        return SUM
    return w.couple(eqn, "rows are multiplied with other rows (e.g. logits between every pair of examples, "
                         "as in-batch negatives)")


def _conv(w, eqn, ins):
    lhs, rhs = ins
    dn = eqn.params["dimension_numbers"]
    if rhs is not None or not isinstance(lhs, Rows) or eqn.params.get("batch_group_count", 1) != 1:
        return w.unknown(eqn)
    if lhs.axis != dn.lhs_spec[0]:
        return w.unknown(eqn)
    return Rows(dn.out_spec[0], lhs.count)


def all_rows(ins) -> Rows | None:
    """The rows every operand from the batch has, on one axis (``gcd_rows``); None where one
    of them is a sum or statistic, or their rows lie on different axes."""
    rows = [t for t in ins if isinstance(t, Rows)]
    return gcd_rows(rows) if len(rows) == sum(1 for t in ins if t is not None) else None


def _concatenate(w, eqn, ins):
    d = eqn.params["dimension"]
    if any(isinstance(t, Part) for t in ins):
        # parts of one rows axis put back to its length in another order: rows moved (``jnp.roll``)
        size = {t.size for t in ins if isinstance(t, Part)}
        if all(isinstance(t, Part) and t.axis == d for t in ins) and len(size) == 1 \
                and shape_of(eqn.outvars[0])[d] == size.pop():
            return Moved(d, w.where(eqn))
        return Unknown(next(t for t in ins if isinstance(t, Part)).where)
    r = all_rows(ins)
    if r is None or r.axis == eqn.params["dimension"]:
        return w.unknown(eqn)
    return r


def _full_along(w, eqn, ins, check):
    """Slices and pads: rows pass when the rows axis is kept whole (``check(axis)``) and the
    other operands (indices, padding value) are not from the batch."""
    t = ins[0]
    if any(x is not None for x in ins[1:]) and not isinstance(t, Rows):
        return w.unknown(eqn)
    if not isinstance(t, Rows):
        return t
    if any(x is not None and not (isinstance(x, Rows) and x.axis == t.axis) for x in ins[1:]) or not check(t.axis):
        return w.unknown(eqn)
    return t


def _slice(w, eqn, ins):
    p, s = eqn.params, shape_of(eqn.invars[0])

    def whole(k):
        return p["start_indices"][k] == 0 and p["limit_indices"][k] == s[k] and (p["strides"] is None
                                                                                  or p["strides"][k] == 1)
    t = ins[0]
    if isinstance(t, Rows) and not whole(t.axis) and (p["strides"] is None or p["strides"][t.axis] == 1):
        # a contiguous part of the rows (one half of a ``jnp.roll``)
        return Part(t.axis, s[t.axis], w.where(eqn))
    return _full_along(w, eqn, ins, whole)


def _dynamic_slice(w, eqn, ins):
    if any(x is not None for x in ins[1:]):
        return w.unknown(eqn)
    s = shape_of(eqn.invars[0])
    return _full_along(w, eqn, ins[:1], lambda k: eqn.params["slice_sizes"][k] == s[k])


def _dynamic_update_slice(w, eqn, ins):
    if any(x is not None for x in ins[2:]):
        return w.unknown(eqn)
    s = shape_of(eqn.invars[0])
    return _full_along(w, eqn, ins[:2], lambda k: shape_of(eqn.invars[1])[k] == s[k])


def _pad(w, eqn, ins):
    return _full_along(w, eqn, ins, lambda k: tuple(eqn.params["padding_config"][k]) == (0, 0, 0))


def _along(why):
    """Cumulative sums, top-k: rows meet when the rows are the axis worked along."""
    def rule(w, eqn, ins):
        r = all_rows(ins)
        if r is None:
            return w.unknown(eqn)
        p = eqn.params
        axis = p.get("dimension", p.get("axis", p.get("reduction_dimension", -1)))
        if axis is None:
            axis = -1
        if axis % len(shape_of(eqn.invars[0])) == r.axis:
            return w.couple(eqn, why)
        return r
    return rule


def _stack(w, eqn, ins):
    r = all_rows(ins)
    if r is None:
        return w.unknown(eqn)
    return Rows(r.axis + (r.axis >= eqn.params["axis"]), r.count)


def _sort(w, eqn, ins):
    """A sort along the rows only permutes them — a dropless MoE sorts every token of the
    batch by expert and puts them back —, which this walk cannot follow: not judged there
    (a ``top_k`` or ``cumsum`` along the rows does make rows meet)."""
    r = all_rows(ins)
    if r is None or eqn.params["dimension"] % len(shape_of(eqn.invars[0])) == r.axis:
        return w.unknown(eqn)
    return r


def _leading(w, eqn, ins):
    """Primitives that keep their operand's leading axes and work within them (PRNG keys
    split, folded, wrapped or drawn from — per-example keys —, bit casts): rows stay on
    their axis where it is one of those."""
    r = all_rows(ins)
    s, out = shape_of(eqn.invars[0]), shape_of(eqn.outvars[0])
    if r is None or r.axis >= min(len(s), len(out)) or s[:r.axis + 1] != out[:r.axis + 1]:
        return w.unknown(eqn)
    return r


def _split(w, eqn, ins):
    t = ins[0]
    if isinstance(t, Rows) and t.axis == eqn.params["axis"] % len(shape_of(eqn.invars[0])):
        return w.unknown(eqn)
    return t


def _rev(w, eqn, ins):
    t = ins[0]
    if isinstance(t, Rows) and t.axis in eqn.params["dimensions"]:
        return Moved(t.axis, w.where(eqn))   # x[::-1] along the batch
    return t


def _reduce_window(w, eqn, ins):
    t = ins[0]
    if any(x is not None for x in ins[1:]) and not isinstance(t, Rows):
        return w.unknown(eqn)
    if not isinstance(t, Rows):
        return t
    p, k = eqn.params, t.axis
    whole = (p["window_dimensions"][k] == 1 and p["window_strides"][k] == 1
             and tuple(p["padding"][k]) == (0, 0) and p["base_dilation"][k] == 1 and p["window_dilation"][k] == 1)
    return t if whole else w.unknown(eqn)


def _gather(w, eqn, ins):
    op, idx = ins
    dn = eqn.params["dimension_numbers"]
    os, ishape, out = shape_of(eqn.invars[0]), shape_of(eqn.invars[1]), shape_of(eqn.outvars[0])
    offset_src = [d for d in range(len(os)) if d not in dn.collapsed_slice_dims and d not in dn.operand_batching_dims]
    batch_pos = [d for d in range(len(out)) if d not in dn.offset_dims]   # indices' dims but the last, in order
    if op == SUM or isinstance(op, Stat):
        return w.couple(eqn, "a statistic over the batch's rows is read per row") if isinstance(idx, Rows) else (
            op if idx is None else w.unknown(eqn))
    got = []
    if isinstance(idx, Rows):
        if idx.axis == len(ishape) - 1:
            return w.unknown(eqn)
        got.append(Rows(batch_pos[idx.axis], idx.count))
    elif idx is not None:
        return w.unknown(eqn)
    if isinstance(op, Rows):
        k = op.axis
        if k in dn.operand_batching_dims:
            d = dn.start_indices_batching_dims[list(dn.operand_batching_dims).index(k)]
            if isinstance(idx, Rows) and idx.axis != d:
                return w.unknown(eqn)
            got.append(Rows(batch_pos[d], op.count))
        elif k in offset_src and k not in dn.start_index_map and eqn.params["slice_sizes"][k] == os[k]:
            if idx is not None:
                return w.unknown(eqn)
            got.append(Rows(dn.offset_dims[offset_src.index(k)], op.count))
        else:
            return w.unknown(eqn)
    return gcd_rows(got) or w.unknown(eqn)


def moved(w, eqn, ins):
    """A primitive with a ``Moved`` or ``Part`` operand (``rev`` and ``concatenate`` make
    them): elementwise and reductions judged, anything else not (a part of the rows is
    judged only by the concatenation that puts it back)."""
    name = eqn.primitive.name
    part = next((t for t in ins if isinstance(t, Part)), None)
    if part is not None:
        return Unknown(part.where)   # (not judged past the slice)
    m = next(t for t in ins if isinstance(t, Moved))
    if name in _REDUCE_SUM | _REDUCE_OTHER and len(ins) == 1:
        axes = tuple(eqn.params["axes"])
        if m.axis in axes:
            return SUM if name in _REDUCE_SUM else Stat(w.where(eqn))
        return Moved(m.axis - sum(1 for a in axes if a < m.axis), m.where)
    if name not in ELEMENTWISE:
        return w.unknown(eqn)
    out_shape = shape_of(eqn.outvars[0])
    for v, t in zip(eqn.invars, ins):   # the moved axis kept, no broadcast along it
        if t is not None and (len(shape_of(v)) != len(out_shape) or shape_of(v)[m.axis] != out_shape[m.axis]):
            return w.unknown(eqn)
    if any(t is not None and t != m for t in ins):
        return w.couple(eqn, f"rows are combined with rows of the batch moved along it at {m.where} (x[::-1] or "
                             "jnp.roll along the batch: mixup, shifted negatives); a micro-batch moves only its own rows")
    return m


RULES = {
    "broadcast_in_dim": _broadcast, "reshape": _reshape, "squeeze": _squeeze, "transpose": _transpose,
    "dot_general": _dot, "conv_general_dilated": _conv, "concatenate": _concatenate, "slice": _slice,
    "dynamic_slice": _dynamic_slice, "dynamic_update_slice": _dynamic_update_slice, "pad": _pad,
    "gather": _gather, "split": _split, "stack": _stack, "sort": _sort,
    **{n: _leading for n in ("random_bits", "random_split", "random_fold_in", "random_wrap", "random_unwrap",
                             "bitcast_convert_type")}, "rev": _rev,
    **{n: _reduce for n in _REDUCE_SUM | _REDUCE_OTHER},
    **{n: _along("a cumulative sum (or product, max) runs along the batch's rows, e.g. expert slots counted over "
                 "the tokens of every sequence") for n in _CUMULATIVE},
    "top_k": _along("a top-k runs along the batch's rows, e.g. experts choosing tokens across sequences"),
    "approx_top_k": _along("a top-k runs along the batch's rows"),
    **{n: _reduce_window for n in ("reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window")},
}

