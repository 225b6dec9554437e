"""``draw_timeline``: the pipeline picture of a simulated ``schedule.Timeline``.

One row per stage, one box per task (forward and backward in two colours, the backward of a
stage that recomputes its activations — ``StagePlan.remat`` "dots" / "full" — in a third:
its box holds the recomputation; the micro-batch number inside when the box is wide enough),
a time axis in µs / ms / s and the bubble fraction in the title. ``.svg`` is written by hand (no dependency); ``.png`` uses matplotlib,
imported only then (``pip install 'autopar[plot]'``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import escape

from .schedule import Timeline

COLORS = {"F": "#4c72b0", "B": "#dd8452", "R": "#c44e52"}
KIND_NAMES = {"F": "forward", "B": "backward", "R": "backward + recompute"}
PLOT_EXTRA = "pip install 'autopar[plot]'"

# SVG geometry (pixels)
_ROW_H, _ROW_GAP, _TOP, _AXIS_H, _PLOT_W, _RIGHT = 26, 6, 44, 40, 900, 20
_CHAR_W = 7.0  # approximate width of a 12px sans-serif character


def _time_unit(makespan: float) -> tuple[str, float]:
    if makespan >= 1.0:
        return "s", 1.0
    if makespan >= 1e-3:
        return "ms", 1e3
    return "µs", 1e6


def _ticks(makespan: float, target: int = 8) -> list[float]:
    """Ticks at 1/2/5 × 10^k seconds covering [0, makespan]."""
    if makespan <= 0:
        return [0.0]
    raw = makespan / target
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    return [i * step for i in range(int(makespan / step + 1e-9) + 1)]


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _title(timeline: Timeline, title: str | None) -> str:
    unit, scale = _time_unit(timeline.makespan)
    stats = (f"makespan {_fmt(timeline.makespan * scale)} {unit} · "
             f"bubble {timeline.bubble_fraction:.1%}")
    return f"{title} — {stats}" if title else f"pipeline timeline — {stats}"


def _labels(timeline: Timeline, stage_labels: Sequence[str] | None) -> list[str]:
    S = timeline.num_stages
    if stage_labels is None:
        return [f"stage {s}" for s in range(S)]
    labels = [str(label) for label in stage_labels]
    if len(labels) != S:
        raise ValueError(f"stage_labels needs one label per stage: {len(labels)} given, {S} stages")
    return labels


def draw_timeline(timeline: Timeline, path, *, stage_labels: Sequence[str] | None = None,
                  title: str | None = None, recompute: Sequence[str] | None = None) -> str:
    """Write the pipeline picture of ``timeline`` to ``path`` (``.svg`` or ``.png``) and
    return the path. ``stage_labels``: one row label per stage (default "stage s"; interleaved:
    per device group, each row holding its stages g, g + G, …); ``recompute``: per stage its
    remat option ("none", "dots", "full"); the backward boxes of the others are drawn as
    "backward + recompute"."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".svg", ".png"):
        raise ValueError(f"draw_timeline writes .svg or .png, got {str(path)!r}")
    labels = _labels(timeline, stage_labels)
    remat = list(recompute) if recompute is not None else ["none"] * timeline.total_stages
    if len(remat) != timeline.total_stages:
        raise ValueError(f"recompute needs one option per stage: {len(remat)} given, {timeline.total_stages} stages")
    kinds = _Kinds(remat)
    if suffix == ".svg":
        Path(path).write_text(_svg(timeline, labels, _title(timeline, title), kinds), encoding="utf-8")
    else:
        _png(timeline, labels, _title(timeline, title), path, kinds)
    return str(path)


class _Kinds:
    """The colour key of each task: "F", "B", or "R" (a backward that recomputes)."""

    def __init__(self, remat: list[str]):
        self.remat = remat

    def __call__(self, task) -> str:
        return "R" if task.kind == "B" and self.remat[task.stage] not in ("none", "") else task.kind

    def legend(self) -> tuple[str, ...]:
        return ("F", "B", "R") if any(r not in ("none", "") for r in self.remat) else ("F", "B")

    def name(self, task) -> str:
        k = self(task)
        return KIND_NAMES[k] + (f" ({self.remat[task.stage]})" if k == "R" else "")


def _svg(timeline: Timeline, labels: list[str], title: str, kinds: _Kinds) -> str:
    S, makespan = timeline.num_stages, timeline.makespan
    unit, scale = _time_unit(makespan)
    left = 16 + _CHAR_W * max(len(label) for label in labels)
    width = left + _PLOT_W + _RIGHT
    height = _TOP + S * (_ROW_H + _ROW_GAP) + _AXIS_H
    span = makespan if makespan > 0 else 1.0

    def x(t: float) -> float:
        return left + _PLOT_W * t / span

    def row_y(s: int) -> float:
        return _TOP + s * (_ROW_H + _ROW_GAP)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="12">',
           f'<rect class="background" x="0" y="0" width="{width:.0f}" height="{height:.0f}" fill="white"/>',
           f'<text class="title" x="{width / 2:.1f}" y="20" text-anchor="middle" font-size="14">'
           f'{escape(title)}</text>']
    # legend
    lx = left
    for kind in kinds.legend():
        out.append(f'<rect class="legend" x="{lx:.1f}" y="28" width="10" height="10" fill="{COLORS[kind]}"/>')
        out.append(f'<text class="legend" x="{lx + 14:.1f}" y="37">{KIND_NAMES[kind]}</text>')
        lx += 20 + _CHAR_W * len(KIND_NAMES[kind])
    for s, label in enumerate(labels):
        y = row_y(s)
        out.append(f'<rect class="row" x="{left:.1f}" y="{y:.1f}" width="{_PLOT_W}" height="{_ROW_H}" fill="#f2f2f2"/>')
        out.append(f'<text class="stage-label" x="{left - 8:.1f}" y="{y + _ROW_H / 2 + 4:.1f}" '
                   f'text-anchor="end">{escape(label)}</text>')
    for task, start, end in timeline.events:
        y = row_y(timeline.row(task))
        x0, x1 = x(start), x(end)
        tip = (f"{kinds.name(task)} · stage {task.stage} · micro-batch {task.microbatch} · "
               f"{_fmt(start * scale)}–{_fmt(end * scale)} {unit}")
        extra = " recompute" if kinds(task) == "R" else ""
        out.append(f'<rect class="task {task.kind}{extra}" x="{x0:.2f}" y="{y:.1f}" '
                   f'width="{max(x1 - x0, 0.0):.2f}" height="{_ROW_H}" fill="{COLORS[kinds(task)]}" stroke="white" '
                   f'stroke-width="0.5"><title>{escape(tip)}</title></rect>')
        text = str(task.microbatch)
        if x1 - x0 >= _CHAR_W * len(text) + 4:
            out.append(f'<text class="microbatch" x="{(x0 + x1) / 2:.2f}" y="{y + _ROW_H / 2 + 4:.1f}" '
                       f'text-anchor="middle" fill="white">{text}</text>')
    axis_y = _TOP + S * (_ROW_H + _ROW_GAP)
    out.append(f'<line class="axis" x1="{left:.1f}" y1="{axis_y:.1f}" x2="{left + _PLOT_W:.1f}" '
               f'y2="{axis_y:.1f}" stroke="black"/>')
    for t in _ticks(makespan):
        xt = x(t)
        out.append(f'<line class="tick" x1="{xt:.1f}" y1="{axis_y:.1f}" x2="{xt:.1f}" y2="{axis_y + 5:.1f}" stroke="black"/>')
        out.append(f'<text class="tick-label" x="{xt:.1f}" y="{axis_y + 18:.1f}" text-anchor="middle">'
                   f'{_fmt(t * scale)}</text>')
    out.append(f'<text class="axis-label" x="{left + _PLOT_W / 2:.1f}" y="{axis_y + 34:.1f}" '
               f'text-anchor="middle">time ({escape(unit)})</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _png(timeline: Timeline, labels: list[str], title: str, path, kinds: _Kinds) -> None:
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as e:
        raise ImportError(f"draw_timeline needs matplotlib for .png output: {PLOT_EXTRA} "
                          f"(or write .svg, which needs nothing)") from e
    S, makespan = timeline.num_stages, timeline.makespan
    unit, scale = _time_unit(makespan)
    fig = Figure(figsize=(12, 1.2 + 0.45 * S), layout="constrained")
    ax = fig.add_subplot()
    for task, start, end in timeline.events:
        x0, w = start * scale, (end - start) * scale
        ax.barh(timeline.row(task), w, left=x0, height=0.8, color=COLORS[kinds(task)], edgecolor="white", linewidth=0.5)
    fig.canvas.draw()  # renderer for measuring the label width
    width_px = ax.get_window_extent().width
    span = makespan * scale if makespan > 0 else 1.0
    for task, start, end in timeline.events:
        text = str(task.microbatch)
        if (end - start) * scale / span * width_px >= 7 * len(text) + 4:
            ax.text((start + end) / 2 * scale, timeline.row(task), text, ha="center", va="center",
                    color="white", fontsize=8)
    ax.set_yticks(range(S), labels)
    ax.set_ylim(S - 0.5, -0.5)
    ax.set_xlim(0, span)
    ax.set_xlabel(f"time ({unit})")
    ax.set_title(title)
    ax.legend(handles=[Patch(color=COLORS[k], label=KIND_NAMES[k]) for k in kinds.legend()],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.savefig(path, dpi=120)
