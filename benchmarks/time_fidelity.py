"""Measured step time vs predicted: does the cost model, fitted by ``autopar calibrate``, rank plans
the way the hardware does?

    python benchmarks/time_fidelity.py [--spec SPEC.json] [--quick] [--repeats 7] [--only NAME ...]
    python benchmarks/time_fidelity.py --rewrite benchmarks/results/time_fidelity.json   # tables from saved data

1. Calibrate on the devices JAX sees (``autopar.calibrate``; 8 simulated CPU devices here, the
   GPUs of a GPU machine — the script is the same) and write the spec to
   ``OUT/time_fidelity_spec.json`` (``--spec`` skips this and uses a spec already fitted).
2. For every model config (MLP, GPT, MoE, Wide-ResNet at sizes whose step takes milliseconds on
   a CPU; ``--scale`` multiplies batch sizes on bigger machines), plan ``autopar.plan`` (mesh
   searched) and the four intra-op baselines (data parallel, FSDP, Megatron, DP×TP) with the
   calibrated spec — five *candidates* per config.
3. Run each candidate (``plan.apply``, inputs placed in the plan's layouts beforehand), compile,
   warm up, then time ``--repeats`` calls of each, the candidates of a config in turn (so a change
   of machine load hits them alike): median step time and spread (max − min) / median.

Reports, against the issue's targets: median and max |relative error| (predicted − measured) /
measured over all candidates; Spearman and Kendall rank correlation of predicted vs measured,
pooled and within each config (the one that says whether the model ranks a config's plans);
how often the candidate predicted fastest is the measured fastest or within 10 % of it; how
often autopar's own plan is within 10 % of the measured fastest. Writes
OUT/time_fidelity.{md,json,png}; the machine load (``os.getloadavg``) before and after.

On a shared machine the speed changes between calibration and measurement: a fixed matmul on
every device (``autopar.calibrate.load_probe``), timed right after calibrating and in turn with
each config's candidates, measures by how much (reported per config as a load indicator).
Discordant pairs (ordered one way by the prediction, the other by the measurement) are counted
with how many of them are closer in measured time than their spread: orders the measurement
cannot resolve on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import numpy as np  # noqa: E402

from benchmarks._common import code_version  # noqa: E402

CANDIDATES = ("autopar", "data_parallel", "fsdp", "megatron", "dp_tp")
WITHIN = 0.10

# (name, example module, step function, knobs, batch argnums); batch knobs scale with --scale
CONFIGS = [
    ("mlp-wide", "mlp", "mlp_step", dict(batch=64, hidden=1024, layers=2), (1, 2)),
    ("mlp-batch", "mlp", "mlp_step", dict(batch=2048, hidden=128, layers=2), (1, 2)),
    ("mlp-deep", "mlp", "mlp_step", dict(batch=256, hidden=512, layers=4), (1, 2)),
    ("gpt", "gpt", "sgd_train_step", dict(layers=2, hidden=128, seq=64, vocab=1024, batch=16), (1,)),
    ("gpt-wide", "gpt", "sgd_train_step", dict(layers=2, hidden=256, seq=32, vocab=512, batch=8), (1,)),
    ("moe", "moe", "sgd_train_step", dict(layers=2, hidden=64, experts=8, seq=32, vocab=512, batch=16), (1,)),
    ("wresnet", "wresnet", "sgd_train_step", dict(layers=14, channels=8, width=2, image=32, batch=16), (1,)),
    ("mlp-square", "mlp", "mlp_step", dict(batch=512, hidden=512, layers=2), (1, 2)),
    ("mlp-narrow", "mlp", "mlp_step", dict(batch=1024, hidden=256, layers=6), (1, 2)),
    ("mlp-tall", "mlp", "mlp_step", dict(batch=4096, hidden=256, layers=3), (1, 2)),
    ("mlp-widest", "mlp", "mlp_step", dict(batch=128, hidden=2048, layers=2), (1, 2)),
    ("gpt-deep", "gpt", "sgd_train_step", dict(layers=4, hidden=128, seq=64, vocab=1024, batch=16), (1,)),
    ("gpt-long", "gpt", "sgd_train_step", dict(layers=2, hidden=128, seq=256, vocab=1024, batch=8), (1,)),
    ("gpt-vocab", "gpt", "sgd_train_step", dict(layers=2, hidden=128, seq=64, vocab=8192, batch=16), (1,)),
    ("gpt-batch", "gpt", "sgd_train_step", dict(layers=2, hidden=128, seq=64, vocab=1024, batch=64), (1,)),
    ("moe-wide", "moe", "sgd_train_step", dict(layers=2, hidden=128, experts=8, seq=32, vocab=512, batch=16), (1,)),
    ("moe-experts", "moe", "sgd_train_step", dict(layers=2, hidden=64, experts=16, seq=32, vocab=512, batch=32),
     (1,)),
    ("wresnet-wide", "wresnet", "sgd_train_step", dict(layers=14, channels=16, width=2, image=32, batch=16), (1,)),
    ("wresnet-batch", "wresnet", "sgd_train_step", dict(layers=14, channels=8, width=2, image=32, batch=64), (1,)),
    ("wresnet-image", "wresnet", "sgd_train_step", dict(layers=14, channels=8, width=2, image=64, batch=16), (1,)),
]
QUICK = ("mlp-wide", "gpt")


def _build(module: str, fn_name: str, knobs: dict):
    import importlib
    mod = importlib.import_module(f"examples.{module}")
    fn = getattr(mod, fn_name)
    make = getattr(mod, f"{fn_name}_args")
    return fn, make(**knobs, abstract=True), make(**knobs, abstract=False)


def _candidates(fn, abstract, spec, batch_argnums):
    import autopar
    from autopar import PlanError, baselines
    out = {}
    for name in CANDIDATES:
        t0 = time.perf_counter()
        try:
            if name == "autopar":
                plan = autopar.plan(fn, *abstract, cluster=spec, time_limit_s=20)
            else:
                plan = baselines.BASELINES[name](fn, *abstract, cluster=spec, batch_argnums=batch_argnums,
                                                 time_limit_s=20)
            out[name] = (plan, time.perf_counter() - t0)
        except PlanError as err:
            out[name] = (None, str(err).split(";")[0][:160])
    return out


def measure_interleaved(calls: dict, warmup: int, repeats: int) -> dict:
    """{name: (median s, spread)} of the zero-argument ``calls``, timed in turn (call 1 of each,
    then call 2 of each, …) so that a change of machine load hits every candidate alike."""
    import jax
    for fn in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    return {k: (float(np.median(ts)), float((max(ts) - min(ts)) / np.median(ts))) for k, ts in times.items()}


PROBE = "(load probe)"


def run_config(cfg, spec, warmup: int, repeats: int, scale: int, probe, probe_s: float) -> list[dict]:
    name, module, fn_name, knobs, batch_argnums = cfg
    knobs = dict(knobs, batch=knobs["batch"] * scale)
    fn, abstract, concrete = _build(module, fn_name, knobs)
    plans, calls, rows = _candidates(fn, abstract, spec, batch_argnums), {}, []
    for cand, (plan, _) in plans.items():
        if plan is not None:
            sharded = plan.apply(fn)
            args = sharded.shard_inputs(*concrete)
            calls[cand] = lambda sharded=sharded, args=args: sharded(*args)
    calls[PROBE] = probe   # timed in turn with the candidates: how much slower than at calibration
    timed = measure_interleaved(calls, warmup, repeats)
    slowdown = timed[PROBE][0] / probe_s
    for cand, (plan, info) in plans.items():
        row = dict(config=name, candidate=cand, knobs=knobs)
        if plan is None:
            rows.append(dict(row, status="no plan", note=info))
            continue
        measured, spread = timed[cand]
        p = plan.predicted
        rows.append(dict(row, status="ok", mesh=list(plan.mesh_shape), plan_s=info, predicted_s=p.step_time_s,
                         compute_s=p.compute_s, comm_s=p.comm_s, collectives=len(p.collectives),
                         measured_s=measured, spread=spread, error=(p.step_time_s - measured) / measured,
                         slowdown=slowdown))
        print(f"  {name:<10} {cand:<14} mesh {'x'.join(map(str, plan.mesh_shape)):<4} predicted "
              f"{p.step_time_s * 1e3:8.3f} ms  measured {measured * 1e3:8.3f} ms ± {100 * spread:3.0f} %  "
              f"error {100 * rows[-1]['error']:+6.1f} % (load probe ×{slowdown:.2f})", flush=True)
    return rows


# ----------------------------------------------------------------------------- statistics

def _ranks(x) -> np.ndarray:
    x = np.asarray(x, float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for v in np.unique(x):   # ties share their mean rank
        ranks[x == v] = ranks[x == v].mean()
    return ranks


def spearman(a, b) -> float:
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def kendall(a, b) -> float:
    """Kendall's τ-b."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    conc = disc = ta = tb = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
            if da == 0 and db == 0:
                continue
            if da == 0:
                ta += 1
            elif db == 0:
                tb += 1
            elif da == db:
                conc += 1
            else:
                disc += 1
    denom = np.sqrt((conc + disc + ta) * (conc + disc + tb))
    return float((conc - disc) / denom) if denom else float("nan")


def summarize(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    err = np.array([abs(r["error"]) for r in ok])
    pred, meas = [r["predicted_s"] for r in ok], [r["measured_s"] for r in ok]
    per = {}
    for name in dict.fromkeys(r["config"] for r in ok):
        rs = [r for r in ok if r["config"] == name]
        fastest = min(rs, key=lambda r: r["measured_s"])
        chosen = min(rs, key=lambda r: r["predicted_s"])
        ours = next((r for r in rs if r["candidate"] == "autopar"), None)
        per[name] = dict(
            candidates=len(rs), spearman=spearman([r["predicted_s"] for r in rs], [r["measured_s"] for r in rs]),
            kendall=kendall([r["predicted_s"] for r in rs], [r["measured_s"] for r in rs]),
            measured_fastest=fastest["candidate"], predicted_fastest=chosen["candidate"],
            predicted_fastest_is_fastest=chosen is fastest,
            predicted_fastest_within=chosen["measured_s"] <= (1 + WITHIN) * fastest["measured_s"],
            autopar_within=ours is not None and ours["measured_s"] <= (1 + WITHIN) * fastest["measured_s"],
            autopar_over_fastest=ours["measured_s"] / fastest["measured_s"] if ours else None)
    disc = noisy = 0
    for name in per:
        rs = [r for r in ok if r["config"] == name]
        for i, a in enumerate(rs):
            for b in rs[i + 1:]:
                if (a["predicted_s"] - b["predicted_s"]) * (a["measured_s"] - b["measured_s"]) < 0:
                    disc += 1
                    gap = abs(a["measured_s"] - b["measured_s"]) / min(a["measured_s"], b["measured_s"])
                    noisy += gap < max(a["spread"], b["spread"])
    finite = lambda xs: [x for x in xs if np.isfinite(x)]  # noqa: E731
    sp, kd = finite([p["spearman"] for p in per.values()]), finite([p["kendall"] for p in per.values()])
    spreads = np.array([r["spread"] for r in ok])
    # the prediction scaled by how much slower the machine ran beside the config than at calibration
    # (its load probe): the error left when the machine's speed change is taken out
    scaled = np.array([abs(r["predicted_s"] * r["slowdown"] - r["measured_s"]) / r["measured_s"] for r in ok])
    return dict(
        median_abs_error_load_scaled=float(np.median(scaled)) if scaled.size else None,
        points=len(ok), configs=len(per), failed=len(rows) - len(ok),
        median_abs_error=float(np.median(err)) if err.size else None,
        max_abs_error=float(err.max()) if err.size else None,
        mean_signed_error=float(np.mean([r["error"] for r in ok])) if ok else None,
        slowdown=[float(min(r["slowdown"] for r in ok)), float(max(r["slowdown"] for r in ok))] if ok else None,
        spearman_pooled=spearman(pred, meas), kendall_pooled=kendall(pred, meas),
        spearman_within_mean=float(np.mean(sp)) if sp else None,
        kendall_within_mean=float(np.mean(kd)) if kd else None,
        predicted_fastest_is_fastest=sum(p["predicted_fastest_is_fastest"] for p in per.values()),
        predicted_fastest_within=sum(p["predicted_fastest_within"] for p in per.values()),
        autopar_within=sum(p["autopar_within"] for p in per.values()),
        discordant_pairs=disc, discordant_within_spread=noisy,
        spread_median=float(np.median(spreads)) if spreads.size else None,
        spread_max=float(spreads.max()) if spreads.size else None, per_config=per)


# ----------------------------------------------------------------------------- output

def _ms(s) -> str:
    return f"{s * 1e3:.3f}"


def table(rows: list[dict]) -> str:
    out = ["| config | candidate | mesh | predicted ms | measured ms (spread) | error % | compute / comm ms | "
           "load probe |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['config']} | {r['candidate']} | — | — | — | — | {r['status']}: "
                       f"{r.get('note', '')} | |")
            continue
        out.append(f"| {r['config']} | {r['candidate']} | {'x'.join(map(str, r['mesh']))} | {_ms(r['predicted_s'])} | "
                   f"{_ms(r['measured_s'])} (±{100 * r['spread']:.0f} %) | {100 * r['error']:+.1f} | "
                   f"{_ms(r['compute_s'])} / {_ms(r['comm_s'])} | ×{r['slowdown']:.2f} |")
    return "\n".join(out)


def per_config_table(s: dict) -> str:
    out = ["| config | Spearman | Kendall | predicted fastest | measured fastest | within 10 % | autopar / fastest |",
           "|---|---:|---:|---|---|---|---:|"]
    for name, p in s["per_config"].items():
        ratio = f"{p['autopar_over_fastest']:.2f}" if p["autopar_over_fastest"] else "—"
        out.append(f"| {name} | {p['spearman']:.2f} | {p['kendall']:.2f} | {p['predicted_fastest']} | "
                   f"{p['measured_fastest']} | {'yes' if p['predicted_fastest_within'] else 'no'} | {ratio} |")
    return "\n".join(out)


def headline(s: dict) -> list[str]:
    n = s["configs"]
    return [
        f"- {s['points']} measured candidates in {n} configs ({s['failed']} candidates without a plan)",
        f"- |error|: median {100 * s['median_abs_error']:.1f} %, max {100 * s['max_abs_error']:.1f} % "
        f"(mean signed {100 * s['mean_signed_error']:+.1f} %) — target median ≤ 25 %",
        f"- machine speed: a fixed matmul on every device (timed in turn with each config's candidates) ran "
        f"×{s['slowdown'][0]:.2f} … ×{s['slowdown'][1]:.2f} slower than right after calibrating" + (
            f"; each prediction × its config's slowdown: median |error| {100 * scaled:.1f} %"
            if (scaled := s.get("median_abs_error_load_scaled")) is not None else ""),
        f"- rank correlation within a config (mean over configs): Spearman {s['spearman_within_mean']:.2f}, "
        f"Kendall {s['kendall_within_mean']:.2f}; pooled over all candidates: Spearman "
        f"{s['spearman_pooled']:.2f}, Kendall {s['kendall_pooled']:.2f} — target ≥ 0.8",
        f"- discordant pairs within configs: {s['discordant_pairs']}, of which {s['discordant_within_spread']} are "
        "closer in measured time than the larger spread of the two (an order the measurement does not resolve)",
        f"- candidate predicted fastest is the measured fastest in {s['predicted_fastest_is_fastest']}/{n} configs, "
        f"within 10 % of it in {s['predicted_fastest_within']}/{n}",
        f"- autopar's plan within 10 % of the measured-fastest candidate in {s['autopar_within']}/{n} configs "
        "— target ≥ 90 %",
        f"- measurement spread (max − min) / median: median {100 * s['spread_median']:.0f} %, "
        f"max {100 * s['spread_max']:.0f} %",
    ]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    markers = dict(zip(CANDIDATES, "o^svD"))
    configs = list(dict.fromkeys(r["config"] for r in ok))
    colors = plt.get_cmap("tab10")
    for r in ok:
        ax.errorbar(r["measured_s"] * 1e3, r["predicted_s"] * 1e3, xerr=r["spread"] * r["measured_s"] * 1e3 / 2,
                    fmt=markers[r["candidate"]], color=colors(configs.index(r["config"])), ms=6, alpha=0.8, lw=0.8)
    lo = min(min(r["measured_s"], r["predicted_s"]) for r in ok) * 1e3 * 0.7
    hi = max(max(r["measured_s"], r["predicted_s"]) for r in ok) * 1e3 * 1.4
    xs = np.array([lo, hi])
    ax.plot(xs, xs, "k-", lw=0.8)
    ax.fill_between(xs, xs * 0.75, xs * 1.25, color="gray", alpha=0.15, label="±25 %")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured step time, ms (bar: spread)")
    ax.set_ylabel("predicted step time (calibrated spec), ms")
    for i, c in enumerate(configs):
        ax.plot([], [], "o", color=colors(i), label=c)
    for c, m in markers.items():
        ax.plot([], [], m, color="gray", label=c)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Predicted vs measured step time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(rows, summary, meta, fits_text: str, out: Path) -> None:
    md = ["# Measured step time vs predicted (calibrated spec)\n",
          f"`{meta['command']}` — {meta['devices']} {meta['device_kind']} devices, jax {meta['jax']}, "
          f"{meta['cores']} cores, load average {meta['load_before']} before / {meta['load_after']} after, "
          f"{meta['wall_s']:.0f} s. Code: {meta['code']}. Each candidate: compiled, {meta['warmup']} warm-up "
          f"calls, then the median of {meta['repeats']} timed calls, the candidates of a config timed in turn; "
          "spread = (max − min) / median. Error = "
          "(predicted − measured) / measured.\n",
          "## Summary\n", "\n".join(headline(summary)) + "\n",
          "## Per config\n", per_config_table(summary) + "\n",
          "## Every candidate\n", table(rows) + "\n",
          "## Calibration used\n", f"Spec: `{meta['spec']}`.\n", "```\n" + fits_text + "\n```\n"]
    text = "\n".join(md)
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    name = "time_fidelity_quick" if meta["quick"] else "time_fidelity"
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(dict(meta=meta, summary=summary, rows=rows), indent=1, default=str))
    if any(r["status"] == "ok" for r in rows):
        plot(rows, out / f"{name}.png")
    print(f"wrote {out / name}.md, .json, .png")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", help="a calibrated spec JSON (default: calibrate now)")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}, quick calibration")
    ap.add_argument("--only", nargs="+", help="configs whose name contains one of these")
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per candidate (default 7)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--scale", type=int, default=1, help="multiply every batch size (GPUs: e.g. 16)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--rewrite", metavar="JSON", help="re-render the .md/.png (summary recomputed) from a saved .json")
    a = ap.parse_args()
    if a.rewrite:
        saved = json.loads(Path(a.rewrite).read_text())
        rows = [{k: v for k, v in r.items() if k != "error_load_adjusted"} for r in saved["rows"]]
        return write(rows, summarize(rows), saved["meta"], saved["meta"].get("fits", ""), Path(a.out))
    if a.repeats < 5 and not a.quick:
        raise SystemExit(f"--repeats must be ≥ 5 for a reported run, got {a.repeats}")
    import jax
    from autopar.calibrate import calibrate, report, write as write_spec
    from autopar.cost import load_cluster
    from autopar.cost.calibration import Calibration, format_fits
    t0 = time.perf_counter()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    out = Path(a.out)
    if a.spec:
        spec = load_cluster(a.spec)
        side = Path(a.spec).with_name(Path(a.spec).stem + ".calibration.json")
        fits_text = (format_fits((c := Calibration.model_validate_json(side.read_text())).fits, c.samples)
                     if side.exists() else "(no calibration data next to the spec)")
        spec_path = a.spec
    else:
        spec, cal = calibrate(quick=a.quick, name="time-fidelity")
        fits_text = report(spec, cal)
        print(fits_text)
        spec_path, _ = write_spec(spec, cal, out / ("time_fidelity_spec_quick.json" if a.quick
                                                    else "time_fidelity_spec.json"))
    spec_path = Path(spec_path).resolve()
    spec_path = spec_path.relative_to(ROOT) if spec_path.is_relative_to(ROOT) else spec_path
    from autopar.calibrate import Timer, load_probe
    probe = load_probe()
    probe_s = Timer(2, 15)(probe)[0]   # right after calibrating: the machine's speed the spec describes
    print(f"load probe: {probe_s * 1e3:.3f} ms", flush=True)
    cfgs = [c for c in CONFIGS if (not a.quick or c[0] in QUICK) and (not a.only or any(s in c[0] for s in a.only))]
    rows = []
    for cfg in cfgs:
        print(f"{cfg[0]}: planning {len(CANDIDATES)} candidates, measuring …", flush=True)
        rows += run_config(cfg, spec, a.warmup, a.repeats, a.scale, probe, probe_s)
    summary = summarize(rows)
    meta = dict(command="python benchmarks/time_fidelity.py" + " ".join([""] + sys.argv[1:]), quick=bool(a.quick),
                devices=len(jax.devices()), device_kind=jax.devices()[0].device_kind, jax=jax.__version__,
                cores=os.cpu_count(), machine=platform.machine(), load_before=load_before,
                load_after=" ".join(f"{x:.2f}" for x in os.getloadavg()), wall_s=time.perf_counter() - t0,
                code=code_version(), warmup=a.warmup, repeats=a.repeats, spec=str(spec_path), scale=a.scale,
                probe_s=probe_s, fits=fits_text)
    write(rows, summary, meta, fits_text, out)


if __name__ == "__main__":
    main()
