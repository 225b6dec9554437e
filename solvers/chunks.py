"""Chunks of a layer sequence for interleaved 1F1B (``autopar.pipeline.interleave``): G·v
contiguous chunks, chunk j on device group j mod G, pass r = chunks rG..rG + G − 1."""
from __future__ import annotations

import math

import numpy as np


def pass_chunks(lat: np.ndarray, G: int, v: int) -> list[int] | None:
    """Bounds (G·v + 1) of G·v contiguous chunks of the layers, chunk j on group j mod G,
    ``lat[a, b]`` the time of layers a..b−1, minimising Σ over the v passes (chunks rG..rG+G−1)
    of the pass's slowest chunk — exactly, by dynamic programs: the least slowest chunk of
    layers a..b−1 cut in G, then the passes' split points. Interleaved 1F1B runs each chunk
    on G micro-batches in a row and hands them to the next group, so a pass moves at its
    slowest chunk's pace: a round of G micro-batches takes between the busiest group's time
    (max_g Σ_r) and this sum (Σ_r max_g), which equals it when every pass is even. Where one
    layer is heavy (a stem, an LM head), every other chunk of its pass grows toward it and
    the other passes take the rest. None where no split has finite times."""
    L = lat.shape[0]
    lat = np.where(np.isnan(lat), np.inf, lat)
    full = np.full((L + 1, L + 1), np.inf)
    full[:L, :] = lat
    # cut[a][b]: least slowest chunk of layers a..b−1 in G chunks; arg: the last chunk's start
    cut, arg = np.full((L + 1, L + 1), np.inf), np.zeros((L + 1, G + 1, L + 1), dtype=np.int64)
    idx = np.arange(L + 1)
    behind = idx[:, None] >= idx[None, :]   # [c, b]: no chunk c..b−1
    for a in range(L):
        h = full[a].copy()   # one chunk: a..b−1
        cut_off = behind | (idx[:, None] <= a)   # the chunks so far must end after a
        for k in range(2, G + 1):
            both = np.maximum(h[:, None], full)   # [c, b]: chunks so far ending at c, then c..b−1
            both[cut_off] = np.inf
            arg[a, k] = both.argmin(axis=0)
            h = both.min(axis=0)
        cut[a] = h
    F = np.full((v + 1, L + 1), np.inf)
    back = np.zeros((v + 1, L + 1), dtype=np.int64)
    F[0, 0] = 0.0
    for r in range(1, v + 1):
        total = F[r - 1][:, None] + cut   # [m', m]: passes so far ending at m', then m'..m−1
        back[r] = total.argmin(axis=0)
        F[r] = total.min(axis=0)
    if not math.isfinite(F[v, L]):
        return None
    ends = [L]
    for r in range(v, 0, -1):
        ends.append(int(back[r, ends[-1]]))
    passes = list(reversed(ends))
    bounds = []
    for a, b in zip(passes, passes[1:]):
        inner = [b]
        for k in range(G, 1, -1):
            inner.append(int(arg[a, k, inner[-1]]))
        bounds += [a] + list(reversed(inner))[:-1]
    return bounds + [L]


__all__ = ["pass_chunks"]
