"""Pipelines over scanned layer stacks (MaxText's ``scan_layers``, flax ``nn.scan``, a
``lax.scan`` over stacked weights): the scan is unrolled into one pipeline layer per
iteration and every stacked parameter is split into one leaf per iteration, so stage k holds
and updates only the slices of the iterations it runs.

Found by ``find_scan_split``: a ``scan`` (at the loss's top level, or inside ``jit``s) whose
``xs`` include parameter leaves stacked along axis 0 (length = the trip count) that nothing
else reads. The planner then works on an equivalent loss of the split parameters
(``split_loss``): the jaxpr of ``loss_fn`` is re-evaluated with each such scan run as a Python
loop over its iterations — iteration t reads the t-th slice directly — with a
``stage_boundary`` on the carry between iterations, so layers are iterations and identical
iterations have one structural key (planned once). Everything else is bound as traced.

The user-facing step keeps the user's structure: ``split_tree`` / ``join_tree`` convert the
parameters and every optimizer-state subtree shaped like them (Adam's mu/nu, …) between the
stacked and the split form (``ScanSplit``); ``autopar.pipeline.unscan_step`` holds the steps
over the split form and the check of the optimizer (which runs on the split form).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from ..jaxpr_eval import CALLS, bind, inline, run
from ..trace import traced_jaxpr
from .boundary import stage_boundary_p


@dataclass(frozen=True)
class ScanSplit:
    """Parameter leaves (flat indices of the user's params) stacked over scan iterations, and
    each one's length; the split form has the leaf replaced by a list of its slices."""
    stacked: tuple[int, ...]
    lengths: tuple[int, ...]

    def length_of(self) -> dict[int, int]:
        return dict(zip(self.stacked, self.lengths))


def _uses(jaxpr, origin: dict, counts: dict, scans: list) -> None:
    """Count reads of each parameter leaf (by ``origin``: jaxpr var → leaf index) through jit
    calls; collect (leaf, length) of scan xs that are whole parameter leaves."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        ins = [origin.get(v) if isinstance(v, jcore.Var) else None for v in eqn.invars]
        if name in CALLS:
            inner = eqn.params[CALLS[name]]
            inner = inner.jaxpr if isinstance(inner, jcore.ClosedJaxpr) else inner
            _uses(inner, {iv: o for iv, o in zip(inner.invars, ins) if o is not None}, counts, scans)
            continue
        for o in ins:
            if o is not None:
                counts[o] = counts.get(o, 0) + 1
        if name == "scan":
            nc, nk, n = int(eqn.params["num_consts"]), int(eqn.params["num_carry"]), int(eqn.params["length"])
            for v, o in zip(eqn.invars[nc + nk:], ins[nc + nk:]):
                if o is not None and n > 1 and v.aval.shape[:1] == (n,):
                    scans.append((o, n))


def loss_jaxpr(loss_fn, params_abs, mb_abs):
    """(closed jaxpr, output treedef) of ``loss_fn`` at these shapes: one trace shared by
    ``find_scan_split`` and ``split_loss``."""
    closed, out = traced_jaxpr(loss_fn, params_abs, mb_abs)
    return closed, jax.tree_util.tree_structure(out)


def find_scan_split(loss_fn, params_abs, mb_abs, traced=None) -> ScanSplit | None:
    """The parameter leaves that only a scan reads, as its per-iteration ``xs`` (None: none).
    ``traced``: ``loss_jaxpr``'s result, when the caller has it."""
    closed, _ = traced or loss_jaxpr(loss_fn, params_abs, mb_abs)
    n_params = len(jax.tree_util.tree_leaves(params_abs))
    origin = {v: i for i, v in enumerate(closed.jaxpr.invars[:n_params])}
    counts: dict = {}
    scans: list = []
    _uses(closed.jaxpr, origin, counts, scans)
    as_xs: dict = {}
    for leaf, n in scans:
        as_xs.setdefault(leaf, []).append(n)
    ok = sorted(leaf for leaf, ns in as_xs.items() if len(ns) == 1 and counts.get(leaf) == 1)
    if not ok:
        return None
    return ScanSplit(stacked=tuple(ok), lengths=tuple(as_xs[leaf][0] for leaf in ok))


class _Slices(list):
    """A stacked parameter given as its slices (one array per scan iteration)."""


def _stacked(x):
    return jnp.stack(list(x)) if isinstance(x, _Slices) else x


def _eval(jaxpr, consts, args) -> list:
    return run(jaxpr, consts, args, _split_hook)


def _split_hook(eqn, ins) -> list | None:
    """An equation reading split parameters: a call inlined (so the scan inside it can be
    unrolled), the scan unrolled, any other reader given the stacked array."""
    if not any(isinstance(x, _Slices) for x in ins):
        return None
    name = eqn.primitive.name
    if name in CALLS:
        return inline(eqn, ins, _split_hook)
    if name == "scan":
        return _unroll(eqn, ins)
    return bind(eqn, [_stacked(x) for x in ins])


def _unroll(eqn, ins) -> list:
    """The scan as a loop over its iterations: slices of split parameters read directly, other
    xs sliced; a stage boundary on the floating carries between iterations."""
    p = eqn.params
    nc, nk, n, body = int(p["num_consts"]), int(p["num_carry"]), int(p["length"]), p["jaxpr"]
    consts = [_stacked(x) for x in ins[:nc]]
    carry = [_stacked(x) for x in ins[nc:nc + nk]]
    xs = ins[nc + nk:]
    ys: list = [None] * n
    order = range(n - 1, -1, -1) if p["reverse"] else range(n)
    for step, t in enumerate(order):
        x_t = [x[t] if isinstance(x, _Slices) else lax.index_in_dim(x, t, keepdims=False) for x in xs]
        outs = _eval(body.jaxpr, body.consts, [*consts, *carry, *x_t])
        carry, ys[t] = outs[:nk], outs[nk:]
        if step < n - 1:
            carry = [stage_boundary_p.bind(c) if jnp.issubdtype(c.dtype, jnp.floating) else c for c in carry]
    stacked = [jnp.stack([ys[t][k] for t in range(n)]) for k in range(len(eqn.outvars) - nk)]
    return list(carry) + stacked


def split_tree(split: ScanSplit, tree_def, leaves) -> list:
    """User-form flat leaves → the split form's pytree (stacked leaves become lists of slices)."""
    n = split.length_of()

    def part(x, t):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype)
        return x[t]
    return tree_def.unflatten([[part(x, t) for t in range(n[i])] if i in n else x for i, x in enumerate(leaves)])


def split_loss(loss_fn, split: ScanSplit, params_abs, mb_abs, traced=None):
    """``loss(split_params, batch)``: ``loss_fn`` with the split parameters' scans unrolled
    (``traced``: ``loss_jaxpr``'s result, when the caller has it)."""
    closed, out_def = traced or loss_jaxpr(loss_fn, params_abs, mb_abs)
    p_def = jax.tree_util.tree_structure(params_abs)
    n = split.length_of()

    def loss(split_params, batch):
        tops = p_def.flatten_up_to(split_params)
        args = [_Slices(t) if i in n else t for i, t in enumerate(tops)]
        return out_def.unflatten(_eval(closed.jaxpr, closed.consts, args + jax.tree_util.tree_leaves(batch)))
    loss.__name__ = getattr(loss_fn, "__name__", "loss_fn")
    loss.__qualname__ = getattr(loss_fn, "__qualname__", loss.__name__)
    return loss


def join_leaves(split: ScanSplit, user_def, split_leaves, device=None) -> list:
    """The split form's flat leaves → the user's flat leaves (slices stacked on ``device``)."""
    n, out, k = split.length_of(), [], 0
    for i in range(user_def.num_leaves):
        if i in n:
            parts = split_leaves[k:k + n[i]]
            out.append(jnp.stack([jax.device_put(x, device) for x in parts]))
            k += n[i]
        else:
            out.append(split_leaves[k])
            k += 1
    return out


def _matches(tree, p_def, shapes) -> bool:
    if tree is None or jax.tree_util.tree_structure(tree) != p_def:
        return False
    return [tuple(jnp.shape(x)) for x in p_def.flatten_up_to(tree)] == [tuple(s) for s in shapes]


def map_param_subtrees(fn, tree, p_def, shapes):
    """``fn(flat leaves)`` applied to every subtree of ``tree`` shaped like the parameters
    (structure ``p_def``, leaf ``shapes``): the params themselves, Adam's mu and nu, …; other
    leaves (step counts) kept."""
    def is_params(t):
        return _matches(t, p_def, shapes)
    return jax.tree_util.tree_map(lambda t: fn(p_def.flatten_up_to(t)) if is_params(t) else t, tree,
                                  is_leaf=is_params)
