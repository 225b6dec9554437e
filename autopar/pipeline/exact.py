"""Exact stage costing for ``autopar.plan_training``: every (layer range, sub-mesh) planned
whole, one cost variant per stage option the search may choose (``TrainingInputs.options``:
activation rematerialisation, ``autopar.pipeline.remat``, × optimizer-state sharding,
``autopar.pipeline.zero``), from which the stage DP picks, per stage, the fastest that fits
with the micro-batches it holds in flight (``solvers.stage_dp``).

The first option (no remat, no ZeRO-1 under ``"auto"``) is planned for every pair. The other
options are planned lazily: a pair first enters with an optimistic placeholder — the first
option's latency (recomputation adds FLOPs, ZeRO-1 an all-gather), the parameters with their accumulators and
optimizer state sharded over every device of the sub-mesh as its static memory, and the
option's activations — and ``resolve`` plans it for real once a stage DP solution relies on
it (``placeholders``). Its activations are exact: the residuals of the rematerialised stage
are traced without planning it (``StageCoster.activation``). Where the first option does not
fit at all, the others are planned at once (there is no latency to borrow), unless even the
placeholder's memory overflows the budget. The placeholder's latency is a lower bound only
as long as the recomputation does not let the ILP find a faster layout (measured: 4
LayerNorm/GELU blocks, layers 0–1 on 4 devices of the test cluster, "full" 2.227 µs vs 2.241
µs without remat: compute 1.53 vs 1.29 µs, the rest 0.70 vs 0.95 µs, both ILPs optimal on
different layouts); there the search may miss a slightly faster remat plan, never return an
infeasible one.
"""
from __future__ import annotations

import numpy as np

from .costs import CostArrays, StageCost, entry
from .inputs import resident_bytes
from .pool import prefetch


class ExactCosts:
    """Cost arrays (L, L+1, #sub-meshes), or (R, L, L+1, #) with R > 1 stage options."""

    def __init__(self, coster, inputs, num_layers: int, shapes, progress):
        self.coster, self.L, self.shapes, self.options = coster, num_layers, list(shapes), tuple(inputs.options)
        self.budget, self.opt_ratio, self.grad_accum = inputs.budget, inputs.opt_ratio, inputs.grad_accum
        self.p_leaves = inputs.p_leaves
        R, nS = len(self.options), len(self.shapes)
        self.latency = np.full((R, num_layers, num_layers + 1, nS), np.inf)
        self.memory, self.activation = np.zeros_like(self.latency), np.zeros_like(self.latency)
        self.pending: set[tuple[int, int, int, int]] = set()  # (option, start, end, sub-mesh) placeholders
        progress.phase("plan stage candidates (layer range × sub-mesh)",
                       total=num_layers * (num_layers + 1) // 2 * nS)
        eager = []
        prefetch(coster, [((i, j, sub), self.options[0]._asdict()) for i in range(num_layers)
                          for j in range(i + 1, num_layers + 1) for sub in self.shapes])
        for i in range(num_layers):
            for j in range(i + 1, num_layers + 1):
                for s, sub in enumerate(self.shapes):
                    c = coster.cost(i, j, sub, **self.options[0]._asdict())
                    self._set(0, i, j, s, c)
                    floor, n = self._param_floor(i, j, sub), sub[0] * sub[1]
                    for r in range(1, R):
                        if c.fits:
                            self.latency[r, i, j, s], self.memory[r, i, j, s] = c.latency, floor
                            self.activation[r, i, j, s] = coster.activation(i, j, self.options[r].remat) / n
                            self.pending.add((r, i, j, s))
                        elif floor <= self.budget:
                            eager.append((r, i, j, s))
        self.resolve(eager)

    def _param_floor(self, i: int, j: int, sub) -> float:
        """Least static memory of layers i..j−1 on ``sub``: their parameters with accumulators
        and optimizer state, sharded over every device."""
        st = self.coster.stage(i, j)[0]
        return resident_bytes([self.p_leaves[q] for q in st.params], self.opt_ratio, self.grad_accum) / (sub[0] * sub[1])

    def _set(self, r: int, i: int, j: int, s: int, c: StageCost) -> None:
        self.latency[r, i, j, s], self.memory[r, i, j, s], self.activation[r, i, j, s] = entry(c)

    def placeholders(self, sol) -> set[tuple[int, int, int, int]]:
        """The placeholders the stage DP solution ``sol`` uses."""
        used = {(v, k, j, m) for (k, j, m, *_), v in zip(sol.stages, sol.variants or (0,) * len(sol.stages))}
        return used & self.pending

    def resolve(self, keys) -> None:
        """Plan these (option, start, end, sub-mesh) candidates for real."""
        prefetch(self.coster, [((i, j, self.shapes[s]), self.options[r]._asdict()) for r, i, j, s in sorted(keys)])
        for r, i, j, s in sorted(keys):
            self._set(r, i, j, s, self.coster.cost(i, j, self.shapes[s], **self.options[r]._asdict()))
            self.pending.discard((r, i, j, s))

    def option(self, variant: int) -> str:
        return self.options[variant]

    @property
    def arrays(self) -> CostArrays:
        if len(self.options) == 1:
            return CostArrays(self.latency[0], self.memory[0], self.activation[0])
        return CostArrays(self.latency, self.memory, self.activation)

    @property
    def candidates(self) -> int:
        """(range, sub-mesh) pairs with a finite cost in some option."""
        return int(np.isfinite(self.latency).any(axis=0).sum())


__all__ = ["ExactCosts"]
