"""``autopar calibrate``: the least-squares fits (on synthetic samples made by cost.comm's own
formulas), the spec fields they fill in (defaults leave every shipped spec's costs as they
were), and one quick calibration on the 8 simulated CPU devices whose spec must reproduce its
own measurements within the fit error it reports, and plan."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import autopar
from autopar.cost import ClusterSpecError, cluster_from_dict, collective_time, known_clusters, load_cluster, mesh_model
from autopar.cost.calibration import Sample, fit_link, fit_spec, fit_throughput, fused_chains, link_errors

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _collective_samples(alpha, bw, *, noise=0.0, seed=0, link="intra"):
    """Samples of every kind on meshes (8,) and (2, 4) timed by cost.comm itself (× noise)."""
    spec = load_cluster("cpu-8").model_copy(update={"intra_node_link": load_cluster("cpu-8").intra_node_link
                                                    .model_copy(update={"alpha_s": alpha,
                                                                        "bandwidth_bytes_per_s": bw})})
    rng = np.random.default_rng(seed)
    out = []
    for shape in ((8,), (2, 4)):
        mesh = mesh_model(spec, 1, shape)
        for axis in range(len(shape)):
            for kind in KINDS:
                for n in (4096, 65536, 1 << 20, 1 << 23):
                    t = collective_time(mesh, kind, (axis,), n) * (1 + noise * rng.standard_normal())
                    out.append(Sample(kind=kind, seconds=t, spread=0.0, repeats=1, nbytes=n, link=link,
                                      axis_size=shape[axis], mesh=shape, axis=axis))
    return out


def test_fit_link_recovers_alpha_and_bandwidth_exactly():
    link, fit = fit_link(_collective_samples(7e-6, 3e10), "intra")
    assert link.alpha_s == pytest.approx(7e-6, rel=1e-6)
    assert link.bandwidth_bytes_per_s == pytest.approx(3e10, rel=1e-6)
    assert fit.max_rel_error < 1e-6 and fit.samples == 3 * len(KINDS) * 4   # 3 axes


def test_fit_link_with_noise_reports_its_error():
    samples = _collective_samples(2e-5, 5e9, noise=0.1, seed=3)
    link, fit = fit_link(samples, "intra")
    assert link.alpha_s == pytest.approx(2e-5, rel=0.3) and link.bandwidth_bytes_per_s == pytest.approx(5e9, rel=0.3)
    rel = np.array([abs(collective_time(mesh_model(load_cluster("cpu-8").model_copy(update={
        "intra_node_link": link}), 1, s.mesh), s.kind, (s.axis,), s.nbytes) / s.seconds - 1) for s in samples])
    assert rel.max() == pytest.approx(fit.max_rel_error, rel=1e-9)
    assert np.sqrt(np.mean(rel ** 2)) == pytest.approx(fit.rms_rel_error, rel=1e-9)


def test_fit_throughput_recovers_rate_and_intercept():
    s = [Sample(kind="matmul", flops=f, seconds=1e-4 + f / 5e10, spread=0, repeats=1) for f in (1e6, 1e8, 1e9)]
    rate, t0, fit = fit_throughput(s, "flops", "matmul")
    assert rate == pytest.approx(5e10, rel=1e-9) and t0 == pytest.approx(1e-4, rel=1e-6) and fit.max_rel_error < 1e-9
    with pytest.raises(ValueError, match="≥ 2 sizes"):
        fit_throughput(s[:1], "flops", "matmul")


def test_fit_spec_fills_the_new_terms_and_round_trips():
    samples = _collective_samples(1e-5, 2e10)
    samples += [Sample(kind="matmul", flops=f, seconds=f / 1e10, spread=0, repeats=1) for f in (1e7, 1e8)]
    samples += [Sample(kind="matmul", flops=f, seconds=f / 8e10, spread=0, repeats=1, alone=True) for f in (1e7, 1e8)]
    samples += [Sample(kind="elementwise", nbytes=b, seconds=b / 2e9, spread=0, repeats=1) for b in (1e6, 1e7)]
    samples.append(Sample(kind="elementwise", nbytes=1e7, seconds=1.2e7 / 2e9, spread=0, repeats=1, chain=8))
    samples.append(Sample(kind="conv", flops=1e8, seconds=1e8 / 2.5e9, spread=0, repeats=1))
    spec, fits = fit_spec(load_cluster("cpu-8"), samples, name="fitted", devices_per_node=8, launch_overhead_s=3e-4)
    assert spec.device.shared_by == pytest.approx(8.0)
    assert spec.device.peak_flops["float32"] == pytest.approx(8e10)       # one device's own; 1e10 each when all busy
    assert mesh_model(spec, 1, (8,)).flops_for("float32") == pytest.approx(1e10)
    assert mesh_model(spec, 1, (8,)).hbm_bandwidth_bytes_per_s == pytest.approx(2e9)
    assert spec.fuse_elementwise and spec.step_overhead_s == 3e-4 and fused_chains(samples)[0]
    assert spec.device.conv_efficiency == pytest.approx(0.25)   # 2.5 of the 10 GFLOP/s of a matmul
    assert set(spec.intra_node_link.by_kind) == set(KINDS)
    assert max(abs(link_errors(spec, samples)["intra"])) < 1e-6
    assert {f.name for f in fits} >= {"matmul float32", "elementwise bandwidth", "intra-node link"}
    again = cluster_from_dict(json.loads(spec.model_dump_json()))
    assert again == spec


def test_shipped_specs_keep_todays_terms():
    for name in known_clusters():
        spec = load_cluster(name)
        assert spec.device.shared_by == 1.0 and spec.step_overhead_s == 0.0 and not spec.fuse_elementwise
        assert spec.device.matmul_half_dim == 0.0 and spec.device.conv_efficiency == 1.0 and not spec.combine_all_reduces
        assert not spec.combine_all_gathers and spec.device.conv_half_dim == 0.0 and spec.collective_sync_s == 0.0
        assert not spec.intra_node_link.by_kind and not spec.inter_node_link.by_kind


def test_by_kind_overrides_one_collective_and_rejects_unknown_kinds():
    base = load_cluster("cpu-8").model_dump()
    slow = {"alpha_s": 1e-3, "bandwidth_bytes_per_s": 1e9}
    spec = cluster_from_dict({**base, "intra_node_link": {**base["intra_node_link"], "by_kind": {"all-to-all": slow}}})
    plain, mesh = mesh_model(load_cluster("cpu-8"), 1, (8,)), mesh_model(spec, 1, (8,))
    assert collective_time(mesh, "all-reduce", (0,), 1e6) == collective_time(plain, "all-reduce", (0,), 1e6)
    assert collective_time(mesh, "all-to-all", (0,), 1e6) == pytest.approx(7 * 1e-3 + 7 / 8 * 1e6 / 1e9)
    with pytest.raises(ClusterSpecError, match="by_kind keys must be collective names"):
        cluster_from_dict({**base, "intra_node_link": {**base["intra_node_link"], "by_kind": {"allreduce": slow}}})


def test_fuse_elementwise_charges_a_chain_its_inputs_and_output_once(devices8):
    import jax
    import jax.numpy as jnp

    def chain(x):
        return jnp.sin(x * 2.0 + 1.0) * 3.0

    x = jax.ShapeDtypeStruct((1024, 512), jnp.float32)
    base = load_cluster("cpu-8").model_dump()
    slow = {**base, "device": {**base["device"], "hbm_bandwidth_bytes_per_s": 1e9}}   # memory-bound
    off = autopar.plan(chain, x, cluster=cluster_from_dict(slow), mesh_shape=(8,))
    on = autopar.plan(chain, x, cluster=cluster_from_dict({**slow, "fuse_elementwise": True}), mesh_shape=(8,))
    local = 1024 * 512 * 4 / 8
    assert off.mesh_shape == on.mesh_shape == [8] and on.input_specs_flat == off.input_specs_flat
    assert off.predicted.compute_s == pytest.approx(4 * 2 * local / 1e9, rel=1e-6)   # 4 ops, each reads + writes
    # read x, write the result (+ the fused ops' FLOPs at 20 TFLOP/s: 1e-5 of it)
    assert on.predicted.compute_s == pytest.approx(2 * local / 1e9, rel=1e-4)


def test_calibration_module_imports_no_jax():
    code = "import sys; import cost.calibration; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def calibrated(devices8):
    from autopar.calibrate import Timer, calibrate
    return calibrate(quick=True, timer=Timer(1, 3), meshes=[(8,), (2, 4)], log=lambda *_: None)


def test_calibrate_on_8_cpu_devices_reproduces_its_measurements(calibrated, tmp_path):
    from autopar.calibrate import check, write
    spec, cal = calibrated
    assert spec.devices_per_node == 8 and cal.devices == 8 and cal.platform == "cpu"
    kinds = {s.kind for s in cal.samples}
    assert kinds == {"matmul", "conv", "elementwise", *KINDS}
    assert {(s.mesh, s.axis) for s in cal.samples if s.link} == {((8,), 0), ((2, 4), 0), ((2, 4), 1)}
    assert all(s.link == "intra" for s in cal.samples if s.kind in KINDS)
    assert spec.device.shared_by >= 1 and spec.step_overhead_s > 0
    # XLA:CPU keeps independent all-gathers apart (its HLO has one op per gather): not combined
    assert not cal.all_gathers_combined and not spec.combine_all_gathers
    # measured (a difference of two timings, clamped at 0: on 2 busy cores it can be 0, which made
    # this test flaky when it asserted > 0), reported, not written
    assert cal.sync_in_program_s >= 0 and cal.sync_back_to_back_s >= 0 and spec.collective_sync_s == 0.0
    path, data = write(spec, cal, tmp_path / "mine.json")
    loaded = load_cluster(str(path))
    assert loaded == spec
    for link, (recomputed, printed) in check(loaded, cal).items():   # the written spec, its printed fit
        assert recomputed == pytest.approx(printed, rel=1e-9, abs=1e-12), link
    rel = link_errors(loaded, cal.samples)["intra"]
    fit = next(f for f in cal.fits if f.name == "intra-node link")
    assert np.all(np.abs(rel) <= fit.max_rel_error + 1e-12) and len(rel) == fit.samples
    assert json.loads(data.read_text())["samples"]


def test_plan_with_a_calibrated_spec(calibrated, tmp_path):
    from autopar.calibrate import write
    from examples.mlp import mlp_step, mlp_step_args
    path, _ = write(*calibrated, tmp_path / "mine.json")
    plan = autopar.plan(mlp_step, *mlp_step_args(batch=64, hidden=256, abstract=True), cluster=str(path))
    assert plan.cluster == calibrated[0] and plan.predicted.step_time_s > plan.predicted.compute_s > 0
    assert plan.predicted.step_time_s == pytest.approx(plan.predicted.compute_s + plan.predicted.comm_s
                                                      + calibrated[0].step_overhead_s)


def test_cli_calibrate_rejects_a_bad_out_path_before_measuring(capsys):
    from autopar.cli import main
    assert main(["calibrate", "--out", "spec.txt", "--quick"]) == 2
    assert "--out must name a .json file" in capsys.readouterr().err


def test_combine_all_reduces_charges_alpha_once_per_group(devices8):
    from autopar.baselines import data_parallel
    from examples.mlp import mlp_step, mlp_step_args
    base = load_cluster("cpu-8").model_dump()
    slow_alpha = {**base, "intra_node_link": {"alpha_s": 1e-4, "bandwidth_bytes_per_s": 1e11}}
    args = mlp_step_args(batch=512, hidden=64, layers=3, abstract=True)
    off = data_parallel(mlp_step, *args, cluster=cluster_from_dict(slow_alpha), batch_argnums=(1, 2))
    on = data_parallel(mlp_step, *args, cluster=cluster_from_dict({**slow_alpha, "combine_all_reduces": True}),
                       batch_argnums=(1, 2))
    grads = [c for c in on.predicted.collectives if c.kind == "all-reduce" and "combined" in c.where]
    assert len(grads) >= 3   # every weight gradient (and the loss) joins one op
    mesh = mesh_model(on.cluster, 1, (8,))
    total = sum(c.bytes for c in grads)
    assert sum(c.time_s for c in grads) == pytest.approx(collective_time(mesh, "all-reduce", (0,), total))
    one_by_one = sum(collective_time(mesh, "all-reduce", (0,), c.bytes) for c in grads)
    assert on.predicted.comm_s < off.predicted.comm_s and one_by_one - sum(c.time_s for c in grads) > 1e-4


def test_the_compiler_check_counts_one_all_gather_per_independent_gather_on_cpu(devices8):
    from autopar.calibrate import COMBINE, all_gathers_combined, compiled_all_gathers
    assert compiled_all_gathers(1 << 16) == COMBINE and not all_gathers_combined(1 << 16)


def test_combine_all_gathers_charges_alpha_once_per_group_of_weight_gathers(devices8):
    """With ``combine_all_gathers`` the gathers of program inputs (weights gathered for the
    step) cost their bytes in the ILP and one α per group in the report; other gathers keep α."""
    from autopar.planner import PlanHooks, plan_with
    from examples.mlp import mlp_step, mlp_step_args
    base = load_cluster("cpu-8").model_dump()
    slow_alpha = {**base, "intra_node_link": {"alpha_s": 1e-4, "bandwidth_bytes_per_s": 1e11}}
    args = mlp_step_args(batch=64, hidden=128, layers=3, abstract=True)
    weights = {0, 1, 2}   # the three weight matrices (mlp_step_args, no bias): kept split on dim 0
    hooks = PlanHooks(restrict=lambda shape: {"allowed": lambda u, s: u not in weights or s.out_specs[0][:1] == ((0,),)})
    plans = {on: plan_with(mlp_step, args, cluster=cluster_from_dict({**slow_alpha, "combine_all_gathers": on}),
                           mesh_shape=(8,), hooks=hooks) for on in (False, True)}
    gathers = {on: [c for c in p.predicted.collectives if c.kind == "all-gather" and "input[" in c.where]
               for on, p in plans.items()}
    assert len(gathers[False]) >= 3 and not any("combined" in c.where for c in gathers[False])
    assert all("combined" in c.where for c in gathers[True])
    mesh = mesh_model(plans[True].cluster, 1, (8,))
    total = sum(c.bytes for c in gathers[True])
    assert sum(c.time_s for c in gathers[True]) == pytest.approx(collective_time(mesh, "all-gather", (0,), total))
    one_by_one = sum(collective_time(mesh, "all-gather", (0,), c.bytes) for c in gathers[False])
    alpha = collective_time(mesh, "all-gather", (0,), 1.0) - collective_time(mesh, "all-gather", (0,), 1.0, latency=False)
    assert alpha > 1e-4 and one_by_one - sum(c.time_s for c in gathers[True]) == pytest.approx(
        (len(gathers[False]) - 1) * alpha)
    assert plans[True].solver.objective_s < plans[False].solver.objective_s


def test_fit_matmul_recovers_half_dim_and_the_planner_charges_it(devices8):
    import jax
    import jax.numpy as jnp

    from autopar.cost import matmul_efficiency
    from autopar.cost.calibration import fit_matmul
    dims = [(n, n, n) for n in (128, 256, 512)] + [(512, 512, 16), (512, 16, 512), (512, 512, 64)]
    s = [Sample(kind="matmul", flops=2.0 * m * k * n, dims=(m, k, n), spread=0, repeats=1,
                seconds=2e-4 + 2.0 * m * k * n / (4e10 * matmul_efficiency(32.0, (m, k, n)))) for m, k, n in dims]
    rate, t0, half, fit = fit_matmul(s, "matmul")
    assert half == 32.0 and rate == pytest.approx(4e10, rel=1e-6) and fit.max_rel_error < 1e-6
    base = load_cluster("cpu-8").model_dump()
    spec = cluster_from_dict({**base, "device": {**base["device"], "matmul_half_dim": 32.0}})

    def mm(a, b):
        return a @ b
    a, b = jax.ShapeDtypeStruct((1024, 256), jnp.float32), jax.ShapeDtypeStruct((256, 512), jnp.float32)
    plain = autopar.plan(mm, a, b, cluster="cpu-8", mesh_shape=(8,))
    slow = autopar.plan(mm, a, b, cluster=spec, mesh_shape=(8,))
    dot = next(e for e in slow.eqns if e.primitive == "dot_general")
    assert dot.compute_s > next(e.compute_s for e in plain.eqns if e.primitive == "dot_general")
    assert dot.compute_s >= 2 * 1024 * 256 * 512 / 8 / 20e12 / matmul_efficiency(32.0, (128, 256, 512)) * (1 - 1e-9)


def test_cli_calibrate_in_two_processes_fits_the_inter_node_link(tmp_path):
    """``--processes 2`` (jax.distributed, 4 CPU devices each): axes whose groups span the two
    processes are the inter-node link, fitted apart from the intra-node one."""
    import os
    out = tmp_path / "two.json"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    r = subprocess.run([sys.executable, "-m", "autopar", "calibrate", "--processes", "2", "--quick",
                        "--out", str(out)], capture_output=True, text=True, timeout=240, env=env,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "inter-node link" in r.stdout and "intra-node link" in r.stdout
    spec = load_cluster(str(out))
    assert spec.devices_per_node == 4 and spec.nics_per_node == 4 and spec.inter_node_link.by_kind
    cal = json.loads(out.with_name("two.calibration.json").read_text())
    assert cal["processes"] == 2 and {s["link"] for s in cal["samples"] if s["link"]} == {"intra", "inter"}


def test_conv_efficiency_scales_convolution_time(devices8):
    import jax
    import jax.numpy as jnp

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    args = jax.ShapeDtypeStruct((8, 32, 32, 16), jnp.float32), jax.ShapeDtypeStruct((3, 3, 16, 16), jnp.float32)
    base = load_cluster("cpu-8").model_dump()
    slow = cluster_from_dict({**base, "device": {**base["device"], "conv_efficiency": 0.25}})
    t = [next(e.compute_s for e in autopar.plan(conv, *args, cluster=c, mesh_shape=(8,)).eqns
              if e.primitive == "conv_general_dilated") for c in ("cpu-8", slow)]
    assert t[1] == pytest.approx(4 * t[0], rel=1e-9)   # compute-bound at 20 TFLOP/s: a quarter of the rate


def test_fit_conv_recovers_efficiency_and_half_dim_and_the_planner_charges_few_channels(devices8):
    """Convolutions with few channels are slower per FLOP (measured on this machine: a 3×3 conv
    with 8 channels ran at about a tenth of the rate of one with 32); ``conv_half_dim`` charges
    the implicit matmul's (M, K, N) like ``matmul_half_dim`` charges a matmul's."""
    import jax
    import jax.numpy as jnp

    from autopar.cost import matmul_efficiency
    from autopar.cost.calibration import fit_conv
    dims = [(2048, 9 * c, c) for c in (8, 16, 32, 64)]
    s = [Sample(kind="conv", flops=2.0 * m * k * n, dims=(m, k, n), spread=0, repeats=1,
                seconds=2.0 * m * k * n / (4e10 * 0.5 * matmul_efficiency(16.0, (m, k, n)))) for m, k, n in dims]
    e, h, fit = fit_conv(s, {"float32": 4e10})
    assert h == 16.0 and e == pytest.approx(0.5, rel=1e-9) and fit.max_rel_error < 1e-9
    assert fit_conv(s[:1], {"float32": 4e10})[1] == 0.0   # one size: nothing to fit h from

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    base = load_cluster("cpu-8").model_dump()
    spec = cluster_from_dict({**base, "device": {**base["device"], "conv_half_dim": 16.0}})
    for c in (8, 64):
        args = jax.ShapeDtypeStruct((8, 32, 32, c), jnp.float32), jax.ShapeDtypeStruct((3, 3, c, c), jnp.float32)
        plans = [autopar.plan(conv, *args, cluster=x, mesh_shape=(8,)) for x in ("cpu-8", spec)]
        (e0, s0), (e1, s1) = [next((e.compute_s, e.strategy) for e in p.eqns if e.primitive == "conv_general_dilated")
                              for p in plans]
        assert s0 == s1
        # the batch split (the only one cheaper than replicating here): local (M, K, N) = (1024, 9c, c)
        assert e1 == pytest.approx(e0 / matmul_efficiency(16.0, (1024, 9 * c, c)), rel=1e-9), (c, s0)


def test_gathers_combined_only_for_program_inputs_outside_loops():
    """A weight read by a scan body in every iteration (a closure constant) is resharded in every
    iteration: not combined; a stacked weight's slice is gathered once before the loop: combined;
    an intermediate value never is."""
    import jax
    import jax.numpy as jnp

    from autopar.build_edges import gathers_combined
    from autopar.graph import build_graph
    from autopar.trace import trace

    def f(ws, shared, x):
        h, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w @ shared), None), x, ws)
        return (h @ shared).sum()
    S = jax.ShapeDtypeStruct
    graph = build_graph(trace(f, S((3, 16, 16), jnp.float32), S((16, 16), jnp.float32), S((4, 16), jnp.float32)))
    base = load_cluster("cpu-8").model_dump()
    mesh = {on: mesh_model(cluster_from_dict({**base, "combine_all_gathers": on}), 1, (8,)) for on in (False, True)}
    stacked, shared = (graph.program.invars[0], graph.program.invars[1])
    reads = {(o.id, n.index) for n in graph.nodes for o in n.operands if hasattr(o, "id")}
    slice_reader = next(v for w, v in reads if w == stacked and graph.nodes[v].name == "scan_slice")
    in_body = [v for w, v in reads if w == shared and graph.reshard_repeat(v) > 1]
    outside = [v for w, v in reads if w == shared and graph.reshard_repeat(v) == 1]
    assert in_body and outside
    assert gathers_combined(graph, mesh[True], stacked, slice_reader)
    assert not gathers_combined(graph, mesh[False], stacked, slice_reader)
    assert not any(gathers_combined(graph, mesh[True], shared, v) for v in in_body)
    assert all(gathers_combined(graph, mesh[True], shared, v) for v in outside)
    inner = next(n for n in graph.nodes if n.kind == "eqn" and n.name == "tanh").outputs[0].id
    assert not gathers_combined(graph, mesh[True], inner)


def test_collective_sync_is_charged_once_per_collective_op():
    base = load_cluster("cpu-8").model_dump()
    plain = mesh_model(cluster_from_dict(base), 1, (2, 4))
    synced = mesh_model(cluster_from_dict({**base, "collective_sync_s": 3e-4}), 1, (2, 4))
    for kind in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute"):
        for axes in ((0,), (1,), (0, 1)):
            assert collective_time(synced, kind, axes, 1e6) == pytest.approx(collective_time(plain, kind, axes, 1e6) + 3e-4)
            # a combined op's share (no α) carries no sync either: the group pays it once
            assert collective_time(synced, kind, axes, 1e6, latency=False) == collective_time(plain, kind, axes, 1e6,
                                                                                             latency=False)
    assert collective_time(synced, "all-reduce", (), 1e6) == 0.0 and collective_time(synced, "all-reduce", (0,), 0) == 0.0


def test_processes_meet_at_the_coordination_barrier_before_the_first_collective(monkeypatch):
    """The local microbenchmarks take unequal times per process; a collective's first gloo
    rendezvous gives up after 30 s, so measure waits at the coordination service's barrier."""
    import jax
    from jax._src import distributed

    from autopar import calibrate as cal
    calls = []

    class Client:
        def wait_at_barrier(self, barrier_id, timeout_in_ms, process_ids=None):
            calls.append((barrier_id, timeout_in_ms))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed.global_state, "client", Client())
    cal._barrier("collectives")
    assert calls == [("autopar_calibrate_collectives", 600_000)]
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    cal._barrier("again")
    assert len(calls) == 1  # one process: nothing to wait for
