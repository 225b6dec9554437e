"""Fitting a :class:`~cost.cluster.ClusterSpec` to measured microbenchmarks (pure numpy, no JAX).

``autopar.calibrate`` times jitted microbenchmarks on the devices JAX sees and records each as
a :class:`Sample` (median seconds over repeats, and the spread). This module fits the spec's
numbers to them by least squares on *relative* residuals ``(model − measured) / measured``
(every size counts alike, not just the largest):

    matmul       t = t₀ + flops / (F·Π d/(d+h))  per dtype, all devices at once, square and skinny
                 (M, K, N) → F (effective FLOP/s) and h (``DeviceSpec.matmul_half_dim``, searched)
    elementwise  t = t₀ + bytes / B           read + written bytes, all devices at once → B
    conv         a 3×3 convolution and its two gradients, all devices at once, several channel
                 counts: rate = F·e·Π d/(d+h) over its implicit matmul's (M, K, N)
                 → ``DeviceSpec.conv_efficiency`` e (≤ 1) and ``conv_half_dim`` h (searched)
    chain        k dependent elementwise ops in one program vs one op: fused if < k/2 times as long
                 → ``ClusterSpec.fuse_elementwise``
    combining    k independent small all-reduces in one program vs one: combined if the k − 1 extra
                 cost less than half of k − 1 single ops → ``ClusterSpec.combine_all_reduces``
    alone        the same matmul on one device while the others idle → F₁;  shared_by = F₁ / F
    collective   t = cost.comm's formula of its kind with (α, 1/β) of the axis's link

A collective's time is linear in (α, β) once the branch of each ``min(ring, doubling)`` is
fixed, so the link fit alternates: read each sample's coefficients of α and β off
``Collective.time`` at the current (α, β) (the formula is not copied here), solve the 2×2
weighted least squares, repeat until the branches stop changing. The fitted spec keeps
``peak_flops = F·shared_by`` and ``hbm_bandwidth = B·shared_by`` (one device's own numbers),
and ``cost.comm.mesh_model`` divides both by ``shared_by`` again, so with every device busy the
model charges exactly the fitted F and B. Matmul/elementwise intercepts t₀ are per-launch
overheads, reported but not charged per op.

`link_errors` recomputes every collective sample's time from a spec (through ``cost.comm``, as the
planner will) — the fit quality the calibrate command prints and its test re-checks.
"""
from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .cluster import ClusterSpec, LinkSpec, LinkTerms
from .comm import COLLECTIVES, collective, collective_time, compute_time, matmul_efficiency, mesh_model

LINKS = ("intra", "inter")


class Sample(BaseModel):
    """One measured microbenchmark point (median over ``repeats`` timed calls after warm-up)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: str = Field(description="'matmul', 'conv', 'elementwise', or a cost.comm collective name")
    seconds: float = Field(gt=0, description="median seconds per op")
    spread: float = Field(ge=0, description="(max − min) / median over the repeats")
    repeats: int = Field(gt=0)
    dtype: str = "float32"
    flops: float = 0.0            # matmul: per device
    dims: tuple[int, ...] = ()    # matmul, conv (its implicit matmul): (M, K, N) per device
    nbytes: float = 0.0           # elementwise: bytes read + written per device; collective: cost.comm's n
    alone: bool = False           # one device ran while the others idled
    chain: int = 1                # elementwise: dependent elementwise ops in the program (fused if XLA does)
    independent: int = 1          # all-reduce: independent ops of this size in the program (combined if XLA does)
    whole_program: bool = False   # collectives: seconds of the whole program (launch included), not one op
    link: str = ""                # collectives: "intra" or "inter"
    axis_size: int = 1            # collectives: devices in the group
    mesh: tuple[int, ...] = ()    # collectives: the mesh and axis they ran over (for the report)
    axis: int = 0


class Fit(BaseModel):
    """One fitted quantity and how well it reproduces its samples (relative errors)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    values: dict[str, float]
    samples: int
    rms_rel_error: float
    max_rel_error: float


class Calibration(BaseModel):
    """What ``autopar calibrate`` measured and fitted (written next to the spec)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    platform: str
    device_kind: str
    devices: int
    processes: int
    samples: list[Sample]
    fits: list[Fit]
    launch_overhead_s: float = 0.0
    sync_in_program_s: float = Field(0.0, description=(
        "a small all-reduce after each of k matmuls, over k matmuls alone, per op"))
    sync_back_to_back_s: float = Field(0.0, description="the same all-reduce in a chain of k, per op")
    all_gathers_combined: bool = Field(False, description=(
        "the compiler merged independent all-gathers into fewer ops (read from its HLO) "
        "→ ClusterSpec.combine_all_gathers"))


# ----------------------------------------------------------------------------- fitting

def _weighted_lstsq(columns: np.ndarray, t: np.ndarray) -> np.ndarray:
    """x ≥ 0 minimising Σ ((columns @ x − t) / t)² (a column whose coefficient comes out
    negative is dropped and the rest refitted: a time cannot fall with size)."""
    w = 1.0 / t
    active = list(range(columns.shape[1]))
    while True:
        x = np.zeros(columns.shape[1])
        sol, *_ = np.linalg.lstsq(columns[:, active] * w[:, None], np.ones_like(t), rcond=None)
        x[active] = sol
        neg = [i for i in active if x[i] < 0]
        if not neg or len(active) == 1:
            return np.maximum(x, 0.0)
        active.remove(min(neg, key=lambda i: x[i]))


def _errors(pred, t) -> tuple[float, float]:
    rel = (np.asarray(pred, float) - t) / t
    return float(np.sqrt(np.mean(rel ** 2))), float(np.max(np.abs(rel)))


def fit_throughput(samples: list[Sample], work: str, name: str) -> tuple[float, float, Fit]:
    """t = t₀ + work / rate over ``samples`` (``work`` = "flops" or "nbytes") → (rate, t₀, fit)."""
    if len(samples) < 2:
        raise ValueError(f"fitting {name} needs ≥ 2 sizes, got {len(samples)} sample(s)")
    t = np.array([s.seconds for s in samples])
    x = np.array([getattr(s, work) for s in samples], float)
    t0, slope = _weighted_lstsq(np.stack([np.ones_like(x), x], axis=1), t)
    if not slope > 0:
        raise ValueError(f"{name}: time does not grow with {work} ({list(zip(x, t))}); use larger sizes")
    rms, mx = _errors(t0 + slope * x, t)
    return 1.0 / slope, float(t0), Fit(name=name, values={"rate": 1.0 / slope, "t0_s": float(t0)},
                                       samples=len(samples), rms_rel_error=rms, max_rel_error=mx)


HALF_DIMS = (0.0,) + tuple(float(2 ** (k / 2)) for k in range(0, 21))   # 1 … 1024: the search of fit_matmul


def fit_matmul(samples: list[Sample], name: str) -> tuple[float, float, float, Fit]:
    """t = t₀ + flops / (F · matmul_efficiency(h, dims)) → (F, t₀, h, fit): linear least squares in
    (t₀, 1/F) for each h of ``HALF_DIMS``, the h with the smallest relative rms kept."""
    best, error = None, None
    for h in HALF_DIMS if any(s.dims for s in samples) else (0.0,):
        eff = [matmul_efficiency(h, s.dims) if s.dims else 1.0 for s in samples]
        scaled = [s.model_copy(update={"flops": s.flops / e}) for s, e in zip(samples, eff)]
        try:
            rate, t0, fit = fit_throughput(scaled, "flops", name)
        except ValueError as err:   # time does not grow with the work this h assumes: not a candidate
            error = err
            continue
        if best is None or fit.rms_rel_error < best[3].rms_rel_error - 1e-12:
            best = (rate, t0, h, fit)
    if best is None:
        raise error
    rate, t0, h, fit = best
    return rate, t0, h, fit.model_copy(update={"values": {**fit.values, "half_dim": h}})


def fit_conv(samples: list[Sample], peaks: dict[str, float]) -> tuple[float, float, Fit]:
    """rate = peak · e · matmul_efficiency(h, dims) → (e = ``conv_efficiency``, h =
    ``conv_half_dim``, fit): for each h of ``HALF_DIMS`` (only 0 when the samples have no dims
    or one size) e is the median of rate / (peak · efficiency), capped at 1; the h whose times
    have the smallest relative rms is kept."""
    best = None
    sized = len({s.dims for s in samples}) > 1 and all(s.dims for s in samples)
    for h in HALF_DIMS if sized else (0.0,):
        base = [peaks[s.dtype] * matmul_efficiency(h, s.dims) for s in samples]
        e = min(1.0, float(np.median([s.flops / s.seconds / b for s, b in zip(samples, base)])))
        rel = np.array([(s.flops / (b * e) - s.seconds) / s.seconds for s, b in zip(samples, base)])
        rms = float(np.sqrt(np.mean(rel ** 2)))
        if best is None or rms < best[2] - 1e-12:
            best = (e, h, rms, float(np.max(np.abs(rel))))
    e, h, rms, mx = best
    return e, h, Fit(name="conv (fwd + grads) / matmul rate", values={"ratio": e, "half_dim": h},
                     samples=len(samples), rms_rel_error=rms, max_rel_error=mx)


def _coefficients(s: Sample, alpha: float, bw: float) -> tuple[float, float]:
    """(∂t/∂α, ∂t/∂β) of ``s``'s collective at (α, bw): exact on the branch active there, since
    every formula is a min of terms linear in α and β = 1/bw."""
    time = collective(s.kind).time
    base = time(s.axis_size, alpha, bw, s.nbytes)
    eps = 1e-6
    d_alpha = (time(s.axis_size, alpha * (1 + eps), bw, s.nbytes) - base) / (alpha * eps)
    beta = 1.0 / bw
    d_beta = (time(s.axis_size, alpha, 1.0 / (beta * (1 + eps)), s.nbytes) - base) / (beta * eps)
    return d_alpha, d_beta


def _alternate(samples: list[Sample], t: np.ndarray, alpha: float, bw: float) -> tuple[float, float]:
    """Fix each sample's branch at (α, bw), solve the linear least squares, repeat until stable."""
    branches = None
    for _ in range(20):
        coef = np.array([_coefficients(s, alpha, bw) for s in samples])
        key = tuple(np.round(coef / np.maximum(np.abs(coef).max(axis=0), 1e-300), 9).ravel())
        if key == branches:
            break
        branches = key
        a, b = _weighted_lstsq(coef, t)
        alpha, bw = max(a, 1e-9), 1.0 / max(b, 1e-15)   # both must stay > 0 in a LinkSpec
    return alpha, bw


def fit_link(samples: list[Sample], name: str, start: LinkTerms | None = None) -> tuple[LinkSpec, Fit]:
    """α and bandwidth of one link from its collective samples (module docstring)."""
    if len({(s.kind, s.axis_size, s.nbytes) for s in samples}) < 2:
        raise ValueError(f"fitting link {name!r} needs ≥ 2 distinct collective samples, got {len(samples)}")
    bad = sorted({s.kind for s in samples} - set(COLLECTIVES))
    if bad:
        raise ValueError(f"unknown collective kind(s) {bad} in the samples of link {name!r}")
    t = np.array([s.seconds for s in samples])
    starts = [(start.alpha_s, start.bandwidth_bytes_per_s)] if start else []
    starts += [(a, b) for a in (1e-6, 1e-5, 1e-4, 1e-3) for b in (1e8, 1e9, 1e10, 1e11)]
    best = None
    for a0, b0 in starts:   # the branches of the mins depend on where the search starts
        alpha, bw = _alternate(samples, t, a0, b0)
        pred = [collective(s.kind).time(s.axis_size, alpha, bw, s.nbytes) for s in samples]
        rms = _errors(pred, t)[0]
        if best is None or rms < best[0] - 1e-12:
            best = (rms, alpha, bw)
    _, alpha, bw = best
    link = LinkSpec(alpha_s=alpha, bandwidth_bytes_per_s=bw)
    pred = [collective(s.kind).time(s.axis_size, alpha, bw, s.nbytes) for s in samples]
    rms, mx = _errors(pred, t)
    return link, Fit(name=name, values={"alpha_s": alpha, "bandwidth_bytes_per_s": bw}, samples=len(samples),
                     rms_rel_error=rms, max_rel_error=mx)


def fit_spec(base: ClusterSpec, samples: list[Sample], *, name: str, devices_per_node: int,
             memory_bytes: int | None = None, device_name: str | None = None,
             launch_overhead_s: float = 0.0, description: str = "") -> tuple[ClusterSpec, list[Fit]]:
    """A spec fitted to ``samples``; what was not measured (the inter-node link on one node,
    memory size where the platform does not say) comes from ``base``."""
    fits: list[Fit] = []
    busy = [s for s in samples if s.kind == "matmul" and not s.alone]
    if not busy:
        raise ValueError("no matmul samples: calibration needs matmul timings with every device busy")
    peaks, ratios, halves = {}, [], []
    for dtype in sorted({s.dtype for s in busy}):
        rate, _, half, fit = fit_matmul([s for s in busy if s.dtype == dtype], f"matmul {dtype}")
        peaks[dtype] = rate
        halves.append(half)
        fits.append(fit)
        alone = [s for s in samples if s.kind == "matmul" and s.alone and s.dtype == dtype]
        if len(alone) >= 2:
            eff = [matmul_efficiency(half, s.dims) if s.dims else 1.0 for s in alone]
            try:
                scaled = [s.model_copy(update={"flops": s.flops / e}) for s, e in zip(alone, eff)]
                rate1, _, fit1 = fit_throughput(scaled, "flops", f"matmul {dtype}, one device alone")
            except ValueError:   # too noisy to fit: shared_by stays 1 unless another dtype gives it
                continue
            fits.append(fit1)
            ratios.append(rate1 / rate)
    shared_by = max(1.0, float(np.median(ratios))) if ratios else 1.0
    conv = [s for s in samples if s.kind == "conv" and s.dtype in peaks]   # rate / the matmul rate of its dtype
    conv_eff, conv_half = 1.0, 0.0
    if conv:
        conv_eff, conv_half, fit = fit_conv(conv, peaks)
        fits.append(fit)
    ew = [s for s in samples if s.kind == "elementwise" and not s.alone and s.chain == 1]
    bw, _, fit = fit_throughput(ew, "nbytes", "elementwise bandwidth")
    fits.append(fit)
    fuse = fused_chains(samples)
    if fuse is not None:
        fits.append(Fit(name="elementwise chain / one op", values={"ratio": fuse[1]}, samples=fuse[2],
                        rms_rel_error=0.0, max_rel_error=0.0))
    combine = combined_all_reduces(samples)
    if combine is not None:
        fits.append(Fit(name="k all-reduces: extra / (k−1) ops", values={"ratio": combine[1]}, samples=combine[2],
                        rms_rel_error=0.0, max_rel_error=0.0))
    links = {}
    for link in LINKS:
        mine = _link_samples(samples, link)
        if not mine:
            continue
        common, _ = fit_link(mine, f"{link}-node link", base.intra_node_link if link == "intra" else None)
        kinds = {}
        for kind in sorted({s.kind for s in mine}):
            ks = [s for s in mine if s.kind == kind]
            if len({(s.axis_size, s.nbytes) for s in ks}) >= 2:
                fitted, fit = fit_link(ks, f"{link}-node {kind}", common)
                kinds[kind] = LinkTerms(alpha_s=fitted.alpha_s, bandwidth_bytes_per_s=fitted.bandwidth_bytes_per_s)
                fits.append(fit)
        links[link] = LinkSpec(alpha_s=common.alpha_s, bandwidth_bytes_per_s=common.bandwidth_bytes_per_s,
                               by_kind=kinds)
    if "intra" not in links and devices_per_node > 1:
        raise ValueError("no intra-node collective samples: calibration needs collectives inside a node")
    data = base.model_dump()
    data.update(name=name, description=description, devices_per_node=devices_per_node,
                step_overhead_s=launch_overhead_s, fuse_elementwise=bool(fuse and fuse[0]),
                combine_all_reduces=bool(combine and combine[0]))
    data["device"].update(peak_flops={k: v * shared_by for k, v in peaks.items()},
                          hbm_bandwidth_bytes_per_s=bw * shared_by, shared_by=shared_by,
                          matmul_half_dim=float(np.median(halves)), conv_efficiency=conv_eff,
                          conv_half_dim=conv_half)
    if device_name:
        data["device"]["name"] = device_name
    if memory_bytes:
        data["device"]["memory_bytes"] = int(memory_bytes)
    if "intra" in links:
        data["intra_node_link"] = links["intra"].model_dump()
    if "inter" in links:   # measured per device: one "NIC" per device carries that bandwidth
        data["inter_node_link"] = links["inter"].model_dump()
        data["nics_per_node"] = devices_per_node
    spec = ClusterSpec.model_validate(data)
    for link, rel in link_errors(spec, samples).items():   # each link with its per-kind terms
        fits.append(Fit(name=f"{link}-node link", values=links[link].model_dump(exclude={"by_kind"}),
                        samples=len(rel), rms_rel_error=float(np.sqrt(np.mean(rel ** 2))),
                        max_rel_error=float(np.max(np.abs(rel)))))
    return spec, fits


def _link_samples(samples: list[Sample], link: str) -> list[Sample]:
    return [s for s in samples if s.kind in COLLECTIVES and s.link == link and not s.whole_program]


def combined_all_reduces(samples: list[Sample]) -> tuple[bool, float, int] | None:
    """(combined?, extra time of k independent all-reduces over one / (k − 1) single ops, pairs):
    XLA combines them when k ops cost less than half of k − 1 extra ops (the single op's time is
    the chained one of the same size and axis); None without such samples."""
    ratios = []
    for many in (s for s in samples if s.kind == "all-reduce" and s.whole_program and s.independent > 1):
        same = [s for s in samples if s.kind == "all-reduce" and s.mesh == many.mesh and s.axis == many.axis
                and s.nbytes == many.nbytes]
        one = [s for s in same if s.whole_program and s.independent == 1]   # the same program with one op
        op = [s for s in same if not s.whole_program]                       # one op's time (chained)
        if one and op:
            ratios.append((many.seconds - one[0].seconds) / ((many.independent - 1) * op[0].seconds))
    if not ratios:
        return None
    r = float(np.median(ratios))
    return r < 0.5, r, len(ratios)


def fused_chains(samples: list[Sample]) -> tuple[bool, float, int] | None:
    """(fused?, median time of a chain of k elementwise ops / one op of the same size, pairs):
    a chain moving its data once (ratio < k / 2) is fused; None without chain samples."""
    ratios, ks = [], []
    for c in (s for s in samples if s.kind == "elementwise" and s.chain > 1):
        one = [s for s in samples if s.kind == "elementwise" and s.chain == 1 and s.nbytes == c.nbytes]
        if one:
            ratios.append(c.seconds / one[0].seconds)
            ks.append(c.chain)
    if not ratios:
        return None
    ratio = float(np.median(ratios))
    return ratio < min(ks) / 2, ratio, len(ratios)


def predicted_seconds(spec: ClusterSpec, s: Sample) -> float:
    """The time ``spec`` gives sample ``s`` through ``cost.comm``, as the planner costs an op
    (throughput samples without their launch intercept t₀; a collective on the sample's mesh
    laid out over ``prod(mesh) / devices_per_node`` nodes)."""
    if s.kind == "elementwise" and s.chain > 1:
        raise ValueError("an elementwise chain sample has no model time of its own (see fused_chains)")
    if s.kind in ("matmul", "elementwise", "conv"):
        mesh = mesh_model(spec, 1, (spec.devices_per_node,))   # every device busy
        eff = matmul_efficiency(spec.device.matmul_half_dim, s.dims) if s.dims else 1.0
        if s.kind == "conv":
            eff = spec.device.conv_efficiency * (matmul_efficiency(spec.device.conv_half_dim, s.dims) if s.dims else 1.0)
        t = compute_time(mesh, s.flops / eff, s.nbytes, s.dtype)
        return t / spec.device.shared_by if s.alone else t
    nodes = max(1, math.prod(s.mesh) // spec.devices_per_node)
    back_to_back = spec.model_copy(update={"collective_sync_s": 0.0})   # how the samples ran
    return collective_time(mesh_model(back_to_back, nodes, s.mesh), s.kind, (s.axis,), s.nbytes)


def link_errors(spec: ClusterSpec, samples: list[Sample]) -> dict[str, np.ndarray]:
    """{link: relative errors (predicted − measured) / measured of ``spec`` on that link's
    collective samples} — recomputed from the spec alone, so a test can hold the written spec
    to the fit the command printed."""
    out = {}
    for link in LINKS:
        mine = _link_samples(samples, link)
        if mine:
            t = np.array([s.seconds for s in mine])
            out[link] = (np.array([predicted_seconds(spec, s) for s in mine]) - t) / t
    return out


def format_fits(fits: list[Fit], samples: list[Sample]) -> str:
    """The fit table ``autopar calibrate`` prints."""
    lines = [f"{'fit':<34} {'samples':>7} {'rms err':>8} {'max err':>8}  values"]
    for f in fits:
        vals = ", ".join(_fmt(k, v) for k, v in f.values.items())
        lines.append(f"{f.name:<34} {f.samples:>7} {100 * f.rms_rel_error:7.1f}% {100 * f.max_rel_error:7.1f}%  {vals}")
    spread = [s.spread for s in samples]
    if spread:
        lines.append(f"measurement spread (max−min)/median: median {100 * float(np.median(spread)):.0f} %, "
                     f"max {100 * max(spread):.0f} % over {len(spread)} samples")
    return "\n".join(lines)


def _fmt(key: str, v: float) -> str:
    if "bandwidth" in key:
        return f"bandwidth {v / 1e9:.3g} GB/s"
    if key.endswith("_s"):
        return f"{key[:-2]} {v * 1e6:.2f} µs"
    if key == "rate":
        return f"{v / 1e9:.4g} G/s"
    return f"{key} {v:.4g}"
