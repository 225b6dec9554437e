"""A jaxpr evaluated equation by equation, each primitive bound again (so under a trace it
traces the same program again), with a ``hook`` that may compute some equations otherwise:
the one evaluator behind the pipeline's program rewrites — scans unrolled per iteration
(``pipeline.unscan``), conds as selects (``pipeline.update_split``), random draws over the
batch made per micro-batch (``pipeline.rng_form``)."""
from __future__ import annotations

from typing import Callable

from jax.extend import core as jcore

# call primitives whose body may be evaluated in place: the parameter holding the body
CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}

Hook = Callable[[object, list], "list | None"]   # (eqn, input values) -> outputs, or None: bind as is


def bind(eqn, ins) -> list:
    """``eqn``'s primitive bound to ``ins`` with its own parameters."""
    out = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


def run(jaxpr, consts, args, hook: Hook | None = None) -> list:
    """The outputs of ``jaxpr`` on ``consts`` and ``args``; each equation computed by
    ``hook(eqn, ins)`` where that returns a list, else bound as traced."""
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        outs = hook(eqn, ins) if hook is not None else None
        if outs is None:
            outs = bind(eqn, ins)
        for v, o in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def body_of(jaxpr_like):
    """(jaxpr, consts) of a ClosedJaxpr or an open Jaxpr."""
    if isinstance(jaxpr_like, jcore.ClosedJaxpr):
        return jaxpr_like.jaxpr, jaxpr_like.consts
    return jaxpr_like, ()


def inline(eqn, ins, hook: Hook | None = None) -> list:
    """A call (``CALLS``: pjit, closed_call …) evaluated in place, its body's equations
    joining the caller's (so ``hook`` sees them)."""
    jaxpr, consts = body_of(eqn.params[CALLS[eqn.primitive.name]])
    return run(jaxpr, consts, ins, hook)
