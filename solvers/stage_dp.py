"""Inter-op stage partitioning (Alpa §5): split L layers into pipeline stages on sub-meshes.

Data (``StageProblem``): layers 0..L−1; a cluster of N nodes × M devices; sub-mesh shapes

    𝓜 = {(1,1), (1,2), (1,4), …, (1,M)} ∪ {(k,M) : k ∈ K(N)},   |m| = n·m devices   (``submesh_shapes``)

with K(N) = {2..N} up to 8 nodes, else the powers of two ≤ N and N (``node_counts``),

and for each layer range [i,j) and m ∈ 𝓜: latency t(i,j,m) (s per micro-batch, fwd+bwd, ∞ =
infeasible), static memory W(i,j,m) (params+grads+optimizer state) and activation memory
A(i,j,m) per in-flight micro-batch (bytes per device). A plan is S stages
[b_0=0,b_1), …, [b_{S−1},b_S=L) with sub-meshes m_1..m_S (stage i has t_i, W_i, A_i):

    minimise  T = Σ_i t_i + (B − 1)·max_i t_i                                    (``_solution``)
    s.t.      Σ_i |m_i| = N·M                             tiling                 (``_dp``, index d)
              W_i + f(S − i + 1)·A_i ≤ device_memory      memory, i = 1..S       (``_need``)
              t_i < ∞
    f(r) = min(r, B) under 1F1B (stage i holds the micro-batches of the stages from it to
    the last, never more than B), f(r) = B under GPipe          (``solvers.schedules.Schedule.inflight``)

Tiling: Alpa's rule — the shapes of 𝓜 with Σ|m_i| = N·M can always be placed on the
cluster (Alpa §5.2) when M is a power of two; for other M, (1,M) is added and the device
count is the only check (it can then be optimistic, e.g. three (1,4) on 2 nodes × 6).

Algorithm (``solve_stages``): for a bound t_max on every stage latency,

    F(0, L, 0) = 0
    F(s, k, d) = min_{k<j≤L, m: |m|≤d, t(k,j,m) ≤ t_max, W+f(s)·A ≤ mem} t(k,j,m) + F(s−1, j, d−|m|)

places layers k..L−1 as s stages on d devices (``_dp`` with ⊕ = +); s counts the stages from
this one to the last, which is exactly the S − i + 1 of the memory rule. Then

    T* = min_{t_max} min_S F_{t_max}(S, 0, N·M) + (B − 1)·t_max

over the distinct finite latencies t_max ≥ t_lo = min over plans of max_i t_i (the bottleneck,
``_dp`` with ⊕ = max). B = 1 needs only F_∞ (no bound). Otherwise a best-first search over
gaps of candidates (``solve_stages``): a DP at t whose plans' largest stage is h covers
[h, t] (F is constant there); a gap cands[i..j] below a DP with Σ = f has the lower bound
f + (B−1)·cands[i] (F only grows as t_max falls) and is dropped once that exceeds the best T
— Alpa's pruning "(B−1)·t_max > best T", tightened by f; each DP bisects its gap. Ties: fewer
stages, then the lexicographically smallest (b_1, m_1, b_2, m_2, …) — layer boundaries
first, earliest stage first (``_better``); the DP keeps the first (j, m) within 1e-9 of the
minimum, which yields that order.

Pruning (exact, ``solvers.stage_prune``; ``solve_stages(prune=False)`` turns it off): before
the DPs, candidates that no plan within the tie tolerance of the optimum can use are set to
∞ — B·t > U (a stage's own latency bounds T from below) and the waste rule (the other
layers on the other devices need a bottleneck of at least ρ·layers/devices) against the
objective U of the best equal split; a DP under t_max also drops candidates whose waste
bound exceeds t_max, and runs at most (U − (B−1)·t_lo)/t_min stage levels (U: the best plan
so far). ``_dp`` then works on the band of range lengths each sub-mesh still has, in units
of the gcd of the surviving sub-mesh sizes (D/M device states once sub-node meshes are
gone). Cost per DP: Σ_m S·K·band_m·D/unit instead of #shapes·S·L²·D.

Variants: the arrays may carry a leading axis of V alternative costings of every stage
(e.g. parameters sharded harder: less W, more t). A stage with r stages after it uses the
fastest variant that fits with f(r) micro-batches in flight (``_effective``,
``solvers.stage_variants``), so the DP runs on per-s effective latencies;
``StageSolution.variants`` names the variant of each stage.
Ties prefer the lower variant index.

Infeasible (``StageInfeasibleError``): min_device_memory = min over plans with finite
latencies of max_i (W_i + f(S−i+1)·A_i) (``_dp`` with ⊕ = max on the memory needs; per stage
the least-memory variant with a finite latency).
``solvers.stage_brute.brute_force`` enumerates every plan (tiny instances) and checks all of the above.
"""
from __future__ import annotations

import functools
import heapq
import math
from dataclasses import dataclass

import numpy as np

from . import stage_prune
from .schedules import SCHEDULES
from .stage_variants import _effective, _effective_all, _inflight, _least_need, _need  # noqa: F401
from .submeshes import EVERY_NODE_COUNT_UP_TO, node_counts, submesh_shapes, uniform_stages, uniform_submeshes  # noqa: F401

__all__ = ["StageProblem", "StageSolution", "StageInfeasibleError", "solve_stages",
           "submesh_shapes", "node_counts", "uniform_stages", "uniform_submeshes"]

_TOL = 1e-9
_KEEP_FLOATS = 20_000_000  # ``_dp`` keeps a stage level's blocks between its two passes up to this many


class StageInfeasibleError(ValueError):
    """No plan fits; ``min_device_memory`` is the smallest device memory that makes one fit
    (``inf`` when no plan with finite stage latencies tiles the cluster at all)."""

    def __init__(self, message: str, min_device_memory: float):
        super().__init__(message)
        self.min_device_memory = min_device_memory


@dataclass(frozen=True, eq=False)
class StageProblem:
    """Arrays have shape (L, L+1, len(submesh_shapes)); entry [i, j, s] is the range [i, j)
    on sub-mesh s (only i < j is read). A dict {(i, j, s): value} is accepted too (missing:
    latency ∞, memory 0). ``memory``/``activation`` None means 0 (memory not modelled).
    Arrays of shape (V, L, L+1, #submeshes) give V variants of every stage (module docstring);
    all three then need that shape (None still means 0)."""

    num_layers: int
    num_nodes: int
    devices_per_node: int
    latency: object
    memory: object = None
    activation: object = None
    num_microbatches: int = 1
    device_memory: float = math.inf
    schedule: str = "1f1b"

    def __post_init__(self):
        L, shape = self.num_layers, (self.num_layers, self.num_layers + 1, len(self.shapes))
        if L < 1 or self.num_nodes < 1 or self.devices_per_node < 1 or self.num_microbatches < 1:
            raise ValueError("num_layers, num_nodes, devices_per_node, num_microbatches must be ≥ 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, not {self.schedule!r}")
        lat0 = self.latency
        if not isinstance(lat0, dict) and np.ndim(lat0) == 4:
            shape = (int(np.shape(lat0)[0]),) + shape
        for name, default in (("latency", math.inf), ("memory", 0.0), ("activation", 0.0)):
            a = getattr(self, name)
            if a is None:
                a = np.zeros(shape)
            elif isinstance(a, dict):
                d, a = a, np.full(shape, default)
                for (i, j, s), v in d.items():
                    a[i, j, s] = v
            a = np.array(a, dtype=np.float64)
            if a.shape != shape:
                what = "(V, L, L+1, #submeshes)" if len(shape) == 4 else "(L, L+1, #submeshes)"
                raise ValueError(f"{name} has shape {a.shape}, expected {what} = {shape}")
            if len(shape) == 4 and shape[0] < 1:
                raise ValueError("at least one variant is needed")
            if np.isnan(a).any() or (a < 0).any():
                raise ValueError(f"{name} must be ≥ 0 or inf (no NaN)")
            if name == "latency":  # ranges [i, j) with j ≤ i do not exist
                a[(..., *np.tril_indices(L, 0, L + 1), slice(None))] = np.inf
            a.flags.writeable = False
            object.__setattr__(self, name, a)
        # internal view: (V, #submeshes, L, L+1) for every array
        object.__setattr__(self, "_v", tuple(
            (a if a.ndim == 4 else a[None]).transpose(0, 3, 1, 2) for a in (self.latency, self.memory, self.activation)))

    @property
    def num_variants(self) -> int:
        return self._v[0].shape[0]

    @classmethod
    def from_callables(cls, num_layers, num_nodes, devices_per_node, latency_fn, static_mem_fn=None,
                       act_mem_fn=None, **kwargs) -> "StageProblem":
        """Each fn is called as fn(start, end, submesh_shape) for the range [start, end); the
        memory fns only where the latency is finite."""
        shapes = submesh_shapes(num_nodes, devices_per_node)
        lat = np.full((num_layers, num_layers + 1, len(shapes)), np.inf)
        mem, act = np.zeros_like(lat), np.zeros_like(lat)
        for i in range(num_layers):
            for j in range(i + 1, num_layers + 1):
                for s, sh in enumerate(shapes):
                    lat[i, j, s] = latency_fn(i, j, sh)
                    if math.isfinite(lat[i, j, s]):
                        mem[i, j, s] = static_mem_fn(i, j, sh) if static_mem_fn else 0.0
                        act[i, j, s] = act_mem_fn(i, j, sh) if act_mem_fn else 0.0
        return cls(num_layers, num_nodes, devices_per_node, lat, mem, act, **kwargs)

    @functools.cached_property
    def shapes(self) -> list[tuple[int, int]]:
        return submesh_shapes(self.num_nodes, self.devices_per_node)

    @functools.cached_property
    def sizes(self) -> list[int]:
        return [n * m for n, m in self.shapes]

    @property
    def total_devices(self) -> int:
        return self.num_nodes * self.devices_per_node


@dataclass(frozen=True)
class StageSolution:
    """stages: (start, end, submesh_index, submesh_shape, latency_s) per stage, in order;
    t_max: the largest stage latency; objective_s = total_latency_s + (B−1)·t_max;
    variants: the cost variant of each stage (all 0 without variants)."""

    stages: list
    total_latency_s: float
    t_max: float
    objective_s: float
    num_stages: int
    status: str  # "optimal" | "forced"
    variants: tuple = ()


def _dp(p: StageProblem, cost, smax: int, combine, unit: int = 1):
    """F[s][k, d/unit] = best ⊕-combination of cost(s)[m, k, j] ⊕ F[s−1][j, (d−|m|)/unit];
    choice[s][k, d/unit] = flat (j, m) index of the first choice within _TOL of the best (−1:
    none): the smallest j, then the smallest m at that j. ``unit`` divides D and the size of
    every sub-mesh with a finite cost (``stage_prune.device_unit``): d runs over its multiples.

    One sub-mesh shape at a time (two passes: the best over every (m, j), then the first
    choice near it), each over the band of range lengths j − k where that shape has a finite
    cost (after ``stage_prune.prune`` a few lengths per shape), so the working set is
    (K, D/unit, band) per shape: with all (m, j) at once it was #shapes × L × D × L floats
    (10 GB for 96 layers on 128 × 8 devices)."""
    L, D, sizes = p.num_layers, p.total_devices // unit, p.sizes
    F = [np.full((L + 1, D + 1), np.inf)]
    F[0][L, 0] = 0.0
    choice = [None]
    for s in range(1, smax + 1):
        K = L - s + 1  # s stages need k ≤ L − s, and the next stage then starts at j ≤ K
        c = cost(s)[:, :K, :K + 1]  # (nS, K, K+1) of (m, k, j)
        prev = F[s - 1][:K + 1].T  # (D+1, K+1) of (d, j)
        blocks = []
        for m, size in enumerate(sizes):
            n = size // unit
            if n > D or size % unit:
                continue
            ks, jf = np.nonzero(np.isfinite(c[m]))
            if not len(ks):
                continue
            lo, hi = int((jf - ks).min()), int((jf - ks).max())  # the band of lengths j − k
            k0, k1 = int(ks.min()), int(ks.max()) + 1  # rows with a finite cost
            js = np.arange(k0, k1)[:, None] + np.arange(lo, hi + 1)[None, :]  # (rows, W) of j
            ok = js <= K
            jc = np.where(ok, js, K)
            cb = np.where(ok, np.take_along_axis(c[m][k0:k1], jc, axis=1), np.inf)  # (rows, W)
            blocks.append((m, n, k0, k1, js, cb, jc))

        def block(n, cb, jc) -> np.ndarray:  # (rows, D+1−n, W): d = n..D, every j of the band
            return combine(cb[:, None, :], prev[:D + 1 - n][:, jc].transpose(1, 0, 2))
        # the blocks of pass 1 are kept for pass 2 while they are small (else recomputed)
        keep = sum(cb.size * (D + 1 - n) for _, n, _, _, _, cb, _ in blocks) <= _KEEP_FLOATS
        kept = []
        best = np.full((K, D + 1), np.inf)
        for m, n, k0, k1, js, cb, jc in blocks:
            v = block(n, cb, jc)
            kept.append(v if keep else None)
            np.minimum(best[k0:k1, n:], v.min(axis=2), out=best[k0:k1, n:])
        limit = best * (1 + _TOL)
        first_j = np.full((K, D + 1), K + 1, dtype=np.int64)
        first_m = np.zeros((K, D + 1), dtype=np.int64)
        for (m, n, k0, k1, js, cb, jc), v in zip(blocks, kept):
            near = (block(n, cb, jc) if v is None else v) <= limit[k0:k1, n:, None]
            # the first j of the band within the tolerance (the band is a few lengths wide:
            # slice by slice is faster than ``argmax`` along it, and gives the same)
            W = near.shape[2]
            first = np.full(near.shape[:2], W)
            for w in range(W - 1, -1, -1):
                first[near[:, :, w]] = w
            found = first < W
            j = js[:, :1] + np.where(found, first, 0)  # (js[r, w] = js[r, 0] + w)
            fj, fm = first_j[k0:k1, n:], first_m[k0:k1, n:]  # views
            take = found & (j < fj)
            fj[take], fm[take] = j[take], m
        idx = first_j * len(sizes) + first_m
        idx[~np.isfinite(best)] = -1
        Fs = np.full((L + 1, D + 1), np.inf)
        Fs[:K] = best
        F.append(Fs)
        choice.append(idx)
    return F, choice


def _plan(p: StageProblem, choice, S: int, unit: int = 1) -> list[tuple[int, int, int]]:
    k, d, plan, nS = 0, p.total_devices // unit, [], len(p.sizes)
    for s in range(S, 0, -1):
        j, m = divmod(int(choice[s][k, d]), nS)
        plan.append((k, j, m))
        k, d = j, d - p.sizes[m] // unit
    assert k == p.num_layers and d == 0
    return plan


def _solution(p: StageProblem, plan, status: str, variants) -> StageSolution:
    """``variants``: a list, or a function r ↦ the variant array of ``_effective(p, r)``
    (each stage's fastest fitting variant with r stages remaining)."""
    shapes, S = p.shapes, len(plan)
    if callable(variants):
        variants = [int(variants(S - i)[m, k, j]) for i, (k, j, m) in enumerate(plan)]
    stages = [(k, j, m, shapes[m], float(p._v[0][v, m, k, j])) for (k, j, m), v in zip(plan, variants)]
    lats = [st[4] for st in stages]
    total, tmax = sum(lats), max(lats)
    return StageSolution(stages, total, tmax, total + (p.num_microbatches - 1) * tmax, len(stages), status,
                         tuple(int(v) for v in variants))


def _better(a: StageSolution, b: StageSolution | None) -> bool:
    """Lower objective (relative tolerance), then fewer stages, then (b_1, m_1, b_2, m_2, …)."""
    if b is None:
        return True
    tol = _TOL * max(abs(a.objective_s), abs(b.objective_s))
    if abs(a.objective_s - b.objective_s) > tol:
        return a.objective_s < b.objective_s
    key = lambda x: (x.num_stages, [(st[1], st[2]) for st in x.stages])  # noqa: E731
    return key(a) < key(b)


def _same(a: StageSolution, b: StageSolution) -> bool:
    """Equal objective and stages (variants aside)."""
    return not _better(a, b) and not _better(b, a)


def _stage_range(p: StageProblem, num_stages: int | None) -> list[int]:
    smax = min(p.num_layers, p.total_devices)
    if num_stages is None:
        return list(range(1, smax + 1))
    if not 1 <= num_stages <= smax:
        raise ValueError(f"num_stages={num_stages} must be in 1..min(L, N·M) = 1..{smax}")
    return [num_stages]


def _infeasible(p: StageProblem, srange: list[int]) -> StageInfeasibleError:
    F, _ = _dp(p, lambda s: _least_need(p, s), max(srange), np.maximum)
    mm = min(F[s][0, p.total_devices] for s in srange)
    stages = f" with {srange[0]} stages" if len(srange) == 1 else ""
    if not math.isfinite(mm):
        return StageInfeasibleError(
            f"no plan{stages}: no stages with finite latency tile the {p.num_nodes}×{p.devices_per_node} "
            f"cluster", mm)
    return StageInfeasibleError(
        f"no plan{stages} fits device_memory={p.device_memory:.6g} bytes; the smallest device memory "
        f"that makes one fit is {mm:.6g} bytes ({p.schedule}, B={p.num_microbatches})", float(mm))


def _forced(p: StageProblem, forced, num_stages: int | None) -> StageSolution:
    shapes, plan, k = p.shapes, [], 0
    for start, end, shape in forced:
        m = shape if isinstance(shape, (int, np.integer)) else (
            shapes.index(tuple(shape)) if tuple(shape) in shapes else None)
        if m is None or not 0 <= m < len(shapes):
            raise ValueError(f"forced stage [{start},{end}): sub-mesh {shape} not in {shapes}")
        if start != k or end <= start:
            raise ValueError(f"forced stages must be contiguous non-empty ranges from 0; got [{start},{end}) "
                             f"after layer {k}")
        plan.append((start, end, int(m)))
        k = end
    if k != p.num_layers:
        raise ValueError(f"forced stages cover layers 0..{k - 1}, not 0..{p.num_layers - 1}")
    used = sum(p.sizes[m] for _, _, m in plan)
    if used != p.total_devices:
        raise ValueError(f"forced sub-meshes use {used} devices, the cluster has {p.total_devices}")
    if num_stages is not None and num_stages != len(plan):
        raise ValueError(f"num_stages={num_stages} but {len(plan)} forced stages")
    S = len(plan)
    for k, j, m in plan:
        if not np.isfinite(p._v[0][:, m, k, j]).any():
            raise StageInfeasibleError(f"forced stage [{k},{j}) on {shapes[m]} has no finite latency", math.inf)
    # (each stage's own entry (m, k, j) only, not whole arrays)
    need = max(float(_least_need(p, S - i, (m, k, j))) for i, (k, j, m) in enumerate(plan))
    if need > p.device_memory:
        raise StageInfeasibleError(f"forced plan needs {need:.6g} bytes per device > device_memory="
                                   f"{p.device_memory:.6g}", need)
    variants = [int(_effective(p, S - i, (m, k, j))[1]) for i, (k, j, m) in enumerate(plan)]
    return _solution(p, plan, "forced", variants)


def solve_stages(p: StageProblem, *, num_stages: int | None = None, forced=None, prune: bool = True) -> StageSolution:
    """Optimal plan (see the module docstring). ``num_stages`` forces S; ``forced`` =
    [(start, end, submesh_shape or index), …] validates and costs the user's plan.
    ``prune``: drop the candidates no near-optimal plan can use first (``solvers.stage_prune``;
    exact: the same solution either way)."""
    if forced is not None:
        return _forced(p, forced, num_stages)
    srange, D = _stage_range(p, num_stages), p.total_devices
    # effective latencies depend on s only through f(s)
    by_inflight = _effective_all(p, [_inflight(p, s) for s in range(1, max(srange) + 1)])
    unit, bound = 1, math.inf
    if prune:
        keys = list(by_inflight)
        least = by_inflight[_inflight(p, 1)][0]
        bound = stage_prune.upper_bound(lambda r: by_inflight[_inflight(p, r)][0], p.shapes, p.sizes, p.num_layers,
                                        p.num_nodes, p.devices_per_node, p.num_microbatches, num_stages)
        effs = stage_prune.prune([by_inflight[k][0] for k in keys], least, p.sizes, D, p.num_microbatches, bound)
        by_inflight = {k: (e, by_inflight[k][1]) for k, e in zip(keys, effs)}
        if math.isfinite(bound):
            unit = stage_prune.device_unit(effs, p.sizes, D)
            smax = stage_prune.max_stages(effs, p.sizes, p.num_layers, D)
            srange = [s for s in srange if s <= smax]
    eff = {s: by_inflight[_inflight(p, s)][0] for s in range(1, max(srange) + 1)}  # (nS, L, L+1), ∞: no fit
    # the other stages' largest latency is at least this (``stage_prune.waste``): with pruning on,
    # a DP under t_max skips candidates above it
    rest = stage_prune.waste(eff[1], p.sizes, D) if prune else np.zeros_like(eff[1])
    variant = lambda r: by_inflight[_inflight(p, r)][1]  # noqa: E731
    Fb, _ = _dp(p, lambda s: eff[s], max(srange), np.maximum, unit)
    t_lo = min(Fb[s][0, -1] for s in srange)
    if not math.isfinite(t_lo):
        raise _infeasible(p, srange)
    best = None
    B, finite = p.num_microbatches, eff[1][np.isfinite(eff[1])]
    t_min = float(finite.min()) if prune and finite.size else 0.0

    def run(t_max: float) -> tuple[float, float]:
        """DP under t_max; returns (min over S of Σ t_i, max over S of the plans' max t_i)."""
        nonlocal best
        upper = bound if best is None else min(bound, best.objective_s)
        top = min(max(srange), stage_prune.stage_count_bound(upper, t_lo, t_min, B))
        F, ch = _dp(p, lambda s: np.where((eff[s] <= t_max) & (rest <= t_max), eff[s], np.inf), top, np.add, unit)
        sols = [_solution(p, _plan(p, ch, s, unit), "optimal", variant) for s in srange
                if s <= top and math.isfinite(F[s][0, -1])]
        for sol in sols:
            if _better(sol, best):
                best = sol
        if not sols:  # only plans of more stages than can beat U: nothing under t_max either
            return math.inf, t_max
        return min(x.total_latency_s for x in sols), max(x.t_max for x in sols)

    # Best-first over gaps of not yet covered t_max candidates. A run at t whose plans'
    # largest max is h covers [h, t] (F is constant there); a gap cands[i..j] below a run
    # with Σ = f is bounded by f + (B−1)·cands[i] (F only grows as t_max falls).
    cands = np.unique(np.concatenate([e[np.isfinite(e) & (e >= t_lo)] for e, _ in by_inflight.values()]))
    f, h = run(math.inf)
    gaps = [(f + (B - 1) * cands[0], 0, int(np.searchsorted(cands, h)) - 1, f)] if B > 1 else []
    while gaps:
        bound, i, j, f = heapq.heappop(gaps)
        if j < i or bound > best.objective_s * (1 + _TOL):
            continue
        mid = (i + j) // 2
        f_mid, h = run(float(cands[mid]))
        heapq.heappush(gaps, (f + (B - 1) * cands[min(mid + 1, j)], mid + 1, j, f))
        heapq.heappush(gaps, (f_mid + (B - 1) * cands[i], i, int(np.searchsorted(cands, h)) - 1, f_mid))
    return best

