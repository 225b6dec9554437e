"""A stage's planned program run as two executables: the forward and the backward halves of
``stage_train`` with the intra-op plan's constraints.

The intra-op ILP plans ``stage_train(fwd)`` — one micro-batch's forward and backward traced
together (``autopar.pipeline.stages``) — and its memory model counts what the backward reads
from the forward in the plan's layouts. A pipeline runs the two apart (other micro-batches'
tasks come between), so that program is cut where ``jax.vjp`` stops tracing the forward:

* its first equations are the forward as ``jax.vjp`` traces it alone (checked equation by
  equation); the forward half returns the stage's outputs and the *residuals*, the values it
  makes that the backward half reads;
* the rest is the backward half: residuals, the stage inputs it reads again (the weights of
  every matmul: never copied into the residuals) and the outputs' cotangents in, the
  parameter and input gradients out.

Both halves replay their equations with the plan's sharding constraints (``emit.interpret``),
so the layouts — and with them the residuals' bytes per device and the collectives — are the
planned ones; with a ``remat`` option the recomputation is in the backward half, a separate
executable, so it is not merged back into the forward. ``planned_halves`` returns None where
the cut cannot be made (the retraced program is not the planned one, or the forward traced
alone is not its prefix); the runtime then runs ``jax.vjp`` of the stage forward under the
plan's boundary shardings only, and says so (``StageExec.follows_plan``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax

from ..emit import interpret
from ..trace import Program, trace
from .stages import Stage, stage_abstract_args, stage_train


@dataclass(frozen=True)
class Halves:
    forward: Callable                # (*p, *a, *nd) -> [*y, *aux, *residuals]
    backward: Callable               # (*residuals, *inputs read again, *ct) -> [*dp, *da]
    num_residuals: int
    reads: tuple[int, ...]           # positions in p + a + nd the backward reads again


def _used_consts(train: Program, eqns) -> dict:
    used = {x for e in eqns for x in e.inputs if isinstance(x, int) and x in train.consts}
    return {c: train.consts[c] for c in used}


def _part(train: Program, invars, outvars, eqns) -> Program:
    return Program(values=train.values, invars=list(invars), outvars=list(outvars), consts=_used_consts(train, eqns),
                   eqns=list(eqns), in_tree=None, out_tree=None, regions=train.regions)


def forward_prefix(fwd, args, train: Program, num_outputs: int) -> int | None:
    """How many of ``train``'s first equations are the forward: ``jax.vjp`` of ``fwd`` traced
    alone (its residuals returned) matched in order against ``train``'s equations (an equation
    of the lone trace that ``train`` dropped as dead code is skipped). None unless that prefix
    reads no cotangent and makes the stage's ``num_outputs`` outputs (y, then aux)."""
    def alone(p, a, nd):
        y, vjp_fn, aux = jax.vjp(lambda x, z: fwd(x, z, nd), p, a, has_aux=True)
        return y, aux, jax.tree_util.tree_leaves(vjp_fn)
    at = 0
    for e in trace(alone, *args[:3]).eqns:
        t = train.eqns[at] if at < len(train.eqns) else None
        if t is not None and e.prim.name == t.prim.name and len(e.outputs) == len(t.outputs):
            at += 1
    n_in = sum(len(x) for x in args[:3])
    tainted = set(train.invars[n_in:])  # the cotangents and what depends on them
    made = set(train.invars[:n_in])
    for e in train.eqns[:at]:
        if any(isinstance(x, int) and x in tainted for x in e.inputs):
            return None
        made.update(e.outputs)
    outs = [v for v in train.outvars[:num_outputs] if isinstance(v, int)]
    return at if all(v in made or v in train.consts for v in outs) else None


@dataclass(frozen=True)
class Cut:
    at: int                          # the backward's first equation
    residuals: tuple[int, ...]       # values the forward makes and the backward reads
    reads: tuple[int, ...]           # positions in p + a + nd the backward reads again


def cut_train(fwd, args, train: Program, num_outputs: int) -> Cut | None:
    """Where ``train`` = ``trace(stage_train(fwd), *args)`` splits into forward and backward
    (``num_outputs``: the stage's outputs, y then aux); None if it cannot be cut."""
    at = forward_prefix(fwd, args, train, num_outputs)
    if at is None:
        return None
    n_in = sum(len(x) for x in args[:3])
    made = {o for e in train.eqns[:at] for o in e.outputs}
    read = {x for e in train.eqns[at:] for x in e.inputs if isinstance(x, int)} | {
        x for x in train.outvars[num_outputs:] if isinstance(x, int)}
    return Cut(at=at, residuals=tuple(sorted(v for v in read if v in made)),
               reads=tuple(i for i, v in enumerate(train.invars[:n_in]) if v in read))


def residual_bytes_per_device(train: Program, cut: Cut, plan) -> float:
    """The residuals' bytes on one device in ``plan``'s layouts (the layout a value is kept
    in: its shared conversion where ``build_shared`` made one, else its producer's)."""
    from ..cost import shard_factor
    where = {o: (i, k) for i, e in enumerate(train.eqns[:cut.at]) for k, o in enumerate(e.outputs)}
    sizes = dict(zip(plan.axis_names, plan.mesh_shape))
    total = 0.0
    for v in cut.residuals:
        i, k = where[v]
        spec = plan.materialized.get(v, plan.eqns[i].out_specs[k]) or []
        total += train.values[v].nbytes / shard_factor(spec, sizes)
    return total


def planned_halves(fwd, program: Program, st: Stage, num_params: int, plan, mesh) -> Halves | None:
    """The stage's planned ``stage_train`` program cut into its forward and backward halves,
    each replayed with ``plan``'s constraints on ``mesh`` (None: see the module docstring)."""
    args = stage_abstract_args(program, st, num_params)
    train = trace(stage_train(fwd), *args)
    if train.fingerprint != plan.fingerprint:
        return None
    n_out = len(st.outs) + len(st.nd_outs)
    cut = cut_train(fwd, args, train, n_out)
    if cut is None:
        return None
    n_in = sum(len(x) for x in args[:3])
    ins, cts = train.invars[:n_in], train.invars[n_in:]
    residuals = list(cut.residuals)
    fprog = _part(train, ins, list(train.outvars[:n_out]) + residuals, train.eqns[:cut.at])
    bprog = _part(train, residuals + [ins[i] for i in cut.reads] + list(cts), train.outvars[n_out:],
                  train.eqns[cut.at:])
    out_specs = {e.index: e.out_specs for e in plan.eqns}
    in_specs = {(e.index, k): s for e in plan.eqns for k, s in e.reshard_inputs.items()}
    shared = plan.materialized

    def shift(d, lo, hi, key=lambda k: k):
        return {(k - lo if isinstance(k, int) else (k[0] - lo, k[1])): s for k, s in d.items() if lo <= key(k) < hi}
    n, at = len(train.eqns), cut.at
    forward = interpret(fprog, shift(out_specs, 0, at), shift(in_specs, 0, at, key=lambda k: k[0]), mesh,
                        materialized=shared)
    backward = interpret(bprog, shift(out_specs, at, n), shift(in_specs, at, n, key=lambda k: k[0]), mesh,
                         materialized=shared)
    return Halves(forward=forward, backward=backward, num_residuals=len(residuals), reads=cut.reads)


__all__ = ["Cut", "Halves", "cut_train", "forward_prefix", "planned_halves", "residual_bytes_per_device"]
