"""Whether a loss keeps the batch's rows apart: the check that micro-batching it is exact.

A pipeline step runs the loss on each micro-batch and averages. That equals ``jax.jit`` of
the loss over the whole batch only when every example's contribution depends on that
example alone and the loss adds the contributions up (a mean). Losses that let rows meet
are common and would run a different step, silently:

* **BatchNorm** in training mode: each row is normalised by the batch's mean and variance
  (``x - mean(x, axis=0)``): statistics of the micro-batch instead of the batch;
* a **load-balancing loss over all tokens** (Switch/Mixtral style ``mean(f) * mean(P)``
  across the batch): a product of batch means is not the mean of micro-batches' products;
* **expert capacity or expert choice across the batch** (a ``cumsum`` / ``top_k`` over the
  flattened tokens of all sequences) and **in-batch negatives** (logits between every pair
  of examples, contrastive losses). A ``sort`` along the rows only permutes them (a dropless
  MoE puts them back): not judged.

:func:`check_rows` follows the batch's rows through the loss's jaxpr, primitive by primitive,
as an abstract value per array (:class:`Rows`: an axis whose index says which row an element
comes from; ``SUM``: added up over rows; :class:`Stat`: a nonlinear function of such sums;
``None``: not from the batch), and says where rows meet. It descends into scans, loops,
conds, ``jax.checkpoint`` and custom derivatives. Primitives it has no rule for are reported
("not judged"), never silently passed.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from jax.extend import core as jcore

from .rng_form import whole_leaf
from ..trace import _source


class Rows(NamedTuple):
    """Along ``axis`` the array holds ``count`` rows of the batch, each a contiguous block."""
    axis: int
    count: int


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


class RowCheck(NamedTuple):
    """What :func:`check_rows` found on the way to the loss: ``coupled`` says where rows meet
    (None: nowhere), ``unjudged`` the primitive without a rule the rows went through (None:
    every one judged). What only feeds aux outputs is not judged."""
    coupled: str | None
    unjudged: str | None

    def line(self) -> str:
        if self.coupled:
            return f"rows meet: {self.coupled}"
        if self.unjudged:
            return f"not judged past {self.unjudged}"
        return "kept apart (checked)"


_ELEMENTWISE = frozenset("""
abs acos acosh add add_any and asin asinh atan atan2 atanh bessel_i0e bessel_i1e cbrt ceil clamp clz complex
conj convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma
igammac imag integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or polygamma
population_count pow real reduce_precision rem round rsqrt select_n shift_left shift_right_arithmetic
shift_right_logical sign sin sinh sqrt square sub tan tanh xor zeta threefry2x32 random_gamma_grad
""".split())
_LINEAR = frozenset("add add_any sub neg convert_element_type copy copy_p reduce_precision".split())
_PASS = frozenset("optimization_barrier sharding_constraint mesh_cast reshard stop_gradient stage_boundary".split())
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "remat2": "jaxpr", "checkpoint": "jaxpr", "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr"}
_REDUCE_SUM = frozenset({"reduce_sum"})
_REDUCE_OTHER = frozenset("reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin".split())
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())


def _shape(v) -> tuple:
    return tuple(getattr(v.aval, "shape", ()))


class _Walk:
    """The abstract interpretation: a tag per jaxpr variable; findings travel as tags
    (:class:`Coupled`, :class:`Unknown`), so only those reaching the loss count."""

    def __init__(self):
        self.outer: list = []   # the calls, scans … being walked (a jnp function's own jit has no user line)

    def where(self, eqn) -> str:
        """The primitive and the user's line making it: its own, else the innermost enclosing
        call's that has one."""
        at = next((a for a in map(_source, (eqn, *reversed(self.outer))) if a), "")
        return eqn.primitive.name + (f" ({at})" if at else "")

    # -- findings ---------------------------------------------------------------------
    def couple(self, eqn, why: str) -> Coupled:
        return Coupled(f"{why} at {self.where(eqn)}")

    def unknown(self, eqn) -> Unknown:
        return Unknown(self.where(eqn))

    # -- a jaxpr ------------------------------------------------------------------------
    def jaxpr(self, jaxpr, consts_tags, in_tags) -> list:
        env: dict = {}

        def read(v):
            return None if isinstance(v, jcore.Literal) else env.get(v)
        env.update(zip(jaxpr.constvars, consts_tags))
        env.update(zip(jaxpr.invars, in_tags))
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = self.eqn(eqn, ins)
            for v, t in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = t
        return [read(v) for v in jaxpr.outvars]

    def body(self, closed_or_open, in_tags) -> list:
        if isinstance(closed_or_open, jcore.ClosedJaxpr):
            return self.jaxpr(closed_or_open.jaxpr, [None] * len(closed_or_open.consts), in_tags)
        return self.jaxpr(closed_or_open, [], in_tags)

    # -- one equation -------------------------------------------------------------------
    def eqn(self, eqn, ins) -> list:
        n_out = len(eqn.outvars)
        if all(t is None for t in ins):
            return [None] * n_out
        bad = _finding(ins)
        name = eqn.primitive.name
        if name in _CALLS or name in ("scan", "while", "cond"):
            self.outer.append(eqn)
            try:
                return self.control(eqn, ins)
            finally:
                self.outer.pop()
        if bad is not None:
            return [bad] * n_out
        if name in _PASS:
            return list(ins[:n_out])
        rule = _RULES.get(name)
        if rule is None:
            if name in _ELEMENTWISE:
                return [self.elementwise(eqn, ins)] * n_out
            return [self.unknown(eqn)] * n_out
        out = rule(self, eqn, ins)
        return out if isinstance(out, list) else [out] * n_out

    def elementwise(self, eqn, ins):
        out_shape = _shape(eqn.outvars[0])
        rows = [t for t in ins if isinstance(t, Rows)]
        stats = [t for t in ins if t == SUM or isinstance(t, Stat)]
        for v, t in zip(eqn.invars, ins):   # equal shapes, scalars, or size-1 axes broadcast
            s = () if isinstance(v, jcore.Literal) else _shape(v)
            if s and (len(s) != len(out_shape) or any(a not in (b, 1) for a, b in zip(s, out_shape))
                      or (isinstance(t, Rows) and s[t.axis] != out_shape[t.axis])):
                return self.unknown(eqn)
        if rows and stats:
            return self.couple(eqn, "a statistic over the batch's rows (e.g. BatchNorm's mean or variance over "
                                    "axis 0) is combined with per-row values")
        if rows:
            return _gcd_rows(rows) or self.couple(eqn, "rows are combined with other rows (an array over pairs of "
                                                       "examples)")
        return _after(self, eqn, ins, stats)

    # -- control flow and calls ---------------------------------------------------------
    def control(self, eqn, ins) -> list:
        name, p = eqn.primitive.name, eqn.params
        if name in _CALLS:
            body = p.get(_CALLS[name])
            n_in = len(body.jaxpr.invars if isinstance(body, jcore.ClosedJaxpr) else body.invars)
            if n_in != len(ins):
                return [self.unknown(eqn)] * len(eqn.outvars)
            return self.body(body, ins)
        if name == "scan":
            nc, nk = p["num_consts"], p["num_carry"]
            consts, carry, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
            xs_in = []
            for t in xs:
                if isinstance(t, Rows):
                    if t.axis == 0:
                        return [self.unknown(eqn)] * len(eqn.outvars)   # a scan over the rows
                    t = Rows(t.axis - 1, t.count)
                xs_in.append(t)
            for _ in range(8):
                outs = self.body(p["jaxpr"], consts + carry + xs_in)
                joined = [self.settled(eqn, _join(a, b)) for a, b in zip(carry, outs[:nk])]
                if joined == carry:
                    break
                carry = joined
            ys = [Rows(t.axis + 1, t.count) if isinstance(t, Rows) else t for t in outs[nk:]]
            return carry + ys
        if name == "while":
            cn, bn = p["cond_nconsts"], p["body_nconsts"]
            cconsts, bconsts, carry = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
            for _ in range(8):
                outs = self.body(p["body_jaxpr"], bconsts + carry)
                joined = [self.settled(eqn, _join(a, b)) for a, b in zip(carry, outs)]
                if joined == carry:
                    break
                carry = joined
            pred = self.body(p["cond_jaxpr"], cconsts + carry)[0]
            return carry if pred is None else [_finding([pred]) or self.unknown(eqn)] * len(carry)
        # cond: the index picks a branch; its outputs join every branch's
        index, ops = ins[0], ins[1:]
        outs = None
        for branch in p["branches"]:
            got = self.body(branch, ops)
            outs = got if outs is None else [self.settled(eqn, _join(a, b)) for a, b in zip(outs, got)]
        return outs if index is None else [_finding([index]) or self.unknown(eqn)] * len(eqn.outvars)

    def settled(self, eqn, t):
        """A loop's or cond's joined tag, an unsettled one named by ``eqn``."""
        return self.unknown(eqn) if t == Unknown(None) else t


def _finding(tags):
    """The first finding among ``tags``, rows meeting before unjudged primitives."""
    return next((t for t in tags if isinstance(t, Coupled)), None) or next(
        (t for t in tags if isinstance(t, Unknown)), None)


def _gcd_rows(rows) -> Rows | None:
    if len({r.axis for r in rows}) != 1:
        return None
    return Rows(rows[0].axis, math.gcd(*[r.count for r in rows]))


def _after(w, eqn, ins, stats):
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


def _join(a, b):
    """Two tags a value may have (a loop carry, a cond's branches)."""
    if a == b or b is None:
        return a
    if a is None:
        return b
    bad = _finding([a, b])
    if bad is not None:
        return bad
    if isinstance(a, Rows) and isinstance(b, Rows):
        return _gcd_rows([a, b]) or Unknown(None)
    if isinstance(a, Rows) or isinstance(b, Rows):
        return Unknown(None)
    return next(t for t in (a, b) if isinstance(t, Stat)) if SUM in (a, b) else a


# -- structural primitives -------------------------------------------------------------
def _broadcast(w, eqn, ins):
    t = ins[0]
    if not isinstance(t, Rows):
        return t if len(ins) == 1 else w.unknown(eqn)
    dims = eqn.params["broadcast_dimensions"]
    k = dims[t.axis]
    if _shape(eqn.outvars[0])[k] != _shape(eqn.invars[0])[t.axis]:
        return w.unknown(eqn)
    return Rows(k, t.count)


def _reshape(w, eqn, ins):
    t = ins[0]
    if not isinstance(t, Rows):
        return t if len(ins) == 1 else w.unknown(eqn)
    if eqn.params.get("dimensions") is not None:
        return w.unknown(eqn)
    s, new = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
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
    dims = [d % len(_shape(eqn.invars[0])) for d in eqn.params["dimensions"]]
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
    ls, rs = _shape(eqn.invars[0]), _shape(eqn.invars[1])
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


def _concatenate(w, eqn, ins):
    rows = [t for t in ins if isinstance(t, Rows)]
    if len(rows) != sum(1 for t in ins if t is not None):
        return w.unknown(eqn)
    r = _gcd_rows(rows)
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
    p, s = eqn.params, _shape(eqn.invars[0])
    return _full_along(w, eqn, ins, lambda k: p["start_indices"][k] == 0 and p["limit_indices"][k] == s[k]
                       and (p["strides"] is None or p["strides"][k] == 1))


def _dynamic_slice(w, eqn, ins):
    if any(x is not None for x in ins[1:]):
        return w.unknown(eqn)
    s = _shape(eqn.invars[0])
    return _full_along(w, eqn, ins[:1], lambda k: eqn.params["slice_sizes"][k] == s[k])


def _dynamic_update_slice(w, eqn, ins):
    if any(x is not None for x in ins[2:]):
        return w.unknown(eqn)
    s = _shape(eqn.invars[0])
    return _full_along(w, eqn, ins[:2], lambda k: _shape(eqn.invars[1])[k] == s[k])


def _pad(w, eqn, ins):
    return _full_along(w, eqn, ins, lambda k: tuple(eqn.params["padding_config"][k]) == (0, 0, 0))


def _along(why):
    """Sorts, cumulative sums, top-k: rows meet when the rows are the axis worked along."""
    def rule(w, eqn, ins):
        rows = [t for t in ins if isinstance(t, Rows)]
        if len(rows) != sum(1 for t in ins if t is not None):
            return w.unknown(eqn)
        r = _gcd_rows(rows)
        if r is None:
            return w.unknown(eqn)
        p = eqn.params
        axis = p.get("dimension", p.get("axis", p.get("reduction_dimension", -1)))
        if axis is None:
            axis = -1
        if axis % len(_shape(eqn.invars[0])) == r.axis:
            return w.couple(eqn, why)
        return r
    return rule


def _stack(w, eqn, ins):
    rows = [t for t in ins if isinstance(t, Rows)]
    r = _gcd_rows(rows) if len(rows) == sum(1 for t in ins if t is not None) else None
    if r is None:
        return w.unknown(eqn)
    return Rows(r.axis + (r.axis >= eqn.params["axis"]), r.count)


def _sort(w, eqn, ins):
    """A sort along the rows only permutes them — a dropless MoE sorts every token of the
    batch by expert and puts them back —, which this walk cannot follow: not judged there
    (a ``top_k`` or ``cumsum`` along the rows does make rows meet)."""
    rows = [t for t in ins if isinstance(t, Rows)]
    r = _gcd_rows(rows) if len(rows) == sum(1 for t in ins if t is not None) else None
    if r is None or eqn.params["dimension"] % len(_shape(eqn.invars[0])) == r.axis:
        return w.unknown(eqn)
    return r


def _leading(w, eqn, ins):
    """Primitives that keep their operand's leading axes and work within them (PRNG keys
    split, folded, wrapped or drawn from — per-example keys —, bit casts): rows stay on
    their axis where it is one of those."""
    rows = [t for t in ins if isinstance(t, Rows)]
    r = _gcd_rows(rows) if len(rows) == sum(1 for t in ins if t is not None) else None
    s, out = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    if r is None or r.axis >= min(len(s), len(out)) or s[:r.axis + 1] != out[:r.axis + 1]:
        return w.unknown(eqn)
    return r


def _split(w, eqn, ins):
    t = ins[0]
    if isinstance(t, Rows) and t.axis == eqn.params["axis"] % len(_shape(eqn.invars[0])):
        return w.unknown(eqn)
    return t


def _rev(w, eqn, ins):
    t = ins[0]
    return w.unknown(eqn) if isinstance(t, Rows) and t.axis in eqn.params["dimensions"] else t


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
    os, ishape, out = _shape(eqn.invars[0]), _shape(eqn.invars[1]), _shape(eqn.outvars[0])
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
    return _gcd_rows(got) or w.unknown(eqn)


_RULES = {
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


def output_tags(closed, batch_leaves, num_params: int) -> list:
    """The tag of every output of ``closed``, the loss's closed jaxpr on (params, micro-batch),
    following the rows of ``batch_leaves`` (one micro-batch's ShapeDtypeStructs, axis 0 the
    rows but for scalars given whole)."""
    in_tags = [None] * num_params + [None if whole_leaf(x) else Rows(0, int(x.shape[0])) for x in batch_leaves]
    return _Walk().body(closed, in_tags)


def nonlinear(tag) -> bool:
    """Whether an output so tagged is no sum over the rows and no per-row value: no way of
    combining the micro-batches' values gives the whole batch's (a max, a variance, a ratio
    of sums over the batch)."""
    return isinstance(tag, (Stat, Coupled))


def check_rows(closed, batch_leaves, num_params: int, num_loss_leaves: int, tags=None) -> RowCheck:
    """Judge the first ``num_loss_leaves`` outputs (a mean's one, a ``WeightedLoss``'s two) of
    the loss's closed jaxpr ``closed`` (``output_tags``; ``tags``: those, when the caller has
    them). A loss output that is a statistic of sums (a product of batch means) couples rows
    too."""
    outs = (tags if tags is not None else output_tags(closed, batch_leaves, num_params))[:num_loss_leaves]
    found = next((t.why for t in outs if isinstance(t, Coupled)), None) or next(
        (f"the loss is a nonlinear function of sums over the batch (e.g. a product of two batch means, as a "
         f"load-balancing loss over all tokens) made at {t.where}" for t in outs if isinstance(t, Stat)), None) or next(
        ("the loss keeps a rows axis" for t in outs if isinstance(t, Rows)), None)
    unjudged = next((t.where for t in outs if isinstance(t, Unknown)), None)
    return RowCheck(found, None if found else unjudged)


COUPLED_ROWS = ("refuse", "per_microbatch")


def check_coupled_rows(found: RowCheck, name: str, num_microbatches: int, rows: int, coupled_rows: str) -> None:
    """Refuse a loss whose rows meet (``found.coupled``) unless ``coupled_rows`` is
    "per_microbatch": the step then computes each micro-batch's statistics over its own rows
    (GPipe's BatchNorm; what gradient accumulation does), which the plan's report says."""
    if found.coupled is None or coupled_rows == "per_microbatch":
        return
    raise ValueError(
        f"{name} lets the batch's rows meet: {found.coupled}. Run on {num_microbatches} micro-batches of {rows} "
        f"rows, each would see only its own rows, so the step would not be jax.jit's over the whole batch. Plan "
        "with num_microbatches=1 (the batch whole on each stage), keep examples apart in the loss (e.g. LayerNorm "
        "or GroupNorm for BatchNorm; a load-balancing loss per sequence), or pass coupled_rows='per_microbatch' "
        "(CLI --coupled-rows per_microbatch) to run each micro-batch's statistics over its own rows, as GPipe does "
        "for BatchNorm and as gradient accumulation does")
