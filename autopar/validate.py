"""Compile a plan and compare its predictions with what XLA actually produced:
collective bytes per device (parsed from the per-device HLO) and peak memory
(``memory_analysis``)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from autopar.cost import HLO_OPS

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 1, "u4": 1}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s+(" + "|".join(map(re.escape, HLO_OPS)) + r")(-start)?\((.*)$")  # cost.comm's ops


def _bytes_of(text: str) -> int:
    total = 0
    for dt, dims in _SHAPE.findall(text):
        size = _DTYPE_BYTES.get(dt, 1 if dt.startswith("f8") else 4)
        n = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) if dims else 1
        total += size * n
    return total


@dataclass
class HloCollective:
    kind: str           # the cost.comm Collective's name (the kind plans store)
    bytes: int          # the full buffer as in cost.comm (reduce-scatter: its input)
    group_size: int
    line: str


_GROUPS_LIST = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([0-9,]+)\]<=")
# mesh['x'=2,'y'=4] {'y'}, optionally with "device_ids=(…)" (or other attributes) before the braces
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}")


def _group_size(line: str) -> int:
    if m := _GROUPS_LIST.search(line):
        return len([x for x in m.group(1).split(",") if x])
    if m := _GROUPS_IOTA.search(line):
        return int(m.group(1).split(",")[-1])
    if m := _GROUPS_MESH.search(line):
        sizes = dict(re.findall(r"'([^']+)'=([0-9]+)", m.group(1)))
        return int(np.prod([int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2))]))
    if "source_target_pairs" in line:
        return 2
    return 1


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)\s*\(")
_WHILE = re.compile(r"\swhile\(.*body=%?([^,\s]+).*\"known_trip_count\":\{\"n\":\"([0-9]+)\"")


def loop_multipliers(hlo_text: str) -> dict[str, int]:
    """Executions per step of each computation that is a ``while`` body with a known trip
    count (nested loops multiply); other computations run once."""
    calls, current = [], None  # (caller computation, body, trip count)
    for line in hlo_text.splitlines():
        if line and not line.startswith(" ") and (m := _COMPUTATION.match(line)):
            current = m.group(1)
        elif (w := _WHILE.search(line)) and current is not None:
            calls.append((current, w.group(1), int(w.group(2))))
    mult: dict[str, int] = {}
    for _ in range(len(calls) + 1):  # to a fixed point (nesting depth ≤ number of loops)
        for caller, body, n in calls:
            mult[body] = mult.get(caller, 1) * n
    return mult


def hlo_collectives(hlo_text: str) -> list[HloCollective]:
    """Collectives in per-device HLO text, each counted as often as it runs per step (inside
    a while loop: × its known trip count); async pairs are counted once (at -start)."""
    out, mult, current = [], loop_multipliers(hlo_text), None
    for line in hlo_text.splitlines():
        if line and not line.startswith(" ") and (c := _COMPUTATION.match(line)):
            current = c.group(1)
        m = _OP.search(line)
        if not m:
            continue
        result, coll = m.group(1), HLO_OPS[m.group(2)]
        if m.group(3):  # async start: the result tuple also holds the operands; take the last shape(s)
            result = result.split("),")[-1] if result.startswith("((") else result
        g = _group_size(line)
        nbytes = coll.full_bytes(_bytes_of(result), g) * mult.get(current, 1)
        out.append(HloCollective(coll.name, nbytes, g, line.strip()))
    return out


@dataclass
class Validation:
    predicted_bytes: dict[str, float]
    compiled_bytes: dict[str, float]
    predicted_peak_bytes: float
    compiled_peak_bytes: float
    compiled_collectives: list[HloCollective] = field(default_factory=list)

    @property
    def predicted_total_bytes(self) -> float:
        return sum(self.predicted_bytes.values())

    @property
    def compiled_total_bytes(self) -> float:
        return sum(self.compiled_bytes.values())

    def bytes_error(self) -> float:
        p, c = self.predicted_total_bytes, self.compiled_total_bytes
        return abs(p - c) / max(c, 1.0) if (p or c) else 0.0

    def table(self) -> str:
        kinds = sorted(set(self.predicted_bytes) | set(self.compiled_bytes))
        rows = ["| collective | predicted bytes/device | compiled bytes/device |", "|---|---:|---:|"]
        for k in kinds:
            rows.append(f"| {k} | {self.predicted_bytes.get(k, 0):,.0f} | {self.compiled_bytes.get(k, 0):,.0f} |")
        rows.append(f"| total | {self.predicted_total_bytes:,.0f} | {self.compiled_total_bytes:,.0f} |")
        rows.append(f"| peak memory | {self.predicted_peak_bytes:,.0f} | {self.compiled_peak_bytes:,.0f} |")
        return "\n".join(rows)


def validate_plan(plan, fn, *args, devices=None) -> Validation:
    sharded = plan.apply(fn, devices=devices)
    compiled = sharded.lower(*args).compile()
    colls = hlo_collectives(compiled.as_text())
    compiled_bytes: dict[str, float] = {}
    for c in colls:
        compiled_bytes[c.kind] = compiled_bytes.get(c.kind, 0) + c.bytes
    predicted = {k: t.bytes for k, t in plan.predicted.by_kind.items()}
    return Validation(predicted, compiled_bytes, plan.predicted.peak_memory_bytes, compiled_peak_bytes(compiled), colls)


def compiled_peak_bytes(compiled) -> float:
    """Per-device footprint of a compiled program (``memory_analysis()``): XLA:CPU's
    peak_memory_in_bytes leaves out the temporaries; arguments + outputs − aliased + the temp
    allocation (buffers packed with reuse) is what the device holds."""
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes)
    return float(max(getattr(mem, "peak_memory_in_bytes", 0) or 0, total))
