"""Pipeline + intra-op planning of Alpa's GPT suite on dgx-a100-80g, from ShapeDtypeStructs.

For each (suite config, GPUs) it runs ``autopar.plan_training`` (AdamW, global batch 1024,
``--microbatches`` micro-batches, 1F1B) and prints: stages (layers, sub-mesh, logical
mesh), predicted step time, peak memory per device, planning time and how many intra-op
plans were solved. Nothing is allocated or compiled. Results go to
benchmarks/results/pipeline_plan.{md,json}.

    python benchmarks/pipeline_plan.py            # 1.3B/8 … 39B/64
    python benchmarks/pipeline_plan.py --quick    # 1.3B/8 and 2.6B/8
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = [("gpt-1.3b", 1), ("gpt-2.6b", 1), ("gpt-6.7b", 2), ("gpt-15b", 4), ("gpt-39b", 8)]


def run(suite: str, nodes: int, microbatches: int, batch: int, dtype: str) -> dict:
    from autopar import PlanError, plan_training
    from examples import gpt
    params, data = gpt.params_and_batch(suite=suite, batch=batch, abstract=True, dtype=dtype)
    t0 = time.perf_counter()
    try:
        tp = plan_training(gpt.loss_fn, params, data, optimizer=gpt.OPTIMIZER, cluster="dgx-a100-80g",
                           nodes=nodes, num_microbatches=microbatches)
    except PlanError as err:
        return {"model": suite, "gpus": nodes * 8, "error": str(err), "plan_s": time.perf_counter() - t0}
    stages = [f"L{s.layers[0]}-{s.layers[1] - 1}@{s.submesh[0]}x{s.submesh[1]}/"
              f"{'x'.join(map(str, s.plan.mesh_shape))}" for s in tp.stages]
    return {"model": suite, "gpus": nodes * 8, "stages": len(tp.stages), "layout": stages,
            "step_s": tp.predicted.step_time_s, "dp_objective_s": tp.predicted.dp_objective_s,
            "bubble": tp.predicted.bubble_fraction, "peak_gb": tp.predicted.peak_memory_bytes / 1e9,
            "plan_s": time.perf_counter() - t0, "ilp_solves": tp.search.ilp_solves,
            "cache_hits": tp.search.cache_hits, "layers": tp.search.num_layers, "costing": tp.search.costing}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--microbatches", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", help="parameter/activation dtype (Alpa: fp16)")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline_plan"))
    ns = ap.parse_args()
    configs = CONFIGS[:2] if ns.quick else CONFIGS
    rows = []
    head = f"| model | GPUs | stages | layout (layers@sub-mesh/logical mesh) | predicted step | bubble | peak mem/GPU | plan time | ILP solves (cache hits) |"
    print(head)
    print("|" + "---|" * 9)
    lines = [head, "|" + "---|" * 9]
    for suite, nodes in configs:
        r = run(suite, nodes, ns.microbatches, ns.batch, ns.dtype)
        rows.append(r)
        if "error" in r:
            line = f"| {r['model']} | {r['gpus']} | – | {r['error'][:80]} | – | – | – | {r['plan_s']:.1f} s | – |"
        else:
            line = (f"| {r['model']} | {r['gpus']} | {r['stages']} | {' '.join(r['layout'])} | {r['step_s']:.2f} s | "
                    f"{r['bubble']:.1%} | {r['peak_gb']:.1f} GB | {r['plan_s']:.1f} s | {r['ilp_solves']} ({r['cache_hits']}) |")
        print(line, flush=True)
        lines.append(line)
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = (f"GPT suite (seq 1024, vocab 51200, {ns.dtype} params and activations, AdamW, no rematerialisation), global batch {ns.batch}, {ns.microbatches} "
            f"micro-batches, 1F1B, dgx-a100-80g (8 GPUs/node); planned from ShapeDtypeStructs on "
            f"{platform.machine()} ({platform.python_version()}), 2 cores.")
    out.with_suffix(".md").write_text("# Pipeline planning: GPT suite\n\n" + meta + "\n\n" + "\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwritten {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
