"""What a training loss returns, checked on its traced program.

A pipeline step splits the batch into micro-batches, so it must combine their losses into the
full batch's. Two forms are exact:

* one scalar, a **mean over the batch** (``jnp.mean`` of per-example or per-token losses):
  the step averages the micro-batches' losses and gradients;
* :class:`WeightedLoss` ``(total, weight)``, the loss being ``total / weight`` — a sum of
  losses and what it is normalised by, e.g. the count of unmasked tokens: the step sums both
  over the micro-batches and divides once (gradients accumulated unscaled, divided by the
  summed weight before the optimizer; MaxText's gradient accumulation does the same).
  ``weight`` must not depend on the parameters. (A named type, not a bare pair: a bare
  ``(loss, aux)`` — ``has_aux`` style — is refused rather than read as a weight.)

A scalar loss divided by a value computed from the batch (``sum(l * mask) / sum(mask)``: the
masked means of MaxText and Levanter) is neither: averaged over micro-batches with different
masks it is not the full batch's loss. :func:`batch_normalizer` finds that division, and
``plan_training`` refuses it with more than one micro-batch.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ..trace import Lit, Program, TraceError


class WeightedLoss(NamedTuple):
    """What a loss normalised by the batch returns: the loss is ``total / weight`` over the
    whole batch, e.g. ``WeightedLoss(jnp.sum(losses * mask), jnp.sum(mask))`` for a mean over
    unmasked tokens; ``weight`` must not depend on the parameters (``autopar.pipeline.loss_form``)."""
    total: Any
    weight: Any


_WEIGHTED = jax.tree_util.tree_structure(WeightedLoss(0, 0))

_PASS = ("convert_element_type", "neg", "copy", "copy_p", "reduce_precision")


def depends(program: Program, num_params: int) -> tuple[set, set]:
    """The values computed from the parameters, and those computed from the batch."""
    par, data = set(program.invars[:num_params]), set(program.invars[num_params:])
    for e in program.eqns:
        ins = [x for x in e.inputs if isinstance(x, int)]
        if any(x in par for x in ins):
            par.update(e.outputs)
        if any(x in data for x in ins):
            data.update(e.outputs)
    return par, data


def check_form(program: Program, num_params: int, name: str) -> None:
    """One scalar floating loss, or (scalar floating total, scalar weight not depending on
    the parameters); else a :class:`TraceError` saying what was returned."""
    outs, vals = program.outvars, program.values

    def scalar(o, floating=True):
        return isinstance(o, int) and vals[o].shape == () and (
            not floating or jnp.issubdtype(vals[o].dtype, jnp.floating))
    pair = program.out_tree == _WEIGHTED
    if pair and scalar(outs[0]) and isinstance(outs[1], Lit):
        raise TraceError(f"{name}(params, batch) returned WeightedLoss(total, weight) with a constant weight; "
                         "return the mean total / weight instead")
    if not ((len(outs) == 1 and scalar(outs[0])) or (pair and scalar(outs[0]) and scalar(outs[1], False))):
        raise TraceError(
            f"{name}(params, batch) must return one scalar floating loss (a mean over the batch) or "
            "autopar.WeightedLoss(total, weight) of scalars (the loss is total / weight, e.g. a mean over unmasked "
            "tokens); auxiliary outputs (has_aux) are not supported; it returned " + ", ".join(
                f"{vals[o].shape} {vals[o].dtype}" if isinstance(o, int) else "a constant" for o in outs))
    if pair:
        par, _ = depends(program, num_params)
        if outs[1] in par:
            raise TraceError(f"{name}(params, batch) returned WeightedLoss(total, weight) with a weight that depends on the "
                             "parameters; the weight is what the total is normalised by (e.g. the number of "
                             "unmasked tokens) and must come from the batch alone")


def full_batch_loss(loss_fn):
    """``loss_fn`` as one scalar over the batch it is given: the mean, or total / weight (what
    a pipeline step's loss equals, e.g. for a single-device reference step)."""
    def loss(params, batch):
        out = loss_fn(params, batch)
        return out.total / out.weight if isinstance(out, WeightedLoss) else out
    return loss


def differentiated(loss_fn):
    """The scalar each micro-batch's backward differentiates: the mean, or the total."""
    def loss(params, batch):
        out = loss_fn(params, batch)
        return out.total if isinstance(out, WeightedLoss) else out
    return loss


def weighted(program: Program) -> bool:
    """Whether the loss is a :class:`WeightedLoss`."""
    return len(program.outvars) == 2


def batch_normalizer(program: Program, num_params: int):
    """The equation dividing a scalar loss by a value computed from the batch (and not from
    the parameters), following the loss back through casts, negation and the other factor
    of products; None when there is none (a mean divides by a constant)."""
    if weighted(program):
        return None
    par, data = depends(program, num_params)
    producer = {o: e for e in program.eqns for o in e.outputs}

    def batch_only(x):
        return isinstance(x, int) and x in data and x not in par

    def reciprocal(x):
        e = producer.get(x)
        if e is None:
            return False
        if e.prim.name == "div" and isinstance(e.inputs[0], Lit):
            return batch_only(e.inputs[1])
        return e.prim.name == "integer_pow" and e.params.get("y") == -1 and batch_only(e.inputs[0])
    v = program.outvars[0]
    for _ in range(256):
        e = producer.get(v) if isinstance(v, int) else None
        if e is None:
            return None
        name = e.prim.name
        if name in _PASS:
            v = e.inputs[0]
        elif name == "div":
            if batch_only(e.inputs[1]):
                return e
            v = e.inputs[0]
        elif name == "mul":
            a, b = e.inputs
            if any(reciprocal(x) for x in (a, b)):
                return e
            v = a if isinstance(a, int) and a in par else b
        else:
            return None
    return None
