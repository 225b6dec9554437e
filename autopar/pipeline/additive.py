"""Additive stage costing for ``autopar.plan_training`` (many layers): a stage's cost is
estimated from single-layer plans summed over its range (``costs.Sums``), so only L
layers × sub-meshes are planned instead of every range.

Cost variants per (range, sub-mesh), from which the stage DP picks, per stage, the fastest
that fits with the micro-batches that stage holds in flight (``solvers.stage_dp``): for each
stage option r the search may choose (``TrainingInputs.options``: activation
rematerialisation, ``autopar.pipeline.remat``, × ZeRO-1, ``autopar.pipeline.zero``; the first
r₀ preferred)

* ("full", r): each layer planned with the whole memory budget;
* ("lean", r): each layer planned within half its share of the budget,
  budget / (2·L·|m|/N) (a balanced stage on the sub-mesh holds L·|m|/N layers), on the
  logical mesh ("full", r) chose for it: parameters sharded harder, so a long stage, or an
  early one holding many micro-batches, fits. Only on sub-meshes with a share above one layer.

in the order ("full", r₀), ("lean", r₀), then ("full", r) and ("lean", r) for the other
options (ties go to the lower index: no remat, whole budget). Only ("full", r₀) is planned
up front; every other variant is planned lazily (memory-bound ILPs are the slow ones, and
recomputation is never free): a (variant, sub-mesh) first enters with an optimistic
placeholder — ("full", r₀)'s latency, parameters sharded over every device, and
("full", r₀)'s activations for ("lean", r₀), the option's traced residuals for another
(``StageCoster.activation``): a lower bound — and
``resolve`` plans its layers for real once a split that is going to be used relies on one
(``placeholders``). Where a layer does not fit a sub-mesh even alone under r₀, the other
options' whole-budget variants are planned at once there. With remat, a stage also keeps the
input of each of its layers after the first (a single-layer plan never counts its own
input): those bytes are added to the sums.

On a cluster of several nodes, every sub-mesh but one whole node (1, M) — the (k, M) with
k ≥ 2 and the parts (1, m) of a node — is not planned up front (``LAZY_SUBMESHES``):
each layer enters with a lower bound — latency ``StageCoster.bound`` (each logical mesh's
LP relaxation without memory rows, less the most the ILP's memory tie-break adds, + the
stage's sends: no choice the ILP can return, time-limited or not, is faster), static memory
its parameters, accumulators and optimizer state spread over every device, activations its
traced residuals spread over every device (as every placeholder above) — and ("full", r₀) is
planned there like any placeholder, once a solution uses it. Exact: the DP on arrays no
larger than the planned ones, whose solution uses only planned entries, has the objective
of that solution on the planned arrays, which no plan beats (the DP on the fully planned
arrays cannot do better than on lower ones); ties, which go to the lexicographically first
split, may differ only between splits of equal objective. Sub-meshes whose bound already
makes them useless — (16, 8) … (128, 8) for GPT-175B on 128 nodes — are never planned.
"""
from __future__ import annotations

import numpy as np

from .costs import CostArrays, StageCost, StageOption, cumulative, range_sums
from .pool import prefetch, run_tasks

# on several nodes, sub-meshes other than (1, M) enter the stage DP as lower bounds, planned once a
# solution uses them (module docstring); False: every sub-mesh is planned up front (the unpruned search)
LAZY_SUBMESHES = True
# ``layer_meshes`` also names a logical mesh on which a layer's plan came within this fraction of
# the one it chose: single layers do not separate them, a whole stage may (GPT-39B's dots-remat
# layers on a p3.16xlarge node: 4 × 2 ahead of 2 × 4 by 0.02 % alone, its 6-layer stage 1.3 %
# behind on 4 × 2, 3 % in the plan — the grid baseline's 2 × 4 stages then beat it, 0.97×; with
# the ties planned: 300.63 s against the grid's 302.71 s, five stages on (8,))
MESH_TIE = 0.01


class AdditiveCosts:
    """Cost arrays (V, L, L+1, #sub-meshes) for ``solvers.stage_dp.StageProblem``; V = 2 per
    stage option."""

    def __init__(self, coster, num_layers: int, shapes, total_devices: int, param_bytes, options=(StageOption(),)):
        """``param_bytes[i]``: layer i's parameters with accumulators and optimizer state."""
        self.coster, self.L, self.shapes, self.total = coster, num_layers, list(shapes), total_devices
        self.pbytes, self.options = list(param_bytes), tuple(options)
        r0, rest = self.options[0], self.options[1:]
        self.variants = [("full", r0), ("lean", r0)] + [("full", r) for r in rest] + [("lean", r) for r in rest]
        L, nS, nV = num_layers, len(self.shapes), len(self.variants)
        # on several nodes, every sub-mesh but a whole node enters as bounds (module docstring)
        whole = (1, max(m for _, m in self.shapes))
        lazy = {s for s, sub in enumerate(self.shapes) if LAZY_SUBMESHES and sub != whole and total_devices > whole[1]}
        eager = [sub for s, sub in enumerate(self.shapes) if s not in lazy]
        if getattr(coster, "workers", 1) > 1:  # (one process traces each when it first plans it)
            coster.trace_ahead([(i, i + 1) for i in range(L)], sorted({r.remat for r in self.options}))
        # (the lazy sub-meshes' bounds below computed in the same pool round)
        prefetch(coster, [((i, i + 1, sub), r0._asdict()) for i in range(L) for sub in eager],
                 bounds=[(i, i + 1, self.shapes[s]) for s in sorted(lazy) for i in range(L)])
        # layers[v][s]: the single-layer costs of variant v on sub-mesh s (None: a placeholder)
        self.layers: list[list[list | None]] = [[None] * nS for _ in range(nV)]
        self.layers[0] = [None if s in lazy else [coster.cost(i, i + 1, sub, **r0._asdict()) for i in range(L)]
                          for s, sub in enumerate(self.shapes)]
        # bounds[s]: per layer, a StageCost that is not above its plain plan in latency, static
        # memory or activations (``StageCoster.bound``, parameters and residuals spread over
        # every device): what a placeholder of sub-mesh s sums while layers[0][s] is None
        self.bounds = {s: [self._bound(i, self.shapes[s]) for i in range(L)] for s in sorted(lazy)}
        # remat: each layer's own saved bytes (traced, no plan) and the inputs of the layers
        # after a stage's first, which its checkpoints keep (a single-layer plan never counts
        # its input)
        remat = any(r.remat != "none" for r in self.options)
        self.inputs = [coster.input_bytes(i) for i in range(L)] if remat else [0.0] * L
        self.saved = {r: [coster.activation(i, i + 1, r.remat) for i in range(L)] for r in rest}
        self.latency = np.full((nV, L, L + 1, nS), np.inf)
        self.memory, self.activation = np.zeros_like(self.latency), np.zeros_like(self.latency)
        for s in range(nS):
            self._others_where_unfit(s)
        self._fill(range(nS))

    def _bound(self, i: int, sub) -> StageCost:
        n, c = sub[0] * sub[1], self.coster
        lb = c.bound(i, i + 1, sub)
        return StageCost(latency=lb, send=min(lb, c.send_time(i, i + 1, n)), static=self.pbytes[i] / n,
                         persist=self.pbytes[i] / n, act=c.activation(i, i + 1) / n)

    def _others_where_unfit(self, s: int) -> None:
        """A layer that does not fit sub-mesh s alone with the first option: the other options'
        whole-budget variants there at once (their placeholders sum the first option's ∞)."""
        if self.layers[0][s] is not None and any(not c.fits for c in self.layers[0][s]):
            for r in self.options[1:]:
                self._plan(self.variants.index(("full", r)), s)

    def share(self, s: int) -> float:
        """Layers a balanced stage on sub-mesh s holds."""
        return self.L * self.shapes[s][0] * self.shapes[s][1] / self.total

    def _fill(self, subs) -> None:
        """The arrays' entries of sub-meshes ``subs`` from their layers' sums (``Sums``, all
        ranges at once: ``range_sums``) — or, for a placeholder, the bounds' latency, the
        parameters spread over every device and the activations the module docstring gives."""
        lat, mem, act = self.latency, self.memory, self.activation
        L = self.L
        upper = np.triu(np.ones((L, L), dtype=bool))  # [i, j − 1] for j > i
        rows, cols = np.nonzero(upper)
        kept_all = cumulative(self.inputs, skip=1)  # the inputs of layers i+1..j−1
        pbytes = cumulative(self.pbytes)
        saved = {r: cumulative(x) for r, x in self.saved.items()}
        for s in subs:
            n = self.shapes[s][0] * self.shapes[s][1]
            base = self.layers[0][s] if self.layers[0][s] is not None else self.bounds[s]
            t0 = a0 = None  # the base's sums (placeholders), computed once per sub-mesh
            for v, (kind, r) in enumerate(self.variants):
                if kind == "lean" and self.share(s) <= 1:
                    continue
                costs = self.layers[v][s]
                kept = 0.0 if r.remat == "none" else kept_all / n
                if costs is not None:
                    t, m, a = range_sums(costs)
                    a = a + kept
                else:  # optimistic placeholder
                    if t0 is None:
                        t0, _, a0 = range_sums(base)
                    t, m = t0, pbytes / n
                    a = (a0 if r == self.options[0] else saved[r] / n) + kept
                lat[v, rows, cols + 1, s] = t[upper]
                mem[v, rows, cols + 1, s] = m[upper]
                act[v, rows, cols + 1, s] = a[upper]

    def placeholders(self, sol) -> set[tuple[int, int]]:
        """(variant, sub-mesh) placeholders the stage DP solution ``sol`` uses."""
        return {(v, st[2]) for st, v in zip(sol.stages, sol.variants) if self.layers[v][st[2]] is None}

    def resolve(self, keys) -> None:
        """Plan every layer of these (variant, sub-mesh) placeholders and, for one of a variant
        other than the first, of every variant on that sub-mesh (each option, whole budget and
        lean: a stage that relies on one of them there relies on the others next — their
        placeholders are equally optimistic, the DP moves from one to the next as each is
        planned —: one DP round instead of several; measured on GPT-175B on 1,024 H100s: the
        ZeRO-1 variants of (4, 8) and of (8, 8) each came a round after the others, 6 DP rounds
        instead of 4. The plan is the same, ``solve_lazily`` stops only on a solution of planned
        entries); refresh their sums.
        Whole-budget variants first (a lean variant plans on the meshes its full one chose);
        with a worker pool, planned in it first (``_in_workers``)."""
        keys = set(keys)
        for v, s in list(keys):  # (v = 0 on a sub-mesh entered as a bound: its layers planned, nothing more)
            if v != 0:
                keys.update((u, s) for u, (kind, _) in enumerate(self.variants)
                            if u != 0 and self.layers[u][s] is None and (kind == "full" or self.share(s) > 1))
        full = sorted((v, s) for v, s in keys if self.variants[v][0] == "full")
        lean = sorted((v, s) for v, s in keys if self.variants[v][0] == "lean")
        self._in_workers(full, lean)
        for v, s in full:
            self._plan(v, s)
            if v == 0:
                self._others_where_unfit(s)
        for v, s in lean:
            self._plan(v, s)
        self._fill({s for _, s in keys})

    def _in_workers(self, full, lean) -> None:
        """With a worker pool: the layers of these (variant, sub-mesh) pairs planned, one task
        per layer program and sub-mesh (``pool.run_tasks``): its whole-budget plans, then its
        lean ones on the meshes those chose, in the order ``resolve`` asks for them, in one
        worker that does not wait for the other programs' whole-budget plans."""
        if getattr(self.coster, "workers", 1) <= 1:
            return
        groups: dict = {}
        for v, s in full + lean:
            if self.layers[v][s] is None:
                for i in range(self.L):
                    key = self.coster.plan_key(i, i + 1, self.shapes[s], **self.variants[v][1]._asdict())
                    groups.setdefault(key[:2], []).append((i, v, s))
        run_tasks(self.coster, self._plan_layers, list(groups.values()))

    def _plan_layers(self, coster, ops) -> None:
        """(In a worker) layer i of variant v on sub-mesh s for each (i, v, s) of ``ops``."""
        for i, v, s in ops:
            kind, r = self.variants[v]
            c = coster.cost(i, i + 1, self.shapes[s], **r._asdict())
            if kind == "lean":
                mesh = tuple(c.plan.mesh_shape) if c.fits else None
                coster.cost(i, i + 1, self.shapes[s], mesh, share=2 * self.share(s), **r._asdict())

    def _lean_requests(self, v: int, s: int) -> list:
        """``cost`` arguments of the lean variant v's layers on sub-mesh s (its full one planned)."""
        r = self.variants[v][1]
        base = self.layers[self.variants.index(("full", r))][s]
        return [((i, i + 1, self.shapes[s], tuple(c.plan.mesh_shape) if c.fits else None),
                 dict(share=2 * self.share(s), **r._asdict())) for i, c in enumerate(base)]

    def _plan(self, v: int, s: int) -> None:
        if self.layers[v][s] is not None:
            return
        kind, r = self.variants[v]
        sub = self.shapes[s]
        if kind == "full":
            prefetch(self.coster, [((i, i + 1, sub), r._asdict()) for i in range(self.L)])
            self.layers[v][s] = [self.coster.cost(i, i + 1, sub, **r._asdict()) for i in range(self.L)]
            return
        base = self.variants.index(("full", r))
        self._plan(base, s)
        meshes = [tuple(c.plan.mesh_shape) if c.fits else None for c in self.layers[base][s]]
        prefetch(self.coster, self._lean_requests(v, s))
        self.layers[v][s] = [self.coster.cost(i, i + 1, sub, mesh, share=2 * self.share(s), **r._asdict())
                             for i, mesh in enumerate(meshes)]

    def option(self, variant: int):
        """The stage option (``StageOption``) of a cost variant."""
        return self.variants[variant][1]

    def layer_meshes(self, variant: int, a: int, b: int, sub) -> list | None:
        """The logical meshes the single-layer plans (cost ``variant``, else its option's
        whole-budget variant, else the first) of layers a..b−1 on ``sub`` chose (each once,
        the most expensive layer's first), then those on which a layer's whole-budget plan
        (the option's, which tried every mesh; a lean plan is made on one) came within
        ``MESH_TIE`` of its chosen one; None (every mesh) when a layer has no plan."""
        s = self.shapes.index(tuple(sub))
        base = self.variants.index(("full", self.option(variant)))
        var = next((x for x in (self.layers[variant][s], self.layers[base][s], self.layers[0][s]) if x is not None),
                   None)
        if var is None:
            return None
        plans = [var[j] for j in range(a, b)]
        if any(not c.fits for c in plans):
            return None
        plans.sort(key=lambda c: -c.latency)
        whole = next((x for x in (self.layers[base][s], self.layers[0][s]) if x is not None), var)
        near = [tuple(m.mesh_shape) for j in range(a, b) if whole[j].fits for m in _ties(whole[j].plan)]
        return list(dict.fromkeys([tuple(c.plan.mesh_shape) for c in plans] + near))

    @property
    def arrays(self) -> CostArrays:
        return CostArrays(self.latency, self.memory, self.activation)

    @property
    def candidates(self) -> int:
        """(range, sub-mesh) pairs with a finite estimate in some variant."""
        return int(np.isfinite(self.latency).any(axis=0).sum())


def _ties(plan) -> list:
    """The mesh candidates of a plan whose objective came within ``MESH_TIE`` of its chosen mesh's."""
    chosen = next((m.objective_s for m in plan.mesh_candidates if list(m.mesh_shape) == list(plan.mesh_shape)), None)
    if chosen is None:
        return []
    return [m for m in plan.mesh_candidates
            if m.objective_s is not None and m.objective_s <= chosen * (1 + MESH_TIE)]


__all__ = ["AdditiveCosts"]
