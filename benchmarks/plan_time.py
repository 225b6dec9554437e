"""Planning time of the GPT example (AdamW training step, planned from ShapeDtypeStructs)
at 2, 6, 12 and 24 layers on cpu-8 and dgx-a100-80g × 1 node (8 devices).

    python benchmarks/plan_time.py [--layers 2 6 12 24] [--hidden 1024] [--out benchmarks/results]

Prints a markdown table (trace / strategies / solve / total seconds, solver nodes, chosen
mesh, predicted step time) and writes it to OUT/plan_time.md and OUT/plan_time.json.
Target: 24 layers planned in < 10 s on the 2-core development machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import autopar
from examples import gpt


def run(layers, clusters, hidden, seq, vocab, batch):
    rows = []
    for cluster in clusters:
        for n in layers:
            args = gpt.train_step_args(layers=n, hidden=hidden, seq=seq, vocab=vocab, batch=batch, abstract=True)
            t0 = time.perf_counter()
            try:
                plan = autopar.plan(gpt.train_step, *args, cluster=cluster, donate_argnums=(0, 1))
            except autopar.PlanError as err:
                rows.append(dict(cluster=cluster, layers=n, eqns=0, trace_s=0, strategies_s=0, solve_s=0,
                                 total_s=time.perf_counter() - t0, solver_nodes=0, mesh="-", step_time_ms=0,
                                 status=f"does not fit: needs {err.min_bytes_per_device / 2**30:.2f} GiB/device"))
                print(f"{cluster:<14} L={n:<3} {rows[-1]['status']}", flush=True)
                continue
            wall = time.perf_counter() - t0
            t = plan.timing
            rows.append(dict(cluster=cluster, layers=n, eqns=len(plan.eqns), trace_s=t.trace_s,
                             strategies_s=t.strategies_s, solve_s=t.solve_s, total_s=wall,
                             solver_nodes=plan.solver.nodes, mesh="x".join(map(str, plan.mesh_shape)),
                             step_time_ms=plan.predicted.step_time_s * 1e3, status=plan.solver.status,
                             per_mesh_solve_s=plan.timing.per_mesh_solve_s))
            r = rows[-1]
            print(f"{cluster:<14} L={n:<3} eqns={r['eqns']:<6} trace {r['trace_s']:.2f}s  strategies "
                  f"{r['strategies_s']:.2f}s  solve {r['solve_s']:.2f}s  total {r['total_s']:.2f}s  "
                  f"mesh {r['mesh']}  step {r['step_time_ms']:.2f} ms  per mesh {r['per_mesh_solve_s']}", flush=True)
    return rows


def table(rows) -> str:
    out = ["| cluster | layers | equations | trace s | strategies s | solve s | total s | solver nodes | mesh | "
           "predicted step ms | status |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        out.append(f"| {r['cluster']} | {r['layers']} | {r['eqns']} | {r['trace_s']:.2f} | {r['strategies_s']:.2f} | "
                   f"{r['solve_s']:.2f} | {r['total_s']:.2f} | {r['solver_nodes']} | {r['mesh']} | "
                   f"{r['step_time_ms']:.3f} | {r['status']} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 6, 12, 24])
    ap.add_argument("--clusters", nargs="+", default=["dgx-a100-80g", "cpu-8"])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=51200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    rows = run(a.layers, a.clusters, a.hidden, a.seq, a.vocab, a.batch)
    md = (f"GPT train step (AdamW), hidden {a.hidden}, seq {a.seq}, vocab {a.vocab}, batch {a.batch}; "
          f"8 devices; all meshes searched, solved one after the other. "
          f"Machine: {platform.machine()}, Python {platform.python_version()}, {os.cpu_count()} cores.\n\n"
          + table(rows) + "\n")
    print()
    print(md)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_time.md").write_text(md)
    (out / "plan_time.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
