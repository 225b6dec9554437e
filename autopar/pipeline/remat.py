"""Activation rematerialisation of a pipeline stage, per layer: what its forward saves for
the backward.

* ``"none"``: every ``jax.vjp`` residual is kept (the stage forward as traced).
* ``"dots"``: each layer of the stage runs under ``jax.checkpoint`` with
  ``dots_with_no_batch_dims_saveable``: the outputs of matmuls against weights (a
  ``dot_general`` without batch dimensions: projections, MLP) are saved, elementwise ops,
  norms and batched matmuls — attention scores and their softmax, the (seq × seq) tensors —
  are recomputed in the backward. ``checkpoint_dots`` would also save the batched attention
  dots, i.e. keep the largest activations of a long sequence; this is Megatron's selective
  recompute instead.
* ``"full"``: each layer under ``jax.checkpoint`` with ``nothing_saveable``: only each layer's
  inputs are kept, the layer's whole forward runs again in the backward.

The layers are the pipeline's (``Layering``); a stage of layers i..j−1 is run as a chain of
per-layer sub-programs, each wrapped, so the residuals the stage keeps per in-flight
micro-batch (``stages.residual_bytes``) and the forward + backward the intra-op ILP costs
(``stages.stage_train``: the recomputation is in its backward) are the ones the runtime
executes. The stage's first layer's input is the stage's incoming activation, which
``residual_bytes`` never counts (it is an input of the stage), under every option alike.
"""
from __future__ import annotations

import jax

from ..emit import interpret
from ..trace import Program

REMAT_OPTIONS = ("none", "dots", "full")   # in the order the stage DP prefers them (ties: the cheaper)

POLICIES = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            "full": jax.checkpoint_policies.nothing_saveable}


def remat_options(remat: str) -> tuple[str, ...]:
    """The options the stage search chooses among: ``"auto"`` all of them, else the one given."""
    if remat == "auto":
        return REMAT_OPTIONS
    if remat not in REMAT_OPTIONS:
        raise ValueError(f"remat must be 'auto' or one of {REMAT_OPTIONS}, got {remat!r}")
    return (remat,)


def remat_forward(program: Program, st, num_params: int, layer_ranges, option: str):
    """``fwd(p, a, nd) -> (y, aux)`` of stage ``st`` as a chain of its layers
    (``layer_ranges``: [start, end) equation positions tiling ``st.eqns``), each layer under
    ``jax.checkpoint`` with the option's policy."""
    from .stages import _sub_program, split_program
    a, b = st.eqns
    ranges = [tuple(map(int, r)) for r in layer_ranges]
    if not ranges or ranges[0][0] != a or ranges[-1][1] != b or any(r[1] != s[0] for r, s in zip(ranges, ranges[1:])):
        raise ValueError(f"layer ranges {ranges} do not tile the stage's equations [{a}, {b})")
    n = len(program.eqns)
    cut = ([(0, a)] if a > 0 else []) + ranges + ([(b, n)] if b < n else [])
    layers = [ls for ls in split_program(program, num_params, cut) if a <= ls.eqns[0] and ls.eqns[1] <= b]
    policy = POLICIES[option]
    steps = []
    for ls in layers:
        run = interpret(_sub_program(program, ls, num_params), {}, {}, None, custom_calls=True)
        steps.append((ls, jax.checkpoint(lambda p, x, nd, run=run: run(*p, *x, *nd), policy=policy)))
    ny = len(st.outs)

    def fwd(p, acts, nd):
        params = dict(zip(st.params, p))
        batch = dict(zip(st.batch, nd[:len(st.batch)]))
        env = dict(zip(st.acts_in, acts)) | dict(zip(st.nd_acts_in, nd[len(st.batch):]))
        for ls, step in steps:
            outs = step([params[i] for i in ls.params], [env[v] for v in ls.acts_in],
                        [batch[i] for i in ls.batch] + [env[v] for v in ls.nd_acts_in])
            env.update(zip(list(ls.outs) + list(ls.nd_outs), outs))
        outs = [env[v] for v in list(st.outs) + list(st.nd_outs)]
        return outs[:ny], outs[ny:]
    return fwd


__all__ = ["REMAT_OPTIONS", "POLICIES", "remat_options", "remat_forward"]
