"""Trace a function into a flat equation list.

``jax.make_jaxpr`` on example arguments (arrays or ``jax.ShapeDtypeStruct`` pytrees — no
allocation), then nested ``jit``, ``custom_jvp_call``, ``custom_vjp_call`` and ``remat2``
(checkpoint) are inlined and dead equations dropped. With ``calls=True`` an inlined
``custom_jvp`` / ``custom_vjp`` or ``jax.checkpoint`` call keeps a record (:class:`CustomCall`:
the call as traced, its inputs and outputs) and its equations a tag, so a program that is
differentiated after flattening (a pipeline stage's forward) can bind the call itself and get
its custom derivative or its recomputation, not the derivative of its body
(``emit.interpret(custom_calls=True)``). ``jax.nn.dot_product_attention`` is intercepted
while tracing and becomes one equation (forward; its gradient a second one): see
:mod:`autopar.attention`. A ``scan``'s body is expanded in place, once (see
:class:`Region`); ``while``/``cond`` stay single equations. Values are numbered with plain ints.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

# primitive name -> param holding the body to inline
INLINE_PARAMS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}


class TraceError(ValueError):
    """The function could not be traced with the example arguments."""


@dataclass(frozen=True)
class Value:
    id: int
    shape: tuple[int, ...]
    dtype: Any

    @cached_property  # (asked for hundreds of thousands of times while a pipeline plan is built)
    def itemsize(self) -> int:
        return dtype_itemsize(self.dtype)

    @cached_property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.itemsize


@dataclass(frozen=True)
class Lit:
    """A literal operand (a scalar constant inlined in the jaxpr)."""
    val: Any
    shape: tuple[int, ...]
    dtype: Any


@dataclass
class Eqn:
    prim: Any                  # jax.extend.core.Primitive
    inputs: list               # int (value id) | Lit
    outputs: list[int]
    params: dict
    source: str = ""           # source line info, for the report
    repeat: int = 1            # executions per call: the trip counts of the enclosing scans
    scope: tuple = ()          # ids of the enclosing scan regions, outermost first
    remat: int | None = None   # the inlined jax.checkpoint (prevent_cse) it came from, outermost
    custom: int | None = None  # the inlined custom_jvp / custom_vjp / checkpoint call it came from, outermost


RULE_CALLS = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")   # the user's derivative
CUSTOM_CALLS = RULE_CALLS + ("checkpoint", "remat2")                           # + jax.checkpoint's recompute


@dataclass(frozen=True)
class CustomCall:
    """One inlined ``custom_jvp`` / ``custom_vjp`` / ``jax.checkpoint`` call: ``prim`` bound
    with ``params`` on ``inputs`` gives ``outputs``, differentiated by the user's rule (or
    with the checkpoint's recomputation). Its equations (tagged ``Eqn.custom == id``, ``eqns``
    of them after dead-code removal) are contiguous; each output is made by one of them (an
    output that was an input or a literal gets a ``copy``). ``remat``, ``scope``: the
    checkpoint group and scan regions around the call."""
    id: int
    prim: Any
    params: dict
    inputs: tuple              # int (value id) | Lit
    outputs: tuple[int, ...]
    remat: int | None = None
    scope: tuple = ()
    eqns: int = 0

    @property
    def rule(self) -> bool:
        """A custom derivative rule (never split: it holds for the call as a whole); else a checkpoint."""
        return self.prim.name in RULE_CALLS


# A scan's body is planned like straight-line code, once for all iterations: its equations
# are expanded in place between boundary equations of these (never bound) primitives —
#   scan_carry_in[k]:  the loop's initial carry k → the body's carry input (every iteration)
#   scan_slice[k]:     the stacked xs k (length, …) → iteration i's slice (…)
#   scan_carry_out[k]: the body's carry output k → the loop's final carry k
#   scan_stack[k]:     the body's output y k → the stacked ys (length, …)
# params {"region": id, "index": k}. ``emit`` rebuilds the ``lax.scan`` from them.
SCAN_CARRY_IN = jcore.Primitive("scan_carry_in")
SCAN_SLICE = jcore.Primitive("scan_slice")
SCAN_CARRY_OUT = jcore.Primitive("scan_carry_out")
SCAN_STACK = jcore.Primitive("scan_stack")
SCAN_BOUNDARY = ("scan_carry_in", "scan_slice", "scan_carry_out", "scan_stack")


@dataclass(frozen=True)
class Region:
    """One expanded ``scan``: its equations have ``id`` in their scope."""
    id: int
    length: int
    reverse: bool
    unroll: Any
    num_carry: int
    source: str = ""


@dataclass
class Program:
    values: dict[int, Value]
    invars: list[int]
    outvars: list             # int | Lit
    consts: dict[int, Any]    # value id -> constant array (closed-over)
    eqns: list[Eqn]
    in_tree: Any
    out_tree: Any
    fingerprint: str = ""
    stats: dict = field(default_factory=dict)
    regions: dict = field(default_factory=dict)   # region id -> Region (expanded scans)
    customs: dict = field(default_factory=dict)   # call id -> CustomCall (trace(calls=True))


def dtype_itemsize(dtype) -> int:
    try:
        return int(np.dtype(dtype).itemsize)
    except TypeError:
        return 8  # extended dtypes (PRNG keys): treated as 8 bytes per element


def _source(eqn) -> str:
    try:
        from jax._src import source_info_util
        return source_info_util.summarize(eqn.source_info)
    except Exception:  # pragma: no cover - best effort only
        return ""


class _Flattener:
    def __init__(self, calls: bool = False) -> None:
        self.calls = calls   # record custom-derivative and checkpoint calls (trace(calls=True))
        self.values: dict[int, Value] = {}
        self.consts: dict[int, Any] = {}
        self.eqns: list[Eqn] = []
        self.inlined = 0
        self.regions: dict[int, Region] = {}
        self.repeat, self.scope = 1, ()
        self.remat, self.remat_groups = None, 0
        self.custom, self.customs = None, {}

    def new_value(self, aval) -> int:
        vid = len(self.values)
        self.values[vid] = Value(vid, tuple(int(d) for d in aval.shape), aval.dtype)
        return vid

    def read(self, env: dict, atom):
        if isinstance(atom, jcore.Literal):
            aval = atom.aval
            return Lit(atom.val, tuple(aval.shape), aval.dtype)
        return env[atom]

    def run(self, jaxpr, consts, args) -> list:
        env: dict = {}
        for v, c in zip(jaxpr.constvars, consts):
            vid = self.new_value(v.aval)
            self.consts[vid] = c
            env[v] = vid
        for v, a in zip(jaxpr.invars, args):
            env[v] = a
        for eqn in jaxpr.eqns:
            ins = [self.read(env, x) for x in eqn.invars]
            name = eqn.primitive.name
            body = eqn.params.get(INLINE_PARAMS.get(name, ""), None)
            if body is not None and name in INLINE_PARAMS:
                self.inlined += 1
                if isinstance(body, jcore.ClosedJaxpr):
                    inner, inner_consts = body.jaxpr, body.consts
                else:
                    inner, inner_consts = body, ()
                n_extra = len(ins) - len(inner.invars)
                outer_remat = self.remat
                group = self.remat is None and name in ("checkpoint", "remat2") and eqn.params.get("prevent_cse", True)
                if group:  # its equations stay a group: emit keeps XLA from merging a recomputation back
                    self.remat, self.remat_groups = self.remat_groups, self.remat_groups + 1
                custom = self.calls and self.custom is None and name in CUSTOM_CALLS
                if custom:
                    self.custom, start = len(self.customs), len(self.eqns)
                outs = self.run(inner, inner_consts, ins[n_extra:] if n_extra > 0 else ins)
                if custom:
                    outs = self._custom_call(eqn, ins, outs, start, outer_remat)
                    self.custom = None
                if group:
                    self.remat = None
                for v, o in zip(eqn.outvars, outs):
                    env[v] = o
                continue
            if name == "scan":
                outs = self.scan(eqn, ins)
            else:
                outs = [self.new_value(v.aval) for v in eqn.outvars]
                self.eqns.append(Eqn(eqn.primitive, ins, outs, dict(eqn.params), _source(eqn), self.repeat,
                                     self.scope, self.remat, self.custom))
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [self.read(env, v) for v in jaxpr.outvars]

    def _boundary(self, prim, x, aval, rid: int, k: int, source: str) -> int:
        out = self.new_value(aval)
        self.eqns.append(Eqn(prim, [x], [out], {"region": rid, "index": k}, source, self.repeat, self.scope,
                             self.remat, self.custom))
        return out

    def _custom_call(self, eqn, ins, outs, start: int, remat) -> list:
        """Record the custom call just inlined (equations ``start:``); an output its equations
        do not make (an input passed through, a literal) gets a ``copy`` so the call has a place."""
        made = {o for e in self.eqns[start:] for o in e.outputs}
        fixed = []
        for o, v in zip(outs, eqn.outvars):
            if not (isinstance(o, int) and o in made):
                new = self.new_value(v.aval)
                self.eqns.append(Eqn(jax.lax.copy_p, [o], [new], {}, _source(eqn), self.repeat, self.scope,
                                     self.remat, self.custom))
                o = new
            fixed.append(o)
        self.customs[self.custom] = CustomCall(self.custom, eqn.primitive, dict(eqn.params), tuple(ins), tuple(fixed),
                                               remat, self.scope)
        return fixed

    def scan(self, eqn, ins) -> list[int]:
        """Expand a ``scan`` in place (see :class:`Region`); returns its outputs' value ids."""
        p = eqn.params
        nc, nk, length = int(p["num_consts"]), int(p["num_carry"]), int(p["length"])
        body, src = p["jaxpr"], _source(eqn)
        rid = len(self.regions)
        self.regions[rid] = Region(rid, length, bool(p["reverse"]), p["unroll"], nk, src)
        scope, repeat = self.scope, self.repeat
        self.scope = scope + (rid,)
        bin = body.jaxpr.invars
        carry = [self._boundary(SCAN_CARRY_IN, x, bin[nc + k].aval, rid, k, src) for k, x in enumerate(ins[nc:nc + nk])]
        xs = [self._boundary(SCAN_SLICE, x, bin[nc + nk + k].aval, rid, k, src) for k, x in enumerate(ins[nc + nk:])]
        self.repeat = repeat * length
        outs = self.run(body.jaxpr, body.consts, list(ins[:nc]) + carry + xs)
        self.repeat = repeat
        res = [self._boundary(SCAN_CARRY_OUT, o, v.aval, rid, k, src) for k, (o, v) in enumerate(zip(outs, eqn.outvars))
               if k < nk]
        res += [self._boundary(SCAN_STACK, o, v.aval, rid, k, src)
                for k, (o, v) in enumerate(zip(outs[nk:], eqn.outvars[nk:]))]
        self.scope = scope
        return res


def reads(eqn: Eqn, customs: dict) -> list:
    """What ``eqn`` reads; in a recorded custom call, also all the call's inputs (bound whole,
    ``emit.interpret(custom_calls=True)``, it needs them even where its body does not)."""
    if eqn.custom is None or eqn.custom not in customs:
        return eqn.inputs
    return list(eqn.inputs) + list(customs[eqn.custom].inputs)


def _dce(eqns: list[Eqn], outvars: list, customs: dict) -> list[Eqn]:
    live = {o for o in outvars if isinstance(o, int)}
    kept = []
    for eqn in reversed(eqns):
        # a loop's carries are needed by its next iteration whatever reads the final value
        effectful = bool(getattr(eqn.prim, "effects", None)) or eqn.prim.name in (
            "debug_callback", "io_callback", "scan_carry_in", "scan_carry_out")
        if effectful or any(o in live for o in eqn.outputs):
            kept.append(eqn)
            live.update(x for x in reads(eqn, customs) if isinstance(x, int))
    return kept[::-1]


def traced_jaxpr(fn, *args):
    """``jax.make_jaxpr(fn, return_shape=True)(*args)``; the user's function failing under
    tracing is a :class:`TraceError` saying what autopar needs."""
    try:
        return jax.make_jaxpr(fn, return_shape=True)(*args)
    except Exception as err:  # the user's function failed under tracing
        raise TraceError(
            f"could not trace {getattr(fn, '__name__', fn)!r} with jax.make_jaxpr: {type(err).__name__}: {err}\n"
            "autopar needs a jittable function: no Python control flow on traced values, no "
            "side effects, array (or ShapeDtypeStruct) arguments. Check that jax.jit(fn)(*args) works."
        ) from err


def trace(fn, *args, calls: bool = False) -> Program:
    """Trace ``fn(*args)``; args may be arrays or ``jax.ShapeDtypeStruct`` pytrees. ``calls``:
    record each custom-derivative and checkpoint call (:class:`CustomCall`) for a program that
    is differentiated after flattening (a training loss cut into pipeline stages)."""
    if not callable(fn):
        raise TraceError(f"expected a callable, got {type(fn).__name__}")
    from .attention import intercept
    with intercept():  # jax.nn.dot_product_attention → one planned op (autopar.attention)
        closed, out_shape = traced_jaxpr(fn, *args)
    flat = _Flattener(calls)
    in_tree = jax.tree_util.tree_structure(args)
    invars = [flat.new_value(v.aval) for v in closed.jaxpr.invars]
    outs = flat.run(closed.jaxpr, closed.consts, invars)
    eqns = _dce(flat.eqns, outs, flat.customs)
    sizes = Counter(e.custom for e in eqns)
    customs = {k: replace(c, eqns=sizes[k]) for k, c in flat.customs.items() if sizes[k]}
    text = "\n".join(f"{e.prim.name} {e.inputs} {e.outputs} {sorted(map(str, e.params.items()))}" for e in eqns)
    shapes = ";".join(f"{flat.values[v].shape}{flat.values[v].dtype}" for v in invars)
    fingerprint = hashlib.sha256((shapes + "\n" + text).encode()).hexdigest()[:16]
    return Program(
        values=flat.values, invars=invars, outvars=outs, consts=flat.consts, eqns=eqns, regions=flat.regions,
        customs=customs,
        in_tree=in_tree, out_tree=jax.tree_util.tree_structure(out_shape), fingerprint=fingerprint,
        stats={"jaxpr_eqns": len(closed.jaxpr.eqns), "inlined_calls": flat.inlined,
               "dead_eqns": len(flat.eqns) - len(eqns)},
    )
