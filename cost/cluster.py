"""Cluster specifications: one node type plus the network between nodes.

A :class:`ClusterSpec` is a frozen pydantic model. The number of nodes is not part of
the spec; it is chosen at plan time (``nodes=``). Specs ship as JSON files in
``cluster_specs/`` and are loaded by name (``"dgx-a100-80g"``) or by file path.
"""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SPEC_DIR = Path(__file__).resolve().parent.parent / "cluster_specs"


class ClusterSpecError(ValueError):
    """A cluster spec could not be found or is invalid."""


class LinkTerms(BaseModel):
    """Latency α and bandwidth 1/β (one direction) of the α + nβ model."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    alpha_s: float = Field(gt=0, description="latency per message, seconds")
    bandwidth_bytes_per_s: float = Field(gt=0, description="bandwidth per direction, bytes/s")


class LinkSpec(LinkTerms):
    """One link type: α and 1/β for every collective, except the kinds in ``by_kind``
    (collective name → its own α and bandwidth, fitted by ``autopar calibrate`` where one
    implementation is much slower than another, e.g. XLA:CPU's all-to-all; empty: none)."""

    by_kind: dict[str, LinkTerms] = Field(default_factory=dict)

    @field_validator("by_kind")
    @classmethod
    def _known_kinds(cls, v: dict) -> dict:
        from .comm import COLLECTIVES   # (comm imports this module)
        bad = sorted(set(v) - set(COLLECTIVES))
        if bad:
            raise ValueError(f"by_kind keys must be collective names {sorted(COLLECTIVES)}, got {bad}")
        return v

    def terms(self, kind: str) -> LinkTerms:
        """α and bandwidth a collective of ``kind`` sees on this link."""
        return self.by_kind.get(kind, self)


class DeviceSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    peak_flops: dict[str, float] = Field(description="peak FLOP/s per dtype name, e.g. {'float32': 19.5e12}")
    memory_bytes: int = Field(gt=0)
    hbm_bandwidth_bytes_per_s: float = Field(gt=0)
    matmul_half_dim: float = Field(0.0, ge=0, description=(
        "a matmul whose local M, K, N are m, k, n runs at peak · Π d / (d + matmul_half_dim) over d in (m, k, n): "
        "skinny or small matmuls are slower per FLOP (0: every matmul at peak)"))
    conv_efficiency: float = Field(1.0, gt=0, le=1, description=(
        "convolutions (forward and gradients) run at this fraction of the matmul rate (1: same as matmuls)"))
    conv_half_dim: float = Field(0.0, ge=0, description=(
        "a convolution is an implicit matmul (M: output positions, K: window × input channels, N: output "
        "channels, per device); it runs at conv_efficiency · Π d / (d + conv_half_dim) over d in (M, K, N) of the "
        "matmul rate: few channels are slower per FLOP (0: every convolution at conv_efficiency)"))
    shared_by: float = Field(1.0, ge=1, description=(
        "devices sharing one device's compute hardware: with every device busy each gets peak_flops and "
        "hbm_bandwidth / shared_by (simulated CPU devices share the host's cores; GPUs: 1)"))

    @field_validator("peak_flops")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("peak_flops needs at least one dtype, e.g. {'float32': 19.5e12}")
        bad = {k: x for k, x in v.items() if not x > 0}
        if bad:
            raise ValueError(f"peak_flops must be > 0, got {bad}")
        return v

    def flops_for(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype``; unknown dtypes fall back to float32 (or the slowest)."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        return self.peak_flops.get("float32", min(self.peak_flops.values()))


class ClusterSpec(BaseModel):
    """A homogeneous cluster: ``devices_per_node`` identical devices per node.

    ``intra_node_link`` is the per-device link inside a node (NVLink); ``inter_node_link``
    is one NIC; a device's share of the network is ``nics_per_node * NIC bandwidth /
    devices_per_node``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    description: str = ""
    devices_per_node: int = Field(gt=0)
    device: DeviceSpec
    intra_node_link: LinkSpec
    inter_node_link: LinkSpec
    nics_per_node: int = Field(gt=0)
    step_overhead_s: float = Field(0.0, ge=0, description=(
        "fixed seconds per step (launching the compiled program), added to the predicted step time"))
    combine_all_reduces: bool = Field(False, description=(
        "XLA combines independent all-reduces over the same devices into one: the latency α of the all-reduces "
        "no matmul waits for (gradients on their way to the update) is charged once per group, not per tensor"))
    collective_sync_s: float = Field(0.0, ge=0, description=(
        "seconds a collective costs inside a program beyond its α + n·β measured back to back: the wait for "
        "every device to reach it after compute (simulated CPU devices time-sharing the host's cores; GPUs: 0); "
        "charged once per collective op, with α"))
    combine_all_gathers: bool = Field(False, description=(
        "XLA combines independent all-gathers over the same devices into one (XLA:GPU's all-gather combiner; "
        "XLA:CPU does not): the latency α of gathering program inputs (weights gathered for the step) is "
        "charged once per group, not per tensor"))
    fuse_elementwise: bool = Field(False, description=(
        "charge memory traffic as XLA's loop fusion moves it: an elementwise op read only by elementwise ops "
        "writes nothing and its readers read nothing of it (False: every op reads and writes its operands)"))

    def inter_node_bandwidth_per_device(self) -> float:
        return self.nics_per_node * self.inter_node_link.bandwidth_bytes_per_s / self.devices_per_node


def known_clusters() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.json"))


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"invalid cluster spec {source}:"]
    for e in err.errors():
        field = ".".join(str(x) for x in e["loc"]) or "<root>"
        if e["type"] == "missing":  # the input is the enclosing object: name the field, don't dump it
            lines.append(f"  field '{field}' is missing")
        else:
            got = repr(e.get("input"))
            lines.append(f"  field '{field}': {e['msg']} (got {got if len(got) <= 80 else got[:77] + '...'})")
    lines.append("Fix the named field(s); see cluster_specs/dgx-a100-80g.json for a complete example.")
    return "\n".join(lines)


def cluster_from_dict(data: dict, source: str = "<dict>") -> ClusterSpec:
    try:
        return ClusterSpec.model_validate(data)
    except ValidationError as err:
        raise ClusterSpecError(_format_validation_error(source, err)) from None


def load_cluster(name_or_path: str | Path | ClusterSpec) -> ClusterSpec:
    """Load a spec by name (a file in ``cluster_specs/``) or by path to a JSON file."""
    if isinstance(name_or_path, ClusterSpec):
        return name_or_path
    text = str(name_or_path)
    path = Path(text)
    if not (path.suffix == ".json" or path.exists()):
        path = SPEC_DIR / f"{text}.json"
        if not path.exists():
            raise ClusterSpecError(
                f"unknown cluster {text!r}; known clusters: {', '.join(known_clusters())}. "
                "Pass one of these names or the path to a JSON spec file."
            )
    if not path.exists():
        raise ClusterSpecError(f"cluster spec file {text!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ClusterSpecError(f"cluster spec file {text!r} is not valid JSON: {err}") from None
    return cluster_from_dict(data, source=repr(text))
