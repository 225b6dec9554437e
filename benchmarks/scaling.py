"""Intra-op planning time of the GPT training step vs depth and vs devices.

    python benchmarks/scaling.py [--quick] [--hidden 1024] [--cap-s 180] [--out benchmarks/results]

examples/gpt.py ``train_step`` (AdamW), planned from ShapeDtypeStructs (nothing allocated,
no devices needed), seq 1024, vocab 51200, on dgx-a100-80g:

* vs layers (2, 4, 8, 16, 24, 48, 96), 8 devices (1 node), batch 8: the fixed mesh (8,) and
  the full mesh search (8, 2x4, 4x2 solved one after the other, the fastest wins);
* vs devices (8 … 1024 = 1 … 128 nodes), 8 layers, batch = devices (every mesh axis can split
  the batch): the fixed 1D mesh (N,) and the 2D mesh (nodes, 8) (none at 1 node).

Every point is planned in its own process (``--point``); one that runs longer than ``--cap-s``
seconds is stopped and the larger points of its series are skipped with a note. Records the
planning time split (``plan.timing``: trace, strategies, solve), the solver problem size
(``plan.solver``: nodes, edges, strategies), the objective and status. Prints a table, fits the
slope of log(time) vs log(layers) / log(devices), and writes OUT/scaling.md, OUT/scaling.json
and OUT/scaling.png (two panels, log-log; points not proven optimal are boxed). ``--quick``:
hidden 256, a few points (< 2 min), written as scaling_quick.*. ``--replot JSON`` rewrites the
.md and .png from a saved .json without planning.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import code_version  # noqa: E402

CLUSTER = "dgx-a100-80g"


LAYERS = [2, 4, 8, 16, 24, 48, 96]
DEVICES = [8, 16, 32, 64, 128, 256, 512, 1024]

# What the measured numbers say (written after reading benchmarks/results/scaling.json;
# printed under "Reading" in the full run's .md).
INTERPRETATION = """\
Measured at 993d871 (hidden 1024); re-read the table after a rerun.

- **Layers, fixed mesh (8,)**: 1.9 s at 2 layers → 20.6 s at 96 layers (41,554 equations).
  Slope 0.59 over 2–96 layers, 0.67 over 8–96: **sub-linear, not worse than linear**. The
  part that grows is trace (slope 0.83) + strategy enumeration (0.76), roughly in proportion to
  the equation count. The ILP stops growing at 16 layers (1,690 nodes, 2,579 edges from 16 to
  96 layers, because repeated layers are tied), so the solve stays at 1.2–3.9 s.
- **Layers, full mesh search** (8, 2x4, 4x2): exact and 7–21 s up to 24 layers (LP-first
  path, 2.4–7.3 s per 2D mesh). From 48 layers on, each 2D mesh falls back to the heuristic and
  spends its whole default budget: 139 s at 48 layers and 147 s at 96, status *feasible*, with a
  reported gap of 8.7–8.8 % (a weak heuristic bound). The objectives remain below the 1D mesh's
  (376.6 vs 380.8 ms at 48 layers). The cause is that presolve keeps 813 nodes of the 2x4
  problem at 48 layers against 408 at 24. The ILP-size estimate then reaches 244,935, above
  `AUTO_ILP_VARIABLES` = 200,000 (`solvers/driver.py`), and `solve_heuristic` runs with its
  default `time_limit_s=60` (`solvers/heuristic.py:44`), because the planner passes no limit. The
  fitted slopes (0.76; 1.07 over 8–96) therefore describe a step at 48 layers, not a trend.
- **Devices** (8 layers): the 1D mesh is flat, 2.4–4.4 s from 8 to 1024 devices (slope 0.10),
  with the same 1,402-node ILP at every size. The 2D mesh (nodes, 8) takes 9.1 s at 2x8 and
  7.4 s at 4x8. From 8x8 to 128x8 it takes about 63 s: the same fallback (ILP-size estimate
  242,916 at 8x8 against 182,891 at 4x8), status feasible, gap 25–31 %. 1024 devices (128
  nodes) were reached, and no point hit the 180 s cap.
- An earlier run of this script at 1e4214e (the ILP had 1,173 nodes at 8 layers and 1,461 from
  16 layers) stayed exact everywhere: 29.8 s for the 48-layer search and 9.2 s at 8x8. The
  bigger problems of the current strategy rules crossed the threshold. Raising the threshold,
  or giving the heuristic a budget scaled to the problem, is the first lever; trace + strategy
  enumeration (15 of 20.6 s at 96 layers) is the next.
"""


def plan_point(p: dict) -> dict:
    """Plan one point in this process; returns the measurements."""
    import autopar
    from examples import gpt
    args = gpt.train_step_args(layers=p["layers"], hidden=p["hidden"], seq=p["seq"], vocab=p["vocab"],
                               batch=p["batch"], abstract=True)
    t0 = time.perf_counter()
    try:
        plan = autopar.plan(gpt.train_step, *args, cluster=CLUSTER, nodes=p["devices"] // 8,
                            mesh_shape=None if p["mesh"] == "search" else tuple(p["mesh"]),
                            donate_argnums=(0, 1))
    except autopar.PlanError as err:
        return dict(status="no plan", note=str(err)[:200], total_s=time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    t, s = plan.timing, plan.solver
    return dict(status=s.status, total_s=wall, trace_s=t.trace_s, strategies_s=t.strategies_s,
                solve_s=t.solve_s, per_mesh_solve_s=t.per_mesh_solve_s, eqns=len(plan.eqns),
                solver_nodes=s.nodes, solver_edges=s.edges, solver_strategies=s.strategies,
                objective_s=s.objective_s, gap=s.gap, solver=s.solver,
                mesh_chosen="x".join(map(str, plan.mesh_shape)), step_time_s=plan.predicted.step_time_s,
                peak_gib=plan.predicted.peak_memory_bytes / 2**30)


def run_point(p: dict, cap_s: float) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--point", json.dumps(p)], env=env, capture_output=True,
                              text=True, timeout=cap_s)
    except subprocess.TimeoutExpired:
        return dict(p, status="capped", note=f"stopped after {cap_s:.0f} s", total_s=time.perf_counter() - t0)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return dict(p, status="failed", note=(proc.stderr.strip().splitlines() or ["?"])[-1][:200],
                    total_s=time.perf_counter() - t0)
    return dict(p, **json.loads(lines[-1]), process_s=time.perf_counter() - t0)


def _mesh_label(m):
    return m if isinstance(m, str) else "x".join(map(str, m))


def sweep(series: list[tuple[str, list[dict]]], cap_s: float) -> list[dict]:
    rows = []
    for name, points in series:
        capped = None
        for p in points:
            p = dict(p, series=name)
            if capped is not None:
                rows.append(dict(p, status="skipped", note=f"a smaller point ({capped}) exceeded {cap_s:.0f} s"))
                print(f"{name:<22} L={p['layers']:<3} N={p['devices']:<5} skipped", flush=True)
                continue
            r = run_point(p, cap_s)
            rows.append(r)
            if r["status"] in ("capped", "failed"):
                capped = f"L={p['layers']} N={p['devices']}"
                print(f"{name:<22} L={p['layers']:<3} N={p['devices']:<5} {r['status']}: {r.get('note', '')}",
                      flush=True)
                continue
            if "trace_s" not in r:
                print(f"{name:<22} L={p['layers']:<3} N={p['devices']:<5} {r['status']}: {r.get('note', '')}",
                      flush=True)
                continue
            print(f"{name:<22} L={p['layers']:<3} N={p['devices']:<5} eqns {r['eqns']:<6} trace {r['trace_s']:6.2f}  "
                  f"strategies {r['strategies_s']:6.2f}  solve {r['solve_s']:6.2f}  total {r['total_s']:6.2f} s  "
                  f"ILP {r['solver_nodes']} nodes / {r['solver_edges']} edges  mesh {r['mesh_chosen']}  "
                  f"{r['status']}", flush=True)
    return rows


def slopes(rows, x_key, tail_from=None) -> dict:
    """Least-squares slope of log(time) vs log(x) per series, for total and each part; with
    ``tail_from`` also the slope of the total over the points with x >= tail_from."""
    import numpy as np
    out = {}
    for name in dict.fromkeys(r["series"] for r in rows):
        pts = [r for r in rows if r["series"] == name and "trace_s" in r]
        if len(pts) < 2:
            continue
        x = np.log([r[x_key] for r in pts])
        out[name] = {k: float(np.polyfit(x, np.log([max(r[k], 1e-3) for r in pts]), 1)[0])
                     for k in ("total_s", "trace_s", "strategies_s", "solve_s", "solver_nodes")}
        out[name]["range"] = f"{pts[0][x_key]}–{pts[-1][x_key]}"
        tail = [r for r in pts if tail_from is not None and r[x_key] >= tail_from]
        if len(tail) >= 2:
            out[name]["tail_total_s"] = float(np.polyfit(np.log([r[x_key] for r in tail]),
                                                         np.log([r["total_s"] for r in tail]), 1)[0])
            out[name]["tail_range"] = f"{tail[0][x_key]}–{tail[-1][x_key]}"
    return out


def table(rows) -> str:
    out = ["| series | layers | devices | mesh | equations | trace s | strategies s | solve s | total s | "
           "ILP nodes | ILP edges | strategies | objective ms | chosen mesh | status |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        head = f"| {r['series']} | {r['layers']} | {r['devices']} | {_mesh_label(r['mesh'])} |"
        if "trace_s" not in r:
            t = f"{r['total_s']:.1f}" if "total_s" in r else "—"
            out.append(f"{head} — | — | — | — | {t} | — | — | — | — | — | "
                       f"{r['status']}: {r.get('note', '')} |")
            continue
        out.append(f"{head} {r['eqns']:,} | {r['trace_s']:.2f} | {r['strategies_s']:.2f} | {r['solve_s']:.2f} | "
                   f"{r['total_s']:.2f} | {r['solver_nodes']:,} | {r['solver_edges']:,} | {r['solver_strategies']:,} | "
                   f"{1e3 * r['objective_s']:.2f} | {r['mesh_chosen']} | {r['status']} |")
    return "\n".join(out)


def slope_text(sl, what) -> str:
    lines = [f"| series | {what} | total | trace | strategies | solve | ILP nodes | total, tail |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, s in sl.items():
        tail = f"{s['tail_total_s']:.2f} ({what} {s['tail_range']})" if "tail_total_s" in s else "—"
        lines.append(f"| {name} | {s['range']} | {s['total_s']:.2f} | {s['trace_s']:.2f} | {s['strategies_s']:.2f} | "
                     f"{s['solve_s']:.2f} | {s['solver_nodes']:.2f} | {tail} |")
    return "\n".join(lines)


def _word(k):
    return "sub-linear" if k < 0.85 else "near-linear" if k <= 1.15 else "super-linear"


def verdict(sl) -> str:
    out = []
    for name, s in sl.items():
        k = s["total_s"]
        tail = (f"; over layers {s['tail_range']} ∝ L^{s['tail_total_s']:.2f} ({_word(s['tail_total_s'])})"
                if "tail_total_s" in s else "")
        out.append(f"- {name}: total time ∝ layers^{k:.2f} ({_word(k)}){tail}; trace ∝ L^{s['trace_s']:.2f}, "
                   f"strategies ∝ L^{s['strategies_s']:.2f}, solve ∝ L^{s['solve_s']:.2f}, "
                   f"ILP nodes ∝ L^{s['solver_nodes']:.2f}.")
    return "\n".join(out)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind, x_key in ((axes[0], "layers", "layers"), (axes[1], "devices", "devices")):
        for name in dict.fromkeys(r["series"] for r in rows if r["sweep"] == kind):
            pts = [r for r in rows if r["series"] == name and "trace_s" in r]
            if not pts:
                continue
            x = [r[x_key] for r in pts]
            line, = ax.plot(x, [r["total_s"] for r in pts], "o-", label=f"{name}: total")
            ax.plot(x, [r["solve_s"] for r in pts], "x--", color=line.get_color(), alpha=0.7,
                    label=f"{name}: solve")
            ax.plot(x, [r["trace_s"] + r["strategies_s"] for r in pts], ":", color=line.get_color(), alpha=0.7,
                    label=f"{name}: trace+strategies")
            for r in rows:
                if r["series"] == name and r["status"] == "capped":
                    ax.annotate("capped", (r[x_key], r["total_s"]), fontsize=8)
            inexact = [r for r in pts if r["status"] != "optimal"]
            if inexact:  # the solver stopped at a budget: feasible, not proven optimal
                ax.plot([r[x_key] for r in inexact], [r["total_s"] for r in inexact], "s", mfc="none", ms=11,
                        color=line.get_color(), label=f"{name}: not proven optimal")
        if kind == "layers":
            pts = [r for r in rows if r["sweep"] == "layers" and "trace_s" in r]
            if pts:
                lo, hi = min(r["layers"] for r in pts), max(r["layers"] for r in pts)
                y0 = min(r["total_s"] for r in pts if r["layers"] == lo)
                ax.plot([lo, hi], [y0, y0 * hi / lo], color="grey", lw=0.8, ls="-.", label="∝ layers (slope 1)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel(x_key)
        ax.set_ylabel("planning time, s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("GPT train step, 8 devices: time vs layers")
    axes[1].set_title("GPT train step, 8 layers: time vs devices")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="hidden 256, layers 2/4/8/16 and devices 8/512")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=51200)
    ap.add_argument("--layers", type=int, nargs="+")
    ap.add_argument("--devices", type=int, nargs="+")
    ap.add_argument("--device-sweep-layers", type=int, default=8)
    ap.add_argument("--cap-s", type=float, default=180.0, help="stop a point after this long, skip larger ones")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--replot", metavar="JSON", help="rewrite the .md and .png from a saved .json (no planning)")
    ap.add_argument("--point", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.point:
        print(json.dumps(plan_point(json.loads(a.point))), flush=True)
        return
    if a.replot:
        saved = json.loads(Path(a.replot).read_text())
        return write(saved["rows"], saved["meta"], Path(a.out))
    hidden = a.hidden or (256 if a.quick else 1024)
    layers = a.layers or ([2, 4, 8, 16] if a.quick else LAYERS)
    devices = a.devices or ([8, 512] if a.quick else DEVICES)
    base = dict(hidden=hidden, seq=a.seq, vocab=a.vocab)
    series = [
        ("layers, mesh 8", [dict(base, sweep="layers", layers=n, devices=8, batch=8, mesh=[8]) for n in layers]),
        ("devices, mesh N", [dict(base, sweep="devices", layers=a.device_sweep_layers, devices=n, batch=n, mesh=[n])
                             for n in devices]),
        ("devices, mesh nodes×8", [dict(base, sweep="devices", layers=a.device_sweep_layers, devices=n, batch=n,
                                        mesh=[n // 8, 8]) for n in devices if n > 8]),
    ]
    if not a.quick:
        series.insert(1, ("layers, mesh search", [dict(base, sweep="layers", layers=n, devices=8, batch=8,
                                                        mesh="search") for n in layers]))
    t0 = time.perf_counter()
    rows = sweep(series, a.cap_s)
    meta = dict(quick=a.quick, hidden=hidden, seq=a.seq, vocab=a.vocab, device_sweep_layers=a.device_sweep_layers,
                cap_s=a.cap_s, wall_s=time.perf_counter() - t0, machine=platform.machine(),
                python=platform.python_version(), cores=os.cpu_count(), code=code_version())
    write(rows, meta, Path(a.out))


def write(rows, meta, out: Path):
    sl_layers = slopes([r for r in rows if r["sweep"] == "layers"], "layers", tail_from=8)
    sl_devices = slopes([r for r in rows if r["sweep"] == "devices"], "devices")
    done = [r for r in rows if "trace_s" in r]
    biggest = {}
    for r in done:
        key = r["series"]
        if key not in biggest or (r["layers"], r["devices"]) > (biggest[key]["layers"], biggest[key]["devices"]):
            biggest[key] = r
    notes = [r for r in rows if r["status"] in ("capped", "skipped", "failed", "no plan")]
    name = "scaling_quick" if meta["quick"] else "scaling"
    md = [f"# Planning-time scaling\n",
          f"`python benchmarks/scaling.py{' --quick' if meta['quick'] else ''}` — GPT `train_step` (AdamW), hidden "
          f"{meta['hidden']}, seq {meta['seq']}, vocab {meta['vocab']}, planned from ShapeDtypeStructs on {CLUSTER} "
          f"(8 devices per node); layer sweep: 8 devices, batch 8; device sweep: {meta['device_sweep_layers']} layers, "
          f"batch = devices. Each point in its own process, capped at {meta['cap_s']:.0f} s; {len(rows)} points in "
          f"{meta['wall_s']:.0f} s. Times from `plan.timing` (total = wall time of `autopar.plan`; the process start "
          f"and imports are not counted). Code: {meta.get('code', 'unknown')}. Machine: {meta['machine']}, "
          f"Python {meta['python']}, {meta['cores']} cores, "
          "shared with other jobs while measured: single points are noisy by up to ~2×, compare slopes.\n",
          table(rows), "",
          "## Slopes (least squares on log–log)\n",
          slope_text(sl_layers, "layers"), "", verdict(sl_layers), "",
          slope_text(sl_devices, "devices"), "",
          "## Largest sizes reached\n",
          "\n".join(f"- {k}: L={r['layers']}, {r['devices']} devices, {r['eqns']:,} equations, "
                    f"{r['total_s']:.1f} s (solve {r['solve_s']:.1f} s, ILP {r['solver_nodes']:,} nodes)"
                    for k, r in biggest.items()),
          ("\n".join(f"- {r['series']} L={r['layers']} N={r['devices']}: {r['status']} ({r.get('note', '')})"
                     for r in notes) if notes else f"- no point reached the {meta['cap_s']:.0f} s cap"), "",
          f"![planning time]({name}.png)\n"]
    if INTERPRETATION and not meta["quick"]:
        md.insert(-1, "## Reading\n\n" + INTERPRETATION + "\n")
    md = "\n".join(md)
    print()
    print(md)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(json.dumps(dict(meta=meta, rows=rows, slopes_layers=sl_layers,
                                                      slopes_devices=sl_devices), indent=1))
    plot(rows, out / f"{name}.png")
    print(f"wrote {out / name}.md, .json, .png")


if __name__ == "__main__":
    main()
