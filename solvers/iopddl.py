"""Read IOPDDL contest problems (ASPLOS/EuroSys 2025) and write solutions.

Problem file (JSON, optionally gzip-compressed)::

    {"problem": {"name": str,
                 "nodes": {"intervals": [[start, end), ...], "costs": [[...], ...],
                           "usages": [[...], ...]},
                 "edges": {"nodes": [[u, v], ...], "costs": [[k_u·k_v numbers, row-major]]},
                 "usage_limit": number}}

Solution file: a JSON array with one strategy index per node.

The contest marks forbidden strategies and pairs with the cost 1e18; by default those are
read as ``inf`` so solvers treat them as forbidden (any solution using one costs ≥ 1e18
under the contest rules anyway). Pass ``inf_cost=None`` to keep them as numbers.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np

from .problem import Problem

CONTEST_INF = 1e18


def _open(path: str | os.PathLike, mode: str = "rt"):
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, mode) if magic == b"\x1f\x8b" else open(path, mode)


def problem_from_dict(data: dict, *, inf_cost: float | None = CONTEST_INF, name: str = "") -> Problem:
    """Build a :class:`Problem` from the contest's JSON structure."""
    p = data.get("problem", data)
    nodes, edges = p["nodes"], p.get("edges", {})

    def conv(values) -> np.ndarray:
        a = np.asarray(values, dtype=np.float64).reshape(-1)
        if inf_cost is not None:
            a[a >= inf_cost] = np.inf
        return a

    costs = [conv(c) for c in nodes["costs"]]
    usages = [np.asarray(u, dtype=np.float64) for u in nodes["usages"]]
    pairs = [tuple(e) for e in edges.get("nodes", [])]
    ecosts = [conv(c).reshape(len(costs[u]), len(costs[v])) for (u, v), c in zip(pairs, edges.get("costs", []))]
    limit = p.get("usage_limit")
    return Problem(
        node_costs=costs, node_usages=usages, intervals=[tuple(iv) for iv in nodes["intervals"]],
        edges=pairs, edge_costs=ecosts, usage_limit=None if limit is None else float(limit),
        name=p.get("name", name) or name,
    )


def read_problem(path: str | os.PathLike, *, inf_cost: float | None = CONTEST_INF) -> Problem:
    """Read a contest problem file (``.json`` or gzip-compressed ``.json.gz``)."""
    with _open(path) as f:
        data = json.load(f)
    stem = Path(path).name.removesuffix(".gz").removesuffix(".json")
    return problem_from_dict(data, inf_cost=inf_cost, name=stem)


def write_solution(path: str | os.PathLike, choice) -> None:
    """Write the contest's solution format: a JSON array of strategy indices."""
    with open(path, "w") as f:
        json.dump([int(c) for c in choice], f)
        f.write("\n")


def read_solution(path: str | os.PathLike) -> list[int]:
    with _open(path) as f:
        data = json.load(f)
    return [int(c) for c in data]
