"""Shared reshards (``autopar.build``): a value that several consumers read in the same
converted layout is converted once, not once per consumer.

XLA converts a value into a given spec once however many ops read it that way (identical
``with_sharding_constraint``s are CSE'd), but an edge cost per (producer, consumer) pair
charges the conversion on every edge: a per-layer QKV weight stored split on d and read by
three slices paid three gathers where XLA does one (``benchmarks/results/scan_depth.md``).

For every value with two or more consumer operands that may ask for the same costly spec,
the solver gets a :class:`Materialize` node that decides where the consumers read it from:

* "as produced" σ (one strategy per distinct output spec of the producer; an edge to the
  producer allows only the strategies with that spec): each consumer converts from σ itself,
  as before — the old costs exactly;
* "materialised" in a shared spec l: the value is converted once into l right after it is
  produced (µs × the producer's executions per call) and every consumer reads it from l
  (converting l into its own spec where they differ; × the consumer's executions per call).

It holds the materialised copy's bytes per device (as long as the value lives) and ties go
to "as produced". ``emit.interpret`` puts the ``with_sharding_constraint`` into l after the
producer (``Plan.materialized``), so the compiled program does what the cost says; the
predicted collectives count the conversion into l and, from l, one per consumer spec.
The pairwise problem stays pairwise: the Materialize node stands between the producer and
its consumers, so the graph gains no cycles.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import OpGraph
from .strategies.base import local_nbytes
from .trace import Value


@dataclass(frozen=True)
class Materialize:
    """Strategies: ``sources`` ("as produced" in that spec), then ``specs`` (converted once)."""
    value: Value
    producer: int       # graph node
    out_index: int
    sources: tuple      # distinct output specs of the producer's strategies
    specs: tuple        # shared specs it may be converted into once

    def spec_of(self, strategy: int):
        """The spec consumers read: None for "as produced" (the producer's own spec)."""
        k = strategy - len(self.sources)
        return self.specs[k] if k >= 0 else None


def shared_values(graph: OpGraph, strats, grouped, skip, costly) -> dict[int, tuple]:
    """{value id: specs ≥ 2 of its consumer operands may ask for and that cost something to
    convert into from some output spec of the producer (``costly(value, spec)``)}; values of
    producers in ``skip`` and program outputs (returned in the producer's spec: a shared copy
    would be converted back) are left to the pairwise edges."""
    asks: dict[int, list[set]] = {}
    for (u, v), ops in grouped.items():
        if u in skip:
            continue
        for op in ops:
            asks.setdefault(op.value.id, []).append({s.in_specs[op.operand] for s in strats[v]} - {None})
    out = {}
    for vid, wants in asks.items():
        if len(wants) < 2 or vid in graph.output_values:  # an output leaves in its producer's spec
            continue
        seen, twice = set(), set()
        for w in wants:
            twice |= seen & w
            seen |= w
        specs = tuple(sorted((d for d in twice if costly(vid, d)), key=repr))
        if specs:
            out[vid] = specs
    return out


def materialize_terms(graph: OpGraph, strats, grouped, shared: dict, matrix) -> tuple[list, list]:
    """The :class:`Materialize` nodes of ``shared`` and their edges as (graph node, node k,
    matrix: graph node strategies × node k strategies); ``matrix(value, src specs, dst specs,
    reader=None)`` is the µs reshard matrix (``ReshardCache.matrix``)."""
    nodes, links = [], []
    readers: dict[int, list] = {}
    for ops in grouped.values():
        for op in ops:
            if op.value.id in shared:
                readers.setdefault(op.value.id, []).append(op)
    for vid in sorted(readers):
        ops = readers[vid]
        u, j = graph.producer[vid]
        value = ops[0].value
        out_specs = tuple(s.out_specs[j] for s in strats[u])
        sources = tuple(dict.fromkeys(out_specs))
        node = Materialize(value, u, j, sources, shared[vid])
        k = len(nodes)
        nodes.append(node)
        # producer → node: "as produced" only in the producer's spec; converting costs the reshard
        tie = np.array([[0.0 if a == b else np.inf for b in sources] for a in out_specs])
        conv = matrix(value, out_specs, node.specs) * graph.nodes[u].repeat
        links.append((u, k, np.concatenate([tie, conv], axis=1)))
        reads = sources + node.specs  # where a consumer converts from, per node strategy
        per_node: dict[int, np.ndarray] = {}
        for op in ops:
            dst = tuple(s.in_specs[op.operand] for s in strats[op.node])
            m = matrix(value, reads, dst, op.node) * graph.reshard_repeat(op.node)
            per_node[op.node] = per_node.get(op.node, 0.0) + m
        for v in sorted(per_node):
            links.append((v, k, per_node[v].T))
    return nodes, links


def materialize_usages(node: Materialize, mesh) -> np.ndarray:
    """Bytes per device the node holds: the converted copy (none "as produced")."""
    return np.array([0.0] * len(node.sources) + [float(local_nbytes(node.value, s, mesh.shape)) for s in node.specs])
