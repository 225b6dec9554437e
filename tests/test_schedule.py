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


def dependencies(task: Task, S: int) -> list[Task]:
    """The tasks ``task`` must follow: its forward's predecessor, or its own forward and its
    backward's successor."""
    s, m = task.stage, task.microbatch
    if task.kind == "F":
        return [Task(s - 1, m, "F")] if s > 0 else []
    return [Task(s, m, "F")] + ([Task(s + 1, m, "B")] if s < S - 1 else [])


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
        assert all(position[d] < position[task] for d in dependencies(task, S)), task
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
    with pytest.raises(ValueError, match="order of device group 1"):
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


# ---- interleaved 1F1B (Megatron virtual pipeline): G device groups × v chunks, stage j on group j % G

from autopar.pipeline.schedule import interleaved_orders, interleaving_error, peak_held, stage_peaks  # noqa: E402

INTERLEAVED = [(2, 2, 2), (2, 2, 4), (4, 2, 8), (4, 3, 8), (4, 4, 16), (8, 2, 16), (3, 2, 6), (1, 3, 2)]


def chunk_str(order: list[Task]) -> str:
    return " ".join(f"{t.kind}{t.stage}.{t.microbatch}" for t in order)


@pytest.mark.parametrize("G,v,B", INTERLEAVED, ids=[f"G{G}-v{v}-B{B}" for G, v, B in INTERLEAVED])
def test_interleaved_uniform_makespan_and_bubble(G, v, B):
    t_f, t_b = 1.5, 2.75  # exact in binary
    S = G * v
    orders = stage_orders(S, B, "1f1b", virtual=v)
    assert orders == interleaved_orders(G, v, B) and len(orders) == G
    tl = simulate(orders, [t_f] * S, [t_b] * S)
    assert (tl.num_stages, tl.total_stages) == (G, S)
    assert tl.makespan == (v * B + G - 1) * (t_f + t_b)
    assert tl.bubble_fraction == pytest.approx((G - 1) / (v * B + G - 1), abs=1e-12)
    assert tl.busy == tuple([v * B * (t_f + t_b)] * G)
    assert len(tl.events) == 2 * S * B
    assert all(tl.row(task) == task.stage % G for task, _, _ in tl.events)
    # plain 1F1B on G stages of v chunks each: same work, the bubble (idle time) divided by v
    plain = simulate(stage_orders(G, B, "1f1b"), [v * t_f] * G, [v * t_b] * G)
    work = v * B * (t_f + t_b)
    assert plain.makespan == (B + G - 1) * v * (t_f + t_b)
    assert tl.makespan - work == pytest.approx((plain.makespan - work) / v, abs=1e-12)
    assert tl.bubble_fraction <= plain.bubble_fraction


def test_interleaved_virtual_1_is_plain():
    assert stage_orders(4, 6, "1f1b", virtual=1) == stage_orders(4, 6, "1f1b")
    assert interleaving_error(3, 1, 4) is None and interleaving_error(2, 2, 4) is None


def test_interleaved_peaks():
    """Group g peaks at min(2(G−g−1) + (v−1)G + 1, vB) chunk micro-batches (every B multiple of
    G); with activation 1/v per chunk, group 0 holds G + (G−1)/v stages' worth once B ≥ 2G."""
    for G in range(1, 7):
        for v in range(2, 5):
            S = G * v
            for B in range(G, 4 * G + 1, G):
                orders = stage_orders(S, B, "1f1b", virtual=v)
                peaks = peak_inflight(orders)
                assert peaks == [min(2 * (G - g - 1) + (v - 1) * G + 1, v * B) for g in range(G)], (G, v, B)
                assert peak_held(orders, [1.0] * S) == peaks == peak_held(orders)
                held0 = peak_held(orders, [1.0 / v] * S)[0]
                if B >= 2 * G:
                    assert held0 == pytest.approx(G + (G - 1) / v, abs=1e-12), (G, v, B)
                else:
                    assert held0 <= G + (G - 1) / v + 1e-12
                assert peak_held(orders, {s: 1.0 / v for s in range(S)})[0] == held0  # dict activation
                sp = stage_peaks(orders)
                assert sorted(sp) == list(range(S)) and sp[S - 1] == 1
                assert all(1 <= sp[s] <= B for s in range(S))
                for g in range(G):  # a group's live total never exceeds the sum of its stages' peaks
                    assert peaks[g] <= sum(sp[s] for s in range(g, S, G))
    assert stage_peaks(stage_orders(4, 6, "1f1b")) == {s: min(4 - s, 6) for s in range(4)}


def test_interleaved_orders_megatron():
    G, v, B = 2, 2, 4
    orders = stage_orders(G * v, B, "1f1b", virtual=v)
    # hand check, group 0 (stages 0, 2): forwards chunk 0 of mb 0,1, chunk 1 of mb 0,1, chunk 0 of
    # mb 2,3, …; backwards chunk 1 first; warmup min(2(G−0−1) + (v−1)G, vB) = 4, then F/B pairs
    assert chunk_str(orders[0]) == "F0.0 F0.1 F2.0 F2.1 F0.2 B2.0 F0.3 B2.1 F2.2 B0.0 F2.3 B0.1 B2.2 B2.3 B0.2 B0.3"
    # group 1 (stages 1, 3): warmup (v−1)G = 2
    assert chunk_str(orders[1]) == "F1.0 F1.1 F3.0 B3.0 F3.1 B3.1 F1.2 B1.0 F1.3 B1.1 F3.2 B3.2 F3.3 B3.3 B1.2 B1.3"
    # B = G: warmup covers the group's forwards except on the last group
    assert chunk_str(stage_orders(6, 3, "1f1b", virtual=2)[0]) == \
        "F0.0 F0.1 F0.2 F3.0 F3.1 F3.2 B3.0 B3.1 B3.2 B0.0 B0.1 B0.2"
    for G, v, B in INTERLEAVED:
        S = G * v
        orders = interleaved_orders(G, v, B)
        for g, order in enumerate(orders):
            expected = {Task(s, m, k) for s in range(g, S, G) for m in range(B) for k in ("F", "B")}
            assert len(order) == len(expected) == 2 * v * B and set(order) == expected
            fwd = [t for t in order if t.kind == "F"]
            bwd = [t for t in order if t.kind == "B"]
            for k, (f, b) in enumerate(zip(fwd, bwd)):
                chunk, mb = (k // G) % v, (k // (G * v)) * G + k % G
                assert (f.stage, f.microbatch) == (chunk * G + g, mb)
                assert (b.stage, b.microbatch) == ((v - 1 - chunk) * G + g, mb)
            warmup = min(2 * (G - g - 1) + (v - 1) * G, v * B)
            assert all(t.kind == "F" for t in order[:warmup])
            steady = order[warmup:warmup + 2 * (v * B - warmup)]
            assert "".join(t.kind for t in steady) == "FB" * (v * B - warmup)
            assert all(t.kind == "B" for t in order[warmup + len(steady):])


@pytest.mark.parametrize("seed", range(30))
def test_interleaved_random_instances(seed):
    rng = np.random.default_rng(1000 + seed)
    G, v = int(rng.integers(1, 5)), int(rng.integers(2, 5))
    B, S = G * int(rng.integers(1, 4)), G * v
    t_fwd, t_bwd = rng.uniform(0.1, 2.0, S), rng.uniform(0.1, 4.0, S)
    if seed % 5 == 0:  # zero-length tasks: ties for execution_order
        t_fwd[rng.integers(S)] = 0.0
        t_bwd[rng.integers(S)] = 0.0
    sends = [float(x) for x in rng.uniform(0.0, 1.0, S - 1)]
    t_send = sends
    if seed % 3 == 0:
        sends, t_send = [0.3] * (S - 1), 0.3
    orders = stage_orders(S, B, "1f1b", virtual=v)
    tl = simulate(orders, t_fwd, t_bwd, t_send)  # no deadlock
    assert (tl.num_stages, tl.total_stages) == (G, S)

    ends = {task: end for task, _, end in tl.events}
    assert len(ends) == len(tl.events) == 2 * S * B
    for g in range(G):  # each group: its own order, one task at a time, each task as early as allowed
        events = [e for e in tl.events if e[0].stage % G == g]
        assert [task for task, _, _ in events] == orders[g]
        assert all(tl.row(task) == g for task, _, _ in events)
        prev_end = 0.0
        for task, start, end in events:
            assert end == start + (t_fwd[task.stage] if task.kind == "F" else t_bwd[task.stage])
            dep = dependency_end(task, ends, S, sends)
            assert start == max(prev_end, dep), f"{task} starts late"
            prev_end = end
    assert tl.makespan == max(ends.values())
    assert tl.busy == pytest.approx([B * sum(t_fwd[s] + t_bwd[s] for s in range(g, S, G)) for g in range(G)])
    assert 0.0 <= tl.bubble_fraction < 1.0

    order = execution_order(tl)
    assert len(order) == len(set(order)) == len(ends) and set(order) == set(ends)
    position = {task: i for i, task in enumerate(order)}
    starts = {task: start for task, start, _ in tl.events}
    assert [starts[t] for t in order] == sorted(starts.values())
    for task in order:
        assert all(position[d] < position[task] for d in dependencies(task, S)), task
    for g in range(G):  # the driver order keeps each group's own order
        assert [t for t in order if t.stage % G == g] == orders[g]


def test_interleaved_no_deadlock_sweep():
    for G in range(1, 7):
        for v in range(2, 5):
            for B in range(G, 3 * G + 1, G):
                S = G * v
                tl = simulate(stage_orders(S, B, "1f1b", virtual=v), [1.0] * S, [2.0] * S, 0.5)
                assert len(tl.events) == 2 * S * B


def test_interleaved_errors():
    with pytest.raises(ValueError, match="1f1b"):
        stage_orders(4, 4, "gpipe", virtual=2)
    with pytest.raises(ValueError, match="multiple of virtual"):
        stage_orders(6, 4, "1f1b", virtual=4)
    with pytest.raises(ValueError, match="virtual"):
        stage_orders(4, 4, "1f1b", virtual=0)
    with pytest.raises(ValueError, match="virtual"):
        stage_orders(4, 4, "1f1b", virtual=2.0)
    with pytest.raises(ValueError, match="multiple"):
        stage_orders(4, 3, "1f1b", virtual=2)  # G = 2, B = 3
    with pytest.raises(ValueError, match="multiple"):
        interleaved_orders(3, 2, 4)
    assert "multiple" in interleaving_error(2, 2, 3)
    orders = [list(o) for o in stage_orders(4, 2, "1f1b", virtual=2)]
    orders[1].append(orders[0].pop(orders[0].index(Task(2, 0, "B"))))  # stage 2's task on group 1
    with pytest.raises(ValueError, match="only its own tasks"):
        simulate(orders, [1.0] * 4, [1.0] * 4)
    with pytest.raises(ValueError, match="each group must hold as many"):  # 3 stages on 2 groups
        simulate([[Task(0, 0, "F"), Task(2, 0, "F")], [Task(1, 0, "F")]], [1.0] * 3, [1.0] * 3)
    with pytest.raises(ValueError, match="one value per stage"):  # per stage, not per group
        simulate(stage_orders(4, 2, "1f1b", virtual=2), [1.0] * 2, [1.0] * 2)
    with pytest.raises(ValueError, match="stage boundary"):  # per stage boundary, not per group boundary
        simulate(stage_orders(4, 2, "1f1b", virtual=2), [1.0] * 4, [1.0] * 4, [0.1])
