"""The answer of ``Plan.explain`` (``autopar.explain``) as typed, frozen values that format
themselves: the leaf's sharding, the cheapest more-split alternatives, and the causes of their
extra cost grouped by source line."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .report import _si, _time


class ExplainError(ValueError):
    """``explain`` cannot answer: unknown leaf, missing function/arguments, other program."""


@dataclass(frozen=True)
class Cause:
    """The equations of one source line whose predicted cost differs between the plan and the
    alternative: their own compute + collectives, plus resharding the values they read (a
    reshard is charged to the equation that reads the value in another layout, so a layout
    change that only moves an all-to-all along a chain of one line nets out there).
    ``delta_s`` = alternative − plan, summed over ``count`` changes."""
    where: str                    # "gpt.py:168 (_attention)"
    primitives: tuple[str, ...]   # primitives there whose cost changed, largest change first
    delta_s: float
    count: int
    item: str                     # the largest single change: "reshard of add (gpt.py:161)'s output into split" …
    plan: str                     # … as it is in the plan …
    forced: str                   # … and in the alternative

    @property
    def what(self) -> str:
        more = "/…" if len(self.primitives) > 3 else ""
        return f"{'/'.join(self.primitives[:3])}{more} at {self.where}"

    def format(self) -> str:
        times = f", {self.count} changes" if self.count > 1 else ""
        return (f"{_signed_time(self.delta_s):>11}  {self.what}{times}\n{'':13}largest: {self.item}\n"
                f"{'':13}  plan: {self.plan}\n{'':13}  alt:  {self.forced}")


@dataclass(frozen=True)
class Alternative:
    """The cheapest plan found with the leaf split over more devices than in the plan."""
    title: str
    leaf_spec: str
    leaf_split_factor: int
    objective_s: float
    extra_time_s: float            # objective_s − the plan's solved objective
    peak_memory_bytes: float
    extra_memory_bytes: float      # peak − the plan's peak (negative: less memory)
    solver_status: str
    costlier: tuple[Cause, ...]    # largest increase first
    cheaper: tuple[Cause, ...]     # largest decrease first
    other_s: float                 # the part of extra_time_s not listed above
    also_changed: tuple[str, ...]  # other input leaves whose sharding differs (path: plan → alt)


    def format(self, plan_objective_s: float) -> list[str]:
        rel = self.extra_time_s / plan_objective_s if plan_objective_s else math.inf
        lines = [f"{self.title} ({self.leaf_spec}, over {self.leaf_split_factor} devices; re-solved with only this "
                 f"leaf forced, solver {self.solver_status}):",
                 f"  predicted time {_signed_time(self.extra_time_s)} ({rel:+.1%}: {_time(self.objective_s)}), "
                 f"peak memory {_signed_bytes(self.extra_memory_bytes)} ({_bytes(self.peak_memory_bytes)})"]
        if self.costlier:
            lines.append("  what makes it expensive (alternative − plan, largest first):")
            lines += ["    " + c.format().replace("\n", "\n    ") for c in self.costlier]
        if self.cheaper:
            lines.append("  what it saves:")
            lines += ["    " + c.format().replace("\n", "\n    ") for c in self.cheaper]
        if self.other_s:
            lines.append(f"  {_signed_time(self.other_s)} in other, smaller changes")
        if self.also_changed:
            lines.append(f"  other inputs the alternative also reshards ({len(self.also_changed)}): "
                         + "; ".join(self.also_changed[:6]) + (" …" if len(self.also_changed) > 6 else ""))
        return lines


@dataclass(frozen=True)
class Explanation:
    leaf: str
    index: int
    shape: tuple[int, ...]
    dtype: str
    spec: str
    split_factor: int              # devices the leaf is split over (1: replicated)
    devices: int
    mesh_shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    objective_s: float             # the plan's solved objective
    peak_memory_bytes: float
    alternative: Alternative | None    # stored more split (may be gathered where used: FSDP-like)
    used_split: Alternative | None = None  # also read split by its consumers, when ``alternative`` gathers it
    note: str = ""                 # why there is no alternative, or caveats
    hint: str = ""
    seconds: float = 0.0           # time explain took

    @property
    def state(self) -> str:
        if self.split_factor == 1:
            return "replicated"
        return "split" if self.split_factor >= self.devices else "partly split"

    def format(self) -> str:
        mesh = f"mesh {self.mesh_shape} axes {self.axis_names}"
        over = "" if self.split_factor == 1 else f" over {self.split_factor} of {self.devices} devices"
        dtype = f" {self.dtype}" if self.dtype else ""
        lines = [f"{self.leaf}  {self.shape}{dtype}: {self.spec} — {self.state}{over} on {mesh}",
                 f"plan: objective {_time(self.objective_s)}, peak memory {_bytes(self.peak_memory_bytes)} per device"]
        for a in (self.alternative, self.used_split):
            if a is not None:
                lines += a.format(self.objective_s)
        if self.note:
            lines.append(self.note)
        if self.hint:
            lines.append("hint: " + self.hint)
        if self.seconds:
            lines.append(f"(explained in {self.seconds:.2f} s)")
        return "\n".join(lines)

    __str__ = format


def _signed_time(s: float) -> str:
    return ("+" if s >= 0 else "−") + _time(abs(s))


def _bytes(x: float) -> str:
    return _si(x, "B")


def _signed_bytes(x: float) -> str:
    return ("+" if x >= 0 else "−") + _bytes(abs(x))
