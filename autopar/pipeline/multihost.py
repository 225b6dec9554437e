"""Moving a stage's value to another stage whose devices live in other processes.

In a multi-controller job (``jax.distributed``, one process per node) ``jax.device_put``
cannot move an array to devices of another process (jax 0.10 on CPU: "does not support
cross-host device transfers"). :class:`Transfer` moves it with XLA collectives instead: one
jitted ``shard_map`` ``ppermute`` (collective-permute; gloo on CPU, NCCL on GPU) over the
union of the two device sets, which every process owning a device of either set calls.

What is moved. Let the receiving sharding ``dst`` give device j of its n_B devices the
block ``b_j`` of the value (all of one shape: a ``NamedSharding`` splits a dimension only
into equal parts). Sender device i = j mod n_A of the n_A sending devices sends ``b_j`` to
device j, in round j // n_A (⌈n_B / n_A⌉ rounds, one ppermute each): the value crosses the
process boundary (replication of ``dst``) times, once per receiving device, each device
receiving only its block. Before that the senders make the value replicated over their own
devices (an all-gather inside the sending stage, on its fast links, none when it is
replicated already) and each slices its blocks.

Every process of the union must call the same transfers in the same order (the callers
follow one deterministic global schedule). The sending and receiving device sets must be
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
    """The compiled send (on the sender), permute (on the union) and assembly of one
    (src, dst, shape, dtype)."""

    def __init__(self, src: NamedSharding, dst: NamedSharding, shape, dtype):
        self.shape, self.dtype, self.dst = tuple(shape), np.dtype(dtype), dst
        a_devs, b_devs = list(src.mesh.devices.flat), list(dst.mesh.devices.flat)
        if set(a_devs) & set(b_devs):
            raise ValueError(f"Transfer needs disjoint device sets; {src} and {dst} share devices")
        index = dst.devices_indices_map(self.shape)  # (raises IndivisibleError for unequal blocks)
        self.blk = tuple(_slice_len(s, n) for s, n in zip(index[b_devs[0]], self.shape))
        starts = np.array([[s.start or 0 for s in index[d]] for d in b_devs], np.int32).reshape(
            len(b_devs), len(self.shape))
        n_a, n_b = len(a_devs), len(b_devs)
        self.rounds = R = math.ceil(n_b / n_a)
        # sender i's round-r block: receiver j = r·n_A + i (a repeat of its last one past n_B)
        table = np.stack([starts[[min(r * n_a + i, n_b - 1) for r in range(R)]] for i in range(n_a)])
        self.a_devs, self.b_devs = a_devs, b_devs
        me = jax.process_index()
        self.local_a = [d for d in a_devs if d.process_index == me]
        self.local_b = [d for d in b_devs if d.process_index == me]
        axes = tuple(src.mesh.axis_names)
        blk = self.blk

        def cut(x):  # on sender i: its R blocks, (1, R, *blk)
            i = jax.lax.axis_index(axes)
            st = jnp.asarray(table)[i]
            return jnp.stack([jax.lax.dynamic_slice(x, tuple(st[r]), blk) for r in range(R)])[None]
        self.send = jax.jit(jax.shard_map(cut, mesh=src.mesh, in_specs=P(), out_specs=P(axes)))
        union = Mesh(np.array(a_devs + b_devs), ("u",))
        self.union = NamedSharding(union, P("u"))
        perms = [[(j % n_a, n_a + j) for j in range(n_b) if j // n_a == r] for r in range(R)]
        pick = np.array([0] * n_a + [j // n_a for j in range(n_b)], np.int32)

        def permute(v):  # (1, R, *blk) → (1, *blk): receiver j keeps its round's block
            got = jnp.stack([jax.lax.ppermute(v[:, r], "u", perm) for r, perm in enumerate(perms)])
            return got[jnp.asarray(pick)[jax.lax.axis_index("u")]]
        self.permute = jax.jit(jax.shard_map(permute, mesh=union, in_specs=P("u"), out_specs=P("u")))
        self.zeros = {d: jax.device_put(np.zeros((1, R) + blk, self.dtype), d) for d in self.local_b}

    def __call__(self, x):
        local = {}
        if self.local_a:
            if x is None:
                raise ValueError("Transfer: this process holds sending devices but was given no value")
            local.update({s.device: s.data for s in self.send(x).addressable_shards})
        local.update(self.zeros)
        glob = jax.make_array_from_single_device_arrays(
            (len(self.a_devs) + len(self.b_devs), self.rounds) + self.blk, self.union,
            [local[d] for d in self.a_devs + self.b_devs if d in local])
        out = self.permute(glob)
        if not self.local_b:
            return None
        mine = {s.device: s.data for s in out.addressable_shards}
        return jax.make_array_from_single_device_arrays(
            self.shape, self.dst, [mine[d].reshape(self.blk) for d in self.local_b])


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
