"""Pipeline schedules (autopar/schedule.py) and their picture (autopar/timeline.py): analytic
makespans, dependency + tightness properties on seeded random instances, memory peaks,
driver order, errors, SVG/PNG output."""
from __future__ import annotations

import ast
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from autopar.pipeline.schedule import (SCHEDULES, Schedule, Task, Timeline, execution_order, peak_inflight, simulate,
                              stage_orders)
from autopar.pipeline.timeline import draw_timeline

SIZES = [(1, 1), (1, 4), (2, 1), (2, 5), (4, 2), (4, 4), (4, 8), (3, 16), (8, 3), (8, 32)]
SVG_NS = "{http://www.w3.org/2000/svg}"


def order_str(order: list[Task]) -> str:
    return " ".join(f"{t.kind}{t.microbatch}" for t in order)


def dependency_end(task: Task, ends: dict[Task, float], S: int, sends: list[float]) -> float:
    """The earliest start the dependencies allow (0 for F on stage 0)."""
    s, m = task.stage, task.microbatch
    if task.kind == "F":
        return ends[Task(s - 1, m, "F")] + sends[s - 1] if s > 0 else 0.0
    if s == S - 1:
        return ends[Task(s, m, "F")]
    return ends[Task(s + 1, m, "B")] + sends[s]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("S,B", SIZES, ids=[f"S{S}-B{B}" for S, B in SIZES])
def test_uniform_makespan_and_bubble(schedule, S, B):
    t_f, t_b = 1.5, 2.75  # exact in binary: sums are exact
    tl = simulate(stage_orders(S, B, schedule), [t_f] * S, [t_b] * S)
    assert tl.makespan == (B + S - 1) * (t_f + t_b)
    assert tl.bubble_fraction == pytest.approx((S - 1) / (B + S - 1), abs=1e-12)
    assert tl.busy == tuple([B * (t_f + t_b)] * S)
    assert len(tl.events) == 2 * S * B


@pytest.mark.parametrize("S,B", SIZES, ids=[f"S{S}-B{B}" for S, B in SIZES])
@pytest.mark.parametrize("t_f,t_b", [(1.0, 2.0), (3.0, 1.0), (0.25, 0.25)])
def test_1f1b_matches_gpipe_uniform(S, B, t_f, t_b):
    gpipe = simulate(stage_orders(S, B, "gpipe"), [t_f] * S, [t_b] * S)
    one_f_one_b = simulate(stage_orders(S, B, "1f1b"), [t_f] * S, [t_b] * S)
    assert one_f_one_b.makespan == gpipe.makespan


@pytest.mark.parametrize("S,B", [(2, 3), (4, 8), (5, 2)])
def test_uniform_send(S, B):
    """GPipe reaches the lower bound (B+S−1)(t_f+t_b) + 2(S−1)c; 1F1B never beats it."""
    t_f, t_b, c = 1.0, 2.0, 0.5
    bound = (B + S - 1) * (t_f + t_b) + 2 * (S - 1) * c
    assert simulate(stage_orders(S, B, "gpipe"), [t_f] * S, [t_b] * S, c).makespan == bound
    assert simulate(stage_orders(S, B, "1f1b"), [t_f] * S, [t_b] * S, [c] * (S - 1)).makespan >= bound


def test_1f1b_orders():
    orders = stage_orders(4, 6, "1f1b")
    assert order_str(orders[0]) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5"
    assert order_str(orders[2]) == "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 B5"
    assert order_str(orders[3]) == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5"
    assert order_str(stage_orders(4, 2, "1f1b")[0]) == "F0 F1 B0 B1"  # warmup capped at B
    assert order_str(stage_orders(2, 3, "gpipe")[1]) == "F0 F1 F2 B0 B1 B2"
    assert stage_orders(2, 3, "1F1B") == stage_orders(2, 3, "1f1b")


@pytest.mark.parametrize("S,B", SIZES, ids=[f"S{S}-B{B}" for S, B in SIZES])
def test_peak_inflight(S, B):
    assert peak_inflight(stage_orders(S, B, "1f1b")) == [min(S - s, B) for s in range(S)]
    assert peak_inflight(stage_orders(S, B, "gpipe")) == [B] * S
    for schedule in Schedule:  # the simulated task order holds what the planners' one rule says
        assert peak_inflight(stage_orders(S, B, schedule.value)) == [schedule.inflight(S - s, B) for s in range(S)]


@pytest.mark.parametrize("seed", range(50))
def test_random_instance_dependencies_and_tightness(seed):
    rng = np.random.default_rng(seed)
    S, B = int(rng.integers(1, 7)), int(rng.integers(1, 9))
    schedule = SCHEDULES[seed % 2]
    t_fwd, t_bwd = rng.uniform(0.1, 2.0, S), rng.uniform(0.1, 4.0, S)
    if seed % 5 == 0:  # zero-length tasks: ties everywhere for execution_order
        t_fwd[rng.integers(S)] = 0.0
        t_bwd[rng.integers(S)] = 0.0
    sends = [float(v) for v in rng.uniform(0.0, 1.0, S - 1)]
    t_send = sends
    if seed % 3 == 0:  # one float for every boundary
        sends, t_send = [0.3] * (S - 1), 0.3
    orders = stage_orders(S, B, schedule)
    tl = simulate(orders, t_fwd, t_bwd, t_send)

    ends = {task: end for task, _, end in tl.events}
    assert len(ends) == len(tl.events) == 2 * S * B
    # each stage runs its own order, one task at a time, every task as early as allowed
    for s in range(S):
        events = [e for e in tl.events if e[0].stage == s]
        assert [task for task, _, _ in events] == orders[s]
        prev_end = 0.0
        for task, start, end in events:
            assert end == start + (t_fwd[s] if task.kind == "F" else t_bwd[s])
            dep = dependency_end(task, ends, S, sends)
            assert start >= prev_end and start >= dep
            assert start == max(prev_end, dep), f"{task} starts late"
            prev_end = end
    assert tl.makespan == max(ends.values())
    assert tl.busy == pytest.approx([B * (t_fwd[s] + t_bwd[s]) for s in range(S)])
    assert 0.0 <= tl.bubble_fraction < 1.0

    order = execution_order(tl)
    assert sorted(order, key=lambda t: (t.stage, t.microbatch, t.kind)) == \
        sorted(ends, key=lambda t: (t.stage, t.microbatch, t.kind))
    position = {task: i for i, task in enumerate(order)}
    starts = {task: start for task, start, _ in tl.events}
    assert [starts[t] for t in order] == sorted(starts[t] for t in order)
    for task in order:
        s, m = task.stage, task.microbatch
        deps = []
        if task.kind == "F" and s > 0:
            deps.append(Task(s - 1, m, "F"))
        if task.kind == "B":
            deps.append(Task(s, m, "F"))
            if s < S - 1:
                deps.append(Task(s + 1, m, "B"))
        assert all(position[d] < position[task] for d in deps), task
    for s in range(S):  # the driver order keeps each stage's own order
        assert [t for t in order if t.stage == s] == orders[s]


def test_execution_order_zero_times():
    """All times zero: everything starts at 0, only dependencies decide the order."""
    S, B = 3, 2
    tl = simulate(stage_orders(S, B, "1f1b"), [0.0] * S, [0.0] * S)
    order = execution_order(tl)
    assert tl.makespan == 0.0 and tl.bubble_fraction == 0.0
    assert order.index(Task(2, 0, "F")) < order.index(Task(2, 0, "B")) < order.index(Task(1, 0, "B"))
    assert order.index(Task(0, 0, "F")) < order.index(Task(1, 0, "F")) < order.index(Task(2, 0, "F"))


def test_forward_only_orders():
    tl = simulate([[Task(0, 0, "F"), Task(0, 1, "F")], [Task(1, 0, "F"), Task(1, 1, "F")]], [1, 1], [9, 9], 0.5)
    assert tl.makespan == 3.5
    assert peak_inflight([[Task(0, 0, "F"), Task(0, 1, "F")]]) == [2]


@pytest.mark.parametrize("args,match", [
    ((2, 4, "pipedream"), "allowed: gpipe, 1f1b"),
    ((0, 4, "gpipe"), "num_stages"),
    ((2, 0, "1f1b"), "num_microbatches"),
    ((2.0, 4, "gpipe"), "num_stages"),
    ((True, 4, "gpipe"), "num_stages"),
], ids=["schedule", "stages", "microbatches", "float", "bool"])
def test_stage_orders_errors(args, match):
    with pytest.raises(ValueError, match=match):
        stage_orders(*args)


def test_simulate_errors():
    orders = stage_orders(2, 2, "1f1b")
    with pytest.raises(ValueError, match="one value per stage"):
        simulate(orders, [1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="≥ 0"):
        simulate(orders, [1.0, -1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="stage boundary"):
        simulate(orders, [1.0, 1.0], [1.0, 1.0], [0.1, 0.1])
    with pytest.raises(ValueError, match="deadlock"):  # B before its own F on stage 0
        simulate([[Task(0, 0, "B"), Task(0, 0, "F")], [Task(1, 0, "F"), Task(1, 0, "B")]], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="deadlock"):  # stage 0 waits on mb 1, stage 1 on mb 0
        simulate([[Task(0, 0, "F"), Task(0, 1, "B"), Task(0, 1, "F"), Task(0, 0, "B")],
                  [Task(1, 1, "F"), Task(1, 1, "B"), Task(1, 0, "F"), Task(1, 0, "B")]], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="no stage order contains"):
        simulate([[Task(0, 0, "F")], [Task(1, 0, "F"), Task(1, 1, "F")]], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="order of stage 1"):
        simulate([[Task(0, 0, "F")], [Task(0, 1, "F")]], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="twice"):
        simulate([[Task(0, 0, "F"), Task(0, 0, "F")]], [1], [1])
    with pytest.raises(ValueError, match="kind"):
        Task(0, 0, "X")


def small_timeline(S=3, B=4) -> Timeline:
    return simulate(stage_orders(S, B, "1f1b"), [2e-3] * S, [4e-3] * S, 1e-4)


def test_svg(tmp_path: Path):
    S, B = 3, 4
    labels = [f"stage {s} · devices {4 * s}-{4 * s + 3} (2×2) <&>" for s in range(S)]
    path = draw_timeline(small_timeline(S, B), tmp_path / "pipe.svg", stage_labels=labels, title="GPT & 1F1B")
    assert path == str(tmp_path / "pipe.svg")
    root = ET.parse(path).getroot()
    rects = [r for r in root.iter(f"{SVG_NS}rect") if r.get("class", "").startswith("task")]
    assert len(rects) == 2 * S * B
    assert {r.get("class") for r in rects} == {"task F", "task B"}
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG_NS}text")]
    assert all(label in texts for label in labels)
    title = next(t for t in texts if t.startswith("GPT & 1F1B"))
    assert "bubble" in title and "%" in title
    assert "time (ms)" in texts
    assert sum(t.isdigit() for t in texts) > S * B  # micro-batch numbers and ticks


def test_svg_shows_recompute(tmp_path: Path):
    """A stage that recomputes its activations draws its backward boxes as "backward +
    recompute" (class, colour, tooltip, legend); stages without remat keep plain backwards."""
    S, B = 3, 2
    path = draw_timeline(small_timeline(S, B), tmp_path / "r.svg", recompute=["none", "full", "dots"])
    root = ET.parse(path).getroot()
    rects = [r for r in root.iter(f"{SVG_NS}rect") if r.get("class", "").startswith("task")]
    by_stage = {}
    for r in rects:
        tip = "".join(r.find(f"{SVG_NS}title").itertext())
        by_stage.setdefault(int(tip.split("stage ")[1].split(" ")[0]), []).append((r.get("class"), tip, r.get("fill")))
    assert {c for c, _, _ in by_stage[0]} == {"task F", "task B"}
    assert {c for c, _, _ in by_stage[1]} == {"task F", "task B recompute"}
    assert any("backward + recompute (full)" in t for _, t, _ in by_stage[1])
    assert any("backward + recompute (dots)" in t for _, t, _ in by_stage[2])
    assert len({f for c, _, f in rects_of(by_stage) if "recompute" in c}) == 1
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG_NS}text")]
    assert "backward + recompute" in texts
    plain = ET.parse(draw_timeline(small_timeline(S, B), tmp_path / "p.svg")).getroot()
    assert "backward + recompute" not in ["".join(t.itertext()) for t in plain.iter(f"{SVG_NS}text")]
    with pytest.raises(ValueError, match="one option per stage"):
        draw_timeline(small_timeline(S, B), tmp_path / "x.svg", recompute=["full"])


def rects_of(by_stage):
    return [x for items in by_stage.values() for x in items]


def test_png(tmp_path: Path):
    path = draw_timeline(small_timeline(), tmp_path / "pipe.png", title="1F1B")
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_draw_errors(tmp_path: Path, monkeypatch):
    tl = small_timeline()
    with pytest.raises(ValueError, match=r"\.svg or \.png"):
        draw_timeline(tl, tmp_path / "pipe.pdf")
    with pytest.raises(ValueError, match="one label per stage"):
        draw_timeline(tl, tmp_path / "pipe.svg", stage_labels=["a"])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'autopar\[plot\]'"):
        draw_timeline(tl, tmp_path / "pipe.png")


def test_no_jax_imports():
    root = Path(__file__).resolve().parents[1] / "autopar"
    for name in ("pipeline/schedule.py", "pipeline/timeline.py"):
        tree = ast.parse((root / name).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom)}
        assert not imported & {"jax", "jaxlib"}, name
