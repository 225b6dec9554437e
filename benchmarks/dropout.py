"""Dropout in a full-size pipeline plan: the zoo's flax linen ``nn.scan`` decoder (GPT-6.7B
shape: d 4096, 32 heads, 32 layers, seq 1024, batch 16; ``examples/zoo/linen_transformer``)
planned by ``autopar.plan_training`` from ShapeDtypeStructs on dgx-a100-80g × 2 nodes, 8
micro-batches, AdamW, remat and ZeRO-1 searched:

* ``none``: ``loss_fn``, no dropout;
* ``exact``: ``dropout_loss_fn`` (GPT-2's dropout 0.1, a key in the batch), each micro-batch
  drawing its rows of the whole batch's masks (``autopar.pipeline.rng_form``: counters
  computed per element, then threefry) — the step equal to ``jax.jit``'s;
* ``repeated``: the same loss with that rewrite switched off — every micro-batch drawing the
  whole batch's first rows, what a pipeline step did before (not the jit step): the price of
  exactness is ``exact`` − ``repeated``.

Prints a table and writes OUT/dropout.{md,json}.

    python benchmarks/dropout.py [--microbatches 8] [--nodes 2] [--out benchmarks/results]
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import autopar  # noqa: E402
import autopar.pipeline.inputs as inputs_module  # noqa: E402
from _common import code_version  # noqa: E402
from examples.zoo import linen_transformer as zoo  # noqa: E402

CLUSTER = "dgx-a100-80g"


def _plan(case: str, microbatches: int, nodes: int) -> dict:
    params, _, tokens = zoo._args(zoo.FULL_SCAN, abstract=True)
    loss = zoo.loss_fn if case == "none" else zoo.dropout_loss_fn
    batch = tokens if case == "none" else {"tokens": tokens, "dropout": jax.eval_shape(lambda: jax.random.key(0))}
    keep = inputs_module.per_microbatch
    if case == "repeated":   # the rewrite off: the draws as traced for one micro-batch
        inputs_module.per_microbatch = lambda loss_fn, p, mb, B, traced=None: (loss_fn, mb)
    try:
        t0 = time.perf_counter()
        tplan = autopar.plan_training(loss, params, batch, optimizer=optax.adamw(1e-4), cluster=CLUSTER, nodes=nodes,
                                      num_microbatches=microbatches)
        took = time.perf_counter() - t0
    finally:
        inputs_module.per_microbatch = keep
    p = tplan.predicted
    return dict(case=case, step_s=p.step_time_s, peak_gb=p.peak_memory_bytes / 1e9, plan_s=took,
                batch_draws=tplan.batch_draws, stages=len(tplan.stages),
                remat=sorted({s.remat for s in tplan.stages}),
                meshes=sorted({"x".join(map(str, s.plan.mesh_shape)) for s in tplan.stages}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    rows = []
    for case in ("none", "exact", "repeated"):
        rows.append(_plan(case, args.microbatches, args.nodes))
        r = rows[-1]
        print(f"{case:>9}: step {r['step_s']:.4f} s, peak {r['peak_gb']:.1f} GB, {r['stages']} stage(s), remat "
              f"{r['remat']}, meshes {r['meshes']}, batch draws {r['batch_draws']}, planned in {r['plan_s']:.0f} s",
              flush=True)
    head = (f"# Dropout in a full-size pipeline plan\n\nzoo linen nn.scan decoder, GPT-6.7B shape, batch 16 × seq "
            f"1024, {CLUSTER} × {args.nodes} nodes, {args.microbatches} micro-batches, AdamW; predicted by autopar's "
            f"cost model. Code {code_version()}, {platform.machine()}, Python {platform.python_version()}.\n\n"
            "| case | predicted step | peak memory / GPU | stages | remat | meshes | batch draws | plan time |\n"
            "|---|---:|---:|---:|---|---|---:|---:|\n")
    lines = [f"| {r['case']} | {r['step_s']:.4f} s | {r['peak_gb']:.1f} GB | {r['stages']} | {', '.join(r['remat'])} | "
             f"{', '.join(r['meshes'])} | {r['batch_draws']} | {r['plan_s']:.0f} s |" for r in rows]
    ex, rep, none = (next(r for r in rows if r["case"] == c) for c in ("exact", "repeated", "none"))
    tail = (f"\n\nExact draws cost {100 * (ex['step_s'] / rep['step_s'] - 1):+.2f} % of the step against repeated "
            f"ones, dropout {100 * (ex['step_s'] / none['step_s'] - 1):+.2f} % against none.\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dropout.md").write_text(head + "\n".join(lines) + tail)
    (out / "dropout.json").write_text(json.dumps(dict(rows=rows, code=code_version(), cluster=CLUSTER,
                                                      nodes=args.nodes, microbatches=args.microbatches), indent=1))
    print(head + "\n".join(lines) + tail)


if __name__ == "__main__":
    main()
