"""Pipeline stages carved out of the traced loss program.

The loss ``loss_fn(params, microbatch)`` is traced once (``autopar.trace``) into a flat
program whose inputs are the parameter leaves followed by the batch leaves. A stage is a
contiguous range of its equations. For each stage this module finds

* the parameter leaves it reads (``params``; a leaf read by several stages — e.g. tied
  embeddings — is *owned* by the first and copied to the others, whose gradients are sent
  back and added);
* the batch leaves it reads (``batch``);
* the activations it receives from earlier stages (``acts_in``) and the values it sends to
  later stages or returns (``outs``), each split into differentiable (floating) and
  non-differentiable (integer/bool) values.

``stage_for_range`` cuts one range out (``single_layer_stages`` every layer, in one pass), and
``structural_key`` names a stage's program up to value ids (identical layers share it).

``stage_forward`` turns a stage into ``fwd(p, a, nd) -> (y, aux)``: ``p`` its parameter
leaves, ``a`` its floating incoming activations, ``nd`` its batch leaves then integer
activations; ``y`` the floating outputs (differentiated), ``aux`` the integer ones.
``stage_train`` is the same stage's forward + backward for one micro-batch — what the
intra-op ILP plans and costs — ``(p, a, nd, ct) -> (y, aux, dp, da)``.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Var

from ..emit import interpret
from ..trace import Program, dtype_itemsize, reads


class StageSplitError(ValueError):
    """The loss program cannot be cut as asked."""


@dataclass(frozen=True)
class Stage:
    index: int
    eqns: tuple[int, int]                 # [start, end) positions in program.eqns
    params: tuple[int, ...]               # flat param leaf indices read here (sorted)
    batch: tuple[int, ...]                # flat batch leaf indices read here (sorted)
    acts_in: tuple[int, ...]              # value ids from earlier stages (floating), sorted
    nd_acts_in: tuple[int, ...]           # value ids from earlier stages (integer/bool), sorted
    outs: tuple[int, ...]                 # floating values sent on / returned, sorted
    nd_outs: tuple[int, ...]              # integer/bool values sent on
    consts: tuple[int, ...]               # closed-over constants read here


def _floating(dtype) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.inexact))  # (numpy alone does not know bfloat16)


def split_program(program: Program, num_params: int, eqn_ranges) -> list[Stage]:
    """Cut ``program`` (inputs: ``num_params`` param leaves, then batch leaves) at
    ``eqn_ranges`` = [(start, end), …] that tile ``range(len(program.eqns))`` in order."""
    n = len(program.eqns)
    ranges = [tuple(map(int, r)) for r in eqn_ranges]
    if not ranges or ranges[0][0] != 0 or ranges[-1][1] != n or any(
            a >= b for a, b in ranges) or any(r[1] != s[0] for r, s in zip(ranges, ranges[1:])):
        raise StageSplitError(f"stage equation ranges {ranges} must tile [0, {n}) in order, each non-empty")
    invar_pos = {v: i for i, v in enumerate(program.invars)}
    stage_of: dict[int, int] = {}
    for s, (a, b) in enumerate(ranges):
        for eqn in program.eqns[a:b]:
            for o in eqn.outputs:
                stage_of[o] = s
    outvars = [o for o in program.outvars if isinstance(o, int)]
    used_later: dict[int, set[int]] = {}
    for s, (a, b) in enumerate(ranges):
        for eqn in program.eqns[a:b]:
            for x in reads(eqn, program.customs):
                if isinstance(x, int) and x in stage_of and stage_of[x] != s:
                    used_later.setdefault(x, set()).add(s)
    stages = []
    for s, (a, b) in enumerate(ranges):
        params, batch, acts, nd_acts, consts = set(), set(), set(), set(), set()
        for eqn in program.eqns[a:b]:
            for x in reads(eqn, program.customs):
                if not isinstance(x, int):
                    continue
                if x in invar_pos:
                    i = invar_pos[x]
                    if i < num_params:
                        params.add(i)
                    else:
                        batch.add(i - num_params)
                elif x in program.consts:
                    consts.add(x)
                elif stage_of[x] != s:
                    (acts if _floating(program.values[x].dtype) else nd_acts).add(x)
        outs = sorted(v for v, st in stage_of.items() if st == s and (v in used_later or v in outvars))
        stages.append(Stage(
            index=s, eqns=(a, b), params=tuple(sorted(params)), batch=tuple(sorted(batch)),
            acts_in=tuple(sorted(acts)), nd_acts_in=tuple(sorted(nd_acts)),
            outs=tuple(v for v in outs if _floating(program.values[v].dtype)),
            nd_outs=tuple(v for v in outs if not _floating(program.values[v].dtype)),
            consts=tuple(sorted(consts))))
    return stages


def stage_for_range(program: Program, num_params: int, a: int, b: int) -> Stage:
    n = len(program.eqns)
    ranges = [r for r in ((0, a), (a, b), (b, n)) if r[0] < r[1]]
    return next(st for st in split_program(program, num_params, ranges) if st.eqns == (a, b))


def single_layer_stages(program: Program, num_params: int, layer_eqns) -> list[Stage]:
    """``stage_for_range`` of every layer (equation ranges ``layer_eqns``, in order), from one
    split of the program instead of one per layer: a stage's inputs and outputs are the
    values crossing its own range's border, however the rest is cut; its index is the one
    ``stage_for_range`` gives (0 for a stage at the start, else 1)."""
    n, cuts = len(program.eqns), []
    if any(a >= b for a, b in layer_eqns) or any(b > c for (_, b), (c, _) in zip(layer_eqns, layer_eqns[1:])):
        return [stage_for_range(program, num_params, a, b) for a, b in layer_eqns]  # (not in order: one by one)
    for a, b in layer_eqns:
        if a > (cuts[-1][1] if cuts else 0):
            cuts.append((cuts[-1][1] if cuts else 0, a))  # (equations between layers)
        cuts.append((a, b))
    if cuts[-1][1] < n:
        cuts.append((cuts[-1][1], n))
    at = {st.eqns: st for st in split_program(program, num_params, cuts)}
    return [dataclasses.replace(at[(a, b)], index=0 if a == 0 else 1) for a, b in layer_eqns]


def structural_key(program: Program, st: Stage, num_params: int) -> str:
    """Hash of the stage's forward program with value ids renumbered: identical layers
    (same primitives, params, shapes, wiring, input roles) get the same key wherever they sit."""
    ids: dict[int, int] = {}
    vals = program.values

    def name(x):
        if not isinstance(x, int):
            return f"lit{x.val!r}:{x.dtype}"
        if x not in ids:
            ids[x] = len(ids)
        return f"v{ids[x]}:{vals[x].shape}{vals[x].dtype}"
    ins = ([program.invars[p] for p in st.params] + list(st.acts_in)
           + [program.invars[num_params + b] for b in st.batch] + list(st.nd_acts_in) + list(st.consts))
    # the inputs' roles too: an activation is differentiated (its gradient is computed and
    # sent back), a batch leaf is not, so the same layer reading either is another program
    roles = f"{len(st.params)}p {len(st.acts_in)}a {len(st.batch)}b {len(st.nd_acts_in)}n {len(st.consts)}c"
    parts = [f"in {roles} " + " ".join(name(v) for v in ins)]
    for eqn in program.eqns[st.eqns[0]:st.eqns[1]]:
        parts.append(f"{eqn.prim.name} {[name(x) for x in eqn.inputs]} -> {[name(o) for o in eqn.outputs]} "
                     f"{sorted((k, str(v)) for k, v in eqn.params.items())}")
    parts.append("out " + " ".join(name(v) for v in list(st.outs) + list(st.nd_outs)))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def owners(stages: list[Stage], num_params: int) -> list[int]:
    """Owning stage of every param leaf: the first stage that reads it (0 if none does)."""
    own = [0] * num_params
    seen = set()
    for st in stages:
        for p in st.params:
            if p not in seen:
                own[p] = st.index
                seen.add(p)
    return own


def _sub_program(program: Program, st: Stage, num_params: int) -> Program:
    invars = ([program.invars[p] for p in st.params] + list(st.acts_in)
              + [program.invars[num_params + b] for b in st.batch] + list(st.nd_acts_in))
    return Program(values=program.values, invars=invars, outvars=list(st.outs) + list(st.nd_outs),
                   consts={c: program.consts[c] for c in st.consts},
                   eqns=program.eqns[st.eqns[0]:st.eqns[1]], in_tree=None, out_tree=None, regions=program.regions,
                   customs=program.customs)


def stage_forward(program: Program, st: Stage, num_params: int, remat: str = "none", layer_ranges=None):
    """``fwd(p, a, nd) -> (y, aux)`` for one stage (lists of arrays). ``remat`` "dots" or
    "full": each of its layers (``layer_ranges``, equation positions) under ``jax.checkpoint``
    (``autopar.pipeline.remat``)."""
    if remat != "none":
        from .remat import remat_forward
        return remat_forward(program, st, num_params, layer_ranges, remat)
    run = interpret(_sub_program(program, st, num_params), {}, {}, None, custom_calls=True)
    ny = len(st.outs)

    def fwd(p, a, nd):
        outs = run(*p, *a, *nd)
        return list(outs[:ny]), list(outs[ny:])
    return fwd


def stage_train(fwd):
    """Forward + backward of one micro-batch: ``(p, a, nd, ct) -> (y, aux, dp, da)``."""
    def train(p, a, nd, ct):
        y, vjp_fn, aux = jax.vjp(lambda p_, a_: fwd(p_, a_, nd), p, a, has_aux=True)
        dp, da = vjp_fn(ct)
        return y, aux, dp, da
    return train


def stage_abstract_args(program: Program, st: Stage, num_params: int):
    """ShapeDtypeStruct lists (p, a, nd, ct) of ``stage_train`` for this stage."""
    vals = program.values
    sds = lambda v: jax.ShapeDtypeStruct(vals[v].shape, vals[v].dtype)  # noqa: E731
    p = [sds(program.invars[i]) for i in st.params]
    a = [sds(v) for v in st.acts_in]
    nd = [sds(program.invars[num_params + b]) for b in st.batch] + [sds(v) for v in st.nd_acts_in]
    ct = [sds(v) for v in st.outs]
    return p, a, nd, ct


def residual_bytes(fwd, p, a, nd) -> float:
    """Bytes the backward pass keeps from the forward (``jax.vjp`` residuals), not counting
    residuals that are inputs passed through (parameters): activation memory per micro-batch."""
    def res(p_, a_, nd_):
        return jax.tree_util.tree_leaves(jax.vjp(lambda x, y: fwd(x, y, nd_), p_, a_, has_aux=True)[1])
    closed = jax.make_jaxpr(res)(p, a, nd)
    ins = set(closed.jaxpr.invars)
    total = 0.0
    for v in closed.jaxpr.outvars:
        if isinstance(v, Var) and v not in ins:
            total += float(np.prod(v.aval.shape, dtype=np.int64)) * dtype_itemsize(v.aval.dtype)
    return total
