"""Run a TrainingPlan: per-stage executables on sub-meshes (``autopar.pipeline.stage_exec``:
forward, backward, forward-only and update, each a ``jax.jit`` on the stage's sub-mesh, since
one cannot span two meshes) and a Python schedule driver.

Activations go forward and their gradients back with ``jax.device_put`` to the receiving
stage's ``NamedSharding`` (in a multi-process job, ``autopar.pipeline.multistep`` overrides
the few hooks saying where a stage runs and how values move: ``_here``, ``_move``,
``_place_param``, ``_place_opt``, ``_outputs``). Tasks run in the order of the simulated
GPipe/1F1B schedule (``autopar.pipeline.schedule``). The optimizer state is split per stage by
applying ``optimizer.init`` to the params with every leaf the stage does not own replaced by
``None``; each stage updates what it owns apart, which is exact for per-parameter optimizers
(sgd, momentum, adam, adamw, …). An optimizer mixing leaves through small values
(``clip_by_global_norm``: sums of squares) runs its update in rounds with those values sent
between the stages (``autopar.pipeline.update_split``). A ``WeightedLoss``'s weight is summed
over the micro-batches and divides the gradients once (``autopar.pipeline.loss_form``);
``evaluate`` runs the forward tasks only.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from ..emit import MeshError
from ..pytree_json import treedef_from_json
from ..runtime import PlanMismatchError
from .schedule import execution_order
from .stage_exec import StageExec
from .stages import owners, split_program
from .state_split import StateSplit
from .inputs import microbatch_shapes, trace_loss
from .rng_form import RowsLoss, rows_in, per_microbatch, rows_of, whole_leaf
from .loss_form import combine_aux, loss_outputs
from .update_rounds import SplitUpdate
from .update_split import split_update


class StageFallbackWarning(UserWarning):
    """A stage runs without its planned program's inner constraints (``pipeline.halves``)."""


def _is_none(x) -> bool:
    return x is None


class PipelineStep:
    """``step(params, opt_state, batch) -> (params, opt_state, loss)`` for a TrainingPlan —
    ``loss`` is ``(loss, aux)`` for a plan with ``has_aux`` —
    (``trees``: the params' and batch's PyTreeDefs; default: rebuilt from the plan's JSON).
    ``rows``: whether ``loss_fn`` is already ``rng_form.per_microbatch``'s form taking the
    micro-batch's rows (None: made here)."""

    def __init__(self, tplan, loss_fn, optimizer, *, devices=None, donate: bool = True, trees=None,
                 rows: bool | None = None):
        self.plan, self.optimizer, self.donate = tplan, optimizer, donate
        B = tplan.num_microbatches
        self.p_tree, self.b_tree = trees if trees is not None else (
            treedef_from_json(tplan.param_tree), treedef_from_json(tplan.batch_tree))
        params_abs = self.p_tree.unflatten([jax.ShapeDtypeStruct(tuple(s), d)
                                            for s, d in zip(tplan.param_shapes, tplan.param_dtypes)])
        batch_abs = tplan.batch_abs(self.b_tree)
        mb_abs = microbatch_shapes(batch_abs, B)
        if rows is None:
            loss_fn, mb_abs = per_microbatch(loss_fn, params_abs, mb_abs, B)
            self.rows = isinstance(loss_fn, RowsLoss)
        else:
            self.rows = rows
            mb_abs = (mb_abs, jax.ShapeDtypeStruct((rows_in(mb_abs),), jnp.int32)) if rows else mb_abs
        program = trace_loss(loss_fn, params_abs, mb_abs, tplan.has_aux)
        if program.fingerprint != tplan.fingerprint:
            raise PlanMismatchError(
                f"plan was made for {tplan.function} (fingerprint {tplan.fingerprint}) but this loss function/"
                f"parameter shapes trace to a different program ({program.fingerprint}); re-plan with plan_training")
        self.P = P = len(tplan.param_shapes)
        self.stages = split_program(program, P, [s.eqns for s in tplan.stages])
        self.own = owners(self.stages, P)
        all_devices = list(jax.devices() if devices is None else devices)
        need = max(max(s.devices) for s in tplan.stages) + 1
        if len(all_devices) < need:
            raise MeshError(
                f"the plan needs {need} devices ({tplan.nodes} node(s) × {tplan.cluster.devices_per_node}) but JAX "
                f"sees {len(all_devices)}; plan for the devices you have, or on CPU set JAX_NUM_CPU_DEVICES")
        outs = loss_outputs(program, tplan.has_aux)
        self.loss_var, self.weight_var = outs.loss, outs.weight   # (weight: a (total, weight) loss)
        self.aux_vars, self.aux_tree = outs.aux, outs.aux_tree   # (has_aux)
        self.aux_set = set(outs.aux)
        self.loss_dtype = program.values[self.loss_var].dtype
        self.producer = {v: st.index for st in self.stages for v in list(st.outs) + list(st.nd_outs)}
        self.consumers: dict[int, list[int]] = {}
        for st in self.stages:
            for v in list(st.acts_in) + list(st.nd_acts_in):
                self.consumers.setdefault(v, []).append(st.index)
        # the optimizer state per stage (``autopar.pipeline.state_split``)
        self.param_abs = jax.tree_util.tree_leaves(params_abs)
        self.state = StateSplit(optimizer, self.p_tree, params_abs, self.own, len(self.stages))
        self.execs = [StageExec(sp, st, program, P, [all_devices[i] for i in sp.devices], optimizer, donate,
                                 tplan.search.layer_eqns[sp.layers[0]:sp.layers[1]], self.p_tree,
                                 {i for i in range(P) if self.own[i] == k}, tplan.grad_accum)
                      for k, (sp, st) in enumerate(zip(tplan.stages, self.stages))]
        off = [k for k, e in enumerate(self.execs) if not e.follows_plan]
        if off:
            warnings.warn(f"pipeline stages {off} run jax.vjp of their forward under the plan's boundary shardings "
                          "only: their planned forward + backward could not be rebuilt from this loss (a plan made "
                          "for another program, e.g. with its remat option edited); XLA lays out their insides, so "
                          "their memory and collectives may differ from the prediction", StageFallbackWarning,
                          stacklevel=2)
        # sharding of every param leaf, and of its optimizer state, on its owner (unread
        # params: replicated on stage 0)
        self.param_sharding, self.opt_sharding = [], []
        for i in range(P):
            ex = self.execs[self.own[i]]
            st = ex.st
            self.param_sharding.append(ex.p_sh[st.params.index(i)] if i in st.params else ex.repl)
            self.opt_sharding.append(ex.opt_sh.get(i, ex.repl))
        # an optimizer mixing parameters (clip_by_global_norm): its update in rounds across the
        # stages (``autopar.pipeline.update_split``); None for a per-parameter one
        split = split_update(optimizer, params_abs, self.state.full_abs, self.own, self.state.stages,
                             self.state.home, len(self.stages)) if len(self.stages) > 1 else None
        self.split_update = SplitUpdate(self, split) if split is not None else None
        self.values = program.values
        # sharding of every stage output (activations leave their stage laid out so)
        self.out_sharding = {v: sh for e in self.execs for v, sh in zip(
            list(e.st.outs) + list(e.st.nd_outs), list(e.y_sh) + list(e.aux_sh))}
        self.order = execution_order(tplan.simulate())

    # --- optimizer-state placement ----------------------------------------------------
    def state_sharding(self, k: int, j: int):
        """Where optimizer-state leaf j lives on stage k: as the parameter it mirrors is laid
        out for its state (ZeRO-1's slices, else the parameter's sharding), else replicated."""
        mirror = self.state.mirrors[k][j]
        return self.opt_sharding[mirror] if mirror >= 0 else self.execs[k].repl

    # --- one training step: check → tasks in schedule order → gradients to owners → updates ---
    def __call__(self, params, opt_state, batch):
        p_leaves, b_leaves, o_leaves = self._check(params, opt_state, batch)
        p_in, mbs = self._stage_inputs(p_leaves, b_leaves)
        flight = _Flight(acc=[None] * len(self.stages))
        for task in self.order:
            if task.kind == "F":
                self._forward(task.stage, task.microbatch, p_in, mbs, flight)
            else:
                self._backward(task.stage, task.microbatch, flight)
        owner_params, grads = self._gather_grads(p_in, p_leaves, flight.acc)
        # a (total, weight) loss: gradients and loss divided by the weight summed over the batch
        weight = None
        if self.weight_var is not None:
            weight = self._summed_weight(flight, {self.own[i] for i in range(self.P)})
            for k, w in weight.items():
                mine = [i for i in range(self.P) if self.own[i] == k]
                if mine and self._here(k):
                    for i, g in zip(mine, _divide([grads[i] for i in mine], w)):
                        grads[i] = g
        new_p, new_o = self._update(owner_params, grads, o_leaves)
        return self._outputs(new_p, new_o, self._result(flight, weight))

    def evaluate(self, params, batch):
        """The loss of ``batch`` under ``params`` through the stages, forward only — no
        gradients, no update, nothing donated (a validation loss between steps): the same
        micro-batches, averaged (a mean loss) or Σ total / Σ weight (a ``WeightedLoss``); it
        lives on the last stage (in a multi-process job, as the step's loss does)."""
        p_leaves, b_leaves, _ = self._check(params, None, batch)
        p_in, mbs = self._stage_inputs(p_leaves, b_leaves)
        flight = _Flight(acc=[None] * len(self.stages), train=False)
        for task in self.order:
            if task.kind == "F":
                self._forward(task.stage, task.microbatch, p_in, mbs, flight)
        weight = self._summed_weight(flight, set()) if self.weight_var is not None else None
        return self._result(flight, weight)

    def _stage_inputs(self, p_leaves, b_leaves):
        """The parameters on every stage that reads them (owners' copies are the ones updated),
        and the batch leaves cut into micro-batches."""
        B, ex, st = self.plan.num_microbatches, self.execs, self.stages
        p_in = [[self._place_param(p_leaves[i], i, k, ex[k].p_sh[j]) for j, i in enumerate(st[k].params)]
                for k in range(len(st))]
        if self.rows:   # the micro-batch's row indices (``rng_form``): the loss draws over the batch
            b_leaves = list(b_leaves) + [rows_of(next(x.shape[0] for x in b_leaves if not whole_leaf(x)))]
        mbs = [[x if whole_leaf(x) else x[m * (x.shape[0] // B):(m + 1) * (x.shape[0] // B)] for x in b_leaves]
               for m in range(B)]
        return p_in, mbs

    def _summed_weight(self, flight: "_Flight", stages: set) -> dict:
        """A ``WeightedLoss``'s weight summed over the micro-batches where it is made, sent to
        ``stages`` and to the loss's stage → {stage: the summed weight there}."""
        src, v = self.producer[self.weight_var], self.weight_var
        total = None
        if self._here(src):
            total = flight.weights[0]
            for x in flight.weights[1:]:
                total = total + x
        return {k: total if k == src else self._move(total, self.out_sharding[v], self.execs[k].repl, self.values[v])
                for k in sorted(set(stages) | {self.producer[self.loss_var]})}

    def _loss(self, flight: "_Flight", weight):
        """The step's loss on its stage (None in a process without it): the micro-batches'
        mean, or their summed total over the summed ``weight``."""
        k = self.producer[self.loss_var]
        if not self._here(k):
            return None
        loss = flight.losses[0]
        for x in flight.losses[1:]:
            loss = loss + x
        return loss / self.plan.num_microbatches if weight is None else loss / weight[k].astype(loss.dtype)

    def _loss_output(self, loss):
        return loss

    def _result(self, flight: "_Flight", weight):
        """The step's loss, and with ``has_aux`` ``(loss, aux)``: each aux leaf combined over
        the micro-batches on the stage making it (``loss_form.combine_aux``)."""
        loss = self._loss_output(self._loss(flight, weight))
        if not self.plan.has_aux:
            return loss
        aux = []
        summed = self.plan.aux_sums or [False] * len(self.aux_vars)
        for v, grows, s in zip(self.aux_vars, self.plan.aux_grows, summed):
            x = combine_aux(flight.aux[v], grows, s) if self._here(self.producer[v]) else None
            aux.append(self._aux_output(v, None if x is None else jax.device_put(x, self.out_sharding[v]), grows))
        return loss, self.aux_tree.unflatten(aux)

    def _aux_output(self, v, x, grows: bool):
        return x

    # --- where values go (one process: jax.device_put; ``multistep`` overrides these) ---
    def _here(self, k: int) -> bool:
        """Whether this process runs stage k's tasks (one process: every stage)."""
        return True

    def _move(self, x, src, dst, aval):
        """A stage's value (``aval``: its shape and dtype) laid out as ``src`` moved to another
        stage's sharding ``dst``."""
        return jax.device_put(x, dst)

    def _place_param(self, x, i: int, k: int, sh):
        """The caller's param leaf i on stage k's sharding ``sh``."""
        return jax.device_put(x, sh)

    def _place_opt(self, x, j: int, k: int, sh):
        """The caller's optimizer-state leaf j on stage k's sharding ``sh``."""
        return jax.device_put(x, sh)

    def _outputs(self, new_p, new_o, loss):
        return self.p_tree.unflatten(new_p), self.state.tree.unflatten(new_o), loss

    def _check(self, params, opt_state, batch):
        """Flat leaves of the arguments, after checking them against the plan."""
        plan = self.plan
        p_leaves, p_tree = jax.tree_util.tree_flatten(params)
        b_leaves, b_tree = jax.tree_util.tree_flatten(batch)
        o_leaves, o_tree = jax.tree_util.tree_flatten(opt_state)
        if p_tree != self.p_tree or [list(np.shape(x)) for x in p_leaves] != plan.param_shapes:
            raise PlanMismatchError(f"params do not match the plan: planned shapes {plan.param_shapes}, given "
                                    f"{[list(np.shape(x)) for x in p_leaves]} ({len(p_leaves)} leaves); re-plan with "
                                    "plan_training for these params")
        if b_tree != self.b_tree or [list(np.shape(x)) for x in b_leaves] != plan.batch_shapes:
            raise PlanMismatchError(f"batch does not match the plan: planned shapes {plan.batch_shapes}, given "
                                    f"{[list(np.shape(x)) for x in b_leaves]}; a pipeline plan is made for one batch "
                                    "size: re-plan with plan_training for this batch")
        if opt_state is not None and o_tree != self.state.tree:  # (None: ``evaluate``)
            raise PlanMismatchError("opt_state does not match optimizer.init(params) of the planned optimizer")
        return p_leaves, b_leaves, o_leaves

    def _forward(self, k: int, m: int, p_in, mbs, flight: "_Flight") -> None:
        """Stage k's forward of micro-batch m: its inputs moved onto its sub-mesh (activations
        freed once their last reader has them), outputs kept for their readers, the vjp kept
        for the backward."""
        e, s, here = self.execs[k], self.stages[k], self._here(k)
        n_b, src = len(s.batch), self.out_sharding
        val = self.values
        a = [self._move(flight.acts[(v, m)], src[v], sh, val[v]) for v, sh in zip(s.acts_in, e.a_sh)]
        nd = ([jax.device_put(mbs[m][b], sh) if here else None for b, sh in zip(s.batch, e.nd_sh)]
              + [self._move(flight.acts[(v, m)], src[v], sh, val[v]) for v, sh in zip(s.nd_acts_in, e.nd_sh[n_b:])])
        for v in list(s.acts_in) + list(s.nd_acts_in):
            flight.pending[(v, m)] -= 1
            if flight.pending[(v, m)] == 0:
                del flight.acts[(v, m)], flight.pending[(v, m)]
        if here and not flight.train:
            (y, aux), vjp = e.infer(p_in[k], a, nd), None
        elif here:
            y, aux, res = e.forward(p_in[k], a, nd)
            vjp = (res, list(p_in[k]) + a + nd)  # the inputs by reference: the backward reads them again
        else:  # another process's stage: its outputs are placeholders here
            y, aux, vjp = [None] * len(s.outs), [None] * len(s.nd_outs), None
        for v, val in zip(list(s.outs) + list(s.nd_outs), list(y) + list(aux)):
            if v == self.loss_var:
                flight.losses.append(val)
            if v == self.weight_var:
                flight.weights.append(val)
            if v in self.aux_set:
                flight.aux.setdefault(v, []).append(val)
            if v in self.consumers:
                flight.acts[(v, m)] = val
                flight.pending[(v, m)] = len(self.consumers[v])
        if flight.train:
            flight.res[(k, m)] = vjp

    def _backward(self, k: int, m: int, flight: "_Flight") -> None:
        """Stage k's backward of micro-batch m: gradients accumulated on the stage, cotangents
        of its activation inputs sent to (and summed on) their producers."""
        B, e, s = self.plan.num_microbatches, self.execs[k], self.stages[k]
        vjp = flight.res.pop((k, m))
        da = [None] * len(s.acts_in)
        if self._here(k):
            ct = []
            for v, sh in zip(s.outs, e.ct_sh):
                if v == self.loss_var:  # a mean: 1/B per micro-batch; a (total, weight) total: 1
                    g = np.asarray(1.0 / B if self.weight_var is None else 1.0, self.loss_dtype)
                else:
                    g = flight.cts.pop((v, m), None)
                    if g is None:  # an output nobody differentiates: zero cotangent
                        g = np.zeros(self.values[v].shape, self.values[v].dtype)
                ct.append(jax.device_put(g, sh))
            flight.acc[k], da = e.backward(*vjp, ct, e.zero_grads() if flight.acc[k] is None else flight.acc[k])
        for v, g, a_sh in zip(s.acts_in, da, e.a_sh):
            j = self.producer[v]
            g = self._move(g, a_sh, self.execs[j].ct_sh[self.stages[j].outs.index(v)], self.values[v])
            if self._here(j):
                flight.cts[(v, m)] = g if (v, m) not in flight.cts else flight.cts[(v, m)] + g

    def _gather_grads(self, p_in, p_leaves, acc):
        """Per parameter leaf: its owner's copy and its gradient summed on the owner (parameters
        read by several stages send theirs back; unread ones get zeros on stage 0)."""
        grads, owner_params = [None] * self.P, [None] * self.P
        for k, st in enumerate(self.stages):
            for j, i in enumerate(st.params):
                g = acc[k][j] if self._here(k) else None
                if g is not None and g.dtype != self.param_abs[i].dtype:   # a float32 accumulator (grad_accum)
                    g = g.astype(self.param_abs[i].dtype)
                if self.own[i] == k:
                    owner_params[i] = p_in[k][j]
                else:
                    g = self._move(g, self.execs[k].p_sh[j], self.param_sharding[i], self.param_abs[i])
                if self._here(self.own[i]):
                    grads[i] = g if grads[i] is None else grads[i] + g
        read = {i for st in self.stages for i in st.params}
        for i in range(self.P):
            if i not in read:  # read by no stage: zero gradient, kept on stage 0
                owner_params[i] = self._place_param(p_leaves[i], i, self.own[i], self.param_sharding[i])
                if self._here(self.own[i]):
                    grads[i] = jnp.zeros_like(owner_params[i])
        return owner_params, grads

    def _update(self, owner_params, grads, o_leaves):
        """Each stage's optimizer update of the parameters it owns → new flat params and state."""
        if self.split_update is not None:
            return self.split_update(owner_params, grads, o_leaves)
        S, ex = len(self.stages), self.execs
        # every stage's inputs are placed before any update runs: updates donate their inputs,
        # and a step count shared by all stages must not be consumed by the first one
        inputs = []
        for k in range(S):
            o_stage = [None if sk is None else self._place_opt(o_leaves[j], j, k, self.state_sharding(k, j))
                       for j, sk in enumerate(self.state.skeletons[k][0])]
            if self.plan.virtual_stages > 1:   # (stages share devices: a shared leaf placed twice is one buffer)
                o_stage = [_unaliased(x) if x is not None and k != self.state.home[j] else x
                           for j, x in enumerate(o_stage)]
            if not self._here(k):
                inputs.append(None)
                continue
            mine = [i for i in range(self.P) if self.own[i] == k]
            inputs.append((self.p_tree.unflatten([owner_params[i] if i in mine else None for i in range(self.P)]),
                           self.state.full(o_stage, k),
                           self.p_tree.unflatten([grads[i] if i in mine else None for i in range(self.P)])))
        new_p, new_o = [None] * self.P, [None] * len(o_leaves)
        for k in range(S):
            if inputs[k] is None:  # another process's stage
                continue
            p_out, o_out = ex[k].update(*inputs[k])
            owned = [i for i in range(self.P) if self.own[i] == k]
            for i, val in zip(owned, jax.tree_util.tree_leaves(p_out)):
                new_p[i] = val
            o_flat = jax.tree_util.tree_flatten(o_out, is_leaf=_is_none)[0]
            for j, val in enumerate(None if n is None else o_flat[n] for n in self.state.skeletons[k][2]):
                if val is not None and k == self.state.home[j]:  # shared leaves (step counts): stage 0's copy
                    new_o[j] = val
        return new_p, new_o


@dataclass
class _Flight:
    """What a step holds between tasks: activations awaiting readers (and how many), vjp
    residuals, cotangents awaiting their producer's backward, gradient accumulators, losses
    (and a (total, weight) loss's weights)."""
    acc: list
    acts: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)
    res: dict = field(default_factory=dict)
    cts: dict = field(default_factory=dict)
    losses: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    aux: dict = field(default_factory=dict)     # aux value → its value per micro-batch (has_aux)
    train: bool = True   # False: forward only (``evaluate``), no residuals kept


def _unaliased(x):
    """A copy of ``x`` on its sharding: each stage's update donates its inputs, so a shared
    leaf (a step count) given to two stages on the same devices must be two buffers."""
    return jax.device_put(x, x.sharding, may_alias=False) if isinstance(x, jax.Array) else x


@jax.jit
def _divide(grads, weight):
    return [g / weight.astype(g.dtype) for g in grads]
