"""Layer clustering for pipeline stages (Alpa §5.2, the seeds' "automatic stage partitioning").

The forward equations (in program order) are cut into ``L`` contiguous layers:

    minimise   Σ_b cut(b)                         bytes of activations crossing boundary b
    subject to flops(layer) ≤ cap = max((1 + δ)·total / L, largest single equation)

``cut(k)`` counts every value produced at or before equation k and read after it (program
inputs — parameters, the batch — are excluded: each stage receives its own). Solved by
``_dp``: best[l][j] = min_i best[l−1][i] + cut(i) over the window of i whose layer
(i, j] fits the cap; the window only slides right, so a monotone deque makes it O(n·L).
``autopar.stage_boundary`` markers, when present, fix the cuts instead. Without markers and
without ``num_layers``, a stack of more than 8 repeated blocks (``autopar.pipeline.blocks``)
gives one layer per block, the layers markers between blocks would give; else 8 layers.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ..graph import OpGraph, build_graph
from ..trace import Program
from .blocks import repeated_blocks

# layers of an unmarked model (``cluster_layers``), unless it repeats more blocks than this
DEFAULT_LAYERS = 8


@dataclass(frozen=True)
class Layering:
    layers: tuple[tuple[int, int], ...]   # [start, end) over the graph's equation positions
    flops: tuple[float, ...]              # per layer
    cut_bytes: tuple[float, ...]          # per boundary (len(layers) − 1)
    from_markers: bool

    def eqn_ranges(self, program: Program) -> tuple[tuple[int, int], ...]:
        """The layers as [start, end) positions in ``program.eqns`` (graph positions count the
        program's inputs and constants first)."""
        off = len(program.invars) + len(program.consts)
        return tuple((a - off, b - off) for a, b in self.layers)


def layers_of(program: Program, num_layers: int | None = None, stages=None, *, split_scan: bool = False) -> Layering:
    """The pipeline's layers: ``num_layers`` (or as many as the forced ``stages`` reach).
    ``split_scan``: the program is a scanned layer stack unrolled one layer per iteration
    (``autopar.pipeline.unscan``), its iterations separated by stage markers."""
    if stages is not None and num_layers is None:
        num_layers = max(int(tuple(s)[1]) for s in stages)
    try:
        return cluster_layers(build_graph(program), num_layers)
    except ValueError as err:
        if split_scan and "stage_boundary markers make" in str(err):
            made = str(err).split("markers make ")[1].split(" layers")[0]
            raise ValueError(f"num_layers={num_layers}, but a scanned layer stack is pipelined one layer per "
                             f"iteration ({made} layers here): drop num_layers, or pass split_scans=False to keep "
                             "the scan whole in one layer") from None
        raise


def _eqn_positions(graph: OpGraph) -> list[int]:
    return [n.index for n in graph.nodes if n.kind == "eqn"]


def cut_profile(graph: OpGraph) -> np.ndarray:
    """cut[k]: bytes live across the boundary after equation position k."""
    pos = {node: k for k, node in enumerate(_eqn_positions(graph))}
    n = len(pos)
    diff = np.zeros(n + 1)
    for node_index, k in pos.items():
        for v in graph.nodes[node_index].outputs:
            last = max((pos[c] for c, _ in graph.consumers.get(v.id, []) if c in pos), default=k)
            if v.id in graph.output_values:
                last = n - 1
            if last > k:
                diff[k] += v.nbytes
                diff[last] -= v.nbytes
    return np.cumsum(diff)[:n]


def _dp(flops: np.ndarray, cut: np.ndarray, num_layers: int, cap: float) -> list[int] | None:
    n = len(flops)
    prefix = np.concatenate([[0.0], np.cumsum(flops)])
    inf = float("inf")
    best = np.full(n, inf)
    for j in range(n):  # one layer: eqns [0, j]
        if prefix[j + 1] <= cap:
            best[j] = 0.0
    back = [np.full(n, -1, dtype=np.int64)]
    for _ in range(1, num_layers):
        new, arg = np.full(n, inf), np.full(n, -1, dtype=np.int64)
        window: deque[int] = deque()
        lo = 0
        for j in range(1, n):
            i = j - 1  # candidate last eqn of the previous layer
            if best[i] < inf:
                val = best[i] + cut[i]
                while window and best[window[-1]] + cut[window[-1]] >= val:
                    window.pop()
                window.append(i)
            while prefix[j + 1] - prefix[lo + 1] > cap:
                lo += 1
            while window and window[0] < lo:
                window.popleft()
            if window:
                new[j], arg[j] = best[window[0]] + cut[window[0]], window[0]
        best = new
        back.append(arg)
    if best[n - 1] == inf:
        return None
    ends, j = [], n - 1
    for layer in range(num_layers - 1, 0, -1):
        j = int(back[layer][j])
        ends.append(j)
    return sorted(ends)


def cluster_layers(graph: OpGraph, num_layers: int | None = None, *, imbalance: float = 0.25) -> Layering:
    """Cut the equations into layers (at ``stage_boundary`` markers if there are any)."""
    positions = _eqn_positions(graph)
    n = len(positions)
    if n == 0:
        raise ValueError("the function has no equations to cluster into layers")
    flops = np.array([max(graph.nodes[i].flops, 1.0) for i in positions])
    cut = cut_profile(graph)
    # a scan's expanded body (trace.Region) stays whole: no cut between its first and last equation
    scopes = [graph.nodes[i].eqn.scope for i in positions]
    inside = np.array([k + 1 < n and bool(set(scopes[k]) & set(scopes[k + 1])) for k in range(n)])
    # nor an inlined custom_jvp / custom_vjp call: a stage binds it whole (trace.CustomCall);
    # nor a jax.checkpoint, so its recomputation holds, unless that leaves nothing to cut
    customs = [graph.nodes[i].eqn.custom for i in positions]
    calls = graph.program.customs
    same = [k + 1 < n and customs[k] is not None and customs[k] == customs[k + 1] for k in range(n)]
    in_call = np.array([sm and calls[customs[k]].rule for k, sm in enumerate(same)], dtype=bool)
    in_ckpt = np.array([sm and not calls[customs[k]].rule for k, sm in enumerate(same)], dtype=bool)
    inside |= in_call
    if n > 1 and (~(inside | in_ckpt))[:-1].any():
        inside |= in_ckpt
    cut = np.where(inside, np.inf, cut)
    cuttable = int((~inside[:-1]).sum()) if n > 1 else 0
    markers = [k for k, i in enumerate(positions) if graph.nodes[i].name == "stage_boundary"]
    if markers:
        ends = sorted({k for k in markers if k + 1 < n and graph.nodes[positions[k + 1]].name != "stage_boundary"})
        cut_call = [k for k in ends if in_call[k]]
        if cut_call:
            raise ValueError("an autopar.stage_boundary marker inside a jax.custom_jvp / custom_vjp function "
                             f"({graph.nodes[positions[cut_call[0]]].eqn.source or 'in the loss'}): a stage must hold "
                             "the whole call to keep its derivative rule; mark the boundary outside the function")
        if num_layers is not None and num_layers != len(ends) + 1:
            raise ValueError(f"num_layers={num_layers} but the function's stage_boundary markers make "
                             f"{len(ends) + 1} layers; drop num_layers or the markers")
    else:
        if num_layers is not None and num_layers > cuttable + 1 and inside.any():
            raise ValueError(f"num_layers={num_layers} but the function can be cut into at most {cuttable + 1} "
                             "layers: a scan over layers is kept whole in one pipeline layer (cutting a scanned "
                             "layer stack into stages is not supported yet); use fewer layers or unroll the scan")
        ends = None
        if num_layers is None:  # a stack of more repeated blocks than the default: one layer each
            found = repeated_blocks([graph.signatures[i] for i in positions], cut)
            if found is not None and len(found) + 1 > min(DEFAULT_LAYERS, n, cuttable + 1):
                ends = found
        num_layers = num_layers or min(DEFAULT_LAYERS, n, cuttable + 1)
        if not 1 <= num_layers <= n:
            raise ValueError(f"num_layers={num_layers} must be between 1 and the {n} equations")
        cap = max((1 + imbalance) * flops.sum() / num_layers, float(flops.max()))
        while ends is None:  # relax the balance until a partition exists
            ends = _dp(flops, cut, num_layers, cap)
            cap *= 1.25
    bounds = [0] + [e + 1 for e in ends] + [n]
    layers = tuple((positions[a], positions[b - 1] + 1) for a, b in zip(bounds, bounds[1:]))
    return Layering(layers=layers, flops=tuple(float(flops[a:b].sum()) for a, b in zip(bounds, bounds[1:])),
                    cut_bytes=tuple(float(cut[e]) for e in ends), from_markers=bool(markers))
