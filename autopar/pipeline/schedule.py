"""Pipeline schedules (GPipe, 1F1B) and an event simulation of them. Pure Python, no JAX.

Model. S stages, B micro-batches. Task F(s, m) / B(s, m) is the forward / backward of
micro-batch m on stage s and takes ``t_fwd[s]`` / ``t_bwd[s]`` seconds. Boundary s→s+1
costs ``t_send[s]`` seconds, for the activation going forward and for its gradient going
back. Dependencies:

    F(s, m)    starts ≥ end F(s−1, m) + t_send[s−1]          (s > 0)
    B(s, m)    starts ≥ end B(s+1, m) + t_send[s]            (s < S−1)
    B(S−1, m)  starts ≥ end F(S−1, m)

Each stage runs one task at a time, in the order ``stage_orders`` gives it, and every task
starts as early as that allows (list scheduling): start = max(end of the stage's previous
task, end of the dependency + send). Orders:

    "gpipe": F(s,0) … F(s,B−1), then B(s,0) … B(s,B−1)  (backwards in micro-batch order)
    "1f1b":  warmup w_s = min(S−s−1, B) forwards, then (F, B) pairs while forwards remain,
             then the remaining backwards (PipeDream-Flush / Megatron non-interleaved 1F1B)

Formulas (checked in tests/test_schedule.py). Uniform stages (t_f, t_b) and no send, both
schedules:

    makespan        = (B + S − 1) · (t_f + t_b)
    bubble_fraction = 1 − Σ busy / (S · makespan) = (S − 1) / (B + S − 1)

With a uniform send c, GPipe gives (B + S − 1)(t_f + t_b) + 2(S − 1)c, which is a lower
bound for any order (the F chain of micro-batch 0, the last stage's B·(t_f + t_b) of work,
the B chain of its last backward); 1F1B can be later because its interleaving waits on
sends in the steady state. Memory: the micro-batches in flight (forward done, backward not
yet) peak at B on every stage for GPipe and at min(S − s, B) on stage s for 1F1B
(``peak_inflight``), which is why 1F1B is preferred at equal makespan.

Interleaved 1F1B (Megatron's virtual pipeline, ``virtual`` = v > 1): the S stages are v·G
model chunks in layer order on G device groups, stage j on group j mod G (so group g holds
chunks g, g + G, …). A group runs one task at a time, of any of its chunks, in the order
``interleaved_orders`` gives (Narayanan et al. 2021, §2.2): forwards walk the chunks in
blocks of G micro-batches (chunk 0 of micro-batches 0..G−1, chunk 1 of the same, …, then the
next G micro-batches), backwards the same with the chunks reversed; group g warms up with
min(2(G − g − 1) + (v − 1)G, vB) forwards, then alternates F and B. B must be a multiple of
G. Uniform chunks (t_f, t_b each, a stage's 1/v) and no send:

    makespan = (v·B + G − 1) · (t_f + t_b),    bubble = (G − 1) / (v·B + G − 1)

the 1F1B bubble over v; the price is more activations held: group 0 peaks at 2(G − 1) + (v −
1)G + 1 chunk micro-batches (``peak_inflight``), G + (G − 1)/v stages' worth against G.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

from autopar.solvers.schedules import SCHEDULES, Schedule  # noqa: F401 (one place for the schedules)

KINDS = ("F", "B")


@dataclass(frozen=True)
class Task:
    """Forward ("F") or backward ("B") of micro-batch ``microbatch`` on stage ``stage``."""
    stage: int
    microbatch: int
    kind: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Task kind must be one of {KINDS}, got {self.kind!r}")
        if self.stage < 0 or self.microbatch < 0:
            raise ValueError(f"Task stage and microbatch must be ≥ 0, got {self.stage=}, {self.microbatch=}")

    def __str__(self) -> str:
        return f"{self.kind}(s={self.stage}, m={self.microbatch})"


@dataclass(frozen=True)
class Timeline:
    """Simulated run. ``events`` lists (task, start, end) device group by group (a group: a
    stage, or with interleaving the stages g, g + G, …), each group's tasks in its execution
    order; ``busy[g]`` is the total task time of group g."""
    events: tuple[tuple[Task, float, float], ...]
    makespan: float
    busy: tuple[float, ...]

    @property
    def num_stages(self) -> int:
        """Rows of the picture: the device groups (the stages, without interleaving)."""
        return len(self.busy)

    @property
    def total_stages(self) -> int:
        """The stages (with interleaving, every chunk of every group)."""
        return max((t.stage for t, _, _ in self.events), default=len(self.busy) - 1) + 1

    def row(self, task: Task) -> int:
        """The device group running ``task``."""
        return task.stage % len(self.busy)

    @property
    def bubble_fraction(self) -> float:
        """1 − Σ busy / (G · makespan): the idle share of the G device groups over the makespan."""
        if self.makespan <= 0:
            return 0.0
        return 1.0 - sum(self.busy) / (self.num_stages * self.makespan)


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer ≥ 1, got {name}={value!r}")


def stage_orders(num_stages: int, num_microbatches: int, schedule: str, virtual: int = 1) -> list[list[Task]]:
    """Per device group, the order in which it runs its tasks under ``schedule`` ("gpipe" or
    "1f1b", see the module docstring); ``virtual`` > 1: interleaved 1F1B of ``num_stages``
    chunks on num_stages / virtual groups (``interleaved_orders``)."""
    _check_count("num_stages", num_stages)
    _check_count("num_microbatches", num_microbatches)
    _check_count("virtual", virtual)
    name = schedule.lower() if isinstance(schedule, str) else schedule
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    name = Schedule(name)
    if virtual > 1:
        if name is not Schedule.ONE_F_ONE_B:
            raise ValueError(f"virtual stages (interleaving) run under the 1f1b schedule, not {schedule!r}")
        if num_stages % virtual:
            raise ValueError(f"{num_stages} stages cannot be {virtual} chunks on each device group: the stage count "
                             "must be a multiple of virtual")
        return interleaved_orders(num_stages // virtual, virtual, num_microbatches)
    S, B = num_stages, num_microbatches
    orders = []
    for s in range(S):
        F = [Task(s, m, "F") for m in range(B)]
        Bw = [Task(s, m, "B") for m in range(B)]
        if name is Schedule.GPIPE:
            orders.append(F + Bw)
            continue
        warmup = min(S - s - 1, B)
        order = F[:warmup]
        for i in range(B - warmup):
            order += [F[warmup + i], Bw[i]]
        order += Bw[B - warmup:]
        orders.append(order)
    return orders


def interleaving_error(num_groups: int, virtual: int, num_microbatches: int) -> str | None:
    """Why ``interleaved_orders`` cannot order this, or None."""
    if virtual > 1 and num_microbatches % num_groups:
        return (f"interleaved 1F1B needs the micro-batch count to be a multiple of the device groups: "
                f"{num_microbatches} micro-batches on {num_groups} groups")
    return None


def interleaved_orders(num_groups: int, virtual: int, num_microbatches: int) -> list[list[Task]]:
    """Interleaved 1F1B: per device group g, its tasks of stages g, g + G, … (module docstring)."""
    _check_count("num_groups", num_groups)
    _check_count("virtual", virtual)
    _check_count("num_microbatches", num_microbatches)
    G, v, B = num_groups, virtual, num_microbatches
    error = interleaving_error(G, v, B)
    if error:
        raise ValueError(error + "; choose a multiple, or no virtual stages")
    total = v * B

    def task(g: int, k: int, kind: str) -> Task:
        chunk = (k // G) % v
        if kind == "B":
            chunk = v - 1 - chunk
        return Task(chunk * G + g, (k // (G * v)) * G + k % G, kind)

    orders = []
    for g in range(G):
        warmup = min(2 * (G - g - 1) + (v - 1) * G, total)
        order = [task(g, k, "F") for k in range(warmup)]
        for i in range(total - warmup):
            order += [task(g, warmup + i, "F"), task(g, i, "B")]
        order += [task(g, k, "B") for k in range(total - warmup, total)]
        orders.append(order)
    return orders

def _per_stage(name: str, values, num_stages: int) -> list[float]:
    out = [float(v) for v in values]
    if len(out) != num_stages:
        raise ValueError(f"{name} needs one value per stage: {len(out)} given, {num_stages} stages")
    if any(not math.isfinite(v) or v < 0 for v in out):
        raise ValueError(f"{name} must be finite and ≥ 0, got {out}")
    return out


def _dependency(task: Task, num_stages: int) -> tuple[Task, int] | None:
    """The task ``task`` waits for and the boundary whose send sits between (−1: none)."""
    s, m = task.stage, task.microbatch
    if task.kind == "F":
        return (Task(s - 1, m, "F"), s - 1) if s > 0 else None
    if s == num_stages - 1:
        return Task(s, m, "F"), -1
    return Task(s + 1, m, "B"), s


def _validate_orders(orders: Sequence[Sequence[Task]]) -> int:
    """The number of stages of ``orders`` (one task list per device group; group g lists the
    tasks of stages g, g + G, …)."""
    G = len(orders)
    if G < 1:
        raise ValueError("orders must hold one task list per stage (device group); got none")
    seen = set()
    for s, order in enumerate(orders):
        for task in order:
            if not isinstance(task, Task):
                raise ValueError(f"orders[{s}] holds {task!r}; expected Task objects")
            if task.stage % G != s:
                raise ValueError(f"{task} is in the order of device group {s} (of {G}); each group lists only its own tasks "
                                 "(stage j on group j mod G)")
            if task in seen:
                raise ValueError(f"{task} appears twice in the orders")
            seen.add(task)
    S = max((t.stage for t in seen), default=G - 1) + 1
    if S % G:
        raise ValueError(f"orders of {G} device groups hold {S} stages: each group must hold as many")
    for task in seen:
        dep = _dependency(task, S)
        if dep is not None and dep[0] not in seen:
            raise ValueError(f"{task} depends on {dep[0]}, which no stage order contains")
    return S


def simulate(orders: Sequence[Sequence[Task]], t_fwd: Sequence[float], t_bwd: Sequence[float],
             t_send: float | Sequence[float] = 0.0) -> Timeline:
    """List-schedule ``orders`` (one task list per device group: per stage, or interleaved)
    with per-stage task times and per-boundary send times (a float: the same on every
    boundary). Raises ValueError when the orders deadlock (a group waits on a task queued
    behind one that waits on it)."""
    S = _validate_orders(orders)
    G = len(orders)
    t_fwd = _per_stage("t_fwd", t_fwd, S)
    t_bwd = _per_stage("t_bwd", t_bwd, S)
    if isinstance(t_send, (int, float)):
        t_send = [float(t_send)] * (S - 1)
    sends = [float(v) for v in t_send]
    if len(sends) != S - 1:
        raise ValueError(f"t_send needs one value per stage boundary: {len(sends)} given, {S - 1} boundaries")
    if any(not math.isfinite(v) or v < 0 for v in sends):
        raise ValueError(f"t_send must be finite and ≥ 0, got {sends}")

    end: dict[Task, float] = {}
    stage_events: list[list[tuple[Task, float, float]]] = [[] for _ in range(G)]
    free = [0.0] * G
    pos = [0] * G
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(G):
            while pos[s] < len(orders[s]):
                task = orders[s][pos[s]]
                dep = _dependency(task, S)
                start = free[s]
                if dep is not None:
                    if dep[0] not in end:
                        break
                    send = sends[dep[1]] if dep[1] >= 0 else 0.0
                    start = max(start, end[dep[0]] + send)
                finish = start + (t_fwd[task.stage] if task.kind == "F" else t_bwd[task.stage])
                end[task] = finish
                free[s] = finish
                stage_events[s].append((task, start, finish))
                pos[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = [f"stage {s} at {orders[s][pos[s]]} (waits for {_dependency(orders[s][pos[s]], S)[0]})"
                     for s in range(G) if pos[s] < len(orders[s])]
            raise ValueError("pipeline orders deadlock: " + "; ".join(stuck)
                             + ". Every task's dependency must be reachable without it")
    events = tuple(e for per_stage in stage_events for e in per_stage)
    busy = tuple(sum(e - b for _, b, e in per_stage) for per_stage in stage_events)
    makespan = max((e for _, _, e in events), default=0.0)
    return Timeline(events=events, makespan=makespan, busy=busy)


def execution_order(timeline: Timeline) -> list[Task]:
    """Every task once, in one global order for a single-threaded driver: by simulated start,
    ties by stage, then F before B, then micro-batch. Ties that a dependency or a stage's own
    order decides (zero-length tasks) follow the dependency, so the order always respects
    both (a topological sort with that priority); it is non-decreasing in start."""
    S = timeline.total_stages
    info = {task: (start, i) for i, (task, start, _) in enumerate(timeline.events)}
    preds: dict[Task, list[Task]] = {task: [] for task in info}
    prev = None
    for task, _, _ in timeline.events:
        if prev is not None and timeline.row(prev) == timeline.row(task):
            preds[task].append(prev)
        prev = task
        dep = _dependency(task, S)
        if dep is not None:
            preds[task].append(dep[0])
    succs: dict[Task, list[Task]] = {task: [] for task in info}
    waiting = {}
    for task, ps in preds.items():
        waiting[task] = len(ps)
        for p in ps:
            succs[p].append(task)

    def key(task: Task):
        return (info[task][0], task.stage, KINDS.index(task.kind), task.microbatch)

    heap = [key(t) + (t.kind,) for t, n in waiting.items() if n == 0]
    heapq.heapify(heap)
    out = []
    while heap:
        start, stage, _, mb, kind = heapq.heappop(heap)
        task = Task(stage, mb, kind)
        out.append(task)
        for nxt in succs[task]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                heapq.heappush(heap, key(nxt) + (nxt.kind,))
    assert len(out) == len(info), "timeline events contain a dependency cycle"
    return out


def peak_inflight(orders: Sequence[Sequence[Task]]) -> list[int]:
    """Per device group, the most micro-batches whose forward has run and backward has not
    (the activations the stage holds): min(S − s, B) for 1F1B, B for GPipe; interleaved,
    chunk micro-batches (group 0: 2(G − 1) + (v − 1)G + 1 when vB allows)."""
    return [int(round(p)) for p in peak_held(orders)]


def stage_peaks(orders: Sequence[Sequence[Task]]) -> dict[int, int]:
    """{stage: the most of its micro-batches in flight at once} (its group's order walked)."""
    live: dict[int, int] = {}
    peak: dict[int, int] = {}
    for order in orders:
        for task in order:
            live[task.stage] = live.get(task.stage, 0) + (1 if task.kind == "F" else -1)
            peak[task.stage] = max(peak.get(task.stage, 0), live[task.stage])
    return peak


def peak_held(orders: Sequence[Sequence[Task]], activation: Sequence[float] | None = None) -> list[float]:
    """Per device group, the most activation bytes it holds at once: Σ over its stages of
    ``activation[stage]`` (default 1 each) × the micro-batches whose forward on that stage has
    run and backward has not — what the group's memory must hold besides its static part."""
    peaks = []
    for order in orders:
        live = peak = 0.0
        for task in order:
            a = 1.0 if activation is None else float(activation[task.stage])
            live += a if task.kind == "F" else -a
            peak = max(peak, live)
        peaks.append(peak)
    return peaks
