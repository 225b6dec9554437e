"""One pipeline stage's executables, all ``jax.jit``s on its sub-mesh with the shardings of
its intra-op plan (``autopar.pipeline.runtime`` drives them):

* forward ``(p, a, nd) -> (y, aux, res)`` — ``jax.vjp`` of the stage function; ``res`` are
  its residuals less those that are the forward's own inputs (parameters above all: a jitted
  output is a new buffer, so returning them would copy the stage's parameters once per
  in-flight micro-batch); they stay on the stage until its backward; with
  the stage's ``remat`` option its layers run under ``jax.checkpoint``, so the residuals are
  only what the policy saves and the backward executable recomputes the rest (the two are
  separate executables: XLA cannot merge the recomputation back into the forward);
* backward ``(res, inputs, ct, acc) -> (acc + dp, da)`` — the vjp rebuilt from ``res`` and
  the forward's inputs; parameter gradients accumulated over micro-batches in place (the
  accumulator is donated), in the parameter's dtype or, with the plan's ``grad_accum=
  "float32"``, in float32 for lower-precision parameters (cast back once, before the update:
  ``PipelineStep._gather_grads``);
* infer ``(p, a, nd) -> (y, aux)`` — the forward alone, keeping nothing (``evaluate``);
* update ``(params, opt_state, grads) -> (params, opt_state)`` — the optimizer applied to
  the parameters the stage owns, on its own sub-mesh (params/state donated with ``donate``);
  with the stage's ``zero`` (ZeRO-1, ``autopar.pipeline.zero``) its optimizer state lives
  split as ``zero_spec`` lays it out, the parameters and gradients are sliced to that layout
  (no communication), updated there, and the new parameters all-gathered back to their
  sharding inside the same executable, once per step.
"""
from __future__ import annotations

import jax
import numpy as np
import optax

from ..emit import make_mesh, named
from .halves import planned_halves
from .inputs import acc_ratio
from .stages import stage_forward
from .zero import zero_spec

_wsc = jax.lax.with_sharding_constraint


class StageExec:
    """The executables of one stage (see the module docstring)."""

    def __init__(self, sp, st, program, P, devices, optimizer, donate, layer_ranges, p_tree, owned,
                 grad_accum: str = "params"):
        plan = sp.plan
        self.st = st
        self.mesh = make_mesh(plan.mesh_shape, plan.axis_names, devices)
        specs, outs = plan.input_specs_flat, plan.output_specs_flat
        n_p, n_a = len(st.params), len(st.acts_in)
        n_nd = len(st.batch) + len(st.nd_acts_in)
        sh = lambda s: named(self.mesh, s if s is not None else [])  # noqa: E731
        self.p_sh = [sh(s) for s in specs[:n_p]]
        self.a_sh = [sh(s) for s in specs[n_p:n_p + n_a]]
        self.nd_sh = [sh(s) for s in specs[n_p + n_a:n_p + n_a + n_nd]]
        self.ct_sh = [sh(s) for s in specs[n_p + n_a + n_nd:]]
        ny, naux = len(st.outs), len(st.nd_outs)
        self.y_sh = [sh(s) for s in outs[:ny]]
        self.aux_sh = [sh(s) for s in outs[ny:ny + naux]]
        self.repl = named(self.mesh, [])
        self.p_avals = [(tuple(program.values[program.invars[i]].shape), program.values[program.invars[i]].dtype)
                        for i in st.params]
        self.acc_dtypes = [np.float32 if acc_ratio(dtype, grad_accum) > 1 else dtype for _, dtype in self.p_avals]
        fwd = stage_forward(program, st, P, sp.remat, layer_ranges)  # remat: its layers under jax.checkpoint
        y_sh, aux_sh, p_sh, a_sh = self.y_sh, self.aux_sh, self.p_sh, self.a_sh

        halves = planned_halves(fwd, program, st, P, plan, self.mesh)
        self.halves = halves
        self.follows_plan = halves is not None  # the stage's planned program, constraints and all
        # without it: jax.vjp of the stage forward under the boundary shardings; per residual
        # leaf, which forward input it is (-1: computed), set when the forward is traced
        self.residual_layout = None
        n_p = len(st.params)

        def forward(p, a, nd):
            if halves is not None:
                outs = halves.forward(*p, *a, *nd)
                y, aux, res = outs[:ny], outs[ny:ny + naux], list(outs[ny + naux:])
            else:
                y, vjp_fn, aux = jax.vjp(lambda p_, a_: fwd(p_, a_, nd), p, a, has_aux=True)
                leaves, tree = jax.tree_util.tree_flatten(vjp_fn)
                ins = list(p) + list(a) + list(nd)
                which = [next((j for j, x in enumerate(ins) if x is leaf), -1) for leaf in leaves]
                self.residual_layout = (tree, which)
                res = [leaf for leaf, j in zip(leaves, which) if j < 0]
            return [_wsc(v, s) for v, s in zip(y, y_sh)], [_wsc(v, s) for v, s in zip(aux, aux_sh)], res

        def backward(res, ins, ct, acc):
            if halves is not None:
                grads = halves.backward(*res, *[ins[i] for i in halves.reads], *ct)
                dp, da = grads[:n_p], grads[n_p:]
            else:
                tree, which = self.residual_layout
                kept = iter(res)
                dp, da = jax.tree_util.tree_unflatten(tree, [next(kept) if j < 0 else ins[j] for j in which])(ct)
            dp = [_wsc(x + g.astype(x.dtype), s) for x, g, s in zip(acc, dp, p_sh)]
            return dp, [_wsc(g, s) for g, s in zip(da, a_sh)]

        def infer(p, a, nd):  # forward only (``PipelineStep.evaluate``): no residuals
            y, aux = fwd(p, a, nd)
            return [_wsc(v, s) for v, s in zip(y, y_sh)], [_wsc(v, s) for v, s in zip(aux, aux_sh)]

        self.forward = jax.jit(forward)
        self.backward = jax.jit(backward, donate_argnums=(3,))
        self.infer = jax.jit(infer)

        # ZeRO-1: each owned parameter's optimizer-state layout (else the parameter's own)
        sizes = dict(zip(plan.axis_names, plan.mesh_shape))
        # (an owned parameter no stage reads: replicated)
        self.opt_sh = {i: self.repl for i in owned} | {
            i: sh(zero_spec(self.p_avals[j][0], specs[j], sizes)) if sp.zero else self.p_sh[j]
            for j, i in enumerate(st.params) if i in owned}
        z_tree = p_tree.unflatten([self.opt_sh.get(i) for i in range(P)])
        p_sh_tree = p_tree.unflatten([(self.p_sh[st.params.index(i)] if i in st.params else self.repl)
                                      if i in owned else None for i in range(P)])
        zero = sp.zero

        def update(params, opt_state, grads):  # owned params: full tree, None where not owned
            if zero:  # slice to the optimizer state's layout: the update runs split
                params, grads = (jax.tree_util.tree_map(_wsc, t, z_tree) for t in (params, grads))
            upd, opt_state = optimizer.update(grads, opt_state, params)
            new = optax.apply_updates(params, upd)
            if zero:  # all-gather the new parameters back to their sharding
                new = jax.tree_util.tree_map(_wsc, new, p_sh_tree)
            return new, opt_state
        self.update = jax.jit(update, donate_argnums=(0, 1) if donate else ())

    def zero_grads(self):
        """Gradient accumulators: zeros with the parameters' shardings (no compilation), in
        ``acc_dtypes``."""
        return [jax.device_put(np.zeros(shape, dtype), sh)
                for (shape, _), dtype, sh in zip(self.p_avals, self.acc_dtypes, self.p_sh)]
