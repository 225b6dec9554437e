"""Random draws over the batch made per micro-batch as the whole batch makes them.

jax's default generator (threefry with ``jax_threefry_partitionable``, on by default) computes
element i of a draw of shape S from the key and a counter: i's flat index in S. A loss that
draws over its batch — a dropout mask of shape (b, T, D), per-example keys
``jax.random.split(key, b)`` — traced for a micro-batch of b rows makes the same draw in every
micro-batch: each micro-batch's dropout mask is the first b rows of the whole batch's. That is
a different step than ``jax.jit`` of the loss over the batch, silently (and the masks repeat
across micro-batches).

``per_microbatch`` finds those draws — the loss traced at b and at 2b rows: the
``random_bits`` / ``random_split`` equations whose shape grows along one axis — and returns a
:class:`RowsLoss`: the loss re-evaluated (``autopar.jaxpr_eval``) with each such draw computing
the counters of micro-batch m's block of the whole batch's draw along that axis (block m of
size S[axis], the whole draw's shape being S with that axis × B), so each micro-batch gets
exactly its rows of the whole batch's draw. The block's index comes in as one more batch
leaf, the micro-batch's row indices (int32, ``rows_of``), which the pipeline step appends
(``PipelineStep._stage_inputs``). Draws whose shape does not grow with the batch (a mask
broadcast over it) are the same for every micro-batch, as over the whole batch, and stay as
they are; so does a loss without batch draws (``per_microbatch`` returns None).

A key in the batch: a scalar leaf — a PRNG key (``jax.random.key``), flax NNX's ``RngState``
(its key and count) — is given whole to every micro-batch (``whole_leaf``), so a step can take
a fresh dropout key per step as ``batch["dropout"]``; an array of per-example keys is cut like
any other leaf.

Refused with a clear error: a non-partitionable threefry (``jax_threefry_partitionable``
off: its bits depend on the whole draw's size), other generators (rbg), a batch draw inside a
``cond`` / ``while`` / custom-derivative function, a draw growing along several axes or from
a batch of keys.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore
from jax.extend.random import threefry2x32_p

from ..jaxpr_eval import CALLS, inline, run
from ..trace import _source
from .unscan import loss_jaxpr

_DRAWS = ("random_bits", "random_split")
_REBUILT = ("scan", "checkpoint", "remat2")   # higher-order primitives re-made around a rewritten body


def is_key(x) -> bool:
    return jnp.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)


def whole_leaf(x) -> bool:
    """A batch leaf given whole to every micro-batch: a scalar (a PRNG key, flax NNX's
    ``RngState`` key and count, a step number); it has no rows to cut."""
    return not tuple(getattr(x, "shape", ()))


def dtype_name(dtype) -> str:
    """A batch leaf's dtype as the plan's JSON writes it ('float32', 'key<fry>')."""
    return str(dtype) if jnp.issubdtype(dtype, jax.dtypes.prng_key) else str(np.dtype(dtype))


_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


def impl_of(dtype) -> str:
    """The PRNG implementation's name of a key dtype ('key<fry>' → 'threefry2x32')."""
    for impl in _IMPLS:
        if str(jax.eval_shape(lambda impl=impl: jax.random.key(0, impl=impl)).dtype) == str(dtype):
            return impl
    raise ValueError(f"unknown PRNG key dtype {dtype}")


def dtype_of(name: str):
    """``dtype_name``'s inverse."""
    if name.startswith("key<"):
        return jax.eval_shape(lambda: jax.random.key(0, impl=impl_of(name))).dtype
    return np.dtype(name)


def rows_of(num_rows: int) -> np.ndarray:
    """The rows leaf of a whole batch of ``num_rows`` rows (cut into micro-batches like the
    batch: micro-batch m's first entry is its first row)."""
    return np.arange(num_rows, dtype=np.int32)


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, jcore.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jcore.Jaxpr):
                yield x


def _draw_eqns(jaxpr, out: list, outer: tuple = ()) -> list:
    """(eqn, its enclosing equations, outermost first) of every random draw, in order."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _DRAWS:
            out.append((eqn, outer))
        for sub in _subjaxprs(eqn):
            _draw_eqns(sub, out, outer + (eqn,))
    return out


def doubled(mb_abs):
    """A micro-batch's shapes with twice its rows (scalar keys as they are)."""
    return jax.tree_util.tree_map(
        lambda x: x if whole_leaf(x) else jax.ShapeDtypeStruct((2 * x.shape[0],) + tuple(x.shape[1:]), x.dtype),
        mb_abs)


def _where(eqn, outer=()) -> str:
    """Where the user's code makes ``eqn``: its own source line, else that of the innermost
    enclosing call that has one (a draw inside jax.random's own jitted functions has none)."""
    for e in (eqn, *reversed(outer)):
        at = _source(e)
        if at:
            return f" at {at}"
    return ""


def _batch_axis(e1, e2, outer, name: str) -> int | None:
    """The axis along which draw ``e1`` (traced at b rows) grows to ``e2`` (at 2b), None when
    it does not grow; refused where it cannot be made per micro-batch."""
    s1, s2 = tuple(e1.params["shape"]), tuple(e2.params["shape"])
    k1, k2 = tuple(e1.invars[0].aval.shape), tuple(e2.invars[0].aval.shape)
    what = f"{name} draws {e1.primitive.name.replace('_', ' ')} of shape {s1}{_where(e1, outer)}"
    if s1 == s2:
        return None
    grown = [a for a, (x, y) in enumerate(zip(s1, s2)) if x != y]
    if len(s1) != len(s2) or len(grown) != 1 or s2[grown[0]] != 2 * s1[grown[0]] or k1 != k2 or k1:
        raise ValueError(f"{what} that grows with the batch other than along one axis from one key: with "
                         "micro-batches it cannot be made as over the whole batch; draw over the batch axis with one "
                         "key, pass per-example keys in the batch, or plan with num_microbatches=1")
    dtype = str(e1.invars[0].aval.dtype)
    if dtype != "key<fry>":
        raise ValueError(f"{what} from a {dtype} key; per micro-batch only threefry keys (jax.random.key's default) "
                         "draw as over the whole batch; use jax.random.key, or plan with num_microbatches=1")
    if not jax.config.jax_threefry_partitionable:
        raise ValueError(f"{what} over the batch with jax_threefry_partitionable off: its bits then depend on the "
                         "whole draw's size, so a micro-batch cannot draw its rows alone; set "
                         "jax.config.update('jax_threefry_partitionable', True) (jax's default), or plan with "
                         "num_microbatches=1")
    return grown[0]


class RowsLoss:
    """``loss_fn(params, batch)`` as a function of ``(params, (batch, rows))``: its draws over
    the batch (``axes``: draw equation → the axis it grows along) made as micro-batch
    ``rows[0] // len(rows)``'s block of the whole batch's draw, the whole batch being
    ``num_microbatches`` micro-batches."""

    def __init__(self, loss_fn, closed, out_tree, axes: dict, num_microbatches: int, count: int):
        self.loss_fn, self.closed, self.out_tree = loss_fn, closed, out_tree
        self.axes, self.B = axes, num_microbatches
        self.count = count      # draws made per micro-batch (a jitted function called twice: two)
        self.__name__ = getattr(loss_fn, "__name__", "loss_fn")
        self._inside: dict = {}

    def __call__(self, params, batch_rows):
        batch, rows = batch_rows
        m = (rows[0] // rows.shape[0]).astype(jnp.uint32)   # the micro-batch's index
        args = jax.tree_util.tree_leaves(params) + jax.tree_util.tree_leaves(batch)
        return self.out_tree.unflatten(run(self.closed.jaxpr, self.closed.consts, args, self._hook(m)))

    def _has_draw(self, jaxpr) -> bool:
        got = self._inside.get(id(jaxpr))
        if got is None:
            got = self._inside[id(jaxpr)] = any(
                id(e) in self.axes or any(self._has_draw(s) for s in _subjaxprs(e)) for e in jaxpr.eqns)
        return got

    def _hook(self, m):
        def hook(eqn, ins):
            axis = self.axes.get(id(eqn))
            if axis is not None:
                return [_block_draw(eqn, ins[0], axis, self.B, m)]
            if not any(self._has_draw(s) for s in _subjaxprs(eqn)):
                return None
            name = eqn.primitive.name
            if name in CALLS:
                return inline(eqn, ins, hook)
            if name == "scan":
                return _scan(eqn, ins, hook)
            return _remat(eqn, ins, hook)     # "checkpoint" (``per_microbatch`` refused the rest)
        return hook


def per_microbatch(loss_fn, params_abs, mb_abs, num_microbatches: int, traced=None):
    """(loss, micro-batch shapes) for the pipeline: a :class:`RowsLoss` and the micro-batch
    with its rows leaf where ``loss_fn`` draws over the batch and there is more than one
    micro-batch, else ``loss_fn`` and ``mb_abs`` unchanged. ``traced``: ``unscan.loss_jaxpr``
    of ``loss_fn`` at these shapes, when the caller has it."""
    if num_microbatches <= 1:
        return loss_fn, mb_abs
    closed, out_tree = traced or loss_jaxpr(loss_fn, params_abs, mb_abs)
    at_b = _draw_eqns(closed.jaxpr, [])
    if not at_b:
        return loss_fn, mb_abs
    name = getattr(loss_fn, "__name__", "loss_fn")
    try:   # which draws grow with the batch: the loss traced for twice the rows
        at_2b = _draw_eqns(loss_jaxpr(loss_fn, params_abs, doubled(mb_abs))[0].jaxpr, [])
    except Exception as err:
        err = err.__cause__ or err   # (the user's own error under loss_jaxpr's TraceError)
        raise ValueError(f"{name} makes random draws; to find those over the batch it is traced for twice the "
                         f"micro-batch's rows, which failed ({type(err).__name__}: {str(err)[:200]}); a loss whose "
                         "shapes are fixed to one batch size cannot draw per micro-batch: plan with num_microbatches=1"
                         ) from err
    if [e.primitive.name for e, _ in at_b] != [e.primitive.name for e, _ in at_2b]:
        raise ValueError(f"{name} makes different random draws at different batch sizes; a pipeline step cannot "
                         "make them per micro-batch as over the whole batch: plan with num_microbatches=1")
    axes, count = {}, 0
    for (e1, outer), (e2, _) in zip(at_b, at_2b):
        axis = _batch_axis(e1, e2, outer, name)
        if axis is None:
            continue
        count += 1
        bad = [e.primitive.name for e in outer if e.primitive.name not in CALLS and e.primitive.name not in _REBUILT]
        if bad:
            raise ValueError(f"{name} draws over the batch{_where(e1, outer)} inside {bad[0]}; a pipeline step makes such "
                             "draws per micro-batch only outside cond / while / custom-derivative functions: draw the "
                             "mask outside it, or plan with num_microbatches=1")
        axes[id(e1)] = axis
    if not axes:
        return loss_fn, mb_abs
    rows = jax.ShapeDtypeStruct((rows_in(mb_abs),), jnp.int32)
    return RowsLoss(loss_fn, closed, out_tree, axes, num_microbatches, count), (mb_abs, rows)


def rows_in(mb_abs) -> int:
    return next(int(x.shape[0]) for x in jax.tree_util.tree_leaves(mb_abs) if not whole_leaf(x))


# --- a block of the whole batch's draw: counters as 64-bit (hi, lo) uint32 pairs ---------------
def _mul64(x, c: int):
    """x (uint32) × c (a constant < 2**64) mod 2**64, as (hi, lo)."""
    c_hi, c_lo = (c >> 32) & 0xFFFFFFFF, c & 0xFFFFFFFF
    u = lambda v: jnp.asarray(v, jnp.uint32)  # noqa: E731
    x0, x1 = x & u(0xFFFF), x >> u(16)
    c0, c1 = u(c_lo & 0xFFFF), u(c_lo >> 16)
    p00, p01, p10, p11 = x0 * c0, x0 * c1, x1 * c0, x1 * c1
    mid = p01 + p10
    mid_carry = (mid < p01).astype(jnp.uint32)
    lo = p00 + (mid << u(16))
    lo_carry = (lo < p00).astype(jnp.uint32)
    hi = p11 + (mid >> u(16)) + (mid_carry << u(16)) + lo_carry + x * u(c_hi)
    return hi, lo


def _add64(a, b):
    lo = a[1] + b[1]
    return a[0] + b[0] + (lo < a[1]).astype(jnp.uint32), lo


def counters(shape: tuple, axis: int, B: int, m):
    """The threefry counters (hi, lo uint32 words of the flat index) of block ``m`` (a uint32
    scalar) along ``axis`` of a draw of ``shape`` with that axis × ``B``. Under 2**32 elements
    the hi words are 0 and the lo words are the index itself — for axis 0 one iota plus the
    block's offset (what jax's own counters cost); else 64-bit sums of uint32 pairs."""
    full = shape[:axis] + (shape[axis] * B,) + shape[axis + 1:]
    strides = [math.prod(full[k + 1:]) for k in range(len(full))]
    offset = shape[axis] * strides[axis]           # block m starts at m × this
    if math.prod(full) < 2 ** 32:
        if axis == 0:
            lo = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
        else:
            lo = sum(lax.broadcasted_iota(jnp.uint32, shape, k) * jnp.uint32(stride)
                     for k, stride in enumerate(strides) if shape[k] > 1)
            lo = jnp.broadcast_to(jnp.asarray(lo, jnp.uint32), shape)
        return jnp.zeros(shape, jnp.uint32), lo + m * jnp.uint32(offset)
    count = (jnp.zeros(shape, jnp.uint32), jnp.zeros(shape, jnp.uint32))
    for k, stride in enumerate(strides):
        if shape[k] > 1:
            count = _add64(count, _mul64(lax.broadcasted_iota(jnp.uint32, shape, k), stride))
    return _add64(count, _mul64(m, offset))


def _block_draw(eqn, key, axis: int, B: int, m):
    """Draw ``eqn`` (random_bits / random_split of shape S from a scalar threefry key) as block
    ``m`` along ``axis`` of the same draw of shape S with that axis × B: the whole batch's."""
    words = jax.random.key_data(key)
    bits1, bits2 = threefry2x32_p.bind(words[0], words[1], *counters(tuple(eqn.params["shape"]), axis, B, m))
    if eqn.primitive.name == "random_split":
        return jax.random.wrap_key_data(jnp.stack([bits1, bits2], axis=-1), impl=jax.random.key_impl(key))
    width = int(eqn.params["bit_width"])
    if width == 64:
        hi, lo = bits1.astype(jnp.uint64), bits2.astype(jnp.uint64)
        return (hi << jnp.asarray(32, jnp.uint64)) | lo
    bits = bits1 ^ bits2
    return bits if width == 32 else bits.astype(np.dtype(f"uint{width}"))


def _scan(eqn, ins, hook):
    """A scan re-made around its body evaluated with ``hook``."""
    p = eqn.params
    nc, nk, body = int(p["num_consts"]), int(p["num_carry"]), p["jaxpr"]
    consts, carry, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]

    def step(c, x):
        outs = run(body.jaxpr, body.consts, [*consts, *c, *x], hook)
        return outs[:nk], outs[nk:]
    carry, ys = lax.scan(step, list(carry), list(xs), length=int(p["length"]), reverse=bool(p["reverse"]),
                         unroll=p["unroll"])
    return list(carry) + list(ys)


def _remat(eqn, ins, hook):
    """A ``jax.checkpoint`` re-made around its body evaluated with ``hook``."""
    p = eqn.params

    def body(*args):
        return run(p["jaxpr"], (), list(args), hook)
    return list(jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*ins))
