"""Cost-model fidelity: autopar's predicted collective bytes and peak memory per device vs
what XLA compiles, on scaled-down models that compile on 4–64 simulated CPU devices.

    python benchmarks/fidelity.py [--quick] [--only SUBSTRING ...] [--hlo-dir DIR] [--out DIR]

For every config: ``autopar.plan(fn, *args, cluster=..., nodes=..., mesh_shape=...)``, then
``plan.validate(*args)`` (compiles the plan; collective bytes per device by kind parsed from
the per-device HLO; peak memory = arguments + outputs − aliased + temporaries from
``memory_analysis``). The device count is fixed per JAX process, so the script re-runs
itself once per device count (``--child``, with ``JAX_NUM_CPU_DEVICES`` set) and merges the
results; each child keeps a fresh persistent compilation cache and an XLA dump (buffer
assignment and live ranges) in a temporary directory.

Prints a table and the error distribution; writes OUT/fidelity.md and OUT/fidelity.json.
A config is a *miss* when its total-bytes error is > 5 % or its peak-memory error > 15 %;
for every miss the .md lists the per-kind byte differences, the reshard collectives (predicted
vs emitted at sharding constraints), XLA's "involuntary full rematerialization" warnings, what
each peak is made of (the memory model's live values at its peak, mapped back from the plan;
XLA's allocations and the temporaries live at its peak), and the explanation found by reading
the compiled HLO (``EXPLANATIONS`` below; ``--hlo-dir`` keeps every config's HLO text and plan
report for that reading). ``--rewrite JSON`` re-renders the .md from a saved .json.

Configs (all arguments are ShapeDtypeStructs: only compiled, never run, so sizes can be
realistic enough that the plans communicate): GPT (examples/gpt.py ``sgd_train_step`` and
AdamW ``train_step``; 2 layers, hidden 512, seq 512, vocab 8192) on 8 devices (meshes 8, 2x4,
4x2) and on 16/32/64 devices (dgx-a100-80g, nodes = devices/8; SGD on (N,) and (nodes, 8),
AdamW on (nodes, 8)); the MLP (examples/mlp.py ``mlp_step``: batch 128 / hidden 1024 on 4
devices (half a node) and 8 devices (8, 2x4); batch 1024 / hidden 128 on 8 devices of a
fast-link cluster, where data parallelism wins); examples/moe.py and examples/wresnet.py
(small ``sgd_train_step``) when they import. ``--quick``: 7 configs, 4–16 devices.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import code_version  # noqa: E402

BYTES_TOL = 0.05
MEM_TOL = 0.15
CLUSTER = "dgx-a100-80g"


GPT_KNOBS = dict(layers=2, hidden=512, seq=512, vocab=8192)
# the MLP's data-parallel regime needs links much faster than its tiny matmuls (tests/conftest.py's
# make_cluster): on dgx-a100-80g a 128×128 weight is cheaper to replicate than to all-reduce
FAST_LINKS = "fast-links"


# ----------------------------------------------------------------------------- configs

def configs() -> list[dict]:
    out = []

    def add(model, fn, knobs, devices, mesh, donate, quick=False, tag=None, cluster=CLUSTER):
        mesh_s = "x".join(map(str, mesh))
        name = tag or f"{model}.{fn}"
        out.append(dict(id=f"{name}@{mesh_s}", name=name, model=model, fn=fn, knobs=dict(knobs, abstract=True),
                        devices=devices, mesh=list(mesh), donate=list(donate), quick=quick, cluster=cluster))

    for fn, donate in (("sgd_train_step", (0,)), ("train_step", (0, 1))):
        for mesh in ((8,), (2, 4), (4, 2)):
            add("gpt", fn, dict(GPT_KNOBS, batch=16), 8, mesh, donate,
                quick=fn == "sgd_train_step" and mesh != (4, 2))
        for n in (16, 32, 64):  # AdamW only on the 2D mesh: the optimizer adds no collective
            for mesh in ((n,), (n // 8, 8)) if fn == "sgd_train_step" else ((n // 8, 8),):
                add("gpt", fn, dict(GPT_KNOBS, batch=n), n, mesh, donate,
                    quick=n == 16 and fn == "sgd_train_step" and len(mesh) == 2)
    add("mlp", "mlp_step", dict(batch=128, hidden=1024), 4, (4,), (0,), quick=True, tag="mlp.megatron")
    add("mlp", "mlp_step", dict(batch=128, hidden=1024), 8, (8,), (0,), quick=True, tag="mlp.megatron")
    add("mlp", "mlp_step", dict(batch=128, hidden=1024), 8, (2, 4), (0,), tag="mlp.megatron")
    add("mlp", "mlp_step", dict(batch=1024, hidden=128), 8, (8,), (0,), quick=True, tag="mlp.data_parallel",
        cluster=FAST_LINKS)
    add("moe", "sgd_train_step", dict(layers=2, hidden=256, experts=8, seq=256, vocab=8192, batch=16), 8, (8,),
        (0,), quick=True)
    add("moe", "sgd_train_step", dict(layers=2, hidden=256, experts=8, seq=256, vocab=8192, batch=16), 8, (2, 4),
        (0,))
    # (2, 4) left out of the default run: its plan alone takes ~65 s on the 2-core machine
    add("wresnet", "sgd_train_step", dict(layers=14, channels=32, width=2, image=64, batch=32), 8, (8,), (0,))
    return out


# Explanations of the misses, found by reading the compiled HLO, XLA's buffer assignment and
# live ranges (``--hlo-dir``; the XLA dump of the child) next to the plan report. Keyed by config
# id or name; a value is text or a function of the result row (so the numbers quoted are the
# ones of the run being written). Printed under "Differences explained".

SUMMARY = """\
**Summary.** One miss left (memory, a 4-device MLP); two causes of the previous run's 10 misses
were fixed in the cost model and are now measured within tolerance:

1. *Bytes* (was −9 % … −31 % on GPT 4x2, 4x8, 8x8): an axis moved to another dim while a minor
   axis of its source dim is gathered (batch split over (x, y) → hidden split over x) is done by
   XLA's SPMD partitioner as a full all-gather of the whole tensor ("involuntary full
   rematerialization"), not as the all-to-all + all-gather the model priced. `cost/resharding.py`
   now prices exactly that (`tests/test_resharding_hlo.py` checks 7 reshards against the HLO);
   all 22 configs are within 5 %, 21 to the byte.
2. *Memory* (was +14 % … +26 % over-prediction on GPT): the model charged broadcasts that XLA fuses
   into their elementwise consumers (the causal mask per layer, the loss-gradient broadcast),
   transposes that XLA folds into dots (wte.T) and dots whose only reader is a transpose (jax's
   weight gradients (xᵀg)ᵀ, written by XLA in the transposed layout). `autopar/build.py`
   (`fused_nodes`) charges none of them: GPT now +0.2 … +1.0 % on 1D meshes and −2.7 … −8.3 %
   on 2D meshes (the model still leaves out XLA's reshard buffers and does not fuse elementwise
   chains; the two now partly cancel). MoE moved from +7 % to −10 … −12 % (under-prediction, inside
   the tolerance: its dispatch/combine broadcasts were charged before).
"""


def _mlp_megatron(r) -> str:
    return (f"**Memory ({_pct(r['memory_error'])} %): program-order liveness of the gradients and an unfused "
            "update.** The model's peak (6.00 MiB) is at the SGD update of w1 (`mul`, lr·g). It holds the inputs "
            "(3.00 MiB: the 1 MiB shards of w1 and w2, plus x and y at 0.5 MiB each), both weight gradients "
            "(`transpose`, 1 MiB each: in program order every gradient stays live until the updates at the end) and "
            "the lr·g product (1 MiB). XLA needs 4.75 MiB = 3.00 arguments + 1.75 temporaries: it fuses "
            "p − lr·g into one in-place fusion on the donated parameter buffer (no `mul` buffer), updates w2 as "
            "soon as its gradient exists and reuses its slot, and copies w2 once (`copy`, 1 MiB). Net +1.25 MiB; "
            "the same pattern gives +14.5 % on 8 devices, just inside the tolerance. Cause worth an issue "
            "(`autopar/build.py`): elementwise chains are charged value by value (XLA keeps only the chain's "
            "output), and liveness follows program order (XLA's scheduler moves each update next to its "
            "gradient). Fix: charge an elementwise chain's intermediates nothing when the chain ends in a "
            "fusible consumer, and end a donated parameter's gradient at its update.")


EXPLANATIONS: dict = {
    "mlp.megatron@4": _mlp_megatron,
}


# ----------------------------------------------------------------------------- child process

def _cluster(devices, name=CLUSTER):
    from autopar.cost import cluster_from_dict, load_cluster
    if name == FAST_LINKS:  # as tests/conftest.py make_cluster: 1 TFLOP/s devices, α = 0.1 µs
        base = load_cluster("cpu-8").model_dump()
        link = {"alpha_s": 1e-7, "bandwidth_bytes_per_s": 150e9}
        return cluster_from_dict({**base, "name": FAST_LINKS, "devices_per_node": devices,
                                  "device": {**base["device"], "peak_flops": {"float32": 1e12}},
                                  "intra_node_link": link, "inter_node_link": link}), 1
    spec = load_cluster(name)
    if devices < spec.devices_per_node:  # half a DGX node: same device and links, 4 devices
        spec = spec.model_copy(update=dict(name=f"{CLUSTER}/{devices}", devices_per_node=devices))
        return spec, 1
    return spec, devices // spec.devices_per_node


def _local_bytes(shape, itemsize, spec, mesh_sizes) -> int:
    n = itemsize
    for d, axes in zip(shape, spec or []):
        k = 1
        for a in axes:
            k *= mesh_sizes[a]
        n *= -(-d // k)
    for d in list(shape)[len(spec or []):]:
        n *= d
    return n


def _collective_multiset(items):
    return Counter((k, int(round(b))) for k, b in items)


def run_one(cfg, hlo_dir=None) -> dict:
    import importlib

    import jax
    import numpy as np

    import autopar
    from autopar.validate import hlo_collectives

    row = dict(cfg)
    try:
        mod = importlib.import_module(f"examples.{cfg['model']}")
        fn = getattr(mod, cfg["fn"])
        args = getattr(mod, cfg["fn"] + "_args")(**cfg["knobs"])
    except Exception as err:  # the module is being written by someone else: skip, say why
        row.update(status="skipped", note=f"examples/{cfg['model']}.py: {type(err).__name__}: {err}"[:300])
        return row
    spec, nodes = _cluster(cfg["devices"], cfg["cluster"])
    t0 = time.perf_counter()
    try:
        plan = autopar.plan(fn, *args, cluster=spec, nodes=nodes, mesh_shape=tuple(cfg["mesh"]),
                            donate_argnums=tuple(cfg["donate"]))
    except Exception as err:
        row.update(status="plan failed", note=f"{type(err).__name__}: {err}"[:300])
        return row
    t1 = time.perf_counter()
    before = set(os.listdir(DUMP_DIR)) if DUMP_DIR and os.path.isdir(DUMP_DIR) else set()
    try:
        v = plan.validate(*args)
    except Exception as err:
        row.update(status="validate failed", note=f"{type(err).__name__}: {err}"[:300])
        return row
    t2 = time.perf_counter()
    kinds = sorted(set(v.predicted_bytes) | set(v.compiled_bytes))
    pb, cb = v.predicted_total_bytes, v.compiled_total_bytes
    pm, cm = v.predicted_peak_bytes, v.compiled_peak_bytes
    row.update(
        status="ok", cluster=spec.name, nodes=nodes, plan_s=t1 - t0, validate_s=t2 - t1,
        predicted_bytes={k: float(v.predicted_bytes.get(k, 0)) for k in kinds},
        compiled_bytes={k: float(v.compiled_bytes.get(k, 0)) for k in kinds},
        predicted_total_bytes=float(pb), compiled_total_bytes=float(cb),
        bytes_error=(pb - cb) / cb if cb else (0.0 if not pb else float("inf")),
        predicted_peak_bytes=float(pm), compiled_peak_bytes=float(cm),
        memory_error=(pm - cm) / cm if cm else 0.0,
        objective_s=plan.solver.objective_s, step_time_s=plan.predicted.step_time_s,
        predicted_count={k: t.count for k, t in plan.predicted.by_kind.items()},
        compiled_count=dict(Counter(c.kind for c in v.compiled_collectives)),
    )
    bytes_miss = abs(row["bytes_error"]) > BYTES_TOL
    mem_miss = abs(row["memory_error"]) > MEM_TOL
    row["miss"] = bytes_miss or mem_miss
    # what the memory and collective differences are made of (the raw material for the explanations)
    mesh_sizes = dict(zip(plan.axis_names, plan.mesh_shape))
    leaves = jax.tree_util.tree_leaves(args)
    in_bytes = sum(_local_bytes(s, np.dtype(x.dtype).itemsize, sp, mesh_sizes)
                   for x, s, sp in zip(leaves, plan.input_shapes, plan.input_specs_flat))
    row["predicted_input_bytes"] = float(in_bytes)
    pred = _collective_multiset((c.kind, c.bytes) for c in plan.predicted.collectives)
    comp = _collective_multiset((c.kind, c.bytes) for c in v.compiled_collectives)
    row["compiled_not_predicted"] = sorted([k, b, n] for (k, b), n in (comp - pred).items())
    row["predicted_not_compiled"] = sorted([k, b, n] for (k, b), n in (pred - comp).items())
    row["compiled_groups"] = sorted({(c.kind, c.group_size) for c in v.compiled_collectives})
    if row["miss"]:  # what the two peaks are made of, and which collectives XLA emitted for the reshards
        try:
            row["analysis"] = analyse(plan, fn, args, spec, nodes, v, before)
        except Exception as err:  # analysis is best effort: never lose the measurement
            row["analysis"] = dict(error=f"{type(err).__name__}: {err}"[:300])
    need_text = hlo_dir is not None or row["miss"]
    if need_text:  # compile again (validate keeps neither the text nor the memory breakdown)
        compiled = plan.apply(fn).lower(*args).compile()
        text = compiled.as_text()
        m = compiled.memory_analysis()
        row["compiled_memory"] = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                                      aliased=m.alias_size_in_bytes, temp=m.temp_size_in_bytes)
        colls = hlo_collectives(text)
        row["compiled_collectives"] = [dict(kind=c.kind, bytes=c.bytes, group=c.group_size,
                                            op=_op_name(c.line), shape=_result_shape(c.line))
                                       for c in colls]
        row["predicted_collectives"] = [dict(kind=c.kind, bytes=c.bytes, axes=c.axes, where=c.where[:120])
                                        for c in plan.predicted.collectives]
        if hlo_dir is not None:
            Path(hlo_dir).mkdir(parents=True, exist_ok=True)
            (Path(hlo_dir) / (cfg["id"].replace("/", "_") + ".hlo")).write_text(text)
            (Path(hlo_dir) / (cfg["id"].replace("/", "_") + ".plan.txt")).write_text(plan.report())
    return row


DUMP_DIR = None   # set in the child: XLA dumps each compiled module's buffer live ranges here


def _prim(op_name: str, fallback: str) -> str:
    """The jaxpr primitive of an HLO instruction (from its op_name metadata)."""
    if not op_name:
        return fallback
    last = op_name.split("/")[-1]
    return "inputs" if last.startswith("flat_args") else last.split("[")[0]


def xla_peak(dump_dir: str, prefix: str) -> dict:
    """What XLA's memory is made of: the parameter and output allocations whole, plus the
    temporaries live at the moment the temp allocation peaks (its buffer assignment and
    live ranges after scheduling), grouped by the jaxpr primitive each buffer comes from."""
    import re

    import numpy as np
    d = Path(dump_dir)
    hlo = (d / f"{prefix}.cpu_after_optimizations.txt").read_text()
    lr = (d / f"{prefix}.cpu_after_optimizations-live-range.txt").read_text()
    ba = (d / f"{prefix}.cpu_after_optimizations-buffer-assignment.txt").read_text()
    op_of, name_of = {}, {}
    for line in hlo[hlo.index("ENTRY"):].splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\(", line)
        if m:
            op_of[m.group(1)] = m.group(3)
            mm = re.search(r'op_name="([^"]*)"', line)
            name_of[m.group(1)] = mm.group(1) if mm else ""
    ranges = {(n, i): (int(a), int(b)) for n, i, a, b in
              re.findall(r"^\s*([\w.\-]+)\{([0-9,]*)\}:(\d+)-(\d+)", lr[lr.index("BufferLiveRange"):], re.M)}
    by: dict[str, float] = {}
    temp = []   # (bytes, name, start, end)
    kind = None
    for line in ba.splitlines():
        if line.startswith("allocation "):
            size = int(re.search(r"size (\d+)", line).group(1))
            kind = ("inputs" if "parameter" in line else "temp" if "preallocated-temp" in line
                    else "outputs" if "output" in line or "maybe-live-out" in line else None)
            if kind in ("inputs", "outputs"):
                by[kind] = by.get(kind, 0) + size
            continue
        m = re.match(r"\s*value: <\d+ ([\w.\-]+)(?:\{([0-9,]*)\})? @\d+> \(size=(\d+),offset=(\d+)\)", line)
        if m and kind == "temp":
            r = ranges.get((m.group(1), m.group(2) or ""))
            if r:
                temp.append((int(m.group(3)), m.group(1), *r))
    peak_t, at = 0.0, None
    if temp:
        T = max(b for *_, b in temp) + 2
        delta = np.zeros(T + 1)
        for n, _, a, b in temp:
            delta[a] += n
            delta[b + 1] -= n
        live = np.cumsum(delta)
        at = int(np.argmax(live))
        peak_t = float(live[at])
        for n, name, a, b in temp:
            if a <= at <= b:
                k = _prim(name_of.get(name, ""), op_of.get(name, "?"))
                by[k] = by.get(k, 0) + n
    return dict(peak=peak_t + by.get("inputs", 0) + by.get("outputs", 0), at=at, by=by)


def predicted_peak(plan, fn, args, spec, nodes) -> dict:
    """The memory model's largest live set: the plan's strategies mapped back onto the
    solver problem (autopar.build) and swept as ``solvers.evaluate`` does."""
    from autopar.build import build_problem
    from autopar.graph import build_graph
    from autopar.trace import trace
    from autopar.cost import mesh_model
    program = trace(fn, *args)
    graph = build_graph(program)
    ip = build_problem(graph, mesh_model(spec, nodes, tuple(plan.mesh_shape)),
                       memory_budget_bytes=plan.memory_budget_bytes, donated_inputs=plan.donated_inputs)
    names = plan.axis_names

    def conv(sp):
        return [[names[a] for a in axes] for axes in sp]
    off = len(program.invars) + len(program.consts)
    choice = []
    for v, ss in enumerate(ip.strategies):
        if v < len(program.invars):
            ok = [c for c, st in enumerate(ss) if conv(st.out_specs[0]) == plan.input_specs_flat[v]]
        elif v < off:
            ok = [0]
        else:
            e = plan.eqns[v - off]
            ok = [c for c, st in enumerate(ss)
                  if st.name == e.strategy and [conv(x) for x in st.out_specs] == e.out_specs]
        if not ok:
            raise ValueError(f"cannot map the plan's strategy of node {v} back onto the problem")
        choice.append(ok[0])
    P = ip.full
    items = [(v, float(u[choice[v]]), iv, False) for v, (u, iv) in enumerate(zip(P.node_usages, P.intervals))]
    items += [(v, float(u[choice[v]]), iv, True) for v, u, iv in P.extra_usages]
    items += [(-1, float(u), iv, False) for u, iv in P.fixed_usages]
    events = sorted([(a, 1, n) for _, n, (a, b), _ in items if b > a]
                    + [(b, 0, -n) for _, n, (a, b), _ in items if b > a])
    cur = peak = 0.0
    at = 0
    for t, _, d in events:
        cur += d
        if cur > peak:
            peak, at = cur, t
    by: dict[str, float] = {}
    top = []
    for v, n, (a, b), extra in items:
        if a <= at < b and n:
            node = graph.nodes[v] if v >= 0 else None
            k = ("fixed" if node is None else "inputs" if node.kind == "input" else node.name
                 + (" (unreduced partial sums)" if extra else ""))
            by[k] = by.get(k, 0) + n
            shape = tuple(node.outputs[0].shape) if node is not None else ()
            top.append((n, f"#{v} {k} {shape}"))
    top.sort(reverse=True)
    node = graph.nodes[at] if at < len(graph.nodes) else None
    where = f"#{at} {node.name}" + (f" ({node.eqn.source})" if node is not None and node.eqn is not None
                                     and node.eqn.source else "") if node is not None else f"#{at}"
    return dict(peak=peak, at=where, by=by, top=[[n, d] for n, d in top[:8]],
                matches_plan=abs(peak - plan.predicted.peak_memory_bytes) <= 1e-6 * max(peak, 1.0))


def analyse(plan, fn, args, spec, nodes, v, dumped_before) -> dict:
    out = {}
    pred = predicted_peak(plan, fn, args, spec, nodes)
    out["predicted_peak"] = pred
    if DUMP_DIR:
        new = sorted({f.split(".cpu_after")[0] for f in set(os.listdir(DUMP_DIR)) - dumped_before
                      if f.endswith("cpu_after_optimizations-live-range.txt") and ".jit_run" in f})
        if new:
            out["xla_peak"] = xla_peak(DUMP_DIR, new[-1])
    # collectives XLA emitted for reshards (op_name sharding_constraint) vs the reshards the plan costs
    comp = [(c.kind, c.bytes) for c in v.compiled_collectives if _op_name(c.line).endswith("sharding_constraint")]
    pred_r = [(c.kind, c.bytes) for c in plan.predicted.collectives if c.where.startswith("reshard")]
    out["reshard_compiled"] = {k: [sum(1 for x in comp if x[0] == k), sum(b for x, b in comp if x == k)]
                               for k in sorted({k for k, _ in comp})}
    out["reshard_predicted"] = {k: [sum(1 for x in pred_r if x[0] == k), sum(b for x, b in pred_r if x == k)]
                                for k in sorted({k for k, _ in pred_r})}
    return out


def _op_name(line: str) -> str:
    import re
    m = re.search(r'op_name="([^"]*)"', line)
    return m.group(1) if m else ""


def _result_shape(line: str) -> str:
    return line.split("=", 1)[1].strip().split(" ")[0] if "=" in line else ""


def child(path_in, path_out, hlo_dir, cache_dir):
    global DUMP_DIR
    DUMP_DIR = str(Path(cache_dir).parent / f"xla-dump-{os.getpid()}")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP_DIR} "
                               "--xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_run").strip()
    import jax
    # a fresh persistent compilation cache: validate compiles each plan once; reading the HLO text
    # and the memory breakdown of a miss afterwards is a cache hit instead of a second compile
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cfgs = json.loads(Path(path_in).read_text())
    rows = []
    for cfg in cfgs:
        t = time.perf_counter()
        print(f"@@ {cfg['id']}", flush=True)   # XLA's warnings that follow belong to this config
        row = run_one(cfg, hlo_dir)
        rows.append(row)
        if row["status"] == "ok":
            print(f"  {cfg['id']:<34} bytes {row['predicted_total_bytes']:>12,.0f} / "
                  f"{row['compiled_total_bytes']:>12,.0f}"
                  f" ({100 * row['bytes_error']:+6.1f} %)  peak {row['predicted_peak_bytes'] / 2**20:8.2f} / "
                  f"{row['compiled_peak_bytes'] / 2**20:8.2f} MiB ({100 * row['memory_error']:+6.1f} %)  "
                  f"[{time.perf_counter() - t:.1f} s]", flush=True)
        else:
            print(f"  {cfg['id']:<34} {row['status']}: {row.get('note', '')}", flush=True)
        Path(path_out).write_text(json.dumps(rows, default=str))


# ----------------------------------------------------------------------------- parent

def run_all(cfgs, hlo_dir=None) -> list[dict]:
    by_dev: dict[int, list] = {}
    for c in cfgs:
        by_dev.setdefault(c["devices"], []).append(c)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, group in sorted(by_dev.items()):
            print(f"{n} devices: {len(group)} configs", flush=True)
            fin, fout = Path(tmp) / f"in{n}.json", Path(tmp) / f"out{n}.json"
            fin.write_text(json.dumps(group))
            env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(n), JAX_PLATFORMS="cpu",
                       PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
            cmd = [sys.executable, __file__, "--child", str(fin), str(fout), str(Path(tmp) / "jax-cache")]
            if hlo_dir:
                cmd += ["--hlo-dir", hlo_dir]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            current, warnings = None, {}
            for line in proc.stdout:
                if line.startswith("@@ "):
                    current = line[3:].strip()
                    continue
                if "Involuntary full rematerialization" in line and current:
                    warnings.setdefault(current, []).append(_remat_summary(line))
                    continue
                print(line, end="", flush=True)
            proc.wait()
            done = json.loads(fout.read_text()) if fout.exists() else []
            for r in done:
                r["remat_warnings"] = warnings.get(r["id"], [])
            if proc.returncode != 0:
                print(f"  child for {n} devices exited with {proc.returncode}", flush=True)
            seen = {r["id"] for r in done}
            done += [dict(c, status="crashed", note=f"child exited {proc.returncode}") for c in group
                     if c["id"] not in seen]
            rows += done
    return rows


def _remat_summary(line: str) -> str:
    """XLA's "Involuntary full rematerialization" warning, shortened to the two shardings and the value."""
    import re
    m = re.search(r"from sharding (\{.*?\}) to (\{.*?\}) efficiently for HLO operation %[\w.\-]+ = (\S+)", line)
    return f"{m.group(3)}: {m.group(1)} → {m.group(2)}" if m else line.strip()[:200]


def _mb(x):
    return f"{x / 2**20:,.2f}"


def _pct(x):
    return f"{100 * x:+.1f}"


def table(rows) -> str:
    out = ["| config | mesh | devices | kind | predicted bytes | compiled bytes | error % | "
           "predicted peak MiB | compiled peak MiB | error % |",
           "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mesh = "x".join(map(str, r["mesh"]))
        name = r["name"] + (f" ({r['cluster']})" if r["cluster"] != CLUSTER else "")
        if r["status"] != "ok":
            out.append(f"| {name} | {mesh} | {r['devices']} | — | — | — | — | — | — | {r['status']}: "
                       f"{r.get('note', '')[:120]} |")
            continue
        kinds = list(r["compiled_bytes"]) or ["none"]
        for i, k in enumerate(kinds):
            p, c = r["predicted_bytes"].get(k, 0), r["compiled_bytes"].get(k, 0)
            err = _pct((p - c) / c) if c else ("—" if not p else "∞")
            mark = " ✗" if abs(r["memory_error"]) > MEM_TOL else ""
            tail = (f"{_mb(r['predicted_peak_bytes'])} | {_mb(r['compiled_peak_bytes'])} | "
                    f"{_pct(r['memory_error'])}{mark} |") if i == 0 else "| | |"
            first = f"| {name} | {mesh} | {r['devices']} |" if i == 0 else "| | | |"
            out.append(f"{first} {k} | {p:,.0f} | {c:,.0f} | {err} | {tail}")
        pb, cb = r["predicted_bytes"], r["compiled_bytes"]
        if pb.get("reduce-scatter", 0) and "all-reduce" in cb:  # XLA:CPU all-reduces where the plan reduce-scatters
            p2 = pb.get("reduce-scatter", 0) + pb.get("all-reduce", 0)
            c2 = cb.get("reduce-scatter", 0) + cb.get("all-reduce", 0)
            out.append(f"| | | | *all-reduce + reduce-scatter* | {p2:,.0f} | {c2:,.0f} | "
                       f"{_pct((p2 - c2) / c2) if c2 else '—'} | | | |")
        if len(kinds) > 1 or not r["compiled_bytes"]:
            be = r["bytes_error"]
            out.append(f"| | | | **total** | {r['predicted_total_bytes']:,.0f} | {r['compiled_total_bytes']:,.0f} | "
                       f"{_pct(be) if be != float('inf') else '∞'}{' ✗' if abs(be) > BYTES_TOL else ''} | | | |")
        elif abs(r["bytes_error"]) > BYTES_TOL:
            out[-1] = out[-1].replace(f"| {err} |", f"| {err} ✗ |", 1)
    return "\n".join(out)


def distribution(rows) -> tuple[str, dict]:
    import numpy as np
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return "no config compiled\n", {}
    be = np.array([abs(r["bytes_error"]) for r in ok if r["compiled_total_bytes"] > 0])
    me = np.array([abs(r["memory_error"]) for r in ok])
    nb = sum(abs(r["bytes_error"]) <= BYTES_TOL for r in ok)
    nm = sum(abs(r["memory_error"]) <= MEM_TOL for r in ok)
    both = sum(not r["miss"] for r in ok)
    stats = dict(configs=len(ok), skipped=len(rows) - len(ok),
                 bytes_abs_error=dict(min=float(be.min()), median=float(np.median(be)), max=float(be.max()))
                 if be.size else {},
                 memory_abs_error=dict(min=float(me.min()), median=float(np.median(me)), max=float(me.max())),
                 within_5pct_bytes=int(nb), within_15pct_memory=int(nm), within_both=int(both))
    lines = [f"- configs compiled: {len(ok)} (skipped/failed: {len(rows) - len(ok)})"]
    if be.size:
        lines.append(f"- |bytes error|: min {100 * be.min():.1f} %, median {100 * np.median(be):.1f} %, "
                     f"max {100 * be.max():.1f} % (over the {be.size} configs with collectives)")
    lines.append(f"- |peak memory error|: min {100 * me.min():.1f} %, median {100 * np.median(me):.1f} %, "
                 f"max {100 * me.max():.1f} %")
    lines.append(f"- within 5 % bytes: {nb}/{len(ok)}; within 15 % memory: {nm}/{len(ok)}; both: {both}/{len(ok)}")
    return "\n".join(lines) + "\n", stats


def miss_details(r) -> str:
    mesh = "x".join(map(str, r["mesh"]))
    out = [f"### {r['name']} @ {mesh} ({r['devices']} devices)", ""]
    pb, cb = r["predicted_bytes"], r["compiled_bytes"]
    out.append(f"- bytes: predicted {r['predicted_total_bytes']:,.0f}, compiled {r['compiled_total_bytes']:,.0f} "
               f"({_pct(r['bytes_error'])} %); by kind (predicted count/bytes → compiled count/bytes): "
               + "; ".join(f"{k} {r['predicted_count'].get(k, 0)}/{pb.get(k, 0):,.0f} → "
                           f"{r['compiled_count'].get(k, 0)}/{cb.get(k, 0):,.0f}" for k in cb))
    if pb.get("reduce-scatter"):
        p2 = pb.get("reduce-scatter", 0) + pb.get("all-reduce", 0)
        c2 = cb.get("reduce-scatter", 0) + cb.get("all-reduce", 0)
        out.append(f"- all-reduce + reduce-scatter together: predicted {p2:,.0f}, compiled {c2:,.0f} "
                   f"({_pct((p2 - c2) / c2) if c2 else '—'} %; XLA:CPU emits all-reduce where the plan "
                   "reduce-scatters)")
    an = r.get("analysis", {})
    if an.get("reshard_predicted") or an.get("reshard_compiled"):
        fmt = lambda d: ", ".join(f"{k} {n}×/{b:,.0f}" for k, (n, b) in d.items()) or "none"  # noqa: E731
        out.append(f"- reshards: predicted {fmt(an.get('reshard_predicted', {}))}; compiled from sharding "
                   f"constraints {fmt(an.get('reshard_compiled', {}))}")
    if r.get("remat_warnings"):
        w = Counter(r["remat_warnings"])
        out.append(f"- XLA \"involuntary full rematerialization\" (replicate, then re-partition): "
                   + "; ".join(f"{k}{f' ×{n}' if n > 1 else ''}" for k, n in w.items()))
    cm = r.get("compiled_memory")
    out.append(f"- memory: predicted peak {_mb(r['predicted_peak_bytes'])} MiB (of which sharded inputs "
               f"{_mb(r['predicted_input_bytes'])} MiB), compiled {_mb(r['compiled_peak_bytes'])} MiB "
               f"({_pct(r['memory_error'])} %)"
               + (f" = arguments {_mb(cm['arguments'])} + outputs {_mb(cm['outputs'])} − aliased "
                  f"{_mb(cm['aliased'])} + temporaries {_mb(cm['temp'])} MiB" if cm else ""))
    pp, xp = an.get("predicted_peak"), an.get("xla_peak")
    if pp and xp:
        out.append(f"- the two peaks by the primitive that made each live buffer (MiB; the model's peak, at "
                   f"{pp['at']}: {_mb(pp['peak'])}; XLA's live buffers after scheduling, parameter and output "
                   "allocations + "
                   f"the temporaries live at instruction {xp['at']} of its schedule: {_mb(xp['peak'])}):")
        out.append("")
        out.append("  | made by | model | XLA | model − XLA |")
        out.append("  |---|---:|---:|---:|")
        keys = sorted((k for k in set(pp["by"]) | set(xp["by"])
                       if max(pp["by"].get(k, 0), xp["by"].get(k, 0)) >= 2**14),
                      key=lambda k: -abs(pp["by"].get(k, 0) - xp["by"].get(k, 0)))
        rest_p = sum(pp["by"].get(k, 0) for k in keys[8:])
        rest_x = sum(xp["by"].get(k, 0) for k in keys[8:])
        for k in keys[:8]:
            a_, b_ = pp["by"].get(k, 0), xp["by"].get(k, 0)
            out.append(f"  | {k} | {_mb(a_)} | {_mb(b_)} | {(a_ - b_) / 2**20:+,.2f} |")
        if keys[8:]:
            out.append(f"  | (other) | {_mb(rest_p)} | {_mb(rest_x)} | {(rest_p - rest_x) / 2**20:+,.2f} |")
        out.append("")
        if not pp.get("matches_plan", True):
            out.append("  (the remapped model peak differs from the plan's: the breakdown is approximate)")
    elif an.get("error"):
        out.append(f"- (analysis failed: {an['error']})")
    expl = EXPLANATIONS.get(r["id"]) or EXPLANATIONS.get(r["name"])
    if callable(expl):
        try:
            expl = expl(r)
        except Exception as err:  # an explanation must never lose the measurement
            expl = f"_(explanation failed: {type(err).__name__}: {err})_"
    out.append("")
    out.append(expl if expl else "_(not yet explained)_")
    out.append("")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a subset (< 2 min): 8/16 devices, SGD GPT, MLPs")
    ap.add_argument("--only", nargs="+", help="run the configs whose id contains one of these strings")
    ap.add_argument("--hlo-dir", help="write each config's compiled HLO text and plan report here")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--rewrite", metavar="JSON", help="rewrite the .md from a saved .json (no compiling)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rewrite:
        saved = json.loads(Path(a.rewrite).read_text())
        return write(saved["rows"], saved["meta"], Path(a.out))
    if a.child:
        fin, fout, cache = a.child
        return child(fin, fout, a.hlo_dir, cache)
    cfgs = configs()
    if a.quick:
        cfgs = [c for c in cfgs if c["quick"]]
    if a.only:
        cfgs = [c for c in cfgs if any(s in c["id"] for s in a.only)]
    t0 = time.perf_counter()
    rows = run_all(cfgs, a.hlo_dir)
    import jax
    meta = dict(quick=bool(a.quick or a.only), wall_s=time.perf_counter() - t0, code=code_version(),
                jax=jax.__version__, machine=platform.machine(), python=platform.python_version(),
                cores=os.cpu_count(), command="python benchmarks/fidelity.py" + (" --quick" if a.quick else "")
                + (" --only " + " ".join(a.only) if a.only else ""))
    write(rows, meta, Path(a.out))


def write(rows, meta, out: Path):
    dist, stats = distribution(rows)
    misses = [r for r in rows if r["status"] == "ok" and r["miss"]]
    md = [f"# Cost-model fidelity: predicted vs compiled\n",
          f"`{meta['command']}` — {len(rows)} configs in {meta['wall_s']:.0f} s. "
          f"Cluster {CLUSTER} (8 devices per node, nodes = devices/8; the 4-device rows use half a node), "
          f"simulated CPU devices, jax {meta['jax']}. Bytes: collective bytes per device "
          "(the full buffer of each collective, as `cost.comm` and `autopar.validate` count them); peak: "
          "bytes per device (compiled: arguments + outputs − aliased + temporaries). "
          f"A miss: |bytes error| > {100 * BYTES_TOL:.0f} % or |memory error| > {100 * MEM_TOL:.0f} % (✗). "
          f"Error = (predicted − compiled) / compiled. Code: {meta['code']}. "
          f"Machine: {meta['machine']}, Python {meta['python']}, {meta['cores']} cores.\n",
          "GPT: 2 layers, hidden 512 (32 heads), seq 512, vocab 8192, batch 16 on 8 devices and batch = devices "
          "above; MLP: 2 layers, SGD (`fast-links`: tests/conftest.py's cluster, 1 TFLOP/s, α = 0.1 µs); "
          "MoE: 2 layers "
          "h256, 8 experts, seq 256, vocab 8192, batch 16; WResNet: L14 c32 w2 64×64 batch 32. All planned "
          "and compiled from ShapeDtypeStructs.\n",
          "Per kind, XLA:CPU emits an all-reduce (then a slice) wherever the plan has a reduce-scatter, so "
          "those two kinds are compared together in the *all-reduce + reduce-scatter* row; the error that "
          "counts is the **total** row.\n",
          table(rows), "", "## Error distribution\n", dist]
    md.append("## Differences explained\n")
    if misses:
        md.append("Every config outside 5 % bytes / 15 % memory: the numbers of this run (per-kind bytes, the "
                  "reshard collectives, XLA's rematerialization warnings, and what each peak is made of — the "
                  "model's live values at its peak vs XLA's buffer assignment), then the cause found in the "
                  "compiled HLO.\n")
        if SUMMARY:
            md.append(SUMMARY + "\n")
    else:
        md.append("No misses in this run.\n")
    md += [miss_details(r) for r in misses]
    md = "\n".join(md)
    print()
    print(md)
    out.mkdir(parents=True, exist_ok=True)
    name = "fidelity_quick" if meta["quick"] else "fidelity"
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(json.dumps(dict(meta=meta, summary=stats, rows=rows), indent=1, default=str))
    print(f"wrote {out / name}.md and .json")


if __name__ == "__main__":
    main()
