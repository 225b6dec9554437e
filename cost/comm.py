"""α + nβ communication model on a logical device mesh, and the registry of collectives.

Each logical mesh axis is mapped onto the physical cluster (devices numbered node-major,
the mesh laid out row-major over them). An axis whose device groups stay inside a node
uses the intra-node link; an axis that crosses nodes uses the network, with each device
getting ``nics_per_node * NIC bandwidth / devices_per_node``. A collective over several
axes is modelled as one ring over all their devices, limited by the slowest axis.

A link's α and bandwidth may differ per collective kind (``LinkSpec.by_kind``, fitted by
``autopar calibrate``: XLA:CPU's all-to-all is far slower than its all-reduce).

Every collective kind is one :class:`Collective` record in ``COLLECTIVES``: its name (the
``kind`` stored in plans), its time formula, the HLO op names XLA emits for it, which buffer
its ``nbytes`` counts and whether the unreduced partial buffer is live while it runs. With
``p`` devices, per-message latency α and link bandwidth β⁻¹ (bytes/s), ``nbytes`` is the
*full* buffer per device of the classic formulas:

    all-reduce          n = the buffer reduced     min(2(p−1)α + 2(p−1)/p·nβ, ⌈log₂p⌉(α + nβ))
    all-gather          n = the gathered result    min((p−1)α, ⌈log₂p⌉α) + (p−1)/p·nβ
    reduce-scatter      n = its input              as all-gather
    all-to-all          n = the local buffer       (p−1)α + (p−1)/p·nβ
    collective-permute  n = the message            α + nβ
    p2p                 n = the message            α + nβ   (between pipeline stages)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .cluster import ClusterSpec
from .spec import axes_size

CollectiveOp = tuple[str, tuple[int, ...], float]   # (kind = Collective.name, mesh axes, nbytes)


def _all_reduce_time(p: int, alpha: float, bw: float, nbytes: float) -> float:
    """The faster of a ring (reduce-scatter + all-gather) and recursive doubling."""
    ring = 2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes / bw
    doubling = math.ceil(math.log2(p)) * (alpha + nbytes / bw)
    return min(ring, doubling)


def _all_to_all_time(p: int, alpha: float, bw: float, nbytes: float) -> float:
    """A ring: p − 1 steps, each moving 1/p of the buffer."""
    return (p - 1) * alpha + (p - 1) / p * nbytes / bw


def _gather_time(p: int, alpha: float, bw: float, nbytes: float) -> float:
    """All-gather / reduce-scatter: a ring or recursive doubling (same bytes, fewer steps)."""
    ring = _all_to_all_time(p, alpha, bw, nbytes)
    doubling = math.ceil(math.log2(p)) * alpha + (p - 1) / p * nbytes / bw
    return min(ring, doubling)


def _point_time(p: int, alpha: float, bw: float, nbytes: float) -> float:
    """One message per device."""
    return alpha + nbytes / bw


@dataclass(frozen=True)
class Collective:
    """One collective kind (see the module docstring's table)."""

    name: str                       # the kind plans store (``CollectiveCost.kind``) and reports print
    hlo_ops: tuple[str, ...]        # HLO op names XLA emits (``autopar.validate``; async: ``<op>-start``)
    time: Callable[[int, float, float, float], float]   # (p, α s, bytes/s, nbytes) -> seconds
    counts_input: bool = False      # nbytes is the op's input (result × group size), not its result
    partial_live: bool = False      # reduces partial sums: the unreduced local buffer is live during it

    def full_bytes(self, result_bytes: int, group_size: int) -> int:
        """``nbytes`` of one op from its result's bytes and its replica group's size."""
        return result_bytes * (group_size if self.counts_input else 1)


ALL_REDUCE = Collective("all-reduce", ("all-reduce",), _all_reduce_time, partial_live=True)
ALL_GATHER = Collective("all-gather", ("all-gather",), _gather_time)
REDUCE_SCATTER = Collective("reduce-scatter", ("reduce-scatter",), _gather_time, counts_input=True,
                            partial_live=True)
ALL_TO_ALL = Collective("all-to-all", ("all-to-all",), _all_to_all_time)
COLLECTIVE_PERMUTE = Collective("collective-permute", ("collective-permute",), _point_time)
P2P = Collective("p2p", (), _point_time)   # a pipeline stage's send: no op of an intra-op program
COLLECTIVES: dict[str, Collective] = {c.name: c for c in (
    ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, ALL_TO_ALL, COLLECTIVE_PERMUTE, P2P)}
HLO_OPS: dict[str, Collective] = {op: c for c in COLLECTIVES.values() for op in c.hlo_ops}


def collective(kind: str | Collective) -> Collective:
    """The record of ``kind`` (a :class:`Collective` or its name)."""
    if isinstance(kind, Collective):
        return kind
    if kind not in COLLECTIVES:
        raise ValueError(f"unknown collective kind {kind!r}; expected one of {tuple(COLLECTIVES)}")
    return COLLECTIVES[kind]


@dataclass(frozen=True)
class AxisLink:
    size: int
    alpha_s: float
    bandwidth_bytes_per_s: float
    crosses_nodes: bool
    by_kind: tuple[tuple[str, float, float], ...] = ()   # (kind, α, bandwidth): LinkSpec.by_kind

    def terms(self, kind: str) -> tuple[float, float]:
        """(α, bandwidth) a collective of ``kind`` sees on this axis."""
        for k, a, bw in self.by_kind:
            if k == kind:
                return a, bw
        return self.alpha_s, self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class MeshModel:
    """A logical mesh with a link per axis, plus the device's roofline numbers."""

    shape: tuple[int, ...]
    links: tuple[AxisLink, ...]
    peak_flops: tuple[tuple[str, float], ...]
    hbm_bandwidth_bytes_per_s: float
    memory_bytes: int
    device_name: str = ""    # the cluster spec's device name (``device_kind`` reads it)
    fuse_elementwise: bool = False   # ClusterSpec.fuse_elementwise
    combine_all_reduces: bool = False   # ClusterSpec.combine_all_reduces
    matmul_half_dim: float = 0.0        # DeviceSpec.matmul_half_dim
    conv_efficiency: float = 1.0        # DeviceSpec.conv_efficiency
    combine_all_gathers: bool = False   # ClusterSpec.combine_all_gathers
    conv_half_dim: float = 0.0          # DeviceSpec.conv_half_dim
    sync_s: float = 0.0                 # ClusterSpec.collective_sync_s

    @property
    def device_kind(self) -> str:
        """"cpu", "tpu" or "gpu" (anything else: a spec describes GPUs unless its device name
        says cpu / tpu). Fused attention is costed flash-style (no S×S buffer) on a GPU."""
        name = self.device_name.lower()
        return "cpu" if "cpu" in name else "tpu" if "tpu" in name else "gpu"

    @property
    def num_devices(self) -> int:
        return math.prod(self.shape)

    def flops_for(self, dtype: str) -> float:
        table = dict(self.peak_flops)
        return table.get(dtype, table.get("float32", min(table.values())))

    def axes_size(self, axes) -> int:
        return axes_size(axes, self.shape)


def mesh_model(cluster: ClusterSpec, nodes: int, mesh_shape: tuple[int, ...]) -> MeshModel:
    """Map ``mesh_shape`` (product = nodes × devices_per_node) onto the cluster."""
    total = nodes * cluster.devices_per_node
    if math.prod(mesh_shape) != total:
        raise ValueError(
            f"mesh_shape={tuple(mesh_shape)} has {math.prod(mesh_shape)} devices but cluster "
            f"{cluster.name!r} with nodes={nodes} has {total}; pick a shape whose product is {total}"
        )
    dpn = cluster.devices_per_node
    links = []
    for i, size in enumerate(mesh_shape):
        stride = math.prod(mesh_shape[i + 1:])
        crosses = len({(k * stride) // dpn for k in range(size)}) > 1
        if crosses:   # a device's share of the node's NICs, never above its own intra-node link
            share, intra, inter = cluster.nics_per_node / dpn, cluster.intra_node_link, cluster.inter_node_link
            bw = min(cluster.inter_node_bandwidth_per_device(), intra.bandwidth_bytes_per_s)
            kinds = tuple((k, t.alpha_s, min(t.bandwidth_bytes_per_s * share, intra.terms(k).bandwidth_bytes_per_s))
                          for k, t in sorted(inter.by_kind.items()))
            links.append(AxisLink(size, inter.alpha_s, bw, True, kinds))
        else:
            intra = cluster.intra_node_link
            kinds = tuple((k, t.alpha_s, t.bandwidth_bytes_per_s) for k, t in sorted(intra.by_kind.items()))
            links.append(AxisLink(size, intra.alpha_s, intra.bandwidth_bytes_per_s, False, kinds))
    d = cluster.device   # every device of the mesh busy: each gets 1/shared_by of its hardware
    peaks = tuple(sorted((k, v / d.shared_by) for k, v in d.peak_flops.items()))
    return MeshModel(tuple(mesh_shape), tuple(links), peaks, d.hbm_bandwidth_bytes_per_s / d.shared_by,
                     d.memory_bytes, d.name, cluster.fuse_elementwise, cluster.combine_all_reduces,
                     d.matmul_half_dim, d.conv_efficiency, cluster.combine_all_gathers, d.conv_half_dim,
                     cluster.collective_sync_s)


def _ring(mesh: MeshModel, axes, kind: str) -> tuple[int, float, float]:
    p = mesh.axes_size(axes)
    terms = [mesh.links[a].terms(kind) for a in axes]
    return p, max(a for a, _ in terms), min(bw for _, bw in terms)


def collective_time(mesh: MeshModel, kind: str | Collective, axes: tuple[int, ...], nbytes: float, *,
                    latency: bool = True) -> float:
    """Seconds for one collective of ``kind`` over mesh ``axes`` moving ``nbytes`` (see module doc),
    plus ``MeshModel.sync_s`` (``ClusterSpec.collective_sync_s``) per op; ``latency=False``:
    without α and sync (its bytes' share of an op combined with others)."""
    if not axes or nbytes <= 0:
        return 0.0
    c = collective(kind)
    p, alpha, bw = _ring(mesh, axes, c.name)
    if p == 1:
        return 0.0
    return c.time(p, alpha if latency else 0.0, bw, nbytes) + (mesh.sync_s if latency else 0.0)


def p2p_time(link_alpha_s: float, bandwidth_bytes_per_s: float, nbytes: float) -> float:
    """Point-to-point send between two devices (pipeline stages)."""
    return P2P.time(2, link_alpha_s, bandwidth_bytes_per_s, nbytes)


def matmul_efficiency(half_dim: float, dims) -> float:
    """Fraction of peak a matmul with local (M, K, N) = ``dims`` reaches: Π d / (d + half_dim)."""
    return math.prod(d / (d + half_dim) for d in dims) if half_dim > 0 else 1.0


def compute_time(mesh: MeshModel, flops: float, nbytes: float, dtype: str) -> float:
    """Roofline: the slower of arithmetic and memory traffic, on one device."""
    return max(flops / mesh.flops_for(dtype), nbytes / mesh.hbm_bandwidth_bytes_per_s)
