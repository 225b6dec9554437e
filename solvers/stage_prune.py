"""Exact pruning for the stage DP (``solvers.stage_dp``): candidates that no plan within the
tolerance of the optimum can use are removed before the DP runs, so the DP's work shrinks
to the (range, sub-mesh) pairs that can matter. Nothing here is a heuristic: every rule
below is a lower bound on the objective of *every* plan that uses the candidate, compared
with the objective U of a plan that exists (``upper_bound``), so the optimum — and every plan
the tie-break could prefer, all within a relative 1e-9 of it — survives, and
``solve_stages`` returns the same solution with or without pruning (tested against the
unpruned search and brute force in ``tests/test_stage_prune.py``).

Notation (``solvers.stage_dp``): B micro-batches, D = N·M devices, L layers; e_r(i, j, m) the
effective latency of range [i, j) on sub-mesh m as a stage with r stages remaining (the
fastest variant that fits with its in-flight micro-batches, ∞ if none), e_r ≥ e_1 for every
r (memory grows with in-flight micro-batches, so fewer variants fit). A plan's objective is
T = Σ_i t_i + (B − 1)·max_i t_i.

* **Bottleneck rule** (``prune``): a stage with latency t in a plan gives T ≥ t + (B − 1)·t
  = B·t. So a candidate with B·e_r(i, j, m) > U is in no plan with T ≤ U: set to ∞.
* **Waste rule** (``prune``): let ρ = min over every finite e_1(i, j, m) of |m|·e_1 / (j − i),
  the fewest device-seconds per layer any stage achieves. A stage (i, j, m) leaves the other
  L − (j − i) layers to stages on D − |m| devices; each of those stages k has
  |m_k|·t_k ≥ ρ·(layers of k), summed: Σ |m_k|·t_k ≥ ρ·(L − j + i), and Σ |m_k| = D − |m|
  (tiling), so max_k t_k ≥ ρ·(L − j + i) / (D − |m|) and T ≥ B·max_k t_k. A candidate whose
  bound exceeds U is dropped; one with layers left over and no devices left (|m| = D,
  j − i < L) is in no plan at all.
* **Within a DP under a bound t_max** (``solvers.stage_dp.solve_stages``): every stage of the
  plans it considers has t ≤ t_max, so a candidate whose waste bound ρ·(L − j + i)/(D − |m|)
  exceeds t_max is in none of them (ρ taken over the candidates left after pruning: the
  plans that can still be the answer use only those).
* **Stage count** (``stage_count_bound``): T ≥ S·t_min + (B − 1)·t_lo, t_min the least
  surviving candidate latency and t_lo the least bottleneck of any plan, so a DP needs no
  more than (U − (B − 1)·t_lo)/t_min stage levels (U: the best plan found so far).
* **Device unit** (``device_unit``): once pruned, every surviving sub-mesh size may be a
  multiple of some g (e.g. the node size M when sub-node meshes are gone); D is one too, so
  every partial sum a plan reaches is a multiple of g and the DP runs on D/g device states.
* **Stages vs devices** (``max_stages``): every stage takes at least the smallest surviving
  size n_min, so S ≤ min(L, D / n_min).

U (``upper_bound``): the best of the equal splits (``uniform_submeshes``) evaluated on the
effective latencies — a handful of plans, computed without any DP; ∞ when none is feasible
(then nothing is pruned).
"""
from __future__ import annotations

import math

import numpy as np

from .submeshes import uniform_stages, uniform_submeshes

# pruning compares with U·(1 + SLACK): far above the DP's relative tie tolerance (1e-9), so
# no plan the tie-break could pick is lost to rounding
SLACK = 1e-7


def upper_bound(eff_of, shapes, sizes, num_layers: int, num_nodes: int, devices_per_node: int,
                num_microbatches: int, num_stages: int | None = None) -> float:
    """The least objective among the equal splits (``solvers.stage_dp.uniform_submeshes``)
    whose sub-mesh is a candidate; ``eff_of(r)``: effective latencies (#sub-meshes, L, L+1)
    with r stages remaining. ∞ when none is feasible."""
    best = math.inf
    for pp, sub in uniform_submeshes(num_layers, num_nodes, devices_per_node):
        if (num_stages is not None and pp != num_stages) or tuple(sub) not in shapes:
            continue
        m = shapes.index(tuple(sub))
        lats = [float(eff_of(pp - k)[m, a, b]) for k, (a, b) in enumerate(uniform_stages(num_layers, pp))]
        if all(math.isfinite(t) for t in lats):
            best = min(best, sum(lats) + (num_microbatches - 1) * max(lats))
    return best


def waste(least: np.ndarray, sizes, total: int) -> np.ndarray:
    """ρ·(L − j + i) / (D − |m|) per candidate (module docstring, waste rule): a lower bound on
    the largest latency of the other stages of any plan that uses it (∞: no plan can; 0:
    it takes every layer). ``least``: e_1 of the candidates that may be used."""
    L = least.shape[1]
    size = np.asarray(sizes, dtype=np.float64)[:, None, None]
    i, j = np.arange(L)[None, :, None], np.arange(L + 1)[None, None, :]
    span = np.where(j > i, j - i, 1).astype(np.float64)
    finite = np.isfinite(least)
    rho = float((size * least / span)[finite].min()) if finite.any() else 0.0
    rest, free = L - span, float(total) - size     # layers and devices left to the other stages
    return np.where(rest > 0, np.where(free > 0, rho * rest / np.maximum(free, 1.0), np.inf), 0.0)


def prune(effs: list[np.ndarray], least: np.ndarray, sizes, total: int, num_microbatches: int,
          bound: float) -> list[np.ndarray]:
    """The bottleneck and waste rules (module docstring) applied to each effective-latency
    array in ``effs`` (#sub-meshes, L, L+1); ``least``: e_1 (no larger than any of them);
    ``total``: D; ``bound``: U."""
    if not math.isfinite(bound):
        return effs
    limit = bound * (1 + SLACK) / num_microbatches
    rest = waste(least, sizes, total)
    return [np.where((e > limit) | (rest > limit), np.inf, e) for e in effs]


def device_unit(effs: list[np.ndarray], sizes, total: int) -> int:
    """gcd of D and every sub-mesh size with a finite candidate in some array (1 if none)."""
    g = total
    for m, n in enumerate(sizes):
        if any(np.isfinite(e[m]).any() for e in effs):
            g = math.gcd(g, int(n))
    return max(g, 1)


def max_stages(effs: list[np.ndarray], sizes, num_layers: int, total: int) -> int:
    """min(L, D / the smallest sub-mesh size with a finite candidate)."""
    used = [n for m, n in enumerate(sizes) if any(np.isfinite(e[m]).any() for e in effs)]
    return min(num_layers, total // min(used)) if used else num_layers


def stage_count_bound(bound: float, t_lo: float, t_min: float, num_microbatches: int) -> int:
    """The most stages a plan with T ≤ U can have: T ≥ S·t_min + (B − 1)·t_lo (every stage
    takes at least the least candidate latency t_min, the largest at least the least
    bottleneck t_lo), so S ≤ (U − (B − 1)·t_lo) / t_min (no bound without U or t_min)."""
    if not math.isfinite(bound) or t_min <= 0:
        return 1 << 30
    return max(int(math.floor((bound * (1 + SLACK) - (num_microbatches - 1) * t_lo) / t_min * (1 + SLACK))), 1)


__all__ = ["stage_count_bound", "SLACK", "upper_bound", "waste", "prune", "device_unit", "max_stages"]
