"""IOPDDL contest format: reader, writer, evaluator against hand-computed costs, CLI."""
from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autopar.solvers import evaluate, solve
from autopar.solvers.brute import solve_brute
from autopar.solvers.iopddl import problem_from_dict, read_problem, read_solution, write_solution

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO.parent / "shared" / "benchmarks" / "iopddl" / "example.json"

# Two nodes, one edge, usage limit 10.  Node 0 lives [0, 4), node 1 lives [2, 6).
TINY = {
    "problem": {
        "name": "tiny",
        "nodes": {
            "intervals": [[0, 4], [2, 6]],
            "costs": [[10, 1], [5, 7, 1e18]],
            "usages": [[2, 8], [3, 1, 0]],
        },
        "edges": {"nodes": [[0, 1]], "costs": [[0, 4, 1, 6, 0, 1]]},  # 2×3, row-major
        "usage_limit": 10,
    }
}


def example_problem():
    if not EXAMPLE.exists():
        pytest.skip(f"{EXAMPLE} not present")
    return read_problem(EXAMPLE)


def test_example_solution_costs_495():
    p = example_problem()
    assert (p.num_nodes, p.num_edges, p.usage_limit) == (5, 5, 50.0)
    cost, feasible, peak = evaluate(p, [0, 1, 2, 0, 0])
    assert (cost, feasible, peak) == (495.0, True, 50.0)  # node costs 295 + edge costs 200


def test_example_optimum_is_445():
    # hand check: nodes 15+55+35+75+95 = 275, edges 30+40+10+30+60 = 170; peak 10+25+15 = 50
    p = example_problem()
    assert evaluate(p, [0, 0, 2, 1, 0]) == (445.0, True, 50.0)
    assert solve_brute(p).cost == 445.0
    for solver in ("auto", "highs", "cbc"):
        sol = solve(p, solver=solver)
        assert (sol.cost, sol.status, sol.choice) == (445.0, "optimal", (0, 0, 2, 1, 0))


@pytest.mark.parametrize("compress", [False, True], ids=["json", "gz"])
def test_reader_costs_usages_and_contest_infinity(tmp_path, compress):
    path = tmp_path / ("tiny.json.gz" if compress else "tiny.json")
    opener = gzip.open if compress else open
    with opener(path, "wt") as f:
        json.dump(TINY, f)
    p = read_problem(path)
    assert p.name == "tiny" and p.usage_limit == 10.0
    assert np.isinf(p.node_costs[1][2])  # 1e18 marks a forbidden strategy
    np.testing.assert_array_equal(p.edge_costs[0], [[0, 4, 1], [6, 0, 1]])
    # choice (0, 0): 10 + 5 + 0 = 15; usage 2 + 3 = 5 at t = 2, 3
    assert evaluate(p, [0, 0]) == (15.0, True, 5.0)
    # choice (1, 1): 1 + 7 + 0 = 8; usage 8 + 1 = 9
    assert evaluate(p, [1, 1]) == (8.0, True, 9.0)
    # choice (1, 0): 1 + 5 + 6 = 12; usage 8 + 3 = 11 > 10
    assert evaluate(p, [1, 0]) == (12.0, False, 11.0)
    assert math.isinf(evaluate(p, [0, 2])[0])
    assert solve(p).choice == (1, 1)
    raw = problem_from_dict(TINY, inf_cost=None)
    assert raw.node_costs[1][2] == 1e18


def test_half_open_intervals_do_not_overlap_at_the_boundary():
    data = json.loads(json.dumps(TINY))
    data["problem"]["nodes"]["intervals"] = [[0, 2], [2, 6]]  # node 0 ends where node 1 starts
    p = problem_from_dict(data)
    assert evaluate(p, [1, 0]) == (12.0, True, 8.0)


def test_solution_round_trip(tmp_path):
    out = tmp_path / "sol.json"
    write_solution(out, np.array([0, 2, 1]))
    assert json.loads(out.read_text()) == [0, 2, 1]
    assert read_solution(out) == [0, 2, 1]


def test_cli_solves_the_example(tmp_path):
    example_problem()
    out = tmp_path / "example-solution.json"
    run = subprocess.run([sys.executable, "-m", "autopar.solvers", "solve", str(EXAMPLE), "--time-limit", "10",
                          "--solution-out", str(out)], capture_output=True, text=True, cwd=REPO, check=True)
    assert "cost        445" in run.stdout and "feasible    True" in run.stdout, run.stdout
    assert "gap         0.000%" in run.stdout
    assert json.loads(out.read_text()) == [0, 0, 2, 1, 0]
