"""The stage programs a :class:`~.stage_cost.StageCoster` plans: a layer range (i, j) of the
traced training program cut out as a stage (``stages.stage_for_range``; every single layer,
or a split's ranges, in one pass: ``single_layer_stages``), the key of its traced forward +
backward (``program_key``: its structure, and with remat where its layers are cut), that
program traced once and shared by every sub-mesh (``_traced``), and what the trace alone says:
the residual bytes it keeps per micro-batch (``activation``), the bytes a layer receives
(``input_bytes``)."""
from __future__ import annotations

from ..graph import build_graph
from ..trace import trace
from .halves import cut_train
from .stages import (Stage, residual_bytes, single_layer_stages, stage_abstract_args, stage_for_range,
                     stage_forward, stage_train, structural_key)


class StagePrograms:
    """Stage programs of one traced training program (``program``, ``P`` parameters, the
    equation range of each layer ``layer_eqns``), cut and traced once each."""

    def __init__(self, program, num_params: int, layer_eqns):
        self.program, self.P, self.layer_eqns = program, num_params, list(layer_eqns)
        self.stages: dict = {}  # (i, j) -> (Stage, structural key)
        self.traced: dict = {}  # program key -> ``_traced``'s tuple
        self.residuals: dict = {}  # program key -> residual bytes (``activation``)

    def stage(self, i: int, j: int) -> tuple[Stage, str]:
        """Layers i..j−1 as a stage and its structural key (computed once per range; every
        single layer at the first one's request, in one pass: ``single_layer_stages``)."""
        if (i, j) not in self.stages:
            if j == i + 1 and (0, 1) not in self.stages:
                self._keep([(k, k + 1) for k in range(len(self.layer_eqns))],
                           single_layer_stages(self.program, self.P, self.layer_eqns))
            else:
                self._keep([(i, j)], [stage_for_range(self.program, self.P, self.layer_eqns[i][0],
                                                      self.layer_eqns[j - 1][1])])
        return self.stages[(i, j)]

    def stages_ahead(self, ranges) -> None:
        """Cut the layer ranges (i, j) of ``ranges`` (a split's stages: in order, not
        overlapping) that ``stage`` has not cut yet out of the program in one pass
        (``single_layer_stages`` on their equation ranges) instead of one pass each (measured:
        the refinement's two splits of GPT-175B on 1,024 H100s, 59 ranges, 1.2 s of the pool's
        parent before its round, ~20 ms a cut)."""
        todo = [(i, j) for i, j in dict.fromkeys(map(tuple, ranges)) if (i, j) not in self.stages]
        ordered = all(i < j for i, j in todo) and all(j <= c for (_, j), (c, _) in zip(todo, todo[1:]))
        if len(todo) < 2 or not ordered:
            return  # (one range, or not a split: ``stage`` cuts them one by one)
        self._keep(todo, single_layer_stages(self.program, self.P,
                                             [(self.layer_eqns[i][0], self.layer_eqns[j - 1][1]) for i, j in todo]))

    def _keep(self, ranges, cut) -> None:
        for (i, j), st in zip(ranges, cut):
            self.stages[(i, j)] = (st, structural_key(self.program, st, self.P))

    def program_key(self, i: int, j: int, remat: str = "none"):
        """What the stage's traced forward + backward depends on: its structure, and with
        remat where its layers are cut (relative equation positions)."""
        skey = self.stage(i, j)[1]
        if remat == "none":
            return skey
        a = self.layer_eqns[i][0]
        return skey, remat, tuple(self.layer_eqns[k][0] - a for k in range(i + 1, j))

    def trace_ahead(self, ranges, remats) -> None:
        """Trace here each distinct stage program of these (i, j) ranges and
        rematerialisations, once: with a worker pool, every round's forked workers inherit it
        (each round forks fresh workers from this process: what one round's worker traced, the
        next round's traced again — measured at GPT-175B@1,024: 57 traces of 14 programs, 5.9
        of their 8.8 s CPU repeats, nearly all of single layers)."""
        for r in remats:
            for i, j in ranges:
                self._traced(i, j, r)

    def _traced(self, i: int, j: int, remat: str = "none") -> tuple:
        """(fwd, stage args, traced stage_train program, its graph, residual bytes, halves cut)
        of layers i..j−1 with ``remat``: traced once per stage program, shared by all sub-meshes."""
        skey = self.program_key(i, j, remat)
        if skey not in self.traced:
            st = self.stage(i, j)[0]
            fwd = stage_forward(self.program, st, self.P, remat, self.layer_eqns[i:j])
            args = stage_abstract_args(self.program, st, self.P)
            prog = trace(stage_train(fwd), *args)
            self.traced[skey] = (fwd, args, prog, build_graph(prog), residual_bytes(fwd, *args[:3]),
                                 cut_train(fwd, args, prog, len(st.outs) + len(st.nd_outs)))
        return self.traced[skey]

    def activation(self, i: int, j: int, remat: str = "none") -> float:
        """Bytes layers i..j−1 keep for the backward per micro-batch with ``remat`` (all
        devices together; ``stages.residual_bytes``): traced only, no plan (cached)."""
        key = self.program_key(i, j, remat)
        if key not in self.residuals:
            if key in self.traced:
                self.residuals[key] = self.traced[key][4]
            else:
                st = self.stage(i, j)[0]
                args = stage_abstract_args(self.program, st, self.P)
                fwd = stage_forward(self.program, st, self.P, remat, self.layer_eqns[i:j])
                self.residuals[key] = residual_bytes(fwd, *args[:3])
        return self.residuals[key]

    def input_bytes(self, i: int) -> float:
        """Bytes of the floating activations layer i receives from earlier layers."""
        st = self.stage(i, i + 1)[0]
        return float(sum(self.program.values[v].nbytes for v in st.acts_in))
