"""α + nβ communication model on a logical device mesh.

Each logical mesh axis is mapped onto the physical cluster (devices numbered node-major,
the mesh laid out row-major over them). An axis whose device groups stay inside a node
uses the intra-node link; an axis that crosses nodes uses the network, with each device
getting ``nics_per_node * NIC bandwidth / devices_per_node``. A collective over several
axes is modelled as one ring over all their devices, limited by the slowest axis.

``nbytes`` is always the *full* buffer per device in the sense of the classic formulas:
all-reduce: the buffer reduced; all-gather: the gathered result; reduce-scatter: the input
before scattering; all-to-all: the local buffer; permute / p2p: the message.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .cluster import ClusterSpec

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "p2p")


@dataclass(frozen=True)
class AxisLink:
    size: int
    alpha_s: float
    bandwidth_bytes_per_s: float
    crosses_nodes: bool


@dataclass(frozen=True)
class MeshModel:
    """A logical mesh with a link per axis, plus the device's roofline numbers."""

    shape: tuple[int, ...]
    links: tuple[AxisLink, ...]
    peak_flops: tuple[tuple[str, float], ...]
    hbm_bandwidth_bytes_per_s: float
    memory_bytes: int
    device_name: str = ""    # the cluster spec's device name (``device_kind`` reads it)

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
        return math.prod(self.shape[a] for a in axes)


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
        if crosses:
            bw = min(cluster.inter_node_bandwidth_per_device(), cluster.intra_node_link.bandwidth_bytes_per_s)
            links.append(AxisLink(size, cluster.inter_node_link.alpha_s, bw, True))
        else:
            intra = cluster.intra_node_link
            links.append(AxisLink(size, intra.alpha_s, intra.bandwidth_bytes_per_s, False))
    d = cluster.device
    return MeshModel(tuple(mesh_shape), tuple(links), tuple(sorted(d.peak_flops.items())),
                     d.hbm_bandwidth_bytes_per_s, d.memory_bytes, d.name)


def _ring(mesh: MeshModel, axes) -> tuple[int, float, float]:
    p = mesh.axes_size(axes)
    alpha = max(mesh.links[a].alpha_s for a in axes)
    bw = min(mesh.links[a].bandwidth_bytes_per_s for a in axes)
    return p, alpha, bw


def collective_time(mesh: MeshModel, kind: str, axes: tuple[int, ...], nbytes: float) -> float:
    """Seconds for one collective of ``kind`` over mesh ``axes`` moving ``nbytes`` (see module doc)."""
    if not axes or nbytes <= 0:
        return 0.0
    p, alpha, bw = _ring(mesh, axes)
    if p == 1:
        return 0.0
    if kind == "all-reduce":
        ring = 2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes / bw
        doubling = math.ceil(math.log2(p)) * (alpha + nbytes / bw)
        return min(ring, doubling)
    if kind in ("all-gather", "reduce-scatter", "all-to-all"):
        ring = (p - 1) * alpha + (p - 1) / p * nbytes / bw
        if kind == "all-to-all":
            return ring
        doubling = math.ceil(math.log2(p)) * alpha + (p - 1) / p * nbytes / bw
        return min(ring, doubling)
    if kind in ("collective-permute", "p2p"):
        return alpha + nbytes / bw
    raise ValueError(f"unknown collective kind {kind!r}; expected one of {COLLECTIVE_KINDS}")


def p2p_time(link_alpha_s: float, bandwidth_bytes_per_s: float, nbytes: float) -> float:
    """Point-to-point send between two devices (pipeline stages)."""
    return link_alpha_s + nbytes / bandwidth_bytes_per_s


def compute_time(mesh: MeshModel, flops: float, nbytes: float, dtype: str) -> float:
    """Roofline: the slower of arithmetic and memory traffic, on one device."""
    return max(flops / mesh.flops_for(dtype), nbytes / mesh.hbm_bandwidth_bytes_per_s)
