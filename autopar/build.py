"""OpGraph + strategies on one logical mesh → the solver's numeric :class:`solvers.Problem`.

``build_problem`` runs the steps: strategies per node (``build_nodes.node_strategies``,
filtered by ``allowed``) → node terms (cost µs = roofline compute of the local shard +
collectives inside the op; usage bytes = the node's outputs per device over their live
interval; ``build_nodes.node_terms``) → edge terms (µs to reshard a producer's output spec
into the spec its consumer wants, ``build_edges.operand_edges``; input/output ties,
``build_edges.tie_edges``) → the full problem → repeated layers tied (``repeats.tie``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from autopar.cost import MeshModel
from autopar.solvers import Problem

from .build_edges import Operand, ReshardCache, match_donations, operand_edges, rematerialized, tie_edges
from .build_nodes import TIEBREAK_US_PER_BYTE, node_strategies, node_terms, restrict_inputs, transient_usages
from .build_shared import materialize_usages
from .graph import OpGraph
from .repeats import Tied, find_repeats, tie
from .strategies import Strategy
from .strategies.base import local_nbytes


@dataclass
class IntraProblem:
    graph: OpGraph
    mesh: MeshModel
    strategies: list[list[Strategy]]
    compute_s: list[np.ndarray]
    comm_s: list[np.ndarray]
    fallbacks: dict[int, str]
    edges: list[tuple[int, int]]
    edge_operands: list[list[Operand]]
    full: Problem                 # one solver node per graph node
    tied: Tied                    # repeated layers tied: what the solver sees
    stats: dict = field(default_factory=dict)
    carried: list = field(default_factory=list)  # (input, output) pairs a loop feeds back
    aliases: list = field(default_factory=list)  # (input, output) pairs of donated buffers
    rematerialized: frozenset = frozenset()  # constant broadcasts: recomputed per consumer layout, reshards free
    materialize: tuple = ()  # build_shared.Materialize: solver nodes after the graph's

    @property
    def problem(self) -> Problem:
        return self.tied.problem

    def expand(self, choice) -> tuple[int, ...]:
        """A solution of ``problem`` → one strategy index per graph node."""
        return self.tied.expand(choice)[:len(self.graph.nodes)]

    def expand_full(self, choice) -> tuple[int, ...]:
        """A solution of ``problem`` → one strategy index per node of ``full`` (the graph's,
        then the Materialize nodes')."""
        return self.tied.expand(choice)

    def materialized(self, choice) -> dict[int, tuple]:
        """{value id: the spec it is converted into once after it is produced} of a solution."""
        full, n = self.tied.expand(choice), len(self.graph.nodes)
        out = {}
        for k, m in enumerate(self.materialize):
            spec = m.spec_of(full[n + k])
            if spec is not None:
                out[m.value.id] = spec
        return out

    def with_budget(self, memory_budget_bytes: float | None) -> "IntraProblem":
        """The same problem under another memory budget (nothing else depends on it)."""
        full = dataclasses.replace(self.full, usage_limit=memory_budget_bytes)
        tied = dataclasses.replace(self.tied, problem=dataclasses.replace(self.tied.problem,
                                                                          usage_limit=memory_budget_bytes))
        return dataclasses.replace(self, full=full, tied=tied)

    def restricted(self, allowed=None, allowed_reshard=None) -> Problem:
        """``problem`` (same nodes, same strategy indices) with what an input layout rule
        forbids at ∞: input strategies ``allowed(node, strategy)`` rejects, and conversions of
        an input into a consumer's spec ``allowed_reshard(node, src, dst)`` rejects (the
        ``build_problem`` arguments). A choice of it is a choice of ``problem``: the rule's
        plan, used as the warm start of an ILP that may stop at its time limit
        (``autopar.warm_start``)."""
        t, p = self.tied, self.tied.problem
        costs, ecosts = [c.copy() for c in p.node_costs], list(p.edge_costs)
        where = {e: k for k, e in enumerate(p.edges)}
        for node in self.graph.nodes:
            u = node.index
            if node.kind == "input" and allowed is not None:
                bad = np.array([not allowed(u, s) for s in self.strategies[u]], dtype=bool)
                costs[t.index[t.rep[u]]][bad] = np.inf
        for (u, v), ops in zip(self.edges, self.edge_operands):
            if allowed_reshard is None or self.graph.nodes[u].kind != "input" or not ops:
                continue
            ok = np.ones((len(self.strategies[u]), len(self.strategies[v])), dtype=bool)
            for op in ops:
                src = [s.out_specs[op.out_index] for s in self.strategies[u]]
                dst = [s.in_specs[op.operand] for s in self.strategies[v]]
                ok &= np.array([[d is None or allowed_reshard(u, a, d) for d in dst] for a in src], dtype=bool)
            a, b = t.index[t.rep[u]], t.index[t.rep[v]]
            if a == b:
                costs[a][~np.diag(ok)] = np.inf
            elif (a, b) in where:
                ecosts[where[a, b]] = np.where(ok, ecosts[where[a, b]], np.inf)
            else:
                ecosts[where[b, a]] = np.where(ok.T, ecosts[where[b, a]], np.inf)
        return dataclasses.replace(p, node_costs=costs, edge_costs=ecosts, name=f"{p.name} (rule)")


def build_problem(graph: OpGraph, mesh: MeshModel, *, memory_budget_bytes: float | None,
                  donated_inputs=(), tie_repeats: bool = True, allowed=None, allowed_reshard=None,
                  input_usage_scale=None, carried=(), reshard_cache: ReshardCache | None = None,
                  split_backward: bool = False, held_values=None) -> IntraProblem:
    """``donated_inputs``: flat input indices whose buffers the step may reuse; each must keep
    the sharding of the output it aliases (alias constraint: an edge with ∞ off the diagonal).

    ``carried`` (input index, output index) pairs a loop feeds back (``autopar.carry``): an
    edge from the output's producer to the input costing the resharding of the output's spec
    into the input's, paid before the next call.

    ``allowed(node_index, strategy) -> bool`` (default: everything) restricts the shardings of
    the program inputs (node index = flat input leaf index), ``allowed_reshard(node_index,
    src_spec, dst_spec) -> bool`` the specs their consumers may convert them to (forbidden:
    ∞ on the edge); ``autopar.baselines`` uses both to pin data/parameter layouts and lets
    the solver choose every other operator.

    ``input_usage_scale`` {input index: k} counts k bytes per byte of that input (same
    sharding): pipeline stages charge a parameter for its gradient accumulator and optimizer
    state, which live on the stage all step long; ``split_backward``: the program's forward
    and backward run as separate executables (a pipeline stage), so XLA cannot merge a
    ``jax.checkpoint``'s recomputation back into the forward (``xla_view.memory_view``).

    ``held_values`` {value id: k}: k more copies of that value (in the layout it is kept in:
    its shared conversion's where one is made, else its producer's) are held all step long —
    a pipeline stage's residuals of its other in-flight micro-batches
    (``autopar.pipeline.search.plan_stage``), so the ILP weighs a layout's activations by the
    micro-batches the stage keeps, not by one.

    ``tie_repeats`` (default on) ties repeated layers (``autopar.repeats``); it kept the
    optimum on every GPT size we measured. ``reshard_cache``: resharding matrices shared with
    other builds (default: a fresh one for this build).
    """
    signatures = graph.signatures
    strats, fallbacks = node_strategies(graph, mesh, signatures)
    if allowed is not None:
        strats = restrict_inputs(graph, strats, allowed)
    aliases = match_donations(graph, donated_inputs)
    aliased = frozenset(graph.program.outvars[k] for _, k in aliases)
    nodes = node_terms(graph, mesh, strats, signatures, donated_nodes={i for i, _ in aliases}, aliased_outputs=aliased,
                       input_usage_scale=input_usage_scale, split_backward=split_backward)
    cache = reshard_cache if reshard_cache is not None else ReshardCache()
    remat = rematerialized(graph)
    edges = operand_edges(graph, mesh, strats, cache, remat=remat, allowed_reshard=allowed_reshard)
    edges = tie_edges(graph, mesh, strats, cache, edges, aliases=aliases, carried=carried)
    mats, n = edges.materialize, len(graph.nodes)  # Materialize nodes come after the graph's
    m_use = [materialize_usages(m, mesh) for m in mats]
    m_live = [(nodes.intervals[m.producer][0], graph.last_use(m.value.id) + 1 if graph.nodes[m.producer].kind == "input"
               else nodes.intervals[m.producer][1]) for m in mats]
    full = Problem(nodes.costs + [u * TIEBREAK_US_PER_BYTE for u in m_use], nodes.usages + m_use,
                   nodes.intervals + m_live, edges.pairs + [(v, n + k) for v, k, _ in edges.materialize_edges],
                   edges.costs + [m for _, _, m in edges.materialize_edges],
                   usage_limit=memory_budget_bytes, name=f"mesh{mesh.shape}",
                   extra_usages=transient_usages(graph, strats) + held_usages(graph, mesh, strats, mats, held_values))
    rep = _tie_groups(graph, strats, signatures, tie_repeats=tie_repeats, restricted=allowed is not None)
    tied = tie(full, rep + _tie_materialize(rep, mats, n))
    stats = {"aliases": len(aliases), "carried": len(carried), "nodes": len(graph.nodes), "edges": len(edges.pairs),
             "materialize": len(mats),
             "strategies": int(sum(len(s) for s in strats)), "edge_matrix_cache": len(edges.matrix_keys),
             "solver_nodes": tied.problem.num_nodes, "solver_edges": tied.problem.num_edges}
    return IntraProblem(graph, mesh, strats, nodes.compute_s, nodes.comm_s, fallbacks, edges.pairs, edges.operands,
                        full, tied, stats, carried=list(carried), aliases=aliases, rematerialized=remat,
                        materialize=mats)


def held_usages(graph: OpGraph, mesh: MeshModel, strats, mats, held_values) -> list:
    """``build_problem``'s ``held_values`` as usage items over the whole program: k × the
    value's bytes per device in the layout it is kept in — on its Materialize node where it
    has one (whose strategy names that layout: one of the producer's specs, or a conversion),
    else on its producer (the strategy's output layout)."""
    n, items = len(graph.nodes), []
    shared = {m.value.id: k for k, m in enumerate(mats)}
    for v, k in sorted((held_values or {}).items()):
        if k <= 0:
            continue
        if v in shared:
            m = mats[shared[v]]
            specs, node, value = list(m.sources) + list(m.specs), n + shared[v], m.value
        else:
            node, out = graph.producer[v]
            specs, value = [s.out_specs[out] for s in strats[node]], graph.nodes[node].outputs[out]
        items.append((node, np.array([k * float(local_nbytes(value, sp, mesh.shape)) for sp in specs]), (0, n + 1)))
    return items


def _tie_materialize(rep: list[int], mats, n: int) -> list[int]:
    """The solver node each Materialize node copies: the one of the same output of its
    producer's representative, where that has the same strategies (else itself)."""
    where = {(m.producer, m.out_index): k for k, m in enumerate(mats)}
    out = []
    for k, m in enumerate(mats):
        r = where.get((rep[m.producer], m.out_index))
        same = r is not None and mats[r].sources == m.sources and mats[r].specs == m.specs
        out.append(n + (r if same else k))
    return out


def _tie_groups(graph: OpGraph, strats, signatures, *, tie_repeats: bool, restricted: bool) -> list[int]:
    """The node each graph node's strategy copies (itself when untied)."""
    if not tie_repeats:
        return list(range(len(graph.nodes)))
    rep = find_repeats(graph, strats, signatures)
    if restricted:  # restricted inputs of one shape may differ: tie only equal lists
        rep = [t if t == v or [x.out_specs for x in strats[t]] == [x.out_specs for x in strats[v]] else v
               for v, t in enumerate(rep)]
    return rep
