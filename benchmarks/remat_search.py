"""Remat and ZeRO-1 in the pipeline search vs without, and vs Megatron's grid with and without
Megatron's practice (issue 15's benchmark).

GPT-39B (Alpa's suite: 48 layers, hidden 8192, seq 1024, vocab 51200; bfloat16, AdamW), global
batch 1024 in 128 micro-batches, 1F1B, 8 × dgx-a100-80g, planned from ShapeDtypeStructs (no
stage markers). Rows, each in its own process (planning time and peak RSS of that process):

* autopar, remat="none", zero="none" — the search before remat/ZeRO were decisions;
* autopar defaults (remat="auto", zero="auto");
* dp_tp_pp with remat=("none",), zero=(False,) — the plain Megatron grid;
* dp_tp_pp with its defaults — recompute none/dots/full × distributed optimizer per point.

    python benchmarks/remat_search.py                 # the four rows above
    python benchmarks/remat_search.py --suite gpt-1.3b --nodes 1   # a quick check

Writes benchmarks/results/remat_search.{md,json}. Numbers are the cost model's predictions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROWS = {  # key: (what is planned, its options, the table's label)
    "autopar-plain": ("autopar", {"remat": "none", "zero": "none"}, "autopar, no remat / no ZeRO"),
    "autopar": ("autopar", {}, "autopar, remat + ZeRO-1 searched"),
    "grid-plain": ("grid", {"remat": ("none",), "zero": (False,)}, "DP×TP×PP plain"),
    "grid": ("grid", {}, "DP×TP×PP + recompute + distributed optimizer"),
}


def run_one(row: str, suite: str, nodes: int, microbatches: int, batch: int) -> dict:
    import jax.numpy as jnp

    from autopar import PlanError, plan_training
    from autopar.baselines import dp_tp_pp
    from examples import gpt
    kind, kw, _ = ROWS[row]
    params, data = gpt.params_and_batch(suite=suite, batch=batch, abstract=True, dtype=jnp.bfloat16)
    fn = plan_training if kind == "autopar" else dp_tp_pp
    t0 = time.perf_counter()
    try:
        tp = fn(gpt.loss_fn, params, data, optimizer=gpt.OPTIMIZER, cluster="dgx-a100-80g", nodes=nodes,
                num_microbatches=microbatches, **kw)
    except PlanError as err:
        return {"row": row, "error": str(err)[:300], "plan_s": time.perf_counter() - t0,
                "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    stages = [f"{s.layers[1] - s.layers[0]}L@{s.submesh[0]}x{s.submesh[1]}/{'x'.join(map(str, s.plan.mesh_shape))}"
              + (f" {s.remat}" if s.remat != "none" else "") + (" zero1" if s.zero else "") for s in tp.stages]
    return {"row": row, "step_s": tp.predicted.step_time_s, "peak_gb": tp.predicted.peak_memory_bytes / 1e9,
            "stages": stages, "plan_s": time.perf_counter() - t0,
            "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "grid": [g.model_dump() for g in (tp.baseline_grid or [])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default="gpt-39b")
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--microbatches", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "remat_search"))
    ns = ap.parse_args()
    if ns.one:
        print(json.dumps(run_one(ns.one, ns.suite, ns.nodes, ns.microbatches, ns.batch)))
        return
    results, t0 = [], time.time()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    for row in ns.rows.split(","):
        cmd = [sys.executable, __file__, "--one", row, "--suite", ns.suite, "--nodes", str(ns.nodes),
               "--microbatches", str(ns.microbatches), "--batch", str(ns.batch)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=ns.timeout, cwd=ROOT)
            res = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else \
                {"row": row, "error": out.stderr.strip().splitlines()[-1][:300]}
        except subprocess.TimeoutExpired:
            res = {"row": row, "error": f"timeout after {ns.timeout} s"}
        results.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "grid"}), flush=True)
    head = "| row | predicted step | peak mem/GPU | stages (layers@sub-mesh/mesh, remat, ZeRO) | plan time | peak RSS |"
    lines = [f"# Remat and ZeRO-1 in the search: {ns.suite} on {ns.nodes} × dgx-a100-80g", "",
             f"Global batch {ns.batch} in {ns.microbatches} micro-batches, 1F1B, bfloat16, AdamW; planned from "
             f"ShapeDtypeStructs on {platform.machine()} ({platform.python_version()}), 2 cores shared with other "
             f"jobs (load {os.getloadavg()[0]:.1f} at the end, {time.time() - t0:.0f} s in all), code {commit}. "
             "Predicted by autopar's cost model. `python benchmarks/remat_search.py`", "", head,
             "|---|---:|---:|---|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {ROWS[r['row']][2]} | – | – | {r['error']} | {r.get('plan_s', 0):.0f} s | {r.get('rss_gb', 0):.1f} GB |")
        else:
            lines.append(f"| {ROWS[r['row']][2]} | {r['step_s']:.2f} s | {r['peak_gb']:.1f} GB | {' '.join(r['stages'])} | "
                         f"{r['plan_s']:.0f} s | {r['rss_gb']:.1f} GB |")
    Path(ns.out + ".md").write_text("\n".join(lines) + "\n")
    Path(ns.out + ".json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
