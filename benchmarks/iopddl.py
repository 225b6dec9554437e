"""Run ``solvers.solve`` on every IOPDDL instance in a directory under contest time limits.

    python benchmarks/iopddl.py [DIR] [--time-scale 0.25] [--only A,G] [--solver auto]

DIR defaults to ``../shared/benchmarks/iopddl`` next to the repository. Time limits: A 60 s,
G 120 s, M 180 s, S 240 s, others 60 s (times ``--time-scale``); the limit covers the
whole solve (presolve included), not reading the file. Prints a markdown table and writes
it to ``benchmarks/results/iopddl.md`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autopar.solvers import InfeasibleError, solve  # noqa: E402
from autopar.solvers.iopddl import read_problem, write_solution  # noqa: E402

TIME_LIMIT_S = {"A": 60, "G": 120, "M": 180, "S": 240}
BEST_KNOWN = {"A": 6548641531, "G": 217039, "M": 49928460991, "S": 1534613444}
XLA = {"A": 13214846074, "G": 1264777}


def instance_key(path: Path) -> str:
    m = re.search(r"-([A-Za-z0-9]+)\.json(\.gz)?$", path.name)
    return m.group(1) if m else path.name.split(".")[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", nargs="?", default=str(REPO.parent / "shared" / "benchmarks" / "iopddl"))
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--only", default="", help="comma-separated instance keys (e.g. A,G)")
    ap.add_argument("--solver", default="auto")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "iopddl.md"))
    ap.add_argument("--solutions", default="", help="directory for the solution files (optional)")
    args = ap.parse_args(argv)

    files = sorted(p for p in Path(args.dir).iterdir() if re.search(r"\.json(\.gz)?$", p.name))
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    rows = []
    header = ("| instance | nodes | edges | our cost | best known | ratio | XLA | lower bound | "
              "time (s) | limit (s) | feasible | solver |")
    print(header)
    print("|" + "---|" * 12)
    for path in files:
        key = instance_key(path)
        if only and key not in only:
            continue
        problem = read_problem(path)
        limit = TIME_LIMIT_S.get(key, 60) * args.time_scale
        t0 = time.perf_counter()
        try:
            sol = solve(problem, solver=args.solver, time_limit_s=limit)
            cost, feasible, bound, name = sol.cost, sol.feasible, sol.lower_bound, sol.solver
        except InfeasibleError as err:
            cost, feasible, bound, name = float("inf"), False, float("nan"), f"infeasible: {err}"
            sol = None
        elapsed = time.perf_counter() - t0
        if sol is not None and args.solutions and sol.choice:
            Path(args.solutions).mkdir(parents=True, exist_ok=True)
            write_solution(Path(args.solutions) / f"{key}.json", sol.choice)
        best = BEST_KNOWN.get(key)
        ratio = f"{cost / best:.4f}" if best and feasible else "—"
        row = (f"| {key} | {problem.num_nodes} | {problem.num_edges} | {cost:.0f} | {best or '—'} | {ratio} | "
               f"{XLA.get(key, '—')} | {bound:.0f} | {elapsed:.1f} | {limit:.0f} | {feasible} | {name} |")
        rows.append(row)
        print(row, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out.write_text(
        f"# IOPDDL benchmark ({stamp})\n\n"
        f"`python benchmarks/iopddl.py --time-scale {args.time_scale:g} --solver {args.solver}` on "
        f"{platform.machine()}, Python {platform.python_version()}; time = whole solve (presolve included, "
        "file reading excluded). Ratio = our cost / best known; XLA = XLA's auto-sharding solver.\n\n"
        + header + "\n|" + "---|" * 12 + "\n" + "\n".join(rows) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
