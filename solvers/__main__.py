"""Command line: ``python -m autopar.solvers solve FILE --time-limit S [--solver ...] [--solution-out OUT]``.

FILE is an IOPDDL contest problem (``.json`` or ``.json.gz``). Prints the cost, whether the
choice fits the usage limit, the lower bound and gap, and the time; optionally writes the
contest's solution format (one strategy index per node).
"""
from __future__ import annotations

import argparse
import math
import sys

from . import iopddl
from .driver import SOLVERS, solve
from .problem import InfeasibleError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autopar.solvers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("solve", help="solve an IOPDDL problem file")
    s.add_argument("file")
    s.add_argument("--time-limit", type=float, default=None, help="seconds for the whole solve")
    s.add_argument("--solver", choices=SOLVERS, default="auto")
    s.add_argument("--no-presolve", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--solution-out", default=None, help="write the choice as a JSON array")
    args = parser.parse_args(argv)

    problem = iopddl.read_problem(args.file)
    print(f"problem     {problem.name}: {problem.num_nodes} nodes, {problem.num_edges} edges, "
          f"usage_limit {problem.usage_limit}")
    try:
        sol = solve(problem, solver=args.solver, time_limit_s=args.time_limit,
                    presolve=not args.no_presolve, seed=args.seed)
    except InfeasibleError as err:
        print(f"infeasible  {err}")
        return 2
    print(f"solver      {sol.solver} ({sol.status})")
    print(f"cost        {sol.cost:.17g}")
    print(f"feasible    {sol.feasible}")
    print(f"lower bound {sol.lower_bound:.17g}" if math.isfinite(sol.lower_bound) else "lower bound -inf")
    print(f"gap         {sol.gap:.3%}" if math.isfinite(sol.gap) else "gap         unknown")
    print(f"time        {sol.time_s:.2f} s")
    if args.solution_out and sol.choice:
        iopddl.write_solution(args.solution_out, sol.choice)
        print(f"solution    {args.solution_out}")
    return 0 if sol.feasible else 1


if __name__ == "__main__":
    sys.exit(main())
