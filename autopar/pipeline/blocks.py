"""Repeated blocks of an unmarked model: the layers a model without ``stage_boundary`` markers
would have had with them (one transformer block per layer), found from the structure of its
forward program.

The equations' structural signatures (``OpGraph.signatures``: primitive, parameters,
operand and result shapes) form a sequence; a stack of R identical blocks of p equations
is a run where ``sig[k] == sig[k + p]`` holds for (R − 1)·p consecutive k. Periods are taken
from the most common distances between equal signatures (as ``autopar.repeats`` does); the
period covering the most equations wins (ties: the shortest — p and 2p cover the same run).
The block boundaries are then placed at the phase (offset within the period) where the
bytes crossing them — ``layers.cut_profile``, summed over the R − 1 boundaries — are
smallest, typically the residual stream between two blocks. The prologue (embeddings) joins
the first block, the epilogue (final norm, head, loss) the last, as with markers.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

# a stack counts as repeated blocks from this many repetitions on, of at least this many
# equations each, covering at least this share of the program's equations
MIN_BLOCKS = 3
MIN_BLOCK_EQNS = 4
MIN_COVERAGE = 0.5


def _longest_run(match: np.ndarray) -> tuple[int, int]:
    """(start, length) of the longest run of True in ``match`` (the first such run)."""
    if not match.any():
        return 0, 0
    padded = np.concatenate([[False], match, [False]]).astype(np.int8)
    edges = np.diff(padded)
    starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
    k = int(np.argmax(ends - starts))
    return int(starts[k]), int(ends[k] - starts[k])


def repeated_blocks(sigs, cut: np.ndarray, *, num_periods: int = 8) -> list[int] | None:
    """Cut positions (the last equation of every layer but the last, as ``layers._dp``
    returns) that make each repeated block one layer, or None when the equations hold no
    stack of at least ``MIN_BLOCKS`` blocks covering ``MIN_COVERAGE`` of them.
    ``sigs``: one signature per equation; ``cut[k]``: bytes crossing the boundary after k
    (∞ where no cut is allowed)."""
    n = len(sigs)
    codes = np.unique(np.asarray(sigs, dtype=object).astype(str), return_inverse=True)[1] if n else np.zeros(0)
    last, gaps = {}, Counter()
    for pos, s in enumerate(codes.tolist()):
        if s in last:
            gaps[pos - last[s]] += 1
        last[s] = pos
    best = None  # (coverage, −p, start, p)
    for p, count in gaps.most_common(num_periods):
        if p < MIN_BLOCK_EQNS or count < 2 or 2 * p > n:
            continue
        start, run = _longest_run(codes[:-p] == codes[p:])
        cover = run + p
        if best is None or (cover, -p) > (best[0], -best[3]):
            best = (cover, -p, start, p)
    if best is None:
        return None
    cover, _, start, p = best
    blocks = cover // p
    if blocks < MIN_BLOCKS or cover < MIN_COVERAGE * n:
        return None
    # phase φ: boundaries after start + φ + k·p − 1 for k = 1..blocks−1, the fewest bytes crossing
    costs = [float(sum(cut[start + phi + k * p - 1] for k in range(1, blocks))) for phi in range(p)]
    if not np.isfinite(min(costs)):
        return None
    phi = int(np.argmin(costs))
    return [start + phi + k * p - 1 for k in range(1, blocks)]


__all__ = ["MIN_BLOCKS", "MIN_BLOCK_EQNS", "MIN_COVERAGE", "repeated_blocks"]
