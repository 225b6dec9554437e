"""Tie the strategies of repeated layers (transformer blocks, their gradients, their
optimizer updates) so a 96-layer model costs the solver about as much as a 2-layer one.

Equations get a structural signature (primitive, params, operand and result types).
A run where a block of ``P`` signatures repeats ``R ≥ min_repeats`` times is found by
scanning with candidate periods taken from the gaps between equal signatures (the 24 most
frequent: a layer's period can rank below many short gaps between repeated elementwise ops —
the NNX decoder's backward period, 110 equations, ranks 9th or later). Block k of
a run is tied to block ``k mod 2`` (not to block 0), so alternating patterns such as
Megatron's column/row split of consecutive MLP layers stay expressible. Program inputs
(parameters) consumed by a tied equation are tied to the corresponding input.
Tying only restricts the search; costs and memory are still counted per copy
(:func:`tie`: one solver node per group of tied nodes).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from autopar.solvers import Problem

from .trace import Lit


def signature(node) -> int:
    if node.kind != "eqn":
        return hash((node.kind, tuple((v.shape, str(v.dtype)) for v in node.outputs)))
    params = tuple(sorted((k, str(v)) for k, v in node.params.items()))
    ops = tuple(("lit", o.shape, str(o.dtype)) if isinstance(o, Lit) else (o.shape, str(o.dtype))
                for o in node.operands)
    return hash((node.name, params, ops, tuple((v.shape, str(v.dtype)) for v in node.outputs), node.repeat))


def find_repeats(graph, strats, signatures=None, *, min_repeats: int = 3, num_periods: int = 24) -> list[int]:
    """``tie[v]``: the node whose strategy v must copy (``v`` itself if untied)."""
    n = len(graph.nodes)
    tie = list(range(n))
    eqns = [node.index for node in graph.nodes if node.kind == "eqn"]
    signatures = signatures or graph.signatures
    sigs = [signatures[i] for i in eqns]
    last, gaps = {}, Counter()
    for pos, s in enumerate(sigs):
        if s in last:
            gaps[pos - last[s]] += 1
        last[s] = pos
    periods = [g for g, c in gaps.most_common(num_periods) if g >= 4 and c >= 2]
    pos, m = 0, len(sigs)
    while pos < m:
        best = None
        for p in periods:
            r = 1
            while pos + (r + 1) * p <= m and sigs[pos + r * p] == sigs[pos] \
                    and sigs[pos + r * p:pos + (r + 1) * p] == sigs[pos:pos + p]:
                r += 1
            if r >= min_repeats and (best is None or r * p > best[0] * best[1]):
                best = (r, p)
        if best is None:
            pos += 1
            continue
        r, p = best
        for k in range(2, r):
            for t in range(p):
                v, v0 = eqns[pos + k * p + t], eqns[pos + (k % 2) * p + t]
                if len(strats[v]) == len(strats[v0]):
                    tie[v] = v0
        pos += r * p
    _tie_inputs(graph, tie, strats)
    return tie


def _tie_inputs(graph, tie, strats) -> None:
    for node in graph.nodes:
        if node.kind != "input":
            continue
        uses = graph.consumers.get(node.outputs[0].id, [])
        if not uses:
            continue
        c, k = uses[0]
        c0 = tie[c]
        if c0 == c:
            continue
        other = graph.nodes[c0].operands[k]
        if isinstance(other, Lit):
            continue
        u0, _ = graph.producer[other.id]
        if graph.nodes[u0].kind == "input" and u0 != node.index and len(strats[u0]) == len(strats[node.index]) \
                and tie[u0] == u0:
            tie[node.index] = u0


@dataclass(frozen=True)
class Tied:
    """The problem the solver sees: one node per group of tied graph nodes."""
    problem: Problem
    rep: list[int]         # graph node -> the node it is tied to (its group's representative)
    index: dict[int, int]  # representative -> solver node

    def expand(self, choice) -> tuple[int, ...]:
        """A choice of ``problem`` → one strategy index per graph node."""
        return tuple(int(choice[self.index[r]]) for r in self.rep)


def tie(full: Problem, rep: list[int]) -> Tied:
    """``full`` (one node per graph node) with each node ``v`` folded into ``rep[v]`` (same
    strategy list): its cost is added to the representative's, its memory stays its own (an
    ``extra_usages`` term over its own interval), its edges join the representative's (an
    edge inside one group adds its diagonal to the node cost)."""
    assert not full.fixed_usages, "tie expects a problem built from a program"
    reps = sorted(set(rep))
    index = {r: t for t, r in enumerate(reps)}
    costs = [np.zeros(len(full.node_costs[r])) for r in reps]
    extra = []
    for v, r in enumerate(rep):
        costs[index[r]] = costs[index[r]] + full.node_costs[v]
        if v != r:
            extra.append((index[r], full.node_usages[v], full.intervals[v]))
    edge_acc: dict[tuple[int, int], np.ndarray] = {}
    for (u, v), mat in zip(full.edges, full.edge_costs):
        a, b = index[rep[u]], index[rep[v]]
        if a == b:
            costs[a] = costs[a] + np.diag(mat)
            continue
        m = np.array(mat)
        if a > b:
            a, b, m = b, a, m.T
        edge_acc[(a, b)] = edge_acc[(a, b)] + m if (a, b) in edge_acc else m
    problem = Problem(costs, [full.node_usages[r] for r in reps], [full.intervals[r] for r in reps],
                      list(edge_acc), list(edge_acc.values()), usage_limit=full.usage_limit,
                      name=full.name,
                      extra_usages=extra + [(index[rep[v]], use, iv) for v, use, iv in full.extra_usages],
                      fixed_usages=list(full.fixed_usages), cost_offset=full.cost_offset)
    return Tied(problem, rep, index)
