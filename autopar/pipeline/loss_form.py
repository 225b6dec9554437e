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

With ``has_aux`` the loss returns ``(loss, aux)`` as for ``jax.value_and_grad(has_aux=True)``:
``loss`` one of the two forms above, ``aux`` any pytree of arrays (metrics, logits), not
differentiated. :func:`combine_aux` says how the step makes the whole batch's aux from the
micro-batches' (:class:`LossOutputs` names the program's outputs).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ..trace import Lit, Program, TraceError, dtype_itemsize


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


class LossOutputs(NamedTuple):
    """The traced loss program's outputs by role: the loss (a ``WeightedLoss``'s total), its
    weight (None: a mean), the aux leaves (``has_aux``) and their tree."""
    loss: Any
    weight: Any
    aux: tuple
    aux_tree: Any


def loss_outputs(program: Program, has_aux: bool = False) -> LossOutputs:
    outs = list(program.outvars)
    if not has_aux:
        return LossOutputs(outs[0], outs[1] if len(outs) == 2 else None, (), None)
    loss_tree, aux_tree = program.out_tree.children()
    n = loss_tree.num_leaves
    return LossOutputs(outs[0], outs[1] if n == 2 else None, tuple(outs[n:]), aux_tree)


def check_form(program: Program, num_params: int, name: str, has_aux: bool = False) -> None:
    """One scalar floating loss, or (scalar floating total, scalar weight not depending on
    the parameters) — with ``has_aux``, the first of a pair ``(loss, aux)``; else a
    :class:`TraceError` saying what was returned."""
    vals = program.values
    if has_aux:
        kids = program.out_tree.children() if program.out_tree.num_nodes > 1 else []
        if len(kids) != 2 or jax.tree_util.tree_structure((0, 0)).node_data() != program.out_tree.node_data():
            raise TraceError(f"{name}(params, batch) must return a pair (loss, aux) with has_aux=True, as for "
                             f"jax.value_and_grad(..., has_aux=True); it returned a {program.out_tree}")
        outs = program.outvars[:kids[0].num_leaves]
        loss_tree = kids[0]
        given = set(program.invars) | set(program.consts)
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
            kids[1].unflatten(range(kids[1].num_leaves)))[0]]
        for path, o in zip(paths, program.outvars[len(outs):]):
            if not isinstance(o, int) or o in given:
                raise TraceError(f"{name}(params, batch)'s aux leaf {path or '<aux>'} is a constant or an input passed "
                                 "through; a pipeline step returns the aux values the loss computes: return that one "
                                 "beside the step")
    else:
        outs, loss_tree = program.outvars, program.out_tree

    def scalar(o, floating=True):
        return isinstance(o, int) and vals[o].shape == () and (
            not floating or jnp.issubdtype(vals[o].dtype, jnp.floating))
    pair = loss_tree == _WEIGHTED
    if pair and scalar(outs[0]) and isinstance(outs[1], Lit):
        raise TraceError(f"{name}(params, batch) returned WeightedLoss(total, weight) with a constant weight; "
                         "return the mean total / weight instead")
    if not ((len(outs) == 1 and scalar(outs[0])) or (pair and scalar(outs[0]) and scalar(outs[1], False))):
        raise TraceError(
            f"{name}(params, batch) must return one scalar floating loss (a mean over the batch) or "
            "autopar.WeightedLoss(total, weight) of scalars (the loss is total / weight, e.g. a mean over unmasked "
            "tokens)" + ("" if has_aux else "; a pair (loss, aux) needs plan_training(..., has_aux=True)") +
            "; it returned " + ", ".join(
                f"{vals[o].shape} {vals[o].dtype}" if isinstance(o, int) else "a constant" for o in outs))
    if pair:
        par, _ = depends(program, num_params)
        if outs[1] in par:
            raise TraceError(f"{name}(params, batch) returned WeightedLoss(total, weight) with a weight that depends on the "
                             "parameters; the weight is what the total is normalised by (e.g. the number of "
                             "unmasked tokens) and must come from the batch alone")


def full_batch_loss(loss_fn, has_aux: bool = False):
    """``loss_fn`` as one scalar over the batch it is given: the mean, or total / weight (what
    a pipeline step's loss equals, e.g. for a single-device reference step); with
    ``has_aux``, ``(that, aux)``."""
    def loss(params, batch):
        out = loss_fn(params, batch)
        main = out[0] if has_aux else out
        main = main.total / main.weight if isinstance(main, WeightedLoss) else main
        return (main, out[1]) if has_aux else main
    return loss


def per_microbatch_loss(loss_fn, num_microbatches: int, has_aux: bool = False, aux_grows=(), aux_sums=()):
    """``loss_fn`` run on each of ``num_microbatches`` micro-batches (batch leaves split along
    axis 0, scalars given whole) and combined as a pipeline step combines them: the mean of
    the losses (totals and weights summed for a ``WeightedLoss``), aux by ``combine_aux``. The
    single-device reference of a plan whose rows meet (``coupled_rows="per_microbatch"``).
    Random draws over the batch (dropout) are made as the pipeline step makes them: each
    micro-batch gets its rows of the whole batch's draw (``rng_form.per_microbatch``)."""
    from .inputs import abstract_tree, microbatch_shapes
    from .rng_form import per_microbatch, rows_in, rows_of

    def loss(params, batch):
        B = num_microbatches
        mbs = [jax.tree_util.tree_map(lambda x: x if not x.shape else x.reshape(B, -1, *x.shape[1:])[m], batch)
               for m in range(B)]
        fn, _ = per_microbatch(loss_fn, abstract_tree(params, "params"), microbatch_shapes(batch, B), B)
        if fn is not loss_fn:   # draws over the batch: micro-batch m's rows of them
            rows = rows_of(rows_in(batch)).reshape(B, -1)
            outs = [fn(params, (mb, rows[m])) for m, mb in enumerate(mbs)]
        else:
            outs = [loss_fn(params, mb) for mb in mbs]
        mains = [o[0] if has_aux else o for o in outs]
        if isinstance(mains[0], WeightedLoss):
            main = sum(o.total for o in mains) / sum(o.weight for o in mains)
        else:
            main = sum(mains) / num_microbatches
        if not has_aux:
            return main
        leaves = [jax.tree_util.tree_leaves(o[1]) for o in outs]
        grows = list(aux_grows) or [False] * len(leaves[0])
        sums = list(aux_sums) or [False] * len(leaves[0])
        aux = [combine_aux([ls[i] for ls in leaves], grows[i], sums[i]) for i in range(len(leaves[0]))]
        return main, jax.tree_util.tree_structure(outs[0][1]).unflatten(aux)
    return loss


def differentiated(loss_fn, has_aux: bool = False):
    """The scalar each micro-batch's backward differentiates: the mean, or the total."""
    def loss(params, batch):
        out = loss_fn(params, batch)
        out = out[0] if has_aux else out
        return out.total if isinstance(out, WeightedLoss) else out
    return loss


def combine_aux(values: list, grows: bool, summed: bool = False):
    """The whole batch's aux leaf from the micro-batches' ``values``: concatenated along axis
    0 where that axis is the batch's (``grows``: per-example outputs such as logits); else
    floating leaves averaged (a mean over the batch → the batch's mean, as the loss) but
    those that sum over the batch (``summed``: ``aux_sums``) and integer leaves summed (a
    count → the batch's count); a bool leaf over the batch (any? all?) is refused when
    planned (``aux_grows``)."""
    if grows:
        return jnp.concatenate(values, axis=0)
    total = values[0]
    for x in values[1:]:
        total = total + x
    return total / len(values) if jnp.issubdtype(total.dtype, jnp.inexact) and not summed else total


def aux_sums(program: Program, num_params: int, rows: int, grows, tags) -> tuple[list[bool], list[int]]:
    """Per aux leaf of the traced loss ``program`` (has_aux), whether it is a float sum over
    the batch, un-normalised (``jnp.sum(mask)`` as a float token count: ``batch_sum``'s
    test; summed over the micro-batches, where a mean is averaged), and the indices of the
    leaves no combination gives exactly (``row_form.nonlinear`` of their ``tags``: a max, a
    standard deviation or a ratio of sums over the batch — averaged, and said so)."""
    from .row_form import nonlinear
    from .row_rules import SUM
    _, data = depends(program, num_params)
    producer = {o: e for e in program.eqns for o in e.outputs}
    sums, inexact = [], []
    for j, (v, g, t) in enumerate(zip(loss_outputs(program, True).aux, grows, tags)):
        floating = isinstance(v, int) and jnp.issubdtype(program.values[v].dtype, jnp.inexact)
        sums.append(bool(floating and not g and t == SUM
                         and _unnormalised_sum(v, data, producer, rows) is not None))
        if not g and nonlinear(t):
            inexact.append(j)
    return sums, inexact


def aux_grows(loss_fn, params_abs, mb_abs, doubled_abs, traced=None) -> tuple[list[bool], float]:
    """Which aux leaves of ``loss_fn`` (has_aux) have the batch as axis 0 — their leading
    dimension doubles with the micro-batch's rows (traced at both; ``traced``: the caller's
    ``(closed jaxpr, output tree)`` at ``mb_abs``, if it has one) — and one micro-batch's aux
    bytes. A bool leaf that does not grow is refused: whether the batch's is an any or an all
    of the micro-batches' is not known."""
    name = getattr(loss_fn, "__name__", "loss_fn")
    at_b = traced[1].unflatten(traced[0].out_avals) if traced is not None else None
    try:
        if at_b is None:
            at_b = jax.eval_shape(loss_fn, params_abs, mb_abs)
        one = jax.tree_util.tree_flatten_with_path(at_b[1])[0]
        two = jax.tree_util.tree_leaves(jax.eval_shape(loss_fn, params_abs, doubled_abs)[1])
    except Exception as err:
        raise ValueError(f"{name}'s aux: to find the per-example leaves the loss is traced for twice the "
                         f"micro-batch's rows, which failed ({type(err).__name__}: {str(err)[:200]}); plan with "
                         "num_microbatches=1") from err
    grows = [bool(a.shape and b.shape and b.shape[0] == 2 * a.shape[0]) for (_, a), b in zip(one, two)]
    for (path, a), g in zip(one, grows):
        if not g and a.dtype == jnp.bool_:
            raise ValueError(f"{name}'s aux leaf {jax.tree_util.keystr(path)} is a bool over the batch; over "
                             "micro-batches it is not known whether the batch's is their any or their all: return "
                             "a count (jnp.sum(flags)) or a float mean instead")
    return grows, float(sum(math.prod(a.shape) * dtype_itemsize(a.dtype) for _, a in one))


def batch_sum(program: Program, num_params: int, rows: int, has_aux: bool = False):
    """The ``reduce_sum`` over the batch that a scalar loss is, un-normalised (``jnp.sum`` of
    per-example losses where a mean is meant): the loss followed back through casts, negation,
    sums of terms and products with other factors to a sum of values computed from the batch
    with no division by a count in between — a literal that is a multiple of the micro-batch's
    ``rows`` (``jnp.mean``: the sum over rows × tokens divided by their number), or any value
    not computed from the batch (a constant, a parameter). None when there is none (the usual
    mean), or where the loss is made otherwise (max, log …: not judged)."""
    outs = loss_outputs(program, has_aux)
    if outs.weight is not None:   # a WeightedLoss is a sum by design
        return None
    _, data = depends(program, num_params)
    producer = {o: e for e in program.eqns for o in e.outputs}
    return _unnormalised_sum(outs.loss, data, producer, rows)


def _unnormalised_sum(var, data: set, producer: dict, rows: int):
    """``batch_sum``'s search from the program value ``var``: the ``reduce_sum`` over the batch
    it is with no division by a count of rows on the way, or None."""
    def count(x, inverse=False) -> bool:   # a divisor that counts rows (× tokens …)
        if not isinstance(x, Lit) or x.shape != ():
            return isinstance(x, int) and x not in data   # (a constant or parameter value: not judged)
        v = float(x.val)
        n = 1.0 / v if inverse and v else v
        return n >= rows and abs(n / rows - round(n / rows)) < 1e-6

    def find(v, depth=0):
        if depth > 256 or not isinstance(v, int) or v not in data:
            return None
        e = producer.get(v)
        if e is None:
            return None
        name = e.prim.name
        if name in _PASS:
            return find(e.inputs[0], depth + 1)
        if name in ("add", "sub"):
            return next((hit for x in e.inputs if (hit := find(x, depth + 1)) is not None), None)
        if name == "div":
            return None if count(e.inputs[1]) else find(e.inputs[0], depth + 1)
        if name == "mul":
            a, b = e.inputs
            if count(a, inverse=True) or count(b, inverse=True):
                return None
            return next((hit for x in (a, b) if (hit := find(x, depth + 1)) is not None), None)
        if name == "reduce_sum":
            return e
        return None
    return find(var)


def batch_normalizer(program: Program, num_params: int, has_aux: bool = False):
    """The equation dividing a scalar loss by a value computed from the batch (and not from
    the parameters), following the loss back through casts, negation and the other factor
    of products; None when there is none (a mean divides by a constant)."""
    outs = loss_outputs(program, has_aux)
    if outs.weight is not None:   # a WeightedLoss needs no check
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
    v = outs.loss
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


AUX_SHARE = 0.01   # aux outputs (has_aux) held over a step may take this share of a device's memory


def check_aux_size(name: str, aux_bytes: float, num_microbatches: int, budget: float) -> None:
    """Aux outputs stay on their stage over the step, outside the plan's memory: refused past
    ``AUX_SHARE`` of a device's ``budget`` (per-example arrays such as logits)."""
    if num_microbatches * aux_bytes > AUX_SHARE * budget:
        raise ValueError(
            f"{name}'s aux outputs are {aux_bytes / 1e6:.4g} MB per micro-batch, "
            f"{num_microbatches * aux_bytes / 1e9:.4g} GB held over the step's {num_microbatches} micro-batches, over "
            f"{AUX_SHARE:.0%} of a device's {budget / 1e9:.4g} GB, which plans do not count: return metrics (means, "
            "counts) rather than per-example arrays such as logits, or compute those with step.evaluate")


def check_microbatched(program: Program, num_params: int, name: str, num_microbatches: int, rows: int,
                       has_aux: bool = False) -> None:
    """With more than one micro-batch, refuse the scalar losses whose micro-batches' mean is
    not the whole batch's loss: divided by a count from the batch (``batch_normalizer``), or
    summed over the batch (``batch_sum``)."""
    if num_microbatches <= 1:
        return
    cut = batch_normalizer(program, num_params, has_aux)
    if cut is not None:
        raise ValueError(
            f"{name} divides its loss by a value computed from the batch{_at(cut)}, e.g. the number of unmasked "
            f"tokens: averaged over {num_microbatches} micro-batches, that is not the full batch's loss. Return "
            "autopar.WeightedLoss(total, weight) instead (e.g. WeightedLoss(jnp.sum(losses * mask), jnp.sum(mask))): "
            "the step then minimises the summed total over the summed weight, exactly; or plan with "
            "num_microbatches=1")
    total = batch_sum(program, num_params, rows, has_aux)
    if total is not None:
        raise ValueError(
            f"{name} returns a sum over the batch{_at(total)}, not a mean: a pipeline step averages its "
            f"{num_microbatches} micro-batches' losses, so its loss and gradients would be 1/{num_microbatches} of "
            "jax.jit's. Return the mean (jnp.mean; scale the learning rate if it was tuned for the sum), for weighted "
            "rows autopar.WeightedLoss(jnp.sum(losses * w), jnp.sum(w)); or plan with num_microbatches=1")


def _at(eqn) -> str:
    """`` (file:line)`` of the user's code making ``eqn``, when known."""
    return f" ({eqn.source})" if eqn.source else ""
