"""Run a plan as a loop and compare it with the unsharded function (``autopar run``).

A training step is called several times with its outputs fed back (``Plan.carried``). The
outputs that are not fed back (the loss, metrics) must equal the unsharded loop's at every
step. The fed-back state must too — except that optimizers such as Adam turn float noise on
(near-)zero gradients into ±lr updates, so two correct programs can differ there. Such a
difference is accepted only when every step's loss still matches (from step 2 on it depends
on the updated state, so a wrong update shows there) and each differing element is within
twice the largest update the unsharded loop itself made to that leaf, per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np


@dataclass(frozen=True)
class LoopComparison:
    steps: int
    ok: bool
    verdict: str                # "OK", "OK (loss)" or "MISMATCH"
    compared: str               # what was compared, in words
    max_diff: float             # over every output leaf of every step
    outputs_max_diff: float     # outputs that are not fed back
    state_max_diff: float       # fed-back state after the last step
    state_bad_elements: int     # state elements outside rtol/atol
    state_elements: int
    failures: tuple[str, ...] = ()

    def summary(self) -> str:
        text = (f"{self.steps} step(s): {self.compared}; max |sharded - unsharded| = {self.max_diff:.3g} "
                f"→ {self.verdict}")
        if self.verdict == "OK (loss)":
            text += (f"\n  fed-back state differs in {self.state_bad_elements} of {self.state_elements} elements "
                     f"(up to {self.state_max_diff:.3g}), within the size of the step's own updates: float noise "
                     "amplified by the optimizer (e.g. Adam on ~zero gradients)")
        for f in self.failures[:8]:
            text += f"\n  {f}"
        return text


def host(x) -> np.ndarray:
    """``x`` as a numpy array (a PRNG key as its words)."""
    if jax.numpy.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def run_loop(step, args: tuple, carried, steps: int, *, fetch=None) -> list:
    """``steps`` calls of ``step``; call t + 1 gets call t's outputs at the carried positions.
    Returns the flat outputs of every call (as host numpy arrays; ``fetch(leaves)`` makes them
    so, by default ``host`` of each)."""
    flat, tree = jax.tree_util.tree_flatten(args)
    outs = []
    for _ in range(steps):
        out = jax.tree_util.tree_leaves(jax.block_until_ready(step(*jax.tree_util.tree_unflatten(tree, flat))))
        outs.append(list(fetch(out)) if fetch is not None else [host(o) for o in out])
        flat = list(flat)
        for i, k in carried:
            flat[i] = out[k]
    return outs


def _diff(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind not in "fc":
        return 0.0 if np.array_equal(a, b) else float("inf")
    return float(np.max(np.abs(a.astype(np.float64) - b), initial=0.0))


def _close(a, b, rtol, atol) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind not in "fc":
        return np.asarray(a == b)
    return np.isclose(a, b, rtol=rtol, atol=atol)


def compare_loops(got: list, want: list, first_inputs: list, carried, *, rtol: float, atol: float,
                  paths=None) -> LoopComparison:
    """``got``/``want``: ``run_loop`` results of the sharded and unsharded step;
    ``first_inputs``: the flat arguments of the first call (to size the updates)."""
    steps = len(want)
    n = len(want[0])
    paths = paths or [f"output {k}" for k in range(n)]
    state_out = {k for _, k in carried}
    loss_idx = [k for k in range(n) if k not in state_out]
    failures, worst = [], 0.0
    out_worst = 0.0
    for t in range(steps):
        for k in range(n):
            d = _diff(got[t][k], want[t][k])
            worst = max(worst, d)
            if k in loss_idx:
                out_worst = max(out_worst, d)
                if not _close(got[t][k], want[t][k], rtol, atol).all():
                    failures.append(f"step {t + 1}: {paths[k]} differs by {d:.3g}")
    state_bad = state_total = 0
    state_worst, noise_ok = 0.0, True
    prev = {k: first_inputs[i] for i, k in carried}
    for i, k in carried:
        g, w = got[-1][k], want[-1][k]
        close = _close(g, w, rtol, atol)
        state_total += close.size
        bad = int(close.size - close.sum())
        if not bad:
            continue
        state_bad += bad
        d = _diff(g, w)
        state_worst = max(state_worst, d)
        # the largest update the unsharded loop made to this leaf in one step
        seq = [np.asarray(prev[k])] + [want[t][k] for t in range(steps)]
        step_size = max(_diff(seq[t + 1], seq[t]) for t in range(steps))
        if not (d <= 2 * steps * step_size) or np.asarray(w).dtype.kind not in "fc":
            noise_ok = False
            failures.append(f"fed-back {paths[k]} differs by {d:.3g}, more than the loop's own updates allow "
                            f"(2 × {steps} × {step_size:.3g})")
    if not state_bad and not failures:
        verdict = "OK"
        compared = f"every output of every step (rtol {rtol}, atol {atol})"
    elif not failures and noise_ok and loss_idx and steps >= 2 and any(
            np.asarray(want[0][k]).dtype.kind in "fc" for k in loss_idx):
        verdict = "OK (loss)"
        compared = (f"the outputs that are not fed back (e.g. the loss) at every step (rtol {rtol}, atol {atol}), "
                    "the fed-back state against the size of its updates")
    else:
        verdict = "MISMATCH"
        compared = f"every output of every step (rtol {rtol}, atol {atol})"
        if state_bad and not failures:
            failures.append(f"fed-back state differs in {state_bad} of {state_total} elements (up to "
                            f"{state_worst:.3g}) and no output that is not fed back (a loss), over ≥ 2 steps, "
                            "confirms the updates")
    return LoopComparison(steps=steps, ok=verdict != "MISMATCH", verdict=verdict, compared=compared,
                          max_diff=worst, outputs_max_diff=out_worst, state_max_diff=state_worst,
                          state_bad_elements=state_bad, state_elements=state_total, failures=tuple(failures))
