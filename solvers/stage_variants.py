"""The stage DP's cost variants (``solvers.stage_dp``, module docstring "Variants"): which
variant of a (range, sub-mesh) candidate a stage uses given the micro-batches it holds in
flight — the fastest that fits — and the memory it then needs. ``StageProblem._v`` holds the
arrays as (V, #sub-meshes, L, L+1)."""
from __future__ import annotations

import numpy as np

from .schedules import Schedule


def _inflight(p, r: int) -> int:
    """Micro-batches of activations a stage holds when r stages (itself included) remain."""
    return Schedule(p.schedule).inflight(r, p.num_microbatches)


def _need(p, r: int, at: tuple = ()) -> np.ndarray:
    """Memory per device of every (variant, submesh, start, end) as a stage with r stages remaining
    (``at`` = (submesh, start, end): of that entry only, per variant)."""
    i = (slice(None), *at)
    return p._v[1][i] + _inflight(p, r) * p._v[2][i]


def _effective(p, r: int, at: tuple = ()) -> tuple[np.ndarray, np.ndarray]:
    """(latency, variant) of every (submesh, start, end) as a stage with r stages remaining:
    the fastest variant that fits with its in-flight micro-batches (∞ where none fits; ``at``:
    of that entry only)."""
    lat = np.where(_need(p, r, at) <= p.device_memory, p._v[0][(slice(None), *at)], np.inf)
    v = np.argmin(lat, axis=0)  # first of equal minima: the lower variant
    return np.take_along_axis(lat, v[None], axis=0)[0], v


def _effective_all(p, fs) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``_effective`` for each in-flight count f in ``fs`` at once: {f: (latency, variant)},
    equal to it entry for entry. A variant that fits with f micro-batches fits with fewer
    (need = W + f·A, A ≥ 0, is monotone in f in floating point too), so with the variants of
    every entry sorted by latency (stable: ties keep the lower index, as ``argmin`` does) the
    fastest that fits is the first of them that fits, and its position only moves forward as
    f grows: over the f in increasing order each entry is examined V + len(fs) times at most,
    not V·len(fs)."""
    lat, mem, act = p._v
    V, rest = lat.shape[0], lat.shape[1:]
    order = np.argsort(lat.reshape(V, -1), axis=0, kind="stable")
    sl, sm, sa = (np.take_along_axis(a.reshape(V, -1), order, axis=0) for a in (lat, mem, act))
    pos = np.zeros(sl.shape[1], dtype=np.int64)  # per entry: the first sorted variant that may fit
    live = np.flatnonzero(np.isfinite(sl[0]))  # entries whose fit is still open (V: none fits)
    pos[~np.isfinite(sl[0])] = V
    # the answer for the current f, updated where an entry's position moved (most do not move
    # from one f to the next: copying is cheaper than gathering every entry again)
    eff, var = np.where(pos < V, sl[0], np.inf), np.where(pos < V, order[0], 0)
    out = {}
    for f in sorted(set(fs)):
        todo, moved = live, []
        while len(todo):
            t = pos[todo]
            # (the same arithmetic as ``_need``: W + f·A, compared with the device memory)
            bad = ~(sm[t, todo] + f * sa[t, todo] <= p.device_memory) | ~np.isfinite(sl[t, todo])
            todo = todo[bad]
            pos[todo] += 1
            moved.append(todo)
            done = pos[todo] >= V
            todo = todo[~done]
        live = live[pos[live] < V]
        if moved and (ch := np.unique(np.concatenate(moved))).size:
            at, fits = np.minimum(pos[ch], V - 1), pos[ch] < V
            eff[ch] = np.where(fits, sl[at, ch], np.inf)
            var[ch] = np.where(fits, order[at, ch], 0)
        out[f] = (eff.reshape(rest).copy(), var.reshape(rest).copy())
    return out


def _least_need(p, r: int, at: tuple = ()) -> np.ndarray:
    """(submesh, start, end): the least memory of a variant with a finite latency (∞: none;
    ``at``: of that entry only)."""
    return np.where(np.isfinite(p._v[0][(slice(None), *at)]), _need(p, r, at), np.inf).min(axis=0)


__all__ = ["_inflight", "_need", "_effective", "_effective_all", "_least_need"]
