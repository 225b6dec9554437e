"""OpGraph: one node per program input, closed-over constant and equation.

Nodes carry their output values (shape, dtype), operands, FLOPs (each primitive's registered
rule, ``strategies.registry``) and bytes touched; the graph knows each value's producer and
consumers, and the program order used for liveness.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .strategies import primitive_flops
from .trace import Eqn, Lit, Program, Value


@dataclass
class Node:
    index: int
    kind: str                   # "input" | "const" | "eqn"
    name: str                   # primitive name, or "input[i]" / "const"
    outputs: list[Value]
    operands: list              # Value | Lit
    eqn: Eqn | None = None
    flops: float = 0.0          # per call: per execution × repeat
    bytes: float = 0.0          # touched per call (× repeat)

    @property
    def repeat(self) -> int:
        """Executions per call (inside a scan: its trip count)."""
        return self.eqn.repeat if self.eqn is not None else 1

    @property
    def params(self) -> dict:
        return self.eqn.params if self.eqn is not None else {}


@dataclass
class OpGraph:
    program: Program
    nodes: list[Node]
    producer: dict[int, tuple[int, int]] = field(default_factory=dict)   # value -> (node, output index)
    consumers: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # value -> [(node, operand index)]
    output_values: set[int] = field(default_factory=set)
    # value pairs that must have equal specs: a scan's carry at loop entry and at the end of the body
    ties: list[tuple[int, int]] = field(default_factory=list)
    _signatures: list | None = None
    _extents: dict | None = None

    @property
    def signatures(self) -> list[int]:
        """Structural hash per node (same hash ⇒ same strategies and costs); computed once."""
        if self._signatures is None:
            from .repeats import signature
            self._signatures = [signature(n) for n in self.nodes]
        return self._signatures

    def last_use(self, value_id: int, skip=frozenset()) -> int:
        """Index of the last node reading ``value_id`` (len(nodes) if it is a program output).
        A scan's stacked xs are read by every iteration: live until its region's last node.
        Readers in ``skip`` (nodes XLA removes) do not count."""
        if value_id in self.output_values:
            return len(self.nodes)
        uses = [u for u in self.consumers.get(value_id, []) if u[0] not in skip]
        ext = self.region_extents
        return max((ext[self.nodes[n].params["region"]][1] if self.nodes[n].name == "scan_slice" else n
                    for n, _ in uses), default=self.producer[value_id][0])

    @property
    def region_extents(self) -> dict[int, tuple[int, int]]:
        """First and last node index of each expanded scan (``trace.Region``)."""
        if self._extents is None:
            ext: dict[int, tuple[int, int]] = {}
            for node in self.nodes:
                for r in (node.eqn.scope if node.eqn is not None else ()):
                    a, b = ext.get(r, (node.index, node.index))
                    ext[r] = (min(a, node.index), max(b, node.index))
            self._extents = ext
        return self._extents

    def reshard_repeat(self, v: int) -> int:
        """How often a reshard of an operand of node ``v`` runs per call: inside a scan body once
        per iteration; into a ``scan_stack`` too (each iteration's y is converted before it is
        written into the stacked buffer)."""
        node = self.nodes[v]
        if node.name == "scan_stack":
            return node.repeat * self.program.regions[node.params["region"]].length
        return node.repeat

    def born(self, node: Node) -> int:
        """Where ``node``'s outputs start to hold memory: a scan's stacked ys are allocated when
        its loop starts (every iteration writes its slice), anything else at the node."""
        if node.name == "scan_stack":
            return self.region_extents[node.params["region"]][0]
        return node.index


def is_constant_broadcast(eqn: Eqn) -> bool:
    """A broadcast of a literal scalar (``jnp.zeros`` / ``ones`` / ``full``): ``emit`` recomputes
    it in each layout a consumer wants instead of resharding it, so that conversion moves no
    bytes (XLA folds an all-gather of such a constant but not an all-to-all; tests/test_fuzz.py)."""
    return eqn.prim.name == "broadcast_in_dim" and len(eqn.inputs) == 1 and isinstance(eqn.inputs[0], Lit)


def build_graph(program: Program) -> OpGraph:
    nodes: list[Node] = []
    producer: dict[int, tuple[int, int]] = {}
    consumers: dict[int, list[tuple[int, int]]] = {}
    vals = program.values
    for i, vid in enumerate(program.invars):
        nodes.append(Node(len(nodes), "input", f"input[{i}]", [vals[vid]], []))
        producer[vid] = (len(nodes) - 1, 0)
    for vid in program.consts:
        nodes.append(Node(len(nodes), "const", "const", [vals[vid]], []))
        producer[vid] = (len(nodes) - 1, 0)
    for eqn in program.eqns:
        operands = [x if isinstance(x, Lit) else vals[x] for x in eqn.inputs]
        outputs = [vals[o] for o in eqn.outputs]
        idx = len(nodes)
        nbytes = sum(v.nbytes for v in outputs) + sum(v.nbytes for v in operands if isinstance(v, Value))
        nodes.append(Node(idx, "eqn", eqn.prim.name, outputs, operands, eqn,
                          primitive_flops(eqn.prim.name, eqn.params, operands, outputs) * eqn.repeat,
                          float(nbytes) * eqn.repeat))
        for k, x in enumerate(eqn.inputs):
            if not isinstance(x, Lit):
                consumers.setdefault(x, []).append((idx, k))
        for k, o in enumerate(eqn.outputs):
            producer[o] = (idx, k)
    outs = {o for o in program.outvars if isinstance(o, int)}
    return OpGraph(program, nodes, producer, consumers, outs, carry_ties(program))


def carry_ties(program: Program) -> list[tuple[int, int]]:
    """(carry value at the start of the body, carry value at its end) and (start, final carry
    after the loop) per scan carry: one layout for every iteration and for the loop's result (a
    carry passed through unchanged needs no first tie)."""
    start, end, final = {}, {}, {}
    for eqn in program.eqns:
        key = (eqn.params.get("region"), eqn.params.get("index"))
        if eqn.prim.name == "scan_carry_in":
            start[key] = eqn.outputs[0]
        elif eqn.prim.name == "scan_carry_out":
            final[key] = eqn.outputs[0]
            if not isinstance(eqn.inputs[0], Lit):
                end[key] = eqn.inputs[0]
    ties = [(start[k], end[k]) for k in sorted(end, key=str) if k in start and start[k] != end[k]]
    # the final carry leaves the loop in the loop's layout (XLA's while has one state layout; a
    # reshard between the body and the final value was not what XLA did): consumers reshard it
    return ties + [(start[k], final[k]) for k in sorted(final, key=str) if k in start]
