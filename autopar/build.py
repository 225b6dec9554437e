"""OpGraph + strategies on one logical mesh → the solver's numeric :class:`solvers.Problem`.

Node cost (µs) = roofline compute of the local shard + collectives inside the op; edge
cost (µs) = resharding the producer's output spec into the spec the consumer wants;
usage (bytes) = the node's outputs per device, live from the node to its last use
(program inputs and outputs are live for the whole step; ops XLA fuses away hold none,
``fused_nodes``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from autopar.cost import MeshModel, collective, collective_time, compute_time, resharding, shard_factor
from autopar.solvers import Problem

from .followers import Merged, find_followers, merge
from .graph import OpGraph, is_constant_broadcast
from .repeats import find_repeats
from .strategies import FUSION_RULES, Strategy, enumerate_specs, replicate, spec_name, strategies_for
from .strategies.base import local_nbytes
from .trace import SCAN_BOUNDARY, Lit, Value

US = 1e6  # solver costs are microseconds
# Among plans of equal predicted time prefer the one holding fewer bytes per device:
# 1 µs per GB of (summed) live outputs — far below any real cost difference.
TIEBREAK_US_PER_BYTE = 1e-9


@dataclass
class Operand:
    node: int
    operand: int
    value: Value
    producer: int
    out_index: int


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
    merged: Merged                # followers folded in: what the solver sees
    stats: dict = field(default_factory=dict)
    carried: list = field(default_factory=list)  # (input, output) pairs a loop feeds back
    aliases: list = field(default_factory=list)  # (input, output) pairs of donated buffers
    rematerialized: frozenset = frozenset()  # constant broadcasts: recomputed per consumer layout, reshards free

    @property
    def problem(self) -> Problem:
        return self.merged.problem

    def expand(self, choice) -> tuple[int, ...]:
        """A solution of ``problem`` → one strategy index per graph node."""
        return self.merged.expand(choice)

    def with_budget(self, memory_budget_bytes: float | None) -> "IntraProblem":
        """The same problem under another memory budget (nothing else depends on it)."""
        full = dataclasses.replace(self.full, usage_limit=memory_budget_bytes)
        merged = dataclasses.replace(self.merged, problem=dataclasses.replace(self.merged.problem,
                                                                             usage_limit=memory_budget_bytes))
        return dataclasses.replace(self, full=full, merged=merged)

    def restricted(self, allowed=None, allowed_reshard=None) -> Problem:
        """``problem`` (same nodes, same strategy indices) with what an input layout rule
        forbids at ∞: input strategies ``allowed(node, strategy)`` rejects, and conversions of
        an input into a consumer's spec ``allowed_reshard(node, src, dst)`` rejects (the
        ``build_problem`` arguments). A choice of it is a choice of ``problem``: the rule's
        plan, used as the warm start of an ILP that may stop at its time limit."""
        m, p = self.merged, self.merged.problem
        costs, ecosts = [c.copy() for c in p.node_costs], list(p.edge_costs)
        where = {e: k for k, e in enumerate(p.edges)}
        for node in self.graph.nodes:
            u = node.index
            if node.kind == "input" and allowed is not None:
                bad = np.array([not allowed(u, self.strategies[u][s]) for s in m.maps[u]], dtype=bool)
                costs[m.index[m.rep[u]]][bad] = np.inf
        for (u, v), ops in zip(self.edges, self.edge_operands):
            if allowed_reshard is None or self.graph.nodes[u].kind != "input" or not ops:
                continue
            ok = np.ones((len(m.maps[u]), len(m.maps[v])), dtype=bool)
            for op in ops:
                src = [self.strategies[u][s].out_specs[op.out_index] for s in m.maps[u]]
                dst = [self.strategies[v][s].in_specs[op.operand] for s in m.maps[v]]
                ok &= np.array([[d is None or allowed_reshard(u, a, d) for d in dst] for a in src], dtype=bool)
            a, b = m.index[m.rep[u]], m.index[m.rep[v]]
            if a == b:
                costs[a][~np.diag(ok)] = np.inf
            elif (a, b) in where:
                ecosts[where[a, b]] = np.where(ok, ecosts[where[a, b]], np.inf)
            else:
                ecosts[where[b, a]] = np.where(ok.T, ecosts[where[b, a]], np.inf)
        return dataclasses.replace(p, node_costs=costs, edge_costs=ecosts, name=f"{p.name} (rule)")


def _node_strategies(graph: OpGraph, mesh: MeshModel, signatures):
    strats, fallbacks, cache = [], {}, {}
    for node, sig in zip(graph.nodes, signatures):
        if node.kind == "eqn" and sig in cache:
            strats.append(cache[sig][0])
            if cache[sig][1]:
                fallbacks[node.index] = cache[sig][1]
            continue
        if node.kind == "input":
            v = node.outputs[0]
            strats.append([Strategy(spec_name(s), (s,), ()) for s in enumerate_specs(v.shape, mesh.shape)])
        elif node.kind == "const":
            strats.append([Strategy("replicated", (replicate(len(node.outputs[0].shape)),), ())])
        else:
            s, reason = strategies_for(node, mesh)
            strats.append(s)
            cache[sig] = (s, reason)
            if reason:
                fallbacks[node.index] = reason
    return strats, fallbacks


def _node_costs(node, strats, mesh):
    comp = np.zeros(len(strats))
    comm = np.zeros(len(strats))
    use = np.zeros(len(strats))
    if node.kind != "eqn":
        use[:] = [local_nbytes(node.outputs[0], s.out_specs[0], mesh.shape) for s in strats]
        return comp, comm, use
    dtype = str(node.outputs[0].dtype)
    view = node.name in SCAN_BOUNDARY  # a scan's slice / stack / carry: XLA reads and writes in place
    for i, s in enumerate(strats):
        factors = [shard_factor(sp, mesh.shape) for sp in s.out_specs]
        factors += [shard_factor(sp, mesh.shape) for sp in s.in_specs if sp is not None]
        div = s.work_div or max(factors, default=1)
        nbytes = sum(local_nbytes(v, sp, mesh.shape) for v, sp in zip(node.outputs, s.out_specs))
        use[i] = nbytes
        nbytes += sum(local_nbytes(o, sp, mesh.shape) for o, sp in zip(node.operands, s.in_specs))
        comp[i] = 0.0 if view else compute_time(mesh, node.flops / div, nbytes * node.repeat, dtype)  # flops × repeat
        comm[i] = sum(collective_time(mesh, k, ax, n) for k, ax, n in s.comm) * node.repeat
    return comp, comm, use


def transient_usages(graph: OpGraph, strats) -> list:
    """While an op reduces partial sums (a collective inside it whose ``cost.comm`` record is
    ``partial_live``: all-reduce, reduce-scatter), the unreduced local buffer exists besides
    its output: an item live only at the op; so does a strategy's scratch
    (``Strategy.temp_bytes``: unfused attention's S×S scores)."""
    items, cache = [], {}
    for node, ss in zip(graph.nodes, strats):
        key = id(ss)  # strategy lists are shared between nodes of one signature
        if key not in cache:
            # one buffer however many all-reduces it goes through (one per split reduced dim)
            cache[key] = np.array([max((n for kind, _, n in s.comm if collective(kind).partial_live),
                                       default=0.0) + s.temp_bytes * 1.0 for s in ss])
        if cache[key].any():
            items.append((node.index, cache[key], (node.index, node.index + 1)))
    return items


def fused_nodes(graph: OpGraph) -> set[int]:
    """Ops whose output XLA never materialises, so they hold no memory: a single-output op
    that is no program output and whose consumers all fit its primitive's registered
    :class:`~autopar.strategies.Fusion` (a broadcast read only by elementwise ops / reductions,
    a transpose read only by dots, a dot read only by one transpose). Measured in
    benchmarks/fidelity.py: on GPT they were 13 % of the predicted peak and 0 % of XLA's."""
    out = set()
    for node in graph.nodes:
        fusion = FUSION_RULES.get(node.name) if node.kind == "eqn" else None
        if fusion is None or len(node.outputs) != 1 or node.outputs[0].id in graph.output_values:
            continue
        users = graph.consumers.get(node.outputs[0].id, [])
        if users and all(graph.nodes[u].name in fusion.into for u, _ in users) \
                and (not fusion.single_consumer or len(users) == 1):
            out.add(node.index)
    return out



def match_donations(graph: OpGraph, donated_inputs) -> list[tuple[int, int]]:
    """(input index, output index) pairs: each donated input leaf aliases the first unmatched
    program output of the same shape and dtype (the rule ``jax.jit`` uses for donation)."""
    prog = graph.program
    pairs, used = [], set()
    for i in sorted(donated_inputs):
        v = prog.values[prog.invars[i]]
        for k, o in enumerate(prog.outvars):
            if k in used or not isinstance(o, int):
                continue
            w = prog.values[o]
            if w.shape == v.shape and str(w.dtype) == str(v.dtype):
                used.add(k)
                pairs.append((i, k))
                break
    return pairs


def restrict_inputs(graph: OpGraph, strats, allowed) -> list:
    """Keep only the strategies ``allowed(node_index, strategy)`` accepts, on program inputs."""
    out = list(strats)
    for node in graph.nodes:
        if node.kind != "input":
            continue
        keep = [s for s in strats[node.index] if allowed(node.index, s)]
        if not keep:
            raise ValueError(f"no allowed sharding for program input {node.index} (shape {node.outputs[0].shape}): "
                             f"the restriction rejects all of {[s.name for s in strats[node.index]]}")
        out[node.index] = keep
    return out


# resharding cost matrices (src specs × dst specs) by (mesh, shape, itemsize, src, dst), shared by
# every build: a pipeline plan rebuilds the same layers on the same meshes many times
_RESHARD_MATRICES: dict = {}
_RESHARD_CACHE_SIZE = 50_000


def reshard_matrix(mesh: MeshModel, value: Value, src: tuple, dst: tuple, seen: set | None = None) -> np.ndarray:
    """µs to reshard ``value`` from each spec of ``src`` (rows) into each of ``dst`` (columns;
    None: the consumer takes any layout, 0), read-only, cached across builds."""
    key = (mesh, value.shape, value.itemsize, src, dst)
    if seen is not None:
        seen.add(key)
    m = _RESHARD_MATRICES.get(key)
    if m is None:
        m = np.array([[0.0 if d is None else resharding(mesh, value.shape, value.itemsize, a, d)[0]
                       for d in dst] for a in src]) * US
        m.flags.writeable = False
        if len(_RESHARD_MATRICES) >= _RESHARD_CACHE_SIZE:
            _RESHARD_MATRICES.clear()
        _RESHARD_MATRICES[key] = m
    return m


def build_problem(graph: OpGraph, mesh: MeshModel, *, memory_budget_bytes: float | None,
                  donated_inputs=(), merge_followers: bool = False, tie_repeats: bool = True,
                  allowed=None, allowed_reshard=None, input_usage_scale=None, carried=()) -> IntraProblem:
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
    state, which live on the stage all step long.

    ``tie_repeats`` (default on) ties repeated layers (``autopar.repeats``); it kept the
    optimum on every GPT size we measured. ``merge_followers`` (off by default) also folds
    elementwise followers into producers: 2× fewer solver nodes, but 3.6–5.4 % worse
    objectives on the GPT example (it forbids the free slice from a replicated producer
    into a sharded elementwise consumer).
    """
    signatures = graph.signatures
    strats, fallbacks = _node_strategies(graph, mesh, signatures)
    if allowed is not None:
        strats = restrict_inputs(graph, strats, allowed)
    aliases = match_donations(graph, donated_inputs)
    donated_nodes = {i for i, _ in aliases}
    fused = fused_nodes(graph)
    n = len(graph.nodes)
    node_costs, usages, comp_all, comm_all, intervals = [], [], [], [], []
    cost_cache: dict = {}
    for node, ss, sig in zip(graph.nodes, strats, signatures):
        key = sig if node.kind == "eqn" else (node.kind, node.outputs[0].shape, str(node.outputs[0].dtype),
                                               tuple(x.name for x in ss))
        if key not in cost_cache:
            cost_cache[key] = _node_costs(node, ss, mesh)
        comp, comm, use = cost_cache[key]
        if input_usage_scale and node.kind == "input" and node.index in input_usage_scale:
            use = use * float(input_usage_scale[node.index])
        if node.index in fused:
            use = use * 0.0
        comp_all.append(comp)
        comm_all.append(comm)
        node_costs.append((comp + comm) * US + use * TIEBREAK_US_PER_BYTE)
        usages.append(use)
        if node.kind == "input" and node.index not in donated_nodes:
            intervals.append((0, n + 1))
        elif node.kind == "input":  # donated: its buffer is free after the last read
            intervals.append((0, graph.last_use(node.outputs[0].id) + 1))
        else:
            end = max(graph.last_use(v.id) for v in node.outputs)
            intervals.append((graph.born(node), end + 1))
    # edges: group operands by (producer, consumer)
    grouped: dict[tuple[int, int], list[Operand]] = {}
    for node in graph.nodes:
        for k, o in enumerate(node.operands):
            if isinstance(o, Lit):
                continue
            u, j = graph.producer[o.id]
            grouped.setdefault((u, node.index), []).append(Operand(node.index, k, o, u, j))
    edges, edge_costs, edge_ops, grouped_index, matrices = [], [], [], {}, set()
    remat = frozenset(n.index for n in graph.nodes if n.eqn is not None and is_constant_broadcast(n.eqn))
    for (u, v), ops in grouped.items():
        mat = np.zeros((len(strats[u]), len(strats[v])))
        for op in ops:
            if u in remat:  # emit recomputes the constant in the consumer's layout
                continue
            src = tuple(s.out_specs[op.out_index] for s in strats[u])
            dst = tuple(s.in_specs[op.operand] for s in strats[v])
            m = reshard_matrix(mesh, op.value, src, dst, matrices)
            if allowed_reshard is not None and graph.nodes[u].kind == "input":
                ok = np.array([[d is None or allowed_reshard(u, a, d) for d in dst] for a in src], dtype=bool)
                m = np.where(ok, m, np.inf)
            mat = mat + m
        if graph.reshard_repeat(v) > 1:  # a reshard inside a scan body happens every iteration
            mat = mat * graph.reshard_repeat(v)
        grouped_index[(u, v)] = len(edges)
        edges.append((u, v))
        edge_costs.append(mat)
        edge_ops.append(ops)
    outvars, invars = graph.program.outvars, graph.program.invars
    ties = [(invars[i], outvars[k], True) for i, k in aliases] + [(invars[i], outvars[k], False) for i, k in carried]
    ties += [(a, b, True) for a, b in graph.ties]  # scan carries: one layout for every iteration
    for in_value, out_value, alias in ties:
        i, h = graph.producer[in_value]
        u, j = graph.producer[out_value]
        if u == i:
            continue
        src = [s.out_specs[h] for s in strats[i]]
        dst = [s.out_specs[j] for s in strats[u]]
        if alias:
            mat = np.array([[0.0 if a == b else np.inf for b in dst] for a in src])
        else:  # the output, laid out as b, is resharded into the input's a before the next call
            mat = reshard_matrix(mesh, graph.program.values[out_value], tuple(dst), tuple(src), matrices).T
        if (i, u) in grouped_index:
            e = grouped_index[(i, u)]
            edge_costs[e] = edge_costs[e] + mat
        else:
            edges.append((i, u))
            edge_costs.append(mat)
            edge_ops.append([])
    full = Problem(node_costs, usages, intervals, edges, edge_costs, usage_limit=memory_budget_bytes,
                   name=f"mesh{mesh.shape}", extra_usages=transient_usages(graph, strats))
    if merge_followers:
        rep, maps = find_followers(graph, strats)
    else:
        rep, maps = list(range(n)), [np.arange(len(s)) for s in strats]
    if tie_repeats:
        tie = find_repeats(graph, strats, signatures)
        if allowed is not None:  # restricted inputs of one shape may differ: tie only equal lists
            tie = [t if t == v or [x.out_specs for x in strats[t]] == [x.out_specs for x in strats[v]] else v
                   for v, t in enumerate(tie)]
        rep = [tie[r] for r in rep]
    merged = merge(full, rep, maps)
    stats = {"aliases": len(aliases), "carried": len(carried), "nodes": n, "edges": len(edges), "strategies": int(sum(len(s) for s in strats)),
             "edge_matrix_cache": len(matrices), "solver_nodes": merged.problem.num_nodes,
             "solver_edges": merged.problem.num_edges}
    return IntraProblem(graph, mesh, strats, comp_all, comm_all, fallbacks, edges, edge_ops, full, merged, stats,
                        carried=list(carried), aliases=aliases, rematerialized=remat)
