"""Additive stage costing for ``autopar.plan_training`` (many layers): a stage's cost is
estimated from single-layer plans summed over its range (``stage_cost.Sums``), so only L
layers × sub-meshes are planned instead of every range.

Two cost variants per (range, sub-mesh), from which the stage DP picks, per stage, the
fastest that fits with the micro-batches that stage holds in flight (``solvers.stage_dp``):

* variant 0: each layer planned with the whole memory budget;
* variant 1 ("lean"): each layer planned within half its share of the budget,
  budget / (2·L·|m|/N) (a balanced stage on the sub-mesh holds L·|m|/N layers), on the
  logical mesh variant 0 chose for it: parameters sharded harder, so a long stage, or an
  early one holding many micro-batches, fits. Only on sub-meshes with a share above one layer.

Variant 1 is planned lazily (memory-bound ILPs are the slow ones): a sub-mesh first enters
with an optimistic placeholder (variant 0's latency and activations, parameters sharded
over every device: a lower bound), and ``resolve`` plans its layers for real once a split
that is going to be used relies on one (``placeholders``).
"""
from __future__ import annotations

import numpy as np

from .costs import CostArrays, Sums


class AdditiveCosts:
    """Cost arrays (2, L, L+1, #sub-meshes) for ``solvers.stage_dp.StageProblem``."""

    def __init__(self, coster, num_layers: int, shapes, total_devices: int, param_bytes):
        """``param_bytes[i]``: layer i's parameters with accumulators and optimizer state."""
        self.coster, self.L, self.shapes, self.total = coster, num_layers, list(shapes), total_devices
        self.pbytes = list(param_bytes)
        L, nS = num_layers, len(self.shapes)
        self.full = [[coster.cost(i, i + 1, sub) for sub in self.shapes] for i in range(L)]
        self.lean = [[None] * nS for _ in range(L)]
        self.latency = np.full((2, L, L + 1, nS), np.inf)
        self.memory, self.activation = np.zeros_like(self.latency), np.zeros_like(self.latency)
        self._fill(range(nS))

    def share(self, s: int) -> float:
        """Layers a balanced stage on sub-mesh s holds."""
        return self.L * self.shapes[s][0] * self.shapes[s][1] / self.total

    def _fill(self, subs) -> None:
        lat, mem, act = self.latency, self.memory, self.activation
        for s in subs:
            n = self.shapes[s][0] * self.shapes[s][1]
            lean_too = self.share(s) > 1
            for i in range(self.L):
                run0, run1 = Sums(), Sums()
                for j in range(i + 1, self.L + 1):
                    t, w, a = lat[0, i, j, s], mem[0, i, j, s], act[0, i, j, s] = run0.add(self.full[j - 1][s])
                    if not lean_too:
                        continue
                    if self.lean[0][s] is None:  # optimistic placeholder
                        lat[1, i, j, s], mem[1, i, j, s], act[1, i, j, s] = t, sum(self.pbytes[i:j]) / n, a
                    else:
                        lat[1, i, j, s], mem[1, i, j, s], act[1, i, j, s] = run1.add(self.lean[j - 1][s])

    def placeholders(self, sol) -> set[int]:
        """Sub-meshes where the stage DP solution ``sol`` uses a placeholder."""
        return {st[2] for st, v in zip(sol.stages, sol.variants) if v == 1 and self.lean[0][st[2]] is None}

    def resolve(self, subs) -> None:
        """Plan the lean variant of every layer on these sub-meshes; refresh their sums."""
        for s in subs:
            for i in range(self.L):
                c = self.full[i][s]
                mesh = tuple(c.plan.mesh_shape) if c.fits else None
                self.lean[i][s] = self.coster.cost(i, i + 1, self.shapes[s], mesh, share=2 * self.share(s))
        self._fill(subs)

    def layer_meshes(self, variant: int, a: int, b: int, sub) -> list | None:
        """The logical meshes the single-layer plans (cost ``variant``) of layers a..b−1 on
        ``sub`` chose (each once, the most expensive layer's first); None (every mesh) when a
        layer has no plan."""
        s = self.shapes.index(tuple(sub))
        var = self.lean if variant == 1 and self.lean[a][s] is not None else self.full
        plans = [var[j][s] for j in range(a, b)]
        if any(not c.fits for c in plans):
            return None
        plans.sort(key=lambda c: -c.latency)
        return list(dict.fromkeys(tuple(c.plan.mesh_shape) for c in plans))

    @property
    def arrays(self) -> CostArrays:
        return CostArrays(self.latency, self.memory, self.activation)

    @property
    def candidates(self) -> int:
        """(range, sub-mesh) pairs with a finite estimate in some variant."""
        return int(np.isfinite(self.latency).any(axis=0).sum())


__all__ = ["AdditiveCosts"]
