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
  of examples, contrastive losses), and rows **moved along the batch** (``x[::-1]``, ``jnp.roll``
  along axis 0: mixup, shifted negatives) combined with the rows in place. A ``sort`` along
  the rows only permutes them (a dropless MoE puts them back): not judged.

:func:`check_rows` follows the batch's rows through the loss's jaxpr, primitive by primitive,
as an abstract value per array (:class:`Rows`: an axis whose index says which row an element
comes from; ``SUM``: added up over rows; :class:`Stat`: a nonlinear function of such sums;
``None``: not from the batch), and says where rows meet. It descends into scans, loops,
conds, ``jax.checkpoint`` and custom derivatives. Primitives it has no rule for are reported
("not judged"), never silently passed.
"""
from __future__ import annotations

from typing import NamedTuple

from jax.extend import core as jcore

from .rng_form import whole_leaf
from .row_rules import (CALLS, ELEMENTWISE, PASS, RULES, SUM, Coupled, Moved, Part, Rows, Stat, Unknown, after,
                        gcd_rows, moved, shape_of)
from ..trace import _source

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
        if name in CALLS or name in ("scan", "while", "cond"):
            self.outer.append(eqn)
            try:
                return self.control(eqn, ins)
            finally:
                self.outer.pop()
        if bad is not None:
            return [bad] * n_out
        if name in PASS:
            return list(ins[:n_out])
        if name not in ("rev", "concatenate") and any(isinstance(t, (Moved, Part)) for t in ins):
            return [moved(self, eqn, ins)] * n_out
        rule = RULES.get(name)
        if rule is None:
            if name in ELEMENTWISE:
                return [self.elementwise(eqn, ins)] * n_out
            return [self.unknown(eqn)] * n_out
        out = rule(self, eqn, ins)
        return out if isinstance(out, list) else [out] * n_out

    def elementwise(self, eqn, ins):
        out_shape = shape_of(eqn.outvars[0])
        rows = [t for t in ins if isinstance(t, Rows)]
        stats = [t for t in ins if t == SUM or isinstance(t, Stat)]
        for v, t in zip(eqn.invars, ins):   # equal shapes, scalars, or size-1 axes broadcast
            s = () if isinstance(v, jcore.Literal) else shape_of(v)
            if s and (len(s) != len(out_shape) or any(a not in (b, 1) for a, b in zip(s, out_shape))
                      or (isinstance(t, Rows) and s[t.axis] != out_shape[t.axis])):
                return self.unknown(eqn)
        if rows and stats:
            return self.couple(eqn, "a statistic over the batch's rows (e.g. BatchNorm's mean or variance over "
                                    "axis 0) is combined with per-row values")
        if rows:
            return gcd_rows(rows) or self.couple(eqn, "rows are combined with other rows (an array over pairs of "
                                                       "examples)")
        return after(self, eqn, ins, stats)

    # -- control flow and calls ---------------------------------------------------------
    def control(self, eqn, ins) -> list:
        name, p = eqn.primitive.name, eqn.params
        if name in CALLS:
            body = p.get(CALLS[name])
            n_in = len(body.jaxpr.invars if isinstance(body, jcore.ClosedJaxpr) else body.invars)
            if n_in != len(ins):
                return [self.unknown(eqn)] * len(eqn.outvars)
            return self.body(body, ins)
        if name == "scan":
            nc, nk = p["num_consts"], p["num_carry"]
            consts, carry, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
            xs_in = []
            for t in xs:
                if isinstance(t, (Moved, Part)):
                    return [self.unknown(eqn)] * len(eqn.outvars)
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
        return gcd_rows([a, b]) or Unknown(None)
    if any(isinstance(t, (Rows, Moved, Part)) for t in (a, b)):
        return Unknown(None)
    return next(t for t in (a, b) if isinstance(t, Stat)) if SUM in (a, b) else a



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


def check_rows(closed, batch_leaves, num_params: int, num_loss_leaves: int) -> RowCheck:
    """``judge_loss`` of the loss's closed jaxpr ``closed`` (``output_tags``)."""
    return judge_loss(output_tags(closed, batch_leaves, num_params)[:num_loss_leaves])


def judge_loss(outs) -> RowCheck:
    """What the tags ``outs`` of the loss's outputs (a mean's one, a ``WeightedLoss``'s two)
    say: where rows meet on the way to them — a loss that is a statistic of sums (a product
    of batch means) couples rows too — or the primitive not judged."""
    found = next((t.why for t in outs if isinstance(t, Coupled)), None) or next(
        (f"the loss is a nonlinear function of sums over the batch (e.g. a product of two batch means, as a "
         f"load-balancing loss over all tokens) made at {t.where}" for t in outs if isinstance(t, Stat)), None) or next(
        ("the loss keeps a rows axis" for t in outs if isinstance(t, (Rows, Moved))), None)
    unjudged = next((t.where for t in outs if isinstance(t, (Unknown, Part))), None)
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
