"""The model zoo benchmark: every model of ``examples/zoo/`` (flax linen unrolled and nn.scan,
flax NNX unrolled and nnx.scan, equinox, a GShard MoE, a ViT, Llama-3 unrolled and scanned from
``examples/llama.py``), each an optax AdamW training step.

* **full size**, planned from ShapeDtypeStructs (nothing allocated) on ``dgx-a100-80g`` ×
  nodes with the default mesh search: planning time, chosen mesh, predicted step time and peak
  memory per GPU, how many weight leaves are sharded, the ops replicated as fallbacks;
* **tiny size** on 8 simulated CPU devices, mesh (2, 4), on the fast-link test cluster
  (``tests/conftest.make_cluster(8)``, where sharding pays): predicted vs compiled collective
  bytes per device and peak memory (``plan.validate``), and whether the planned step runs equal
  to ``jax.jit`` (loss and the whole AdamW state at rtol 1e-5; parameters are not compared,
  AdamW turns float noise on ~zero gradients into ±lr updates).

    python benchmarks/zoo.py [--models linen_step vit_step ...] [--skip-full] [--skip-tiny] [--out benchmarks/results]

Writes OUT/zoo.md and OUT/zoo.json. ~4–6 min on the 2-core machine.
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import autopar  # noqa: E402
from _common import code_version  # noqa: E402
from autopar.cost import cluster_from_dict, load_cluster  # noqa: E402

CLUSTER = "dgx-a100-80g"
# (module in examples/zoo, step, nodes of CLUSTER at full size, the module's full config)
MODELS = [
    ("linen_transformer", "linen_step", 1, "FULL"),
    ("linen_transformer", "linen_scan_step", 2, "FULL_SCAN"),
    ("nnx_transformer", "nnx_step", 1, "FULL"),
    ("nnx_transformer", "nnx_scan_step", 4, "FULL_SCAN"),
    ("eqx_transformer", "eqx_step", 1, "FULL"),
    ("moe", "moe_step", 1, "FULL"),
    ("vit", "vit_step", 1, "FULL"),
    ("llama", "llama_step", 1, "FULL"),
    ("llama", "llama_scan_step", 8, "FULL_SCAN"),
    ("mixtral", "mixtral_step", 4, "FULL"),
]


def tiny_cluster():
    """tests/conftest.make_cluster(8): one node of 8, α 0.1 µs, 150 GB/s, 1 TFLOP/s, 4 GiB."""
    base = load_cluster("cpu-8").model_dump()
    return cluster_from_dict({
        **base, "name": "test-8", "devices_per_node": 8,
        "device": {**base["device"], "peak_flops": {"float32": 1e12}, "memory_bytes": 4 * 2**30},
        "intra_node_link": {"alpha_s": 1e-7, "bandwidth_bytes_per_s": 150e9},
        "inter_node_link": {"alpha_s": 1e-7, "bandwidth_bytes_per_s": 15e9}, "nics_per_node": 8})


def _weights(plan, params) -> tuple[int, int]:
    n = len(jax.tree.leaves(params))
    return sum(1 for s in plan.input_specs_flat[:n] if any(axes for axes in s)), n


def _fallbacks(plan) -> list:
    return [[f.primitive, f.count] for f in plan.fallbacks]


def full_row(mod, name: str, nodes: int, cfg_name: str) -> dict:
    args = getattr(mod, f"{name}_args")("full", abstract=True)
    t = time.perf_counter()
    plan = autopar.plan(getattr(mod, name), *args, cluster=CLUSTER, nodes=nodes)
    plan_s = time.perf_counter() - t
    sharded, leaves = _weights(plan, args[0])
    cfg = getattr(mod, cfg_name)
    return {"config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else repr(cfg),
            "cluster": CLUSTER, "nodes": nodes, "gpus": nodes * 8,
            "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(args[0]))),
            "plan_s": plan_s, "timing": plan.timing.model_dump(), "mesh": plan.mesh_shape,
            "step_s": plan.predicted.step_time_s, "peak_bytes": plan.predicted.peak_memory_bytes,
            "comm_bytes": plan.predicted.comm_bytes_per_device, "weights_sharded": sharded,
            "weight_leaves": leaves, "fallbacks": _fallbacks(plan), "solver": plan.solver.status}


def tiny_row(mod, name: str) -> dict:
    fn, args = getattr(mod, name), getattr(mod, f"{name}_args")("tiny")
    t = time.perf_counter()
    plan = autopar.plan(fn, *args, cluster=tiny_cluster(), mesh_shape=(2, 4))
    plan_s = time.perf_counter() - t
    v = plan.validate(*args)
    out, ref = plan.apply(fn)(*args), jax.jit(fn)(*args)
    pairs = [(out[2], ref[2])] + list(zip(jax.tree.leaves(out[1]), jax.tree.leaves(ref[1]), strict=True))
    equal, worst = True, 0.0
    for a, b in pairs:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        equal &= bool(np.allclose(a, b, rtol=1e-5, atol=1e-6))
        worst = max(worst, float(np.max(np.abs(a - b) / (1e-6 + 1e-5 * np.abs(b)), initial=0.0)))
    sharded, leaves = _weights(plan, args[0])
    return {"plan_s": plan_s, "mesh": plan.mesh_shape, "pred_bytes": v.predicted_total_bytes,
            "compiled_bytes": v.compiled_total_bytes, "pred_by_kind": v.predicted_bytes,
            "compiled_by_kind": v.compiled_bytes, "pred_peak": v.predicted_peak_bytes,
            "compiled_peak": v.compiled_peak_bytes, "equal": equal,
            "worst_over_tolerance": worst, "weights_sharded": sharded, "weight_leaves": leaves,
            "fallbacks": _fallbacks(plan)}


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f} GB"


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"


def _fb(fbs: list) -> str:
    return ", ".join(f"{p}×{c}" for p, c in fbs) if fbs else "0"


def table(rows: list[dict]) -> str:
    head = ("| model | full: GPUs | params | plan s | mesh | predicted step | peak/GPU | weights sharded | fallbacks "
            "| tiny (2×4): coll. bytes pred / compiled | peak pred / compiled | = jax.jit |")
    lines = [head, "|---|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        f, t = r.get("full"), r.get("tiny")
        cells = [r["model"]]
        if f:
            cells += [f"{f['gpus']} ({f['nodes']}×8)", f"{f['params'] / 1e9:.2f}B", f"{f['plan_s']:.1f}",
                      "×".join(map(str, f["mesh"])), _ms(f["step_s"]), _gb(f["peak_bytes"]),
                      f"{f['weights_sharded']}/{f['weight_leaves']}", _fb(f["fallbacks"])]
        else:
            cells += ["—"] * 8
        if t:
            d = t["compiled_bytes"] - t["pred_bytes"]
            cells += [f"{t['pred_bytes']:,.0f} / {t['compiled_bytes']:,.0f}" + (f" (**{d:+,.0f}**)" if d else ""),
                      f"{t['pred_peak']:,.0f} / {t['compiled_peak']:,.0f} "
                      f"({(t['pred_peak'] - t['compiled_peak']) / t['compiled_peak']:+.0%})",
                      "yes" if t["equal"] else f"**no** ({t['worst_over_tolerance']:.1f}× tol)"]
        else:
            cells += ["—"] * 3
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", help="step names (default: all)")
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other models' rows of the existing zoo.json (the run's models replace theirs)")
    ns = ap.parse_args(argv)
    rows, t0 = [], time.perf_counter()
    for module, name, nodes, cfg_name in MODELS:
        if ns.models and name not in ns.models:
            continue
        mod = importlib.import_module(f"examples.zoo.{module}")
        row = {"model": name, "module": f"examples/zoo/{module}.py", "code": code_version()}
        if not ns.skip_full:
            row["full"] = full_row(mod, name, nodes, cfg_name)
            print(f"{name} full: {row['full']['plan_s']:.1f} s, mesh {row['full']['mesh']}, "
                  f"step {_ms(row['full']['step_s'])}, fallbacks {_fb(row['full']['fallbacks'])}", flush=True)
        if not ns.skip_tiny:
            row["tiny"] = tiny_row(mod, name)
            print(f"{name} tiny: bytes {row['tiny']['pred_bytes']:,.0f} / {row['tiny']['compiled_bytes']:,.0f}, "
                  f"equal {row['tiny']['equal']}", flush=True)
        rows.append(row)
    total = time.perf_counter() - t0
    old, merged = Path(ns.out) / "zoo.json", ""
    if ns.merge and old.exists():   # every model's row in MODELS order, this run's where it has one
        before = json.loads(old.read_text())
        kept = {r["model"]: {"code": before["meta"]["code"], **r} for r in before["rows"]}
        kept.update({r["model"]: r for r in rows})
        rows = [kept[name] for _, name, _, _ in MODELS if name in kept]
        merged = (f" Merged: {', '.join(r['model'] for r in rows if r['code'] == code_version())} run now, the "
                  f"other rows kept from earlier runs (code per row: " +
                  ", ".join(f"{r['model']} {r['code']}" for r in rows) + ").")
    md = table(rows)
    print(md)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"code": code_version(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "jax": jax.__version__, "total_s": total, "cluster": CLUSTER}
    (out / "zoo.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    configs = "\n".join(f"* `{r['model']}` ({r['module']}): {r['full']['config']}" for r in rows if "full" in r)
    (out / "zoo.md").write_text(
        f"# Model zoo (`python benchmarks/zoo.py`)\n\nCode {meta['code']}, {meta['machine']}, jax {meta['jax']}, "
        f"whole run {total:.0f} s.{merged} Full size: AdamW step planned from ShapeDtypeStructs on {CLUSTER} × nodes, mesh "
        "search (1D and every 2D factorization). Tiny: 8 simulated CPU devices, mesh (2, 4), the test cluster "
        "(fast links); collective bytes are per device per step, compiled = the HLO after SPMD partitioning "
        "(while-loop bodies × trip count); peak memory compiled = arguments + outputs − aliased + temporaries; "
        "= jax.jit: loss and the whole AdamW state at rtol 1e-5.\n\n"
        f"{md}\n\nFull-size configs:\n\n{configs}\n")


if __name__ == "__main__":
    main()
