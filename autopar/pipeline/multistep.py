"""A pipeline step in a multi-controller job (``jax.distributed``, one process per node).

Every process runs the same script: it builds the same :class:`MultiProcessStep` from the
same plan (checked: :func:`check_same_plan`) and walks the one deterministic global task
order of the schedule. A process runs the tasks of the stages owning its devices, and
takes part in every move between two stages of which it owns a device: a move within the
process is a ``jax.device_put`` (as with one process), a move across processes is a
:class:`~autopar.pipeline.multihost.Transfer` (a jitted collective-permute) that all of them
issue at the same point of the order. Intra-op collectives of a stage spanning several
processes are the stage's own jitted executables, called by all its processes.

Where values live. Parameters and their optimizer state live only on their owner stage's
devices; a leaf not mirroring a parameter (a step count) on the first stage having one.
The step returns, in a process without devices of that stage, an array of the same sharding
with no shards here (``autopar.pipeline.multihost.empty_array``); the loss likewise lives on
the last stage. Feed the returned values back unchanged in every process; or pass host
arrays (the same values in every process), which each stage puts on its devices. Which of
the two a leaf is, is decided by the processes of its owner stage and agreed on with one
small all-gather per step (a process passing a global array where its owners pass host
values gets a :class:`PlanMismatchError`, raised in every process).
To read a result everywhere use :func:`to_host`; :func:`share_plan` plans once, in process 0.
"""
from __future__ import annotations

import hashlib
import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from ..emit import MeshError
from ..runtime import PlanMismatchError
from .multihost import Transfer, empty_array, processes
from .rng_form import impl_of, is_key, whole_leaf
from .runtime import PipelineStep

_CLOCK_FIELDS = {"timing", "plan_s"}  # wall-clock times: differ between identical plans


def plan_digest(tplan) -> bytes:
    """SHA-256 of the plan without its wall-clock fields (planning is deterministic, so plans
    made independently in every process agree)."""
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in _CLOCK_FIELDS}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v
    text = json.dumps(strip(tplan.model_dump(mode="json")), sort_keys=True)
    return hashlib.sha256(text.encode()).digest()


def check_same_plan(tplan) -> None:
    """Raise :class:`PlanMismatchError` in every process unless all hold the same plan."""
    mine = np.frombuffer(plan_digest(tplan), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))
    differ = [p for p in range(every.shape[0]) if not np.array_equal(every[p], every[0])]
    if differ:
        raise PlanMismatchError(
            f"the processes of this job hold different plans: process(es) {differ} differ from process 0 "
            f"(plan digests {[every[p][:4].tobytes().hex() for p in range(every.shape[0])]}); make the plan once "
            "(e.g. in process 0, saved as JSON) or identically in every process (same arguments: planning "
            "is deterministic)")


def share_plan(make, cls):
    """The plan ``make()`` returns in process 0, in every process of the job (as ``cls``:
    ``TrainingPlan`` or ``Plan``): process 0 plans while the others wait, then its JSON is
    broadcast (``multihost_utils.broadcast_one_to_all``)."""
    first = jax.process_index() == 0
    text = make().to_json().encode() if first else b""
    n = int(multihost_utils.broadcast_one_to_all(np.int64(len(text)), is_source=first))
    buf = np.frombuffer(text, np.uint8) if first else np.zeros(n, np.uint8)
    data = np.asarray(multihost_utils.broadcast_one_to_all(buf, is_source=first))
    return cls.from_json(data.astype(np.uint8).tobytes().decode())


def to_host(tree):
    """Every leaf as a numpy array in every process (all processes must call it): each process
    contributes the shards it holds; one all-gather per dtype (leaves packed) and one for the
    mask of what each process held."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    bufs, haves = [], []
    for x in leaves:
        buf, have = np.zeros(np.shape(x), x.dtype), np.zeros(np.shape(x), np.uint8)
        if isinstance(x, jax.Array):
            for s in x.addressable_shards:
                buf[s.index], have[s.index] = np.asarray(s.data), 1
        else:
            buf[...], have[...] = np.asarray(x), 1
        bufs.append(buf.ravel())
        haves.append(have.ravel())
    dtypes = sorted({b.dtype.str for b in bufs})
    packed = {d: np.concatenate([b for b in bufs if b.dtype.str == d]) for d in dtypes}
    mask = np.concatenate(haves) if haves else np.zeros(0, np.uint8)
    every, masks = (multihost_utils.process_allgather((packed, mask)))
    masks = np.asarray(masks)
    if not masks.any(axis=0).all():
        raise ValueError("to_host: parts of some leaf are held by no process")
    first = masks.argmax(axis=0)  # per element: the first process holding it
    out, at, off = [], dict.fromkeys(dtypes, 0), 0
    for x, b in zip(leaves, bufs):
        d, n = b.dtype.str, b.size
        rows = np.asarray(every[d])[:, at[d]:at[d] + n]
        out.append(rows[first[off:off + n], np.arange(n)].reshape(np.shape(x)))
        at[d], off = at[d] + n, off + n
    return jax.tree_util.tree_unflatten(treedef, out)


class MultiProcessStep(PipelineStep):
    """``PipelineStep`` in one process of a multi-controller job (see the module docstring)."""

    def __init__(self, tplan, loss_fn, optimizer, *, devices=None, donate: bool = True, trees=None,
                 rows: bool | None = None):
        need = tplan.nodes * tplan.cluster.devices_per_node
        have = len(jax.devices() if devices is None else devices)
        if need != have:
            raise MeshError(
                f"the plan is for {need} devices ({tplan.nodes} node(s) × {tplan.cluster.devices_per_node}) but this "
                f"job has {have} ({jax.process_count()} processes × {jax.local_device_count()} local devices); "
                "launch as many processes × devices as the plan's nodes × devices per node, or re-plan for this job")
        check_same_plan(tplan)
        super().__init__(tplan, loss_fn, optimizer, devices=devices, donate=donate, trees=trees, rows=rows)
        self.transfer = Transfer()
        me = jax.process_index()
        self.local = [me in processes(e.repl) for e in self.execs]
        # each optimizer-state leaf's home sharding (its owner's layout, or its first stage's)
        self.opt_home_sharding = [self.state_sharding(k, j) for j, k in enumerate(self.state.home)]
        self.placed: list[bool] = []

    def _here(self, k: int) -> bool:
        return self.local[k]

    def _move(self, x, src, dst, aval):
        me = jax.process_index()
        ps, pd = processes(src), processes(dst)
        if ps | pd == {me}:
            return jax.device_put(x, dst)
        if me not in ps | pd:
            return None
        if is_key(aval):   # a PRNG key (per-layer dropout keys) crosses as its words, wrapped again
            impl = impl_of(aval.dtype)
            words = jax.eval_shape(jax.random.key_data, aval)
            data = self.transfer(jax.random.key_data(x) if me in ps else None, src, dst, words.shape, words.dtype)
            return None if data is None else jax.random.wrap_key_data(data, impl=impl)
        return self.transfer(x if me in ps else None, src, dst, aval.shape, aval.dtype)

    # --- the caller's params / optimizer state: on their home stage, or host values ---
    def _check(self, params, opt_state, batch):
        p_leaves, b_leaves, o_leaves = super()._check(params, opt_state, batch)
        for i, x in enumerate(b_leaves):
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                raise PlanMismatchError(
                    f"batch leaf {i} is a global array ({x.sharding}); a multi-process pipeline step takes the batch "
                    "as host arrays (numpy), the same in every process: each stage puts the leaves it reads")
        b_leaves = [x if whole_leaf(x) else np.asarray(x) for x in b_leaves]   # (scalars as given: a key stays one)
        homes = [(x, self.param_sharding[i], self.own[i]) for i, x in enumerate(p_leaves)] + \
                [(x, self.opt_home_sharding[j], self.state.home[j]) for j, x in enumerate(o_leaves)]
        bits = np.zeros((2, len(homes)), np.int8)
        for n, (x, home, _) in enumerate(homes):
            if isinstance(x, jax.Array):
                bits[0, n] = x.sharding.is_equivalent_to(home, x.ndim)
                bits[1, n] = not x.is_fully_addressable
        every = np.asarray(multihost_utils.process_allgather(bits))  # (processes, 2, leaves)
        self.placed = []
        for n, (x, home, k) in enumerate(homes):
            owners = sorted(processes(self.execs[k].repl))
            placed = bool(every[owners, 0, n].all())
            if not placed and every[:, 1, n].any():
                what = f"param leaf {n}" if n < self.P else f"optimizer-state leaf {n - self.P}"
                raise PlanMismatchError(
                    f"{what}: process(es) {np.flatnonzero(every[:, 1, n]).tolist()} pass an array living on other "
                    f"processes' devices but the processes of its stage {k} ({owners}) pass host values; pass the "
                    "step's outputs back unchanged in every process, or host arrays in every process")
            self.placed.append(placed)
        return p_leaves, b_leaves, o_leaves

    def _place(self, n: int, x, aval, home, h: int, k: int, sh):
        if self.placed[n]:
            if k == h:
                return x if self.local[k] else None
            return self._move(x if self.local[h] else None, home, sh, aval)
        if not self.local[k]:
            return None
        return jax.device_put(np.asarray(x), sh)

    def _place_param(self, x, i: int, k: int, sh):
        return self._place(i, x, self.param_abs[i], self.param_sharding[i], self.own[i], k, sh)

    def _place_opt(self, x, j: int, k: int, sh):
        return self._place(self.P + j, x, self.state.leaves_abs[j], self.opt_home_sharding[j], self.state.home[j], k,
                           sh)

    def _loss_output(self, loss):
        return loss if loss is not None else empty_array((), self.loss_dtype, self.out_sharding[self.loss_var])

    def _aux_output(self, v, x, grows: bool):
        if x is not None:
            return x
        aval = self.values[v]   # (combine_aux keeps the dtype; a bool over the batch was refused)
        shape = (aval.shape[0] * self.plan.num_microbatches,) + tuple(aval.shape[1:]) if grows else aval.shape
        return empty_array(shape, aval.dtype, self.out_sharding[v])

    def _outputs(self, new_p, new_o, loss):
        new_p = [x if x is not None else empty_array(a.shape, a.dtype, self.param_sharding[i])
                 for i, (x, a) in enumerate(zip(new_p, self.param_abs))]
        new_o = [x if x is not None else empty_array(a.shape, a.dtype, self.opt_home_sharding[j])
                 for j, (x, a) in enumerate(zip(new_o, self.state.leaves_abs))]
        return super()._outputs(new_p, new_o, loss)   # (the loss: ``_loss_output``'s placeholder)
