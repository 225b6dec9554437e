"""Typed values the stage search passes along: a planned stage's cost (``StageCost``), the
cost arrays of the stage DP (``CostArrays``), a chosen stage (``ChosenStage``) and what a set
of chosen stages means for memory and time (``stage_memory``, ``simulate_stages``).

Costs per stage and micro-batch (seconds, bytes per device):

* latency = the intra-op ILP's predicted time of the stage's forward + backward on its best
  logical mesh, plus ``send``: 2·(α + bytes_in / (n_dev·bw)) for the activations coming in and
  their gradients going back (bw, α: the inter-node link when the cluster has several nodes,
  else the intra-node link). Forward/backward split 1 : 2 (``FWD_SHARE``).
* act = the stage's residuals (the values its backward reads from its forward) on one
  device, in the layouts of its plan (``autopar.pipeline.halves``: the runtime runs that
  planned program cut in two, so these are the bytes it keeps per in-flight micro-batch); a
  layer range not planned yet (``StageCoster.activation``) counts the ``jax.vjp`` residuals
  / n_dev, a lower bound.
* static = the ILP's peak for one micro-batch − act, where the ILP charges every parameter
  (1 + a + r)× its bytes (itself, its gradient accumulator and optimizer state; a =
  accumulator bytes per parameter byte, 1, or 2 for bfloat16 parameters accumulated in
  float32, ``inputs.acc_ratio``; r = optimizer-state bytes per parameter byte); ``persist``
  is that parameter part. With ZeRO-1 (``autopar.pipeline.zero``) the ILP charges (1 + a)×
  and the sharded optimizer state is added.
* memory of stage k of S = static + f(S − k)·act, f the schedule's in-flight rule
  (``solvers.schedules.Schedule.inflight``).
* gather = ZeRO-1's all-gather of the updated parameters, once per step after the stage's
  last backward: ``step_time`` = max(schedule makespan, max_k end_k + gather_k), end_k the
  end of stage k's last task. The stage DP, which only knows per-micro-batch latencies,
  sees it spread over the B micro-batches (``entry``: latency + gather / B), so a stage
  takes ZeRO-1 only where it is needed to fit or is free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from autopar.solvers.schedules import Schedule

from .schedule import peak_held, simulate, stage_orders, stage_peaks

FWD_SHARE = 1.0 / 3.0   # forward : backward = 1 : 2 (matmul-dominated layers)


class StageOption(NamedTuple):
    """What a stage may be planned with besides its layout: activation rematerialisation of
    its layers (``autopar.pipeline.remat``) and ZeRO-1 (``autopar.pipeline.zero``)."""
    remat: str = "none"
    zero: bool = False

    def label(self) -> str:
        """"" for the plain option, else e.g. "+dots+zero1"."""
        return ("" if self.remat == "none" else f"+{self.remat}") + ("+zero1" if self.zero else "")


@dataclass(frozen=True)
class StageCost:
    """A layer range planned on a sub-mesh (one micro-batch, per device); ``plan`` None: it
    does not fit (latency ∞)."""
    plan: Any = None            # the stage's intra-op autopar Plan
    latency: float = math.inf   # forward + backward + sends, seconds
    send: float = 0.0           # activations in + their gradients back, seconds
    static: float = 0.0         # bytes besides the in-flight activations
    act: float = 0.0            # activation bytes of one micro-batch
    param_dev: float = 0.0      # parameter bytes
    persist: float = 0.0        # parameters with their accumulators and optimizer state (⊆ static)
    remat: str = "none"         # activation rematerialisation of its layers (``autopar.pipeline.remat``)
    zero: bool = False          # optimizer state sharded over the replicated axes (ZeRO-1)
    optimizer: float = 0.0      # optimizer-state bytes (⊆ persist)
    gather_s: float = 0.0       # ZeRO-1: the parameters' all-gather, seconds per step
    num_microbatches: int = 1   # B the stage was costed for (the DP spreads gather_s over it)
    memory_free: bool = False   # no mesh's solve depended on the budget (``autopar.pipeline.reuse``)
    held: float = 0.0           # other micro-batches' residual bytes its ILP's peak counted (planned in flight)

    @property
    def option(self) -> StageOption:
        return StageOption(self.remat, self.zero)

    @property
    def dp_latency(self) -> float:
        """Latency per micro-batch as the stage DP sees it: with the per-step all-gather's share."""
        return self.latency + self.gather_s / self.num_microbatches

    @property
    def fits(self) -> bool:
        return self.plan is not None

    def memory(self, inflight: int) -> float:
        return self.static + inflight * self.act


INFEASIBLE = StageCost()


@dataclass(frozen=True)
class ChosenStage:
    start: int                  # layers [start, end)
    end: int
    submesh: tuple[int, int]    # (nodes, devices per node)
    cost: StageCost


@dataclass(frozen=True, eq=False)
class CostArrays:
    """Per (layer range, sub-mesh) — shape (L, L+1, #sub-meshes), or (V, L, L+1, #) with V cost
    variants — the stage DP's latency, static memory and activation memory."""
    latency: np.ndarray
    memory: np.ndarray
    activation: np.ndarray

    @classmethod
    def empty(cls, num_layers: int, num_shapes: int) -> "CostArrays":
        lat = np.full((num_layers, num_layers + 1, num_shapes), np.inf)
        return cls(lat, np.zeros_like(lat), np.zeros_like(lat))

    def set(self, a: int, b: int, s: int, value: tuple[float, float, float]) -> None:
        self.latency[a, b, s], self.memory[a, b, s], self.activation[a, b, s] = value


def entry(c: StageCost) -> tuple[float, float, float]:
    """A stage cost as the stage DP sees it: (latency, static memory, activations)."""
    return c.dp_latency, c.static, c.act


class Sums:
    """Running (latency, static, activation) of consecutive single-layer plans as one stage:
    sends between layers inside the stage dropped; static = every layer's parameter part
    (parameters, accumulators, optimizer state stay all step) + the largest other part
    (a layer's temporaries are live one layer at a time)."""

    def __init__(self):
        self.t, self.persist, self.transient, self.a, self.n = 0.0, 0.0, 0.0, 0.0, 0

    def add(self, c: StageCost) -> tuple[float, float, float]:
        self.t += c.dp_latency - (c.send if self.n else 0.0)
        self.persist += c.persist
        self.transient = max(self.transient, c.static - c.persist)
        self.a += c.act
        self.n += 1
        return self.t, self.persist + self.transient, self.a


def range_sums(costs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``Sums`` of every range at once: (latency, static, activations), each (L, L) with entry
    [i, j − 1] the sums of ``costs[i:j]`` (below the diagonal: 0) — the same floating-point
    operations in the same order as adding them one by one (``cumulative``)."""
    lat = np.array([c.dp_latency for c in costs], dtype=np.float64)
    send = np.array([c.send for c in costs], dtype=np.float64)
    persist = np.array([c.persist for c in costs], dtype=np.float64)
    transient = np.array([c.static - c.persist for c in costs], dtype=np.float64)
    act = np.array([c.act for c in costs], dtype=np.float64)
    t = cumulative(lat - send, first=lat)
    n = len(costs)
    # (the largest transient part so far, from 0.0 as ``Sums`` starts)
    top = np.maximum.accumulate(np.triu(np.broadcast_to(transient, (n, n))), axis=1)
    return t, cumulative(persist) + top, cumulative(act)


def cumulative(x, first=None, skip: int = 0) -> np.ndarray:
    """(L, L): entry [i, j'] = x[i + skip] + … + x[j'] summed left to right from 0 (``first[i]``
    in place of x[i]; 0 where j' < i + skip) — what adding them one by one gives, bit for bit
    (``np.cumsum`` along a row is sequential, and 0.0 + a = a)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    m = np.triu(np.broadcast_to(x, (n, n)), skip)
    if first is not None:
        m[np.arange(n), np.arange(n)] = first
    return np.cumsum(m, axis=1)


def group_static(costs: list[StageCost]) -> float:
    """The static bytes of stages sharing a device group (interleaving): every stage's
    parameter part, which stays all step, and the largest other part (one runs at a time)."""
    return sum(c.persist for c in costs) + max(c.static - c.persist for c in costs)


def stage_memory(chosen: list[ChosenStage], schedule: str, num_microbatches: int,
                 virtual: int = 1) -> list[tuple[int, float]]:
    """(in-flight micro-batches, bytes per device) of each stage; interleaved (``virtual`` >
    1), the bytes are its device group's: the group's stages' static parts
    (``group_static``) and the most activations they hold at once on the simulated order."""
    S, rule = len(chosen), Schedule(schedule)
    if virtual == 1:
        return [(rule.inflight(S - k, num_microbatches), c.cost.memory(rule.inflight(S - k, num_microbatches)))
                for k, c in enumerate(chosen)]
    orders = stage_orders(S, num_microbatches, schedule, virtual)
    G, held = len(orders), peak_held(orders, [c.cost.act for c in chosen])
    group = [group_static([c.cost for c in chosen[g::G]]) + held[g] for g in range(G)]
    peaks = stage_peaks(orders)
    return [(peaks[k], group[k % G]) for k in range(S)]


def simulate_stages(chosen: list[ChosenStage], schedule: str, num_microbatches: int, virtual: int = 1):
    """The schedule's timeline (``autopar.pipeline.schedule.simulate``) of these stages
    (``virtual`` > 1: interleaved on len(chosen) / virtual device groups)."""
    t = [c.cost.latency - c.cost.send for c in chosen]
    return simulate(stage_orders(len(chosen), num_microbatches, schedule, virtual), [x * FWD_SHARE for x in t],
                    [x * (1 - FWD_SHARE) for x in t], [c.cost.send / 2 for c in chosen[1:]])


def stage_ends(timeline) -> list[float]:
    """When each stage's last task ends in ``timeline``."""
    ends = [0.0] * timeline.total_stages
    for task, _, end in timeline.events:
        ends[task.stage] = max(ends[task.stage], end)
    return ends


def chosen_step(chosen: list[ChosenStage], schedule: str, num_microbatches: int, virtual: int = 1) -> float:
    """The predicted step of these stages: their simulated schedule, with ZeRO-1's all-gathers."""
    return step_time(simulate_stages(chosen, schedule, num_microbatches, virtual), [c.cost.gather_s for c in chosen])


def step_time(timeline, gather_s) -> float:
    """The step: the schedule's makespan, or later where a stage's per-step all-gather
    (``gather_s[k]``, ZeRO-1) after its last task ends after it."""
    return max([timeline.makespan] + [e + g for e, g in zip(stage_ends(timeline), gather_s)])
