"""Stage-partitioning DP (solvers/stage_dp.py) against brute force on seeded random instances."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from autopar.solvers.stage_brute import brute_force
from autopar.solvers.stage_dp import (StageInfeasibleError, StageProblem, StageSolution, solve_stages,
                                      submesh_shapes)


def random_instance(seed: int, *, memory: str | None = None) -> StageProblem:
    """Latencies and memories are multiples of 1/4 (exact sums, so ties are exact and the
    tie-break is tested too); ~10% infinite latencies; memory None/'loose'/'binding'/'tight'."""
    rng = np.random.default_rng(seed)
    L, N, M = int(rng.integers(1, 7)), int(rng.choice([1, 2])), int(rng.choice([2, 4]))
    B, schedule = int(rng.choice([1, 4, 8])), str(rng.choice(["1f1b", "gpipe"]))
    shapes = submesh_shapes(N, M)
    work = rng.integers(1, 9, L)
    lat = np.full((L, L + 1, len(shapes)), np.inf)
    mem, act = np.zeros_like(lat), np.zeros_like(lat)
    for i in range(L):
        for j in range(i + 1, L + 1):
            for s, (n, m) in enumerate(shapes):
                d = n * m
                eff = rng.uniform(0.25, 0.9) ** np.log2(d)  # poor scaling: pipelines pay off
                lat[i, j, s] = np.round(4 * work[i:j].sum() / (d * eff) + rng.integers(0, 3)) / 4
                mem[i, j, s] = np.round(4 * work[i:j].sum() * 8 / d) / 4 + rng.integers(0, 3)
                act[i, j, s] = rng.integers(0, 4)
    lat[rng.random(lat.shape) < 0.1] = np.inf
    p = StageProblem(L, N, M, lat, mem, act, num_microbatches=B, schedule=schedule)
    if memory is None:
        return p
    try:
        brute_force(StageProblem(L, N, M, lat, mem, act, num_microbatches=B, schedule=schedule,
                                 device_memory=-1.0))
    except StageInfeasibleError as e:
        lo = e.min_device_memory
    if not math.isfinite(lo):
        return p
    limit = {"loose": lo * 1.5 + 1, "binding": lo + rng.integers(0, 4), "tight": lo - 0.25}[memory]
    return StageProblem(L, N, M, lat, mem, act, num_microbatches=B, schedule=schedule, device_memory=limit)


def describe(p: StageProblem) -> str:
    return (f"L={p.num_layers} N={p.num_nodes} M={p.devices_per_node} B={p.num_microbatches} "
            f"{p.schedule} mem={p.device_memory}\nlatency={p.latency.tolist()}\nmemory={p.memory.tolist()}"
            f"\nactivation={p.activation.tolist()}")


def outcome(fn, p, **kw):
    try:
        return fn(p, **kw)
    except StageInfeasibleError as e:
        return ("infeasible", e.min_device_memory)


def check_plan(p: StageProblem, sol: StageSolution):
    """The returned plan obeys every rule on its own (independently of both solvers)."""
    assert sol.stages[0][0] == 0 and sol.stages[-1][1] == p.num_layers
    assert all(a[1] == b[0] for a, b in zip(sol.stages, sol.stages[1:]))
    assert sum(n * m for _, _, _, (n, m), _ in sol.stages) == p.num_nodes * p.devices_per_node
    S, B = sol.num_stages, p.num_microbatches
    for i, (k, j, s, shape, t) in enumerate(sol.stages):
        assert shape == submesh_shapes(p.num_nodes, p.devices_per_node)[s] and t == p.latency[k, j, s]
        held = min(S - i, B) if p.schedule == "1f1b" else B
        assert p.memory[k, j, s] + held * p.activation[k, j, s] <= p.device_memory
    lats = [st[4] for st in sol.stages]
    assert sol.objective_s == pytest.approx(sum(lats) + (B - 1) * max(lats))


@pytest.mark.parametrize("memory", [None, "loose", "binding", "tight"])
def test_dp_matches_brute_force(memory):
    infeasible = 0
    for seed in range(40):
        p = random_instance(seed, memory=memory)
        dp, bf = outcome(solve_stages, p), outcome(brute_force, p)
        assert dp == bf, f"seed {seed}: dp {dp} != brute {bf}\n{describe(p)}"
        if isinstance(dp, StageSolution):
            check_plan(p, dp)
        else:
            infeasible += 1
        if p.num_layers > 1:  # forced S too
            S = 1 + seed % min(p.num_layers, p.num_nodes * p.devices_per_node)
            dp, bf = outcome(solve_stages, p, num_stages=S), outcome(brute_force, p, num_stages=S)
            assert dp == bf, f"seed {seed} S={S}: dp {dp} != brute {bf}\n{describe(p)}"
            assert not isinstance(dp, StageSolution) or dp.num_stages == S
    if memory == "tight":
        assert infeasible >= 20
    elif memory is None:
        assert infeasible < 20


def test_min_device_memory_is_exact():
    checked = 0
    for seed in range(40):
        p = random_instance(seed, memory="tight")
        try:
            solve_stages(p)
            continue
        except StageInfeasibleError as e:
            lo = e.min_device_memory
            assert "smallest device memory" in str(e) or not math.isfinite(lo)
        if not math.isfinite(lo):
            continue
        args = (p.num_layers, p.num_nodes, p.devices_per_node, p.latency, p.memory, p.activation)
        kw = dict(num_microbatches=p.num_microbatches, schedule=p.schedule)
        sol = solve_stages(StageProblem(*args, **kw, device_memory=lo))
        assert max(p.memory[k, j, s] + (min(sol.num_stages - i, p.num_microbatches) if p.schedule == "1f1b"
                                         else p.num_microbatches) * p.activation[k, j, s]
                   for i, (k, j, s, _, _) in enumerate(sol.stages)) == lo
        with pytest.raises(StageInfeasibleError):
            solve_stages(StageProblem(*args, **kw, device_memory=lo * (1 - 1e-9)))
        checked += 1
    assert checked >= 10


def test_unequal_layers_get_unequal_submeshes():
    """Layers of cost [1, 1, 4] on 3 nodes × 2 devices, 80% scaling efficiency per doubling:
    the two light layers share a (1,2) stage and the heavy one gets (2,2). (On 8 devices
    the power-of-two shapes only split 4+4, where one stage on 4 is never worse than two.)"""
    work = [1.0, 1.0, 4.0]
    def latency(i, j, shape):
        d = shape[0] * shape[1]
        return sum(work[i:j]) / (d * 0.8 ** math.log2(d))

    p = StageProblem.from_callables(3, 3, 2, latency, num_microbatches=16)
    sol = solve_stages(p)
    assert sol == brute_force(p)
    assert [st[:4] for st in sol.stages] == [(0, 2, 1, (1, 2)), (2, 3, 2, (2, 2))]
    assert sol.t_max == pytest.approx(1 / 0.64) and sol.objective_s == pytest.approx(1.25 + 16 / 0.64)


def test_forced_stages_and_validation():
    work = [1.0, 2.0, 3.0]
    p = StageProblem.from_callables(3, 1, 4, lambda i, j, sh: sum(work[i:j]) / sh[1], num_microbatches=4)
    sol = solve_stages(p, forced=[(0, 1, (1, 2)), (1, 3, 1)])  # shape or index
    assert sol.status == "forced" and sol.stages == [(0, 1, 1, (1, 2), 0.5), (1, 3, 1, (1, 2), 2.5)]
    assert sol.objective_s == 3.0 + 3 * 2.5 and sol.objective_s >= solve_stages(p).objective_s
    bad = [[(0, 1, (1, 4))], [(0, 1, (1, 2)), (2, 3, (1, 2))], [(0, 3, (3, 3))], [(0, 3, (1, 2))],
           [(0, 0, (1, 2)), (0, 3, (1, 2))], [(0, 1, 9), (1, 3, 0)]]
    for forced in bad:
        with pytest.raises(ValueError):
            solve_stages(p, forced=forced)
    with pytest.raises(ValueError):
        solve_stages(p, forced=[(0, 1, (1, 2)), (1, 3, (1, 2))], num_stages=3)
    with pytest.raises(ValueError):
        solve_stages(p, num_stages=4)  # more stages than layers
    # a forced plan over the memory limit reports its own need
    q = StageProblem(2, 1, 2, np.ones((2, 3, 2)), np.full((2, 3, 2), 10.0), np.ones((2, 3, 2)),
                     num_microbatches=4, device_memory=5)
    with pytest.raises(StageInfeasibleError) as e:
        solve_stages(q, forced=[(0, 1, (1, 1)), (1, 2, 0)])
    assert e.value.min_device_memory == 12.0  # first stage: 10 + 2 in flight × 1
    lat = np.ones((2, 3, 2))
    lat[1, 2, 0] = np.inf
    with pytest.raises(StageInfeasibleError):
        solve_stages(StageProblem(2, 1, 2, lat), forced=[(0, 1, 0), (1, 2, 0)])


def test_forced_equals_optimum_and_num_stages():
    p = random_instance(5)
    for seed in range(5, 60):
        p = random_instance(seed)
        if p.num_layers >= 3 and p.num_microbatches > 1:
            break
    sol = solve_stages(p)
    again = solve_stages(p, forced=[(k, j, shape) for k, j, _, shape, _ in sol.stages])
    assert again.objective_s == sol.objective_s and again.stages == sol.stages
    for S in range(1, min(p.num_layers, p.num_nodes * p.devices_per_node) + 1):
        r = outcome(solve_stages, p, num_stages=S)
        assert not isinstance(r, StageSolution) or (r.num_stages == S and r.objective_s >= sol.objective_s)


def test_deterministic_and_tie_break():
    p = random_instance(17, memory="binding")
    assert outcome(solve_stages, p) == outcome(solve_stages, p)
    # all stages identical: fewer stages wins the tie, then the earliest boundaries
    q = StageProblem.from_callables(4, 1, 4, lambda i, j, sh: (j - i) / sh[1], num_microbatches=1)
    sol = solve_stages(q)
    assert sol.num_stages == 1 and sol.stages[0][3] == (1, 4) and sol.objective_s == 1.0
    r = solve_stages(q, num_stages=2)  # only 2+2 devices tile; every boundary ties at Σ = 2
    assert [st[:4] for st in r.stages] == [(0, 1, 1, (1, 2)), (1, 4, 1, (1, 2))]
    assert r == brute_force(q, num_stages=2)


def test_infeasible_latency_and_dict_input():
    lat = {(0, 1, 0): 1.0}  # only layer 0 on one device: 1 layer, 1×2 cluster never tiled
    p = StageProblem(1, 1, 2, lat)
    with pytest.raises(StageInfeasibleError) as e:
        solve_stages(p)
    assert math.isinf(e.value.min_device_memory) and "tile" in str(e.value)
    p = StageProblem(1, 1, 2, {(0, 1, 1): 2.0}, {(0, 1, 1): 7.0}, num_microbatches=3)
    assert solve_stages(p).objective_s == 6.0
    with pytest.raises(ValueError):
        brute_force(StageProblem(12, 2, 8, np.ones((12, 13, 5))))


def test_import_keeps_jax_out():
    code = "import sys, autopar.solvers.stage_dp; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


def with_variant(p: StageProblem, seed: int, memory: str) -> StageProblem:
    """``p`` plus a second variant of every stage: less static memory, more latency (as a
    stage whose parameters are sharded harder); device memory set like ``random_instance``."""
    rng = np.random.default_rng(1000 + seed)
    lat = np.stack([p.latency, p.latency + rng.integers(0, 3, p.latency.shape) / 4])
    mem = np.stack([p.memory, np.floor(p.memory * rng.uniform(0.2, 0.9, p.memory.shape))])
    act = np.stack([p.activation, p.activation])
    kw = dict(num_microbatches=p.num_microbatches, schedule=p.schedule)
    args = (p.num_layers, p.num_nodes, p.devices_per_node, lat, mem, act)
    try:
        brute_force(StageProblem(*args, **kw, device_memory=-1.0), limit=10 ** 7)
    except StageInfeasibleError as e:
        lo = e.min_device_memory
    if not math.isfinite(lo):
        return StageProblem(*args, **kw)
    limit = {"loose": lo * 1.5 + 1, "binding": lo + rng.integers(0, 4), "tight": lo - 0.25}[memory]
    return StageProblem(*args, **kw, device_memory=limit)


@pytest.mark.parametrize("memory", ["loose", "binding", "tight"])
def test_variants_match_brute_force(memory):
    """With two cost variants per stage, the DP (fastest fitting variant at each position)
    equals brute force over every plan × variant choice, and its plan obeys the rules with
    the variants it names."""
    lean_used = infeasible = 0
    for seed in range(40):
        p = with_variant(random_instance(seed), seed, memory)
        dp, bf = outcome(solve_stages, p), outcome(brute_force, p, limit=10 ** 7)
        assert dp == bf, f"seed {seed}: dp {dp} != brute {bf}\n{describe(p)}"
        if not isinstance(dp, StageSolution):
            infeasible += 1
            continue
        S, B = dp.num_stages, p.num_microbatches
        assert len(dp.variants) == S
        for i, ((k, j, s, _, t), v) in enumerate(zip(dp.stages, dp.variants)):
            held = min(S - i, B) if p.schedule == "1f1b" else B
            assert t == p.latency[v, k, j, s]
            assert p.memory[v, k, j, s] + held * p.activation[v, k, j, s] <= p.device_memory
            faster = p.latency[0, k, j, s] < t
            assert not (v == 1 and faster and p.memory[0, k, j, s] + held * p.activation[0, k, j, s]
                        <= p.device_memory), "variant 1 chosen where the faster variant 0 fits"
        lean_used += 1 in dp.variants
    if memory == "binding":
        assert lean_used >= 3
    elif memory == "tight":
        assert infeasible >= 20


def test_variant_depends_on_position():
    """Two layers on 1 × 2 devices, 1F1B with 4 micro-batches: the first of two stages holds
    2 micro-batches and only fits with the lean variant; the last holds 1 and keeps the
    faster one. Forced plans pick variants the same way; a variant axis on only some arrays
    is refused."""
    lat = np.full((2, 2, 3, 2), np.inf)
    mem, act = np.zeros_like(lat), np.ones_like(lat)
    lat[0, 0, 1, 0], lat[0, 1, 2, 0] = 1.0, 1.0  # one layer per (1,1) stage
    mem[0, :, :, 0] = 8.0
    lat[1, 0, 1, 0], lat[1, 1, 2, 0] = 1.5, 1.5
    mem[1, :, :, 0] = 5.0
    p = StageProblem(2, 1, 2, lat, mem, act, num_microbatches=4, device_memory=9.0)
    sol = solve_stages(p)
    assert [(k, j) for k, j, *_ in sol.stages] == [(0, 1), (1, 2)] and sol.variants == (1, 0)
    assert sol.objective_s == 1.5 + 1.0 + 3 * 1.5 and sol == brute_force(p)
    assert solve_stages(p, forced=[(0, 1, 0), (1, 2, 0)]) == sol.__class__(**{**sol.__dict__, "status": "forced"})
    tight = StageProblem(2, 1, 2, lat, mem, act, num_microbatches=4, device_memory=6.9)
    with pytest.raises(StageInfeasibleError) as e:
        solve_stages(tight)
    assert e.value.min_device_memory == 7.0  # lean first stage: 5 + 2 micro-batches
    with pytest.raises(ValueError, match="expected"):
        StageProblem(2, 1, 2, lat, mem[0], act)


def _dp_all_at_once(p, cost, smax, combine):
    """The stage DP's recurrence with every (m, k, d, j) in one array (the formulation before
    ``_dp`` went shape by shape): the reference for its values and its first-near choices."""
    L, D, sizes = p.num_layers, p.total_devices, p.sizes
    F, choice = [np.full((L + 1, D + 1), np.inf)], [None]
    F[0][L, 0] = 0.0
    for s in range(1, smax + 1):
        K = L - s + 1
        c = cost(s)[:, :K, :K + 1]
        V = np.full((len(sizes), K, D + 1, K + 1), np.inf)
        for m, n in enumerate(sizes):
            if n <= D:
                V[m, :, n:, :] = combine(c[m][:, None, :], F[s - 1][:K + 1, :D + 1 - n].T[None, :, :])
        best = V.min(axis=3).min(axis=0)
        near = V <= best[None, :, :, None] * (1 + 1e-9)
        j = np.argmax(near.any(axis=0), axis=2)
        m = np.argmax(np.take_along_axis(near, j[None, :, :, None], axis=3)[..., 0], axis=0)
        idx = j * len(sizes) + m
        idx[~np.isfinite(best)] = -1
        Fs = np.full((L + 1, D + 1), np.inf)
        Fs[:K] = best
        F.append(Fs)
        choice.append(idx)
    return F, choice


def test_dp_by_shape_equals_the_all_at_once_recurrence():
    """``_dp`` (one sub-mesh shape at a time) gives the same tables and the same tie-broken
    choices as the recurrence over all shapes at once, for ⊕ = + and max, on random
    instances with ties (latencies from a few values) and infeasible ranges."""
    from autopar.solvers.stage_dp import _dp, _effective
    rng = np.random.default_rng(7)
    for _ in range(60):
        L, N, M = int(rng.integers(1, 8)), int(rng.integers(1, 4)), int(rng.choice([1, 2, 4, 8]))
        nS = len(submesh_shapes(N, M))
        lat = rng.choice([0.5, 1.0, 2.0, np.inf], size=(L, L + 1, nS)) * rng.integers(1, 3, size=(L, L + 1, nS))
        mem = rng.integers(0, 5, size=lat.shape).astype(float)
        act = rng.integers(0, 3, size=lat.shape).astype(float)
        p = StageProblem(L, N, M, lat, mem, act, num_microbatches=int(rng.integers(1, 5)),
                         device_memory=float(rng.integers(3, 10)))
        for combine in (np.add, np.maximum):
            cost = lambda s: _effective(p, s)[0]  # noqa: E731
            got, want = _dp(p, cost, min(L, N * M), combine), _dp_all_at_once(p, cost, min(L, N * M), combine)
            for s in range(1, len(want[0])):
                np.testing.assert_array_equal(got[0][s], want[0][s])
                np.testing.assert_array_equal(got[1][s], want[1][s])


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_effective_for_every_inflight_count_equals_one_at_a_time(schedule):
    """``_effective_all`` (variants sorted by latency, each entry's first fitting one moved
    forward as the in-flight count grows) equals ``_effective`` at every count, latencies and
    chosen variants alike: ties between variants (the lower index), entries where none fits
    or none is finite, activation-free variants, memory exactly at the limit."""
    from autopar.solvers.stage_dp import _effective, _effective_all, _inflight
    rng = np.random.default_rng(11)
    for _ in range(40):
        V, L, N, M = int(rng.integers(1, 6)), int(rng.integers(1, 7)), int(rng.integers(1, 4)), 4
        shape = (V, L, L + 1, len(submesh_shapes(N, M)))
        lat = rng.choice([0.5, 1.0, 2.0, np.inf], size=shape)
        mem = rng.integers(0, 6, size=shape).astype(float)
        act = rng.choice([0.0, 0.5, 1.0, 2.0], size=shape)
        p = StageProblem(L, N, M, lat, mem, act, num_microbatches=int(rng.integers(1, 9)),
                         device_memory=float(rng.integers(2, 9)), schedule=schedule)
        counts = [_inflight(p, r) for r in range(1, min(L, N * M) + 1)]
        got = _effective_all(p, counts)
        assert sorted(got) == sorted(set(counts))
        for r, f in zip(range(1, len(counts) + 1), counts):
            want = _effective(p, r)
            np.testing.assert_array_equal(got[f][0], want[0])
            np.testing.assert_array_equal(got[f][1], want[1])
