"""``autopar calibrate``: microbenchmarks on the devices JAX sees, fitted into a ClusterSpec.

Every benchmark is a jitted program, compiled and called ``warmup`` times before ``repeats``
timed calls (each until ``block_until_ready``); a sample is the median and the spread
(max − min) / median. What is timed (the fitting is ``cost.calibration``):

* **matmul** per dtype: ``a @ b`` of n×n blocks of several sizes n and skinny (n, n, d) and
  (n, d, n) ones (M, K, N), every device at once
  (``shard_map`` over all devices; the per-device throughput when the mesh is busy) and on one
  device alone (the ratio is ``DeviceSpec.shared_by``: simulated CPU devices share the host).
* **conv**: a 3×3 convolution and its two gradients (a training step's three convolutions) per
  dtype and channel count, every device at once: their rate over the matmul rate is
  ``DeviceSpec.conv_efficiency`` × a matmul-style efficiency of few channels (``conv_half_dim``).
* **elementwise** ``x · 1.5 + 0.5`` over vectors of several sizes on every device (bytes read
  + written → memory bandwidth), and a chain of ``CHAIN_OPS`` such ops at the largest size (not
  much slower than one op: XLA fuses chains → ``ClusterSpec.fuse_elementwise``).
* **collectives** all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute
  over each axis of each candidate mesh (``planner.candidate_meshes``), several sizes. One op
  per call would also time the program launch, so each is run as a chain of 1 and of
  ``1 + CHAIN`` dependent ops in one program and the difference / CHAIN is the time of one op
  (the glue keeping a chain's ops apart — an O(1) in-place update, or the slice / in-place
  update that brings a gather / scatter back to its input's shape — is charged at the fitted
  memory bandwidth and subtracted). An axis whose groups span processes (``jax.distributed``) is an
  inter-node link, else an intra-node one; the two are fitted apart.
* **sync**: a small all-reduce after each of k matmuls vs the matmuls alone, and k of them back to
  back: the difference per op, printed, is what ``ClusterSpec.collective_sync_s`` would charge
  (not written into the spec: it follows the machine's load).
* **combining**: ``COMBINE`` independent all-reduces of the smallest size in one program vs one
  (not much dearer: XLA combines them → ``ClusterSpec.combine_all_reduces``).
* **launch**: a tiny program on every device: ``ClusterSpec.step_overhead_s``.

Sizes are per platform (``SIZES``): CPU sizes keep a run around a minute on 8 simulated devices.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from autopar.cost import ClusterSpec, load_cluster
from autopar.cost.calibration import Calibration, Fit, Sample, fit_spec, fit_throughput, format_fits, link_errors

from .planner import candidate_meshes

CHAIN = 2
CHAIN_OPS = 8
COMBINE = 8
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclass(frozen=True)
class Sizes:
    matmul: tuple[int, ...]        # n of n×n blocks
    skinny: tuple[int, ...]        # d of (n, n, d) and (n, d, n) matmuls, n the largest square size
    elementwise: tuple[int, ...]   # elements per device
    collective: tuple[int, ...]    # bytes per device (cost.comm's n)
    dtypes: tuple[str, ...]
    conv: tuple[tuple[int, int, int], ...] = ()   # (batch, image side, channels) per device of a 3×3 conv


SIZES = {
    "cpu": Sizes((128, 256, 384, 512), (16, 64), (1 << 16, 1 << 18, 1 << 20, 1 << 21),
                 (1 << 12, 1 << 15, 1 << 18, 1 << 21), ("float32",),
                 ((2, 32, 8), (2, 32, 16), (2, 32, 32), (2, 16, 64))),
    "gpu": Sizes((1024, 2048, 4096, 8192), (32, 128), (1 << 22, 1 << 24, 1 << 26, 1 << 27),
                 (1 << 16, 1 << 20, 1 << 24, 1 << 27), ("float32", "bfloat16", "float16"),
                 ((32, 56, 16), (32, 56, 64), (32, 28, 256))),
}
QUICK = {"cpu": Sizes((128, 256, 384), (16,), (1 << 16, 1 << 19), (1 << 12, 1 << 19), ("float32",), ((2, 16, 8), (2, 16, 32))),
         "gpu": Sizes((1024, 4096), (64,), (1 << 22, 1 << 26), (1 << 16, 1 << 24), ("float32", "bfloat16"),
                      ((32, 56, 32), (32, 28, 128)))}


@dataclass(frozen=True)
class Timer:
    warmup: int = 2
    repeats: int = 7

    def __call__(self, fn, *args) -> tuple[float, float]:
        """(median seconds, spread) of ``fn(*args)``."""
        return self.many([fn], *args)[0]

    def many(self, fns, *args) -> list[tuple[float, float]]:
        """(median, spread) of each ``fn(*args)``, timed in turn (a change of load hits all alike)."""
        for fn in fns:
            for _ in range(self.warmup):
                jax.block_until_ready(fn(*args))
        ts = [[] for _ in fns]
        for _ in range(self.repeats):
            for k, fn in enumerate(fns):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                ts[k].append(time.perf_counter() - t0)
        return [(statistics.median(t), (max(t) - min(t)) / statistics.median(t)) for t in ts]


def _devices() -> list:
    """Node-major (as ``cost.comm.mesh_model`` lays meshes out): by process, then id."""
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def _names(k: int) -> tuple[str, ...]:
    return ("x", "y", "z")[:k]


def _global(mesh: Mesh, per_device: tuple[int, ...], dtype, seed: int = 0):
    """An array whose dim 0 is split over every mesh axis: ``per_device`` on each device."""
    shape = (per_device[0] * mesh.devices.size,) + tuple(per_device[1:])
    sharding = NamedSharding(mesh, P(mesh.axis_names))
    host = (np.random.default_rng(seed).standard_normal(shape) * 0.01).astype(jax.numpy.dtype(dtype))  # bf16 too
    return jax.make_array_from_callback(shape, sharding, lambda idx: host[idx])


def _sharded(mesh: Mesh, body):
    spec = P(mesh.axis_names)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))


def _platform() -> str:
    return "cpu" if jax.devices()[0].platform == "cpu" else "gpu"


# ----------------------------------------------------------------------------- compute

def matmul_samples(timer: Timer, sizes: Sizes) -> list[Sample]:
    devs = _devices()
    mesh = Mesh(np.array(devs), ("x",))
    out = []
    big = max(sizes.matmul)
    shapes = [(n, n, n) for n in sizes.matmul] + [(big, big, d) for d in sizes.skinny] + \
        [(big, d, big) for d in sizes.skinny]
    local = [d for d in devs if d.process_index == jax.process_index()][0]
    for dtype in sizes.dtypes:
        for m, k, n in shapes:
            a = _global(mesh, (m, k), dtype, 1)
            b = _global(mesh, (k, n), dtype, 2)
            t, s = timer(_sharded(mesh, lambda x, y: x @ y), a, b)
            out.append(Sample(kind="matmul", dtype=dtype, flops=2.0 * m * k * n, dims=(m, k, n), seconds=t,
                              spread=s, repeats=timer.repeats))
            if jax.process_count() == 1:   # one device of a multi-process job alone would desynchronise it
                x1, y1 = (jax.device_put(np.ones(shape, jax.numpy.dtype(dtype)), local) for shape in ((m, k), (k, n)))
                t, s = timer(jax.jit(lambda x, y: x @ y), x1, y1)
                out.append(Sample(kind="matmul", dtype=dtype, flops=2.0 * m * k * n, dims=(m, k, n), seconds=t,
                                  spread=s, repeats=timer.repeats, alone=True))
    return out


def conv_samples(timer: Timer, sizes: Sizes) -> list[Sample]:
    """A 3×3 convolution (NHWC) and both its gradients in one program, every device at once."""
    mesh = Mesh(np.array(_devices()), ("x",))
    out = []
    for dtype in sizes.dtypes:
        for batch, side, c in sizes.conv:
            x = _global(mesh, (batch, side, side, c), dtype, 4)
            w = jax.numpy.full((3, 3, c, c), 0.01, jax.numpy.dtype(dtype))

            def step(v, w=w):
                conv = lambda v, w: jax.lax.conv_general_dilated(   # noqa: E731
                    v, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
                gv, gw = jax.grad(lambda v, w: (conv(v, w) ** 2).sum(), argnums=(0, 1))(v, w)
                return gv + gw.sum()
            t, s = timer(_sharded(mesh, step), x)
            out.append(Sample(kind="conv", dtype=dtype, flops=3 * 2.0 * batch * side * side * c * c * 9, seconds=t,
                              spread=s, repeats=timer.repeats, dims=(batch * side * side, 9 * c, c)))
    return out


def elementwise_samples(timer: Timer, sizes: Sizes) -> list[Sample]:
    mesh = Mesh(np.array(_devices()), ("x",))
    out = []
    for m in sizes.elementwise:
        x = _global(mesh, (m,), "float32")
        t, s = timer(_sharded(mesh, lambda v: v * 1.5 + 0.5), x)
        out.append(Sample(kind="elementwise", nbytes=2.0 * 4 * m, seconds=t, spread=s, repeats=timer.repeats))

    def chain(v):   # CHAIN_OPS dependent ops: XLA's loop fusion reads v and writes the result once
        for _ in range(CHAIN_OPS):
            v = v * 1.5 + 0.5
        return v
    t, s = timer(_sharded(mesh, chain), x)
    out.append(Sample(kind="elementwise", nbytes=2.0 * 4 * m, seconds=t, spread=s, repeats=timer.repeats,
                      chain=CHAIN_OPS))
    return out


def launch_overhead(timer: Timer) -> float:
    mesh = Mesh(np.array(_devices()), ("x",))
    return timer(_sharded(mesh, lambda v: v + 1.0), _global(mesh, (8,), "float32"))[0]


# ----------------------------------------------------------------------------- collectives

def _one(kind: str, v, axis: str, p: int):
    """One ``kind`` collective over ``axis`` and the glue that gives the result ``v``'s shape
    again (so ops chain); returns (result, glue bytes per device)."""
    i = jax.lax.axis_index(axis)
    m = v.shape[0]
    if kind == "all-reduce":
        r, glue = jax.lax.psum(v, axis), 0
    elif kind == "all-gather":
        g = jax.lax.all_gather(v, axis, tiled=True)              # not its own block: no simplification
        r, glue = jax.lax.dynamic_slice_in_dim(g, ((i + 1) % p) * m, m), 2 * m * v.itemsize
    elif kind == "reduce-scatter":
        s = jax.lax.psum_scatter(v, axis, tiled=True)   # written back into its (dead) input: O(m / p)
        r, glue = jax.lax.dynamic_update_slice_in_dim(v, s, 0, 0), 2 * (m // p) * v.itemsize
    elif kind == "all-to-all":
        r, glue = jax.lax.all_to_all(v.reshape(p, m // p), axis, 0, 0, tiled=True).reshape(m), 0
    elif kind == "collective-permute":
        r, glue = jax.lax.ppermute(v, axis, [(k, (k + 1) % p) for k in range(p)]), 0
    else:
        raise ValueError(f"unknown collective {kind!r}; expected one of {KINDS}")
    return r.at[0].add(i.astype(r.dtype)), glue   # O(1): the next op's input differs per device


def _comm_bytes(kind: str, m_bytes: int, p: int) -> float:
    """cost.comm's n for an op whose input holds ``m_bytes`` per device."""
    return float(m_bytes * p if kind == "all-gather" else m_bytes)


def _link(mesh: Mesh, axis: int) -> str:
    """"inter" when a group along ``axis`` spans processes (nodes), else "intra"."""
    groups = np.moveaxis(mesh.devices, axis, -1).reshape(-1, mesh.devices.shape[axis])
    return "inter" if any(len({d.process_index for d in g}) > 1 for g in groups) else "intra"


def collective_samples(timer: Timer, sizes: Sizes, bandwidth: float, meshes=None) -> list[Sample]:
    devs = _devices()
    out = []
    for shape in meshes or candidate_meshes(len(devs)):
        names = _names(len(shape))
        mesh = Mesh(np.array(devs).reshape(shape), names)
        for axis, p in enumerate(shape):
            if p == 1:
                continue
            for kind in KINDS:
                for nbytes in sizes.collective:
                    in_bytes = nbytes // p if kind == "all-gather" else nbytes
                    m = max(p * p, in_bytes // 4 // (p * p) * p * p)   # float32s, divisible by p²
                    x = _global(mesh, (m,), "float32")
                    glue = 0

                    def body(v, k):
                        nonlocal glue
                        for _ in range(k):
                            v, glue = _one(kind, v, names[axis], p)
                        return v
                    times = timer.many([_sharded(mesh, lambda v, k=k: body(v, k)) for k in (1, 1 + CHAIN)], x)
                    per_op = (times[1][0] - times[0][0]) / CHAIN - glue / bandwidth
                    spread = max(times[0][1], times[1][1])
                    floor = 0.05 * times[1][0] / (1 + CHAIN)   # noise can make the difference ≤ 0
                    out.append(Sample(kind=kind, nbytes=_comm_bytes(kind, m * 4, p), seconds=max(per_op, floor),
                                      spread=spread, repeats=timer.repeats, link=_link(mesh, axis), axis_size=p,
                                      mesh=tuple(shape), axis=axis))
    return out


def combining_samples(timer: Timer, nbytes: int) -> list[Sample]:
    """``COMBINE`` independent all-reduces of ``nbytes`` each in one program, and one, over all
    devices (whole-program times: ``cost.calibration.combined_all_reduces`` compares them with
    the chained op of that size)."""
    mesh = Mesh(np.array(_devices()), ("x",))
    m = nbytes // 4
    x = _global(mesh, (COMBINE * m,), "float32")
    one = _sharded(mesh, lambda v: jax.lax.psum(v[:m], "x"))
    many = _sharded(mesh, lambda v: jax.numpy.concatenate(
        [jax.lax.psum(v[k * m:(k + 1) * m], "x") for k in range(COMBINE)]))
    (t1, s1), (tk, sk) = timer.many([one, many], x)
    p = mesh.devices.size
    return [Sample(kind="all-reduce", nbytes=float(nbytes), seconds=t, spread=s, repeats=timer.repeats,
                   link=_link(mesh, 0), axis_size=p, mesh=(p,), axis=0, independent=k, whole_program=True)
            for k, t, s in ((1, t1, s1), (COMBINE, tk, sk))]


def sync_seconds(timer: Timer, n: int) -> tuple[float, float]:
    """(per op in a program, per op back to back) of a small all-reduce over all devices: after
    each of ``CHAIN_OPS`` n×n matmuls (each reads the reduced value: no overlap) against the
    matmuls alone, and ``CHAIN_OPS`` of them in a chain against an empty program. The first
    exceeds the second by the wait for every device to reach the collective after compute
    (``ClusterSpec.collective_sync_s``)."""
    mesh = Mesh(np.array(_devices()), ("x",))
    x = _global(mesh, (n, n), "float32", 5)

    def program(compute: bool, reduce: bool):
        def f(v):
            for _ in range(CHAIN_OPS):
                if compute:
                    v = jax.numpy.tanh(v @ v * (1.0 / n))
                if reduce:
                    v = v + jax.lax.psum(v[:1, :8], "x")[:, :1] * 1e-6
            return v
        return _sharded(mesh, f if compute or reduce else (lambda v: v + 1e-6))
    (t_mm, _), (t_mm_ar, _), (t_ar, _), (t_0, _) = timer.many(
        [program(True, False), program(True, True), program(False, True), program(False, False)], x)
    return max(0.0, (t_mm_ar - t_mm) / CHAIN_OPS), max(0.0, (t_ar - t_0) / CHAIN_OPS)


def all_gathers_combined(nbytes: int) -> bool:
    """Whether the compiler merges ``COMBINE`` independent all-gathers of ``nbytes`` each (one
    program, over all devices) into fewer ops: counted in its compiled HLO, not timed
    (XLA:GPU's all-gather combiner does, XLA:CPU does not) → ``ClusterSpec.combine_all_gathers``."""
    return 0 < compiled_all_gathers(nbytes) < COMBINE


def compiled_all_gathers(nbytes: int) -> int:
    """All-gather ops in the compiled program of ``COMBINE`` independent all-gathers."""
    from .validate import hlo_collectives
    mesh = Mesh(np.array(_devices()), ("x",))
    m = max(1, nbytes // 4 // mesh.devices.size)
    x = _global(mesh, (COMBINE * m,), "float32")
    many = _sharded(mesh, lambda v: jax.numpy.concatenate(
        [jax.lax.all_gather(v[k * m:(k + 1) * m], "x", tiled=True) for k in range(COMBINE)]))
    return sum(c.kind == "all-gather" for c in hlo_collectives(many.lower(x).compile().as_text()))


def load_probe(n: int = 256):
    """A zero-argument call running one n×n matmul on every device: timed next to a measurement
    and at calibration, the ratio says how much slower the (shared) machine runs now."""
    mesh = Mesh(np.array(_devices()), ("x",))
    a = _global(mesh, (n, n), "float32", 3)
    f = _sharded(mesh, lambda x: x @ x)
    return lambda: f(a)


# ----------------------------------------------------------------------------- the command

def _barrier(name: str, timeout_s: int = 600) -> None:
    """Every process waits here for the others at the coordination service's barrier (not a
    collective). The local microbenchmarks before the first collective take unequal times on a
    shared machine, and a collective's first gloo rendezvous gives up after 30 s (seen in CI:
    "Gloo context initialization failed: DEADLINE_EXCEEDED" in a 2-process calibrate)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # (jax has no public barrier that is not itself a collective)
    client = getattr(distributed.global_state, "client", None)
    if client is not None and hasattr(client, "wait_at_barrier"):
        client.wait_at_barrier(f"autopar_calibrate_{name}", timeout_in_ms=timeout_s * 1000)


def measure(*, quick: bool = False, timer: Timer | None = None, meshes=None, log=print) -> Calibration:
    """Every microbenchmark on the devices JAX sees (same program on every process)."""
    plat = _platform()
    sizes = (QUICK if quick else SIZES)[plat]
    timer = timer or (Timer(1, 3) if quick else Timer())
    log(f"calibrating {len(jax.devices())} {jax.devices()[0].device_kind} device(s) in {jax.process_count()} "
        f"process(es): matmul, elementwise, {len(KINDS)} collectives …")
    t0 = time.perf_counter()
    samples = matmul_samples(timer, sizes) + conv_samples(timer, sizes) + elementwise_samples(timer, sizes)
    bw, _, _ = fit_throughput([s for s in samples if s.kind == "elementwise"], "nbytes", "elementwise")
    _barrier("collectives")
    samples += collective_samples(timer, sizes, bw, meshes)
    if len(jax.devices()) > 1:
        samples += combining_samples(timer, sizes.collective[0])
    sync = sync_seconds(timer, sizes.matmul[min(1, len(sizes.matmul) - 1)]) if len(jax.devices()) > 1 else (0.0, 0.0)
    log(f"measured {len(samples)} samples in {time.perf_counter() - t0:.1f} s")
    return Calibration(sync_in_program_s=sync[0], sync_back_to_back_s=sync[1],platform=plat, device_kind=jax.devices()[0].device_kind, devices=len(jax.devices()),
                       processes=jax.process_count(), samples=samples, fits=[],
                       launch_overhead_s=launch_overhead(timer),
                       all_gathers_combined=len(jax.devices()) > 1 and all_gathers_combined(sizes.collective[0]))


def _memory_bytes() -> int | None:
    stats = getattr(jax.local_devices()[0], "memory_stats", lambda: None)()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def default_base() -> str:
    return "cpu-8" if _platform() == "cpu" else "dgx-h100"


def calibrate(*, base: str | ClusterSpec | None = None, name: str | None = None, quick: bool = False,
              timer: Timer | None = None, meshes=None, log=print) -> tuple[ClusterSpec, Calibration]:
    """Measure (:func:`measure`) and fit (``cost.calibration.fit_spec``) a spec; ``base`` gives
    what is not measured (the inter-node link on one node, memory size on CPU)."""
    base_spec = load_cluster(base or default_base())
    cal = measure(quick=quick, timer=timer, meshes=meshes, log=log)
    kind = cal.device_kind
    dpn = jax.local_device_count()
    name = name or f"calibrated-{kind.lower().replace(' ', '-')}"
    links = sorted({s.link for s in cal.samples if s.link})
    desc = (f"fitted by `autopar calibrate` on {cal.devices} {kind} device(s) in {cal.processes} process(es) "
            f"(links measured: {', '.join(links) or 'none'}; the rest from {base_spec.name})")
    spec, fits = fit_spec(base_spec, cal.samples, name=name, devices_per_node=dpn, memory_bytes=_memory_bytes(),
                          device_name=f"{kind} (calibrated)", launch_overhead_s=cal.launch_overhead_s,
                          description=desc)
    # collective_sync_s is measured and printed, not written: it follows the machine's load (on
    # this 2-core host 1.7 ms per op under load vs 0.7 ms lighter), and calibrated under load it
    # made the ranking worse (benchmarks/results/time_fidelity_sync_run.md); set it by hand
    spec = spec.model_copy(update={"combine_all_gathers": cal.all_gathers_combined})
    return spec, cal.model_copy(update={"fits": fits})


def report(spec: ClusterSpec, cal: Calibration) -> str:
    """The fit table and the fitted numbers."""
    d = spec.device
    lines = [format_fits(cal.fits, cal.samples), "",
             f"spec {spec.name}: {spec.devices_per_node} devices per node, shared_by {d.shared_by:.2f}, "
             + ", ".join(f"{k} {v / 1e9:.4g} GFLOP/s" for k, v in d.peak_flops.items())
             + f", memory bandwidth {d.hbm_bandwidth_bytes_per_s / 1e9:.4g} GB/s, launch "
             f"{spec.step_overhead_s * 1e6:.0f} µs",
             f"intra-node link α {spec.intra_node_link.alpha_s * 1e6:.2f} µs, "
             f"{spec.intra_node_link.bandwidth_bytes_per_s / 1e9:.3g} GB/s; inter-node per device "
             f"α {spec.inter_node_link.alpha_s * 1e6:.2f} µs, "
             f"{spec.inter_node_bandwidth_per_device() / 1e9:.3g} GB/s",
             f"a small all-reduce after compute: {cal.sync_in_program_s * 1e6:.1f} µs, back to back "
             f"{cal.sync_back_to_back_s * 1e6:.1f} µs (the difference, collective_sync_s, is not written: "
             f"it follows the load)",
             f"the compiler combines independent all-reduces: {spec.combine_all_reduces} (timed), "
             f"all-gathers: {spec.combine_all_gathers} (read from its HLO)"]
    return "\n".join(lines)


def write(spec: ClusterSpec, cal: Calibration, out: str | Path) -> tuple[Path, Path]:
    """The spec JSON at ``out`` (loadable by ``autopar plan --cluster out``) and the samples and
    fits next to it (``<stem>.calibration.json``)."""
    out = Path(out)
    if out.suffix != ".json":
        raise ValueError(f"--out must name a .json file, got {str(out)!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(spec.model_dump_json(indent=2) + "\n")
    data = out.with_name(out.stem + ".calibration.json")
    data.write_text(cal.model_dump_json(indent=1) + "\n")
    return out, data


def check(spec: ClusterSpec, cal: Calibration) -> dict[str, tuple[float, float]]:
    """{link: (max |error| of ``spec`` on that link's samples, the max error the fit printed)}."""
    printed = {f.name: f.max_rel_error for f in cal.fits}
    return {link: (float(np.max(np.abs(rel))), printed[f"{link}-node link"])
            for link, rel in link_errors(spec, cal.samples).items()}


__all__ = ["calibrate", "measure", "report", "write", "check", "load_probe", "Timer", "Fit", "SIZES", "QUICK"]
