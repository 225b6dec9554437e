"""Moving a stage's value to another stage whose devices live in other processes.

In a multi-controller job (``jax.distributed``, one process per node) ``jax.device_put``
cannot move an array to devices of another process (jax 0.10 on CPU: "does not support
cross-host device transfers"). :class:`Transfer` moves it with XLA collectives instead: one
jitted ``shard_map`` ``ppermute`` (collective-permute; gloo on CPU, NCCL on GPU) over the
union of the two device sets, which every process owning a device of either set calls.

What is moved. The receiving sharding ``dst`` splits the value into n_H distinct blocks
(all of one shape: a ``NamedSharding`` splits a dimension only into equal parts), each held
by one or more receiving devices; the first of them in mesh order is the block's head.
Sender device i of the n_A sending devices sends head q's block to it in round q // n_A when
i = q mod n_A (⌈n_H / n_A⌉ rounds, one ppermute each): every byte of the value crosses the
process boundary once, whatever the replication of ``dst``. Before that the senders make the
value replicated over their own devices (an all-gather inside the sending stage, on its fast
links; none when it is replicated already) and each slices its blocks. After it, where
``dst`` replicates a block over some mesh axes, the heads pass it to the other devices of
their group inside the receiving stage (a psum over those axes of the block's bits, zeros
from the non-heads: exact for every dtype).

Every process of the union must call the same transfers in the same order (the callers
follow one deterministic global schedule). On CPU each transfer waits for its permute to
finish before returning. Measured on jax 0.10.2 (gloo, 2 processes × 4 devices, 2 × 30
transfers per run, the sender then running collectives among its own devices): without the
wait 8 of 17 runs hung (a receiver waiting in a permute the sender had finished; also with
``jax_cpu_enable_async_dispatch`` off, and with an all-reduce instead of the all-gather);
with it, 0 of 12. The sending and receiving device sets must be
disjoint (pipeline stages are).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def processes(sharding) -> frozenset[int]:
    """The process indices owning the devices of ``sharding``."""
    return frozenset(d.process_index for d in sharding.device_set)


def empty_array(shape, dtype, sharding) -> jax.Array:
    """An array of ``sharding`` without shards in this process (it lives elsewhere)."""
    if any(d.process_index == jax.process_index() for d in sharding.device_set):
        raise ValueError(f"empty_array: {sharding} has devices in this process ({jax.process_index()})")
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, [], dtype=np.dtype(dtype))


class _Route:
    """The compiled send (on the senders), permute (senders + one receiver per block) and
    fan-out (on the receivers) of one (src, dst, shape, dtype)."""

    def __init__(self, src: NamedSharding, dst: NamedSharding, shape, dtype):
        self.shape, self.dtype, self.dst = tuple(shape), np.dtype(dtype), dst
        a_devs, b_devs = list(src.mesh.devices.flat), list(dst.mesh.devices.flat)
        if set(a_devs) & set(b_devs):
            raise ValueError(f"Transfer needs disjoint device sets; {src} and {dst} share devices")
        index = dst.devices_indices_map(self.shape)  # (raises IndivisibleError for unequal blocks)
        first: dict = {}  # block → the first receiving device (in mesh order) holding it
        for d in b_devs:
            first.setdefault(tuple(s.indices(n) for s, n in zip(index[d], self.shape)), d)
        heads = list(first.values())
        self.blk = blk = tuple(_slice_len(s, n) for s, n in zip(index[heads[0]], self.shape))
        starts = np.array([[s.start or 0 for s in index[d]] for d in heads], np.int32).reshape(
            len(heads), len(self.shape))
        n_a, n_h = len(a_devs), len(heads)
        self.rounds = R = math.ceil(n_h / n_a)
        # sender i's round-r block: head q = r·n_A + i (a repeat of the last one past n_H)
        table = np.stack([starts[[min(r * n_a + i, n_h - 1) for r in range(R)]] for i in range(n_a)])
        me = jax.process_index()
        self.blocking = a_devs[0].platform == "cpu"
        self.a_devs, self.b_devs, self.u_devs = a_devs, b_devs, a_devs + heads
        self.local_a = [d for d in a_devs if d.process_index == me]
        self.local_b = [d for d in b_devs if d.process_index == me]
        self.local_u = [d for d in self.u_devs if d.process_index == me]
        axes = tuple(src.mesh.axis_names)

        def cut(x):  # on sender i: its R blocks, (1, R, *blk)
            st = jnp.asarray(table)[jax.lax.axis_index(axes)]
            return jnp.stack([jax.lax.dynamic_slice(x, tuple(st[r]), blk) for r in range(R)])[None]
        self.send = jax.jit(jax.shard_map(cut, mesh=src.mesh, in_specs=P(), out_specs=P(axes)))
        self.union = NamedSharding(Mesh(np.array(self.u_devs), ("u",)), P("u"))
        perms = [[(q % n_a, n_a + q) for q in range(n_h) if q // n_a == r] for r in range(R)]
        pick = np.array([0] * n_a + [q // n_a for q in range(n_h)], np.int32)

        def permute(v):  # (1, R, *blk) → (1, *blk): head q keeps its round's block
            got = jnp.stack([jax.lax.ppermute(v[:, r], "u", perm) for r, perm in enumerate(perms)])
            return got[jnp.asarray(pick)[jax.lax.axis_index("u")]]
        self.permute = jax.jit(jax.shard_map(permute, mesh=self.union.mesh, in_specs=P("u"), out_specs=P("u")))
        self.zeros = {d: jax.device_put(np.zeros((1, R) + blk, self.dtype), d)
                      for d in self.local_u if d not in self.local_a}
        self.fan = None
        if n_h < len(b_devs):  # replicated over some dst axes: heads → their replicas, on the receivers' links
            used = {a for e in dst.spec if e is not None for a in ((e,) if isinstance(e, str) else e)}
            rep = tuple(a for a in dst.mesh.axis_names if a not in used)
            self.blank = {d: jax.device_put(np.zeros((1,) + blk, self.dtype), d)
                          for d in self.local_b if d not in self.local_u}
            self.stacked = NamedSharding(dst.mesh, P(tuple(dst.mesh.axis_names)))
            self.fan = jax.jit(jax.shard_map(lambda v: _bit_psum(v[0], rep), mesh=dst.mesh,
                                             in_specs=P(tuple(dst.mesh.axis_names)), out_specs=dst.spec))

    def __call__(self, x):
        out = None
        if self.local_u:
            local = dict(self.zeros)
            if self.local_a:
                if x is None:
                    raise ValueError("Transfer: this process holds sending devices but was given no value")
                local.update({s.device: s.data for s in self.send(x).addressable_shards})
            glob = jax.make_array_from_single_device_arrays(
                (len(self.u_devs), self.rounds) + self.blk, self.union, [local[d] for d in self.local_u])
            moved = self.permute(glob)
            if self.blocking:  # XLA:CPU (gloo): see the module docstring
                moved.block_until_ready()
            out = {s.device: s.data for s in moved.addressable_shards}
        if not self.local_b:
            return None
        if self.fan is None:
            return jax.make_array_from_single_device_arrays(
                self.shape, self.dst, [out[d].reshape(self.blk) for d in self.local_b])
        pieces = [out[d] if d in self.local_u else self.blank[d] for d in self.local_b]
        return self.fan(jax.make_array_from_single_device_arrays((len(self.b_devs),) + self.blk, self.stacked,
                                                                 pieces))


def _bit_psum(v, axes):
    """``v`` from the one device of each ``axes`` group holding it (the others hold zeros), to
    all of them: a psum of the bits (as unsigned integers), so exact for every dtype."""
    if v.dtype == jnp.bool_:
        return jax.lax.psum(v.astype(jnp.uint8), axes).astype(jnp.bool_)
    uint = jnp.dtype(f"uint{8 * v.dtype.itemsize}")
    return jax.lax.bitcast_convert_type(jax.lax.psum(jax.lax.bitcast_convert_type(v, uint), axes), v.dtype)


def _slice_len(s: slice, n: int) -> int:
    return len(range(*s.indices(n)))


class Transfer:
    """``transfer(x, src, dst, shape, dtype)``: ``x`` (laid out as ``src``, given in the
    processes owning ``src`` devices, else ``None``) as an array laid out as ``dst``, returned
    in the processes owning ``dst`` devices (``None`` in the others). Routes are compiled once
    per (src, dst, shape, dtype)."""

    def __init__(self):
        self._routes: dict = {}

    def __call__(self, x, src: NamedSharding, dst: NamedSharding, shape, dtype):
        key = (src, dst, tuple(shape), np.dtype(dtype).str)
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = _Route(src, dst, shape, dtype)
        return route(x)
