"""Planning at scale: planning time and peak RSS of ``autopar.plan_training`` from 8 to 2,048
GPUs (and one 16,384-GPU point), with the plan it returns (issue 19's benchmark).

Models, planned from ShapeDtypeStructs (bfloat16, AdamW, 1F1B):

* ``gpt-39b``: Alpa's GPT-39B (48 layers, hidden 8192, 64 heads, seq 1024, vocab 51200),
  global batch 1024 in 128 micro-batches, dgx-a100-80g; ``gpt-39b-nomark``: the same model
  written without ``stage_boundary`` markers;
* ``gpt-175b``: GPT-3 175B (96 layers, hidden 12288, 96 heads, seq 2048, vocab 51200), global
  batch 1536 in 192 micro-batches, dgx-h100;
* ``llama-405b``: a Llama-3-405B-shaped decoder (126 layers, dim 16384, 128 heads, 8 KV heads,
  FFN 53248, vocab 128256, seq 8192, ``jax.nn.dot_product_attention`` (planned as one fused
  op, costed flash-style), layers under ``jax.lax.scan``: pipelined
  one iteration per layer), global batch ``--llama-batch`` in micro-batches of
  ``--llama-micro`` sequences, dgx-h100.

Each point runs in its own process (its peak RSS is that process's ``ru_maxrss``)::

    python benchmarks/scale.py                               # the default grid
    python benchmarks/scale.py --points gpt-175b@128 --timeout 900

Writes benchmarks/results/scale.{md,json,png}. Step times are autopar's predictions.
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

DEFAULT_POINTS = ("gpt-39b@8 gpt-39b-nomark@8 gpt-175b@8 gpt-175b@16 gpt-175b@32 gpt-175b@64 gpt-175b@128 "
                  "gpt-175b@256 llama-405b@16 llama-405b@64 llama-405b@256 llama-405b@2048").split()


def build(model: str, llama_batch: int, llama_micro: int):
    """(loss_fn, params, batch, optimizer, cluster, micro-batches) of a model."""
    import jax.numpy as jnp
    if model.startswith("gpt"):
        from examples import gpt
        if model.startswith("gpt-39b"):
            cfg = gpt.GPTConfig(vocab=51200, seq=1024, hidden=8192, heads=64, layers=48, batch=1024,
                                dtype=jnp.bfloat16)
            cluster, mbs = "dgx-a100-80g", 128
        else:
            cfg = gpt.GPTConfig(vocab=51200, seq=2048, hidden=12288, heads=96, layers=96, batch=1536,
                                dtype=jnp.bfloat16)
            cluster, mbs = "dgx-h100", 192
        params, batch = gpt.args_for(cfg, "loss_fn", abstract=True)
        return gpt.make_loss_fn(cfg, markers=not model.endswith("nomark")), params, batch, gpt.OPTIMIZER, cluster, mbs
    from examples import llama
    cfg = llama.LlamaConfig(vocab=128256, dim=16384, layers=126, heads=128, kv_heads=8, ffn=53248, seq=8192,
                            batch=llama_batch, scan=True, attention="dpa", implementation=None,
                            dtype="bfloat16")
    params = llama.init_params(cfg, abstract=True)
    batch = llama._batch(cfg, 0, True)
    return llama.make_loss_fn(cfg), params, batch, llama.optimizer(cfg), "dgx-h100", llama_batch // llama_micro


def run_one(point: str, llama_batch: int, llama_micro: int, workers: int | None) -> dict:
    from autopar import PlanError, plan_training
    from autopar.progress import Progress
    model, nodes = point.split("@")
    nodes = int(nodes) // 8 if int(nodes) >= 8 else 1  # points are named by GPUs (8 per node)
    loss_fn, params, batch, opt, cluster, mbs = build(model, llama_batch, llama_micro)

    class Phases(Progress):
        def __init__(self):
            self.t0, self.phases = time.perf_counter(), []

        def phase(self, name, total=None):
            self.phases.append([name, time.perf_counter() - self.t0])
    progress = Phases()
    t0 = time.perf_counter()
    row = {"point": point, "model": model, "gpus": nodes * 8, "nodes": nodes, "cluster": cluster,
           "microbatches": mbs, "workers": workers}
    kw = {} if workers is None else {"workers": workers}
    try:
        tp = plan_training(loss_fn, params, batch, optimizer=opt, cluster=cluster, nodes=nodes,
                           num_microbatches=mbs, verbose=progress, **kw)
    except PlanError as err:
        row.update(error=str(err)[:400], min_bytes=err.min_bytes_per_device)
    else:
        row.update(step_s=tp.predicted.step_time_s, peak_gb=tp.predicted.peak_memory_bytes / 1e9,
                   stages=tp.num_stages, layers=tp.search.num_layers, ilp_solves=tp.search.ilp_solves,
                   candidates=tp.search.candidates, layout=describe(tp))
    row["plan_s"] = time.perf_counter() - t0
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    row["rss_gb"] = me.ru_maxrss / 1e6
    row["worker_rss_gb"] = kids.ru_maxrss / 1e6  # the largest pool worker
    # CPU seconds of this process and its pool workers: the machine is shared, wall time is noisy
    row["cpu_s"] = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    row["load"] = os.getloadavg()[0]
    row["phases"] = [(n, round(t, 2)) for n, t in progress.phases]
    try:  # the code that planned it (rows of other points may come from older code: --append)
        row["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return row


def describe(tp) -> str:
    from autopar.pipeline.refine import runs
    return runs(f"{s.layers[1] - s.layers[0]}L@{s.submesh[0]}x{s.submesh[1]}/{'x'.join(map(str, s.plan.mesh_shape))}"
                + ("" if s.remat == "none" else f"+{s.remat}") + ("+zero1" if s.zero else "") for s in tp.stages)


def table(rows: list[dict]) -> list[str]:
    head = ["| model | GPUs | plan time (wall) | CPU time | load | peak RSS (worker) | predicted step | peak mem/GPU | "
            "stages (n×layers@sub-mesh/mesh) | code |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        plan = (f"{r['step_s']:.2f} s | {r['peak_gb']:.1f} GB | {r['layout']}" if "step_s" in r else
                f"– | – | {r.get('error', '?')[:160]}")
        head.append(f"| {r['model']} | {r['gpus']} | {r.get('plan_s', float('nan')):.1f} s | "
                    f"{r.get('cpu_s', float('nan')):.1f} s | {r.get('load', float('nan')):.1f} | "
                    f"{r.get('rss_gb', float('nan')):.2f} ({r.get('worker_rss_gb', float('nan')):.2f}) GB | {plan} | "
                    f"{r.get('commit', 'before 68d8fd3')} |")
    return head


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, c, b) = plt.subplots(1, 3, figsize=(14, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((r["gpus"], r["plan_s"], r.get("cpu_s", float("nan")), r["rss_gb"]) for r in rows
                     if r["model"] == model and "rss_gb" in r)
        if pts:
            g, t, u, m = zip(*pts)
            a.plot(g, t, "o-", label=model)
            c.plot(g, u, "o-", label=model)
            b.plot(g, m, "o-", label=model)
    # GPT-175B before this work, as issue 19 measured it on this machine (128: PlanError after
    # 38 s, 512: still running at 900 s, 1,024: killed for memory at > 24 GB)
    a.plot([256, 512], [340, 900], "x--", color="gray", label="gpt-175b before (issue 19; 512: > 900 s)")
    b.plot([128, 256, 512, 1024], [1.3, 2.8, 7.8, 24.0], "x--", color="gray", label="gpt-175b before (1024: OOM)")
    b.legend(fontsize=8)
    for ax, what in ((a, "planning time, wall (s)"), (c, "CPU time (s)"), (b, "peak RSS (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("GPUs")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle("autopar.plan_training at scale (2 shared cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", nargs="*", default=list(DEFAULT_POINTS), help="model@GPUs")
    ap.add_argument("--llama-batch", type=int, default=2048)
    ap.add_argument("--llama-micro", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--table", action="store_true", help="only redo the table and plot from the JSON")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--append", action="store_true", help="add to the existing results (same point: replaced)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale"))
    ns = ap.parse_args()
    if ns.one:
        print(json.dumps(run_one(ns.one, ns.llama_batch, ns.llama_micro, ns.workers)))
        return
    out = Path(ns.out)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"] if (ns.append or ns.table) and \
        out.with_suffix(".json").exists() else []
    for point in [] if ns.table else ns.points:
        cmd = [sys.executable, __file__, "--one", point, "--llama-batch", str(ns.llama_batch),
               "--llama-micro", str(ns.llama_micro)] + ([] if ns.workers is None else ["--workers", str(ns.workers)])
        t0 = time.perf_counter()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=ns.timeout, cwd=ROOT,
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)))
            row = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else \
                {"point": point, "error": (res.stderr.strip().splitlines() or ["?"])[-1][:300]}
        except subprocess.TimeoutExpired:
            row = {"point": point, "error": f"timeout after {ns.timeout} s", "plan_s": time.perf_counter() - t0}
        row.setdefault("model", point.split("@")[0])
        row.setdefault("gpus", int(point.split("@")[1]))
        rows = [r for r in rows if r["point"] != point] + [row]
        print(json.dumps({k: v for k, v in row.items() if k != "phases"}), flush=True)
        load = os.getloadavg()[0]
        out.with_suffix(".json").write_text(json.dumps({"machine": f"{platform.machine()} ({platform.python_version()})",
                                                        "rows": rows, "last_load": load}, indent=1))
    rows.sort(key=lambda r: (r["model"], r["gpus"]))
    lines = ["# Planning at scale", "",
             f"`autopar.plan_training` from ShapeDtypeStructs, one process per point, on {platform.machine()} "
             f"(Python {platform.python_version()}), 2 cores shared with other jobs (timings are noisy). "
             "GPT-39B: batch 1024 in 128 micro-batches on dgx-a100-80g; GPT-175B: batch 1536 in 192 on dgx-h100; "
             f"Llama-405B-shaped: batch {ns.llama_batch} in micro-batches of {ns.llama_micro} on dgx-h100. "
             "Predicted by autopar's cost model. `python benchmarks/scale.py`; code: the commit that planned "
             "the row (`--append` keeps the rows of the points not rerun).", ""] + table(rows)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot([r for r in rows if "rss_gb" in r], out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
