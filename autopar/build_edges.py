"""The edge terms of the solver problem (``autopar.build``): per (producer, consumer) pair the
µs to reshard the producer's output spec into the spec the consumer wants, summed over the
operands it reads; then the ties between a program input and an output: donated buffers
(alias: one layout, ∞ off the diagonal), loop-carried pairs (the output resharded into the
input's layout before the next call) and scan carries (one layout for every iteration).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from autopar.cost import ALL_GATHER, MeshModel, collective_time, resharding
from autopar.solvers.handoff import HandoffCache

from .build_nodes import US
from .build_shared import materialize_terms, shared_values
from .graph import OpGraph, is_constant_broadcast
from .trace import Lit, Value


class ReshardCache(HandoffCache):
    """Resharding cost matrices (µs, src specs × dst specs) by (mesh, shape, itemsize, src,
    dst), read-only. One per plan; a pipeline plan passes one to all its stage builds (it
    rebuilds the same layers on the same meshes many times), and its worker processes hand
    theirs back (``solvers.handoff``). Cleared at ``max_entries``."""

    def __init__(self, max_entries: int = 50_000):
        super().__init__(max_entries)
        self._seconds: dict = {}   # ((mesh key, shape, itemsize, combined), src spec, dst spec) → s
        self._mesh_keys: dict = {}

    def _held(self, m: np.ndarray) -> np.ndarray:
        m.flags.writeable = False
        return m

    def _clear(self) -> None:
        super()._clear()
        self._seconds.clear()
        self._mesh_keys.clear()

    def matrix(self, mesh: MeshModel, value: Value, src: tuple, dst: tuple, seen: set | None = None,
               combined: bool = False) -> np.ndarray:
        """µs to reshard ``value`` from each spec of ``src`` (rows) into each of ``dst``
        (columns; None: the consumer takes any layout, 0). ``seen`` collects the keys used.
        ``combined``: its all-gathers join XLA's combined one (:func:`gathers_combined`), no α."""
        key = (mesh, value.shape, value.itemsize, src, dst, combined)
        if seen is not None:
            seen.add(key)
        m = self.get(key)
        if m is None:
            m = self._build(mesh, value, src, dst, combined)
            self.put(key, m)
        return m

    def costs_any(self, mesh: MeshModel, value: Value, src: tuple, dst_spec, seen: set | None = None,
                  combined: bool = False) -> bool:
        """Whether converting ``value`` from some spec of ``src`` into ``dst_spec`` costs
        something (a finite entry > 0 of ``matrix(mesh, value, src, (dst_spec,))``, whose key
        ``seen`` collects), without making that matrix."""
        key = (mesh, value.shape, value.itemsize, src, (dst_spec,), combined)
        if seen is not None:
            seen.add(key)
        m = self.get(key)
        if m is not None:
            return bool((m[np.isfinite(m)] > 0).any())
        if dst_spec is None:
            return False
        base = self._base(mesh, value, combined)
        for a in dict.fromkeys(src):
            t = self._pair(base, mesh, value, a, dst_spec, combined) * US
            if t > 0 and math.isfinite(t):
                return True
        return False

    def _pair(self, base: tuple, mesh: MeshModel, value: Value, src, dst, combined: bool) -> float:
        """Seconds to reshard ``value`` from spec ``src`` into ``dst``, priced once per ``base``."""
        t = self._seconds.get((base, src, dst))
        if t is None:
            t = self._seconds[base, src, dst] = _seconds(mesh, value, src, dst, combined)
        return t

    def _base(self, mesh: MeshModel, value: Value, combined: bool) -> tuple:
        """The part of a spec pair's key this matrix shares (the mesh hashed once, not per pair)."""
        return self._mesh_keys.setdefault(mesh, len(self._mesh_keys)), value.shape, value.itemsize, combined

    def _build(self, mesh: MeshModel, value: Value, src: tuple, dst: tuple, combined: bool) -> np.ndarray:
        """The matrix from its distinct specs: a spec list repeats specs (many strategies
        share an operand's layout), and another list shares most pairs with this one."""
        if not src:
            return np.zeros(0)
        rows, cols = _positions(src), _positions(dst)
        base = self._base(mesh, value, combined)
        table = np.zeros((len(rows), len(cols)))
        for r, a in enumerate(rows):
            for c, d in enumerate(cols):
                if d is not None:
                    table[r, c] = self._pair(base, mesh, value, a, d, combined)
        return table[np.array([rows[a] for a in src], dtype=np.intp)[:, None],
                     np.array([cols[d] for d in dst], dtype=np.intp)[None, :]] * US


def _positions(specs: tuple) -> dict:
    """{spec: its row among the distinct specs}, in first-seen order."""
    out: dict = {}
    for s in specs:
        if s not in out:
            out[s] = len(out)
    return out


def _seconds(mesh: MeshModel, value: Value, src, dst, combined: bool) -> float:
    seconds, parts = resharding(mesh, value.shape, value.itemsize, src, dst)
    if not combined:
        return seconds
    return sum(collective_time(mesh, k, axes, n, latency=k != ALL_GATHER.name) for k, axes, n in parts)


def gathers_combined(graph: OpGraph, mesh: MeshModel, vid: int, reader: int | None = None) -> bool:
    """Whether XLA combines the all-gathers that reshard value ``vid`` (for node ``reader``)
    with others into one op (``ClusterSpec.combine_all_gathers``): a program input's (a weight
    gathered for the step), which waits for nothing, so all of them are independent of one
    another; not where the reshard is redone in every iteration of a scan."""
    return (mesh.combine_all_gathers and graph.nodes[graph.producer[vid][0]].kind == "input"
            and (reader is None or graph.reshard_repeat(reader) == 1))


@dataclass
class Operand:
    node: int
    operand: int
    value: Value
    producer: int
    out_index: int


@dataclass(frozen=True)
class Edges:
    pairs: list[tuple[int, int]]        # (producer, consumer) or (input, output's producer)
    costs: list[np.ndarray]             # µs, producer strategies × consumer strategies
    operands: list[list[Operand]]       # what each consumer reads ([] for a tie)
    matrix_keys: frozenset              # the reshard matrices used
    # values read through a Materialize node (``build_shared``; their operands cost nothing on
    # ``costs``) and its edges: (graph node, Materialize index, graph strategies × its strategies)
    materialize: tuple = ()
    materialize_edges: tuple = ()


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


def rematerialized(graph: OpGraph) -> frozenset[int]:
    """Constant broadcasts: ``emit`` recomputes them in each consumer's layout, reshards free."""
    return frozenset(n.index for n in graph.nodes if n.eqn is not None and is_constant_broadcast(n.eqn))


def operand_edges(graph: OpGraph, mesh: MeshModel, strats, cache: ReshardCache, *, remat: frozenset[int],
                  allowed_reshard=None, share: bool = True) -> Edges:
    """One edge per (producer, consumer) pair, its operands grouped; ``allowed_reshard(input,
    src, dst)`` forbids (∞) conversions of a program input (those inputs are not shared).
    ``share``: values several consumers may read in one converted spec are read through a
    Materialize node (``autopar.build_shared``) instead of paying the conversion per edge."""
    grouped: dict[tuple[int, int], list[Operand]] = {}
    for node in graph.nodes:
        for k, o in enumerate(node.operands):
            if isinstance(o, Lit):
                continue
            u, j = graph.producer[o.id]
            grouped.setdefault((u, node.index), []).append(Operand(node.index, k, o, u, j))
    costs, keys = [], set()
    matrix = lambda value, src, dst, reader=None: cache.matrix(  # noqa: E731
        mesh, value, tuple(src), tuple(dst), keys, gathers_combined(graph, mesh, value.id, reader))
    skip = set(remat) | ({n.index for n in graph.nodes if n.kind == "input"} if allowed_reshard is not None else set())
    skip |= unshared_producers(graph)
    shared = shared_values(graph, strats, grouped, skip, _costly(graph, mesh, strats, cache, keys)) if share else {}
    for (u, v), ops in grouped.items():
        mat = np.zeros((len(strats[u]), len(strats[v])))
        for op in ops:
            if u in remat:  # emit recomputes the constant in the consumer's layout
                continue
            if op.value.id in shared:  # read through its Materialize node
                continue
            src = tuple(s.out_specs[op.out_index] for s in strats[u])
            dst = tuple(s.in_specs[op.operand] for s in strats[v])
            m = matrix(op.value, src, dst, v)
            if allowed_reshard is not None and graph.nodes[u].kind == "input":
                ok = np.array([[d is None or allowed_reshard(u, a, d) for d in dst] for a in src], dtype=bool)
                m = np.where(ok, m, np.inf)
            mat = mat + m
        if graph.reshard_repeat(v) > 1:  # a reshard inside a scan body happens every iteration
            mat = mat * graph.reshard_repeat(v)
        costs.append(mat)
    nodes, links = materialize_terms(graph, strats, grouped, shared, matrix)
    return Edges(list(grouped), costs, list(grouped.values()), frozenset(keys), tuple(nodes), tuple(links))


def unshared_producers(graph: OpGraph) -> set[int]:
    """Producers of values a ``jax.checkpoint`` group or a scan body makes or reads: not
    shared (straight-line code only). A checkpoint group's recomputation reads them again
    through optimization barriers, and with a shared conversion in between XLA:CPU no longer
    merged the recomputation with the forward pass (tests/test_remat.py on (2, 4): compiled
    all-gathers 5.24 MB vs 1.84 MB predicted, peak 37 % above the prediction); across a scan
    boundary XLA converted a value shared outside the loop again in every iteration
    (tests/test_scan.py: compiled all-gathers 4× the predicted)."""
    out = set()
    for node in graph.nodes:
        if node.eqn is None or (node.eqn.remat is None and not node.eqn.scope):
            continue
        out.add(node.index)
        for x in node.operands:
            if hasattr(x, "id"):
                out.add(graph.producer[x.id][0])
    return out


def _costly(graph: OpGraph, mesh: MeshModel, strats, cache: ReshardCache, keys: set):
    """``costly(value id, spec)``: converting the value into ``spec`` costs something from
    some output spec of its producer (``ReshardCache.costs_any``; ``keys`` collects the key
    of the matrix it stands for)."""
    sources: dict = {}

    def costly(vid, spec) -> bool:
        u, j = graph.producer[vid]
        if (u, j) not in sources:
            sources[u, j] = tuple(dict.fromkeys(s.out_specs[j] for s in strats[u]))
        return cache.costs_any(mesh, graph.program.values[vid], sources[u, j], spec, keys,
                               gathers_combined(graph, mesh, vid))
    return costly


def tie_edges(graph: OpGraph, mesh: MeshModel, strats, cache: ReshardCache, edges: Edges, *,
              aliases, carried) -> Edges:
    """``edges`` with the input/output ties added (on an operand edge: its matrix summed)."""
    pairs, costs, operands, keys = list(edges.pairs), list(edges.costs), list(edges.operands), set(edges.matrix_keys)
    index = {e: k for k, e in enumerate(pairs)}
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
            mat = cache.matrix(mesh, graph.program.values[out_value], tuple(dst), tuple(src), keys).T
        if (i, u) in index:
            costs[index[i, u]] = costs[index[i, u]] + mat
        else:  # (not indexed: a second tie of the same pair is its own edge)
            pairs.append((i, u))
            costs.append(mat)
            operands.append([])
    return Edges(pairs, costs, operands, frozenset(keys), edges.materialize, edges.materialize_edges)
