"""A decoder written with ``jax.lax.scan`` over stacked layer weights (MaxText / Levanter
style) against the same decoder unrolled by a Python loop: planning time, predicted step,
and whether corresponding weights get the same sharding, at growing depth.

    python benchmarks/scan_depth.py [--layers 4 8 16 32] [--hidden 1024] [--cluster dgx-a100-80g]
                                    [--combine-all-gathers]

Planned from ShapeDtypeStructs (nothing allocated), SGD training step, mesh search on one
node. Writes OUT/scan_depth.md and OUT/scan_depth.json (with ``--combine-all-gathers``: the
cluster with ``ClusterSpec.combine_all_gathers``, as XLA:GPU compiles; OUT/scan_depth_combining.*).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import autopar


def block(h, w):
    b, s, d = h.shape
    heads = w["qkv"].shape[2]
    x = _norm(h)
    q, k, v = (jnp.einsum("bsd,dhk->bshk", x, w["qkv"][:, i]) for i in range(3))
    att = jax.nn.softmax(jnp.einsum("bqhk,bshk->bhqs", q, k) / jnp.sqrt(q.shape[-1]), axis=-1)
    h = h + jnp.einsum("bshk,hkd->bsd", jnp.einsum("bhqs,bshk->bqhk", att, v), w["o"])
    x = _norm(h)
    return h + jax.nn.gelu(x @ w["up"]) @ w["down"]


def _norm(x):
    return (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)


def loss_scan(p, tokens):
    h = p["embed"][tokens]
    h, _ = jax.lax.scan(lambda c, w: (block(c, w), None), h, p["blocks"])
    return jnp.mean(jax.nn.logsumexp(h @ p["embed"].T, axis=-1))


def loss_loop(p, tokens):
    h = p["embed"][tokens]
    for w in p["blocks"]:
        h = block(h, w)
    return jnp.mean(jax.nn.logsumexp(h @ p["embed"].T, axis=-1))


def sgd(loss):
    def step(p, tokens):
        value, g = jax.value_and_grad(loss)(p, tokens)
        return jax.tree.map(lambda a, b: a - 1e-3 * b, p, g), value
    return step


def shapes(layers, d, heads, vocab, stacked):
    S, f = jax.ShapeDtypeStruct, jnp.float32
    one = {"qkv": (d, 3, heads, d // heads), "o": (heads, d // heads, d), "up": (d, 4 * d), "down": (4 * d, d)}
    if stacked:
        blocks = {k: S((layers, *v), f) for k, v in one.items()}
    else:
        blocks = [{k: S(v, f) for k, v in one.items()} for _ in range(layers)]
    return {"embed": S((vocab, d), f), "blocks": blocks}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--cluster", default="dgx-a100-80g")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--combine-all-gathers", action="store_true")
    a = ap.parse_args()
    cluster = a.cluster
    if a.combine_all_gathers:
        from autopar.cost import cluster_from_dict, load_cluster
        cluster = cluster_from_dict({**load_cluster(a.cluster).model_dump(), "combine_all_gathers": True})
    tokens = jax.ShapeDtypeStruct((a.batch, a.seq), jnp.int32)
    rows = []
    for n in a.layers:
        row = {"layers": n}
        for kind, loss in (("scan", loss_scan), ("loop", loss_loop)):
            params = shapes(n, a.hidden, a.heads, a.vocab, kind == "scan")
            t0 = time.perf_counter()
            plan = autopar.plan(sgd(loss), params, tokens, cluster=cluster)
            row[f"{kind}_s"] = time.perf_counter() - t0
            row[f"{kind}_step_ms"] = plan.predicted.step_time_s * 1e3
            row[f"{kind}_mesh"] = "x".join(map(str, plan.mesh_shape))
            blocks = plan.input_specs[0]["blocks"]
            row[f"{kind}_specs"] = {k: str(tuple(v)[1:] if kind == "scan" else tuple(v))
                                    for k, v in (blocks if kind == "scan" else blocks[0]).items()}
            row[f"{kind}_fallbacks"] = sum(f.count for f in plan.fallbacks)
        row["same_specs"] = row["scan_specs"] == row["loop_specs"] and row["scan_mesh"] == row["loop_mesh"]
        row["time_ratio"] = row["scan_s"] / row["loop_s"]
        row["step_ratio"] = row["scan_step_ms"] / row["loop_step_ms"]
        rows.append(row)
        print(f"L={n:<3} scan {row['scan_s']:6.2f} s  loop {row['loop_s']:6.2f} s  ratio {row['time_ratio']:.2f}  "
              f"step {row['scan_step_ms']:.2f} / {row['loop_step_ms']:.2f} ms  same specs {row['same_specs']}",
              flush=True)
    suffix = "_combining" if a.combine_all_gathers else ""
    lines = [f"# Scanned vs unrolled decoder ({a.cluster}{' + combine_all_gathers' if suffix else ''}, d {a.hidden}, seq {a.seq}, batch {a.batch}, "
             f"vocab {a.vocab}; {platform.machine()}, {jax.__version__})", "",
             "| layers | scan plan s | loop plan s | scan/loop time | scan step ms | loop step ms | step ratio "
             "| mesh | same weight specs |", "|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['scan_s']:.2f} | {r['loop_s']:.2f} | {r['time_ratio']:.2f} | "
                     f"{r['scan_step_ms']:.2f} | {r['loop_step_ms']:.2f} | {r['step_ratio']:.3f} | "
                     f"{r['scan_mesh']} / {r['loop_mesh']} | {r['same_specs']} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"scan_depth{suffix}.md").write_text("\n".join(lines) + "\n")
    (out / f"scan_depth{suffix}.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
