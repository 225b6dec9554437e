"""Exact pruning of the stage DP (solvers/stage_prune.py): the pruned search returns the same
solution as the unpruned one and as brute force, and it does prune."""
from __future__ import annotations

import math

import numpy as np
import pytest

from autopar.solvers import stage_prune
from autopar.solvers.stage_brute import brute_force
from autopar.solvers.stage_dp import (StageInfeasibleError, StageProblem, _effective, solve_stages,
                                      submesh_shapes)


def transformer_like(seed: int, L: int, N: int, M: int, B: int, *, memory: bool = True) -> StageProblem:
    """Layers of similar work (a heavier first and last), latencies that scale sub-linearly in
    devices plus a per-stage overhead, memory that binds on small sub-meshes: the regime where
    the bottleneck and waste rules remove most candidates. Values on a 1/64 grid (exact ties)."""
    rng = np.random.default_rng(seed)
    shapes = submesh_shapes(N, M)
    work = np.full(L, 8.0)
    work[0], work[-1] = 12.0, 16.0
    work += rng.integers(0, 3, L)
    lat = np.full((L, L + 1, len(shapes)), np.inf)
    mem, act = np.zeros_like(lat), np.zeros_like(lat)
    for i in range(L):
        for j in range(i + 1, L + 1):
            for s, (n, m) in enumerate(shapes):
                d = n * m
                lat[i, j, s] = np.round(64 * (work[i:j].sum() / d ** 0.85 + 0.5 + 0.25 * (n > 1))) / 64
                mem[i, j, s] = (j - i) * 16.0 / d
                act[i, j, s] = 1.0 / d
    lat[rng.random(lat.shape) < 0.05] = np.inf
    return StageProblem(L, N, M, lat, mem, act, num_microbatches=B, device_memory=12.0 if memory else math.inf)


def outcome(p, **kw):
    try:
        return solve_stages(p, **kw)
    except StageInfeasibleError as e:
        return ("infeasible", e.min_device_memory)


def test_pruned_equals_unpruned_and_brute_force_on_random_instances():
    from test_stage_dp import random_instance
    for seed in range(60):
        for memory in (None, "binding"):
            p = random_instance(seed, memory=memory)
            pruned, full = outcome(p), outcome(p, prune=False)
            assert pruned == full, f"seed {seed} {memory}"
            try:
                assert pruned == outcome_brute(p)
            except ValueError:  # too many plans to enumerate
                pass


def outcome_brute(p, **kw):
    try:
        return brute_force(p, **kw)
    except StageInfeasibleError as e:
        return ("infeasible", e.min_device_memory)


@pytest.mark.parametrize("case", [
    dict(L=6, N=2, M=4, B=16), dict(L=5, N=3, M=2, B=64), dict(L=4, N=4, M=2, B=8)], ids=lambda c: str(c))
def test_pruned_equals_brute_force_where_it_prunes(case):
    for seed in range(6):
        p = transformer_like(seed, **case)
        assert outcome(p) == outcome(p, prune=False) == outcome_brute(p), f"seed {seed}"
        for S in (2, 3):
            assert outcome(p, num_stages=S) == outcome(p, num_stages=S, prune=False) == \
                outcome_brute(p, num_stages=S), f"seed {seed} S={S}"


@pytest.mark.parametrize("case", [
    dict(L=24, N=8, M=4, B=64), dict(L=16, N=16, M=8, B=128), dict(L=12, N=6, M=8, B=32, memory=False)],
    ids=lambda c: str(c))
def test_pruned_equals_unpruned_on_larger_instances(case):
    """Beyond brute force: the unpruned DP is the reference (itself tested against brute force)."""
    for seed in range(2):
        p = transformer_like(seed, **case)
        assert outcome(p) == outcome(p, prune=False), f"seed {seed}"


def test_rules_remove_most_candidates_and_sub_node_meshes():
    """On a transformer-like instance with many micro-batches the rules drop more than half of
    the candidates (it keeps 921 of 2030), the one-device meshes none, so the DP steps in
    units of 2+ devices."""
    p = transformer_like(0, L=16, N=16, M=8, B=128)
    e1 = _effective(p, 1)[0]
    bound = stage_prune.upper_bound(lambda r: _effective(p, r)[0], p.shapes, p.sizes, p.num_layers, p.num_nodes,
                                    p.devices_per_node, p.num_microbatches)
    assert math.isfinite(bound)
    (kept,) = stage_prune.prune([e1], e1, p.sizes, p.total_devices, p.num_microbatches, bound)
    before, after = int(np.isfinite(e1).sum()), int(np.isfinite(kept).sum())
    assert after < 0.5 * before, (before, after)
    assert not np.isfinite(kept[p.shapes.index((1, 1))]).any()
    assert stage_prune.device_unit([kept], p.sizes, p.total_devices) > 1
    assert stage_prune.max_stages([kept], p.sizes, p.num_layers, p.total_devices) <= p.num_layers


def test_upper_bound_is_a_plan_the_search_can_beat():
    p = transformer_like(1, L=12, N=4, M=4, B=32, memory=False)
    bound = stage_prune.upper_bound(lambda r: _effective(p, r)[0], p.shapes, p.sizes, p.num_layers, p.num_nodes,
                                    p.devices_per_node, p.num_microbatches)
    assert math.isfinite(bound) and solve_stages(p).objective_s <= bound
    forced = stage_prune.upper_bound(lambda r: _effective(p, r)[0], p.shapes, p.sizes, p.num_layers,
                                     p.num_nodes, p.devices_per_node, p.num_microbatches, num_stages=3)
    assert forced == math.inf or solve_stages(p, num_stages=3).objective_s <= forced


def test_whole_node_counts_beyond_eight_nodes_are_powers_of_two_and_n():
    from autopar.solvers.stage_dp import node_counts, uniform_submeshes
    assert node_counts(8) == [2, 3, 4, 5, 6, 7, 8]
    assert node_counts(16) == [2, 4, 8, 16]
    assert node_counts(24) == [2, 4, 8, 16, 24]
    shapes = submesh_shapes(128, 8)
    assert len(shapes) == 4 + 7 and shapes[-1] == (128, 8)
    assert all(sub in submesh_shapes(24, 8) for _, sub in uniform_submeshes(96, 24, 8))
    # any cluster is still tiled: the DP finds a plan on 24 nodes with only power-of-two stages + N
    p = transformer_like(0, L=6, N=24, M=8, B=8, memory=False)
    sol = solve_stages(p)
    assert sum(n * m for *_, (n, m), _ in sol.stages) == 24 * 8


def test_import_keeps_jax_out():
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys, autopar.solvers.stage_prune, autopar.solvers.submeshes; "
            "assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).parents[1]))
