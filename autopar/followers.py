"""Follower merging (Alpa's trick, generalised): a node whose only array operand comes from
one producer, and whose strategy is a function of that operand's spec (elementwise,
transpose, reductions, …), is folded into the producer's decision.

The merged node keeps its cost (added per producer strategy), its own memory lifetime
(an ``extra_usages`` term) and its edges (re-indexed). This shrinks a transformer step
several-fold; it can only lose a plan that would reshard *into* an elementwise op rather
than out of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autopar.solvers import Problem

from .trace import Lit


@dataclass
class Merged:
    problem: Problem            # the reduced problem handed to the solver
    rep: list[int]              # original node -> representative original node
    maps: list[np.ndarray]      # original node -> (rep strategy -> own strategy)
    index: dict[int, int]       # representative original node -> reduced node

    def expand(self, choice) -> tuple[int, ...]:
        return tuple(int(self.maps[v][choice[self.index[r]]]) for v, r in enumerate(self.rep))


def find_followers(graph, strats) -> tuple[list[int], list[np.ndarray]]:
    rep = list(range(len(graph.nodes)))
    maps = [np.arange(len(s)) for s in strats]
    for node in graph.nodes:
        if node.kind != "eqn" or len(strats[node.index]) < 2:
            continue
        ops = [k for k, o in enumerate(node.operands) if not isinstance(o, Lit)]
        if not ops or len({node.operands[k].id for k in ops}) != 1:
            continue
        u, j = graph.producer[node.operands[ops[0]].id]
        table: dict = {}
        for jj, s in enumerate(strats[node.index]):
            table.setdefault(tuple(s.in_specs[k] for k in ops), []).append(jj)
        r, mu, m = rep[u], maps[u], []
        for i in range(len(strats[r])):
            spec = strats[u][mu[i]].out_specs[j]
            cands = table.get((spec,) * len(ops), [])
            if len(cands) != 1:
                break
            m.append(cands[0])
        else:
            rep[node.index] = r
            maps[node.index] = np.array(m, dtype=np.int64)
    return rep, maps


def merge(full: Problem, rep: list[int], maps: list[np.ndarray]) -> Merged:
    assert not full.fixed_usages, "merge expects a problem built from a program"
    reps = sorted(set(rep))
    index = {r: t for t, r in enumerate(reps)}
    costs = [np.zeros(len(full.node_costs[r])) for r in reps]
    extra = []
    for v, r in enumerate(rep):
        costs[index[r]] = costs[index[r]] + full.node_costs[v][maps[v]]
        if v != r:
            extra.append((index[r], full.node_usages[v][maps[v]], full.intervals[v]))
    edge_acc: dict[tuple[int, int], np.ndarray] = {}
    for (u, v), mat in zip(full.edges, full.edge_costs):
        m2 = mat[np.ix_(maps[u], maps[v])]
        a, b = index[rep[u]], index[rep[v]]
        if a == b:
            costs[a] = costs[a] + np.diag(m2)
            continue
        if a > b:
            a, b, m2 = b, a, m2.T
        edge_acc[(a, b)] = edge_acc[(a, b)] + m2 if (a, b) in edge_acc else m2
    problem = Problem(costs, [full.node_usages[r] for r in reps], [full.intervals[r] for r in reps],
                      list(edge_acc), list(edge_acc.values()), usage_limit=full.usage_limit,
                      name=full.name,
                      extra_usages=extra + [(index[rep[v]], use[maps[v]], iv) for v, use, iv in full.extra_usages],
                      fixed_usages=list(full.fixed_usages), cost_offset=full.cost_offset)
    return Merged(problem, rep, maps, index)
