"""Pipeline plans under jax.distributed: one process per node on 127.0.0.1 (CPU devices, gloo).

The plans are made here (8 simulated devices), saved as JSON and run by
``tests/pipeline_multihost_worker.py`` in 2 processes × 4 devices (one stage per process) and
4 processes × 2 devices (each stage spans 2 processes); process 0 saves every output of two
steps, compared here with two single-device steps.
"""
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from autopar import plan_training
from autopar.emit import MeshError, make_mesh
from autopar.launch import free_port
from autopar.pipeline.loss_form import full_batch_loss
from autopar.pipeline.multihost import Transfer
from conftest import make_cluster
from pipeline_multihost_worker import HAS_AUX, MODELS

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "pipeline_multihost_worker.py"


def _plan(name, schedule, microbatches=4, virtual=1):
    """Two stages of 2 layers, one per node of 4 devices (``virtual`` 2: four 1-layer chunks
    interleaved on the two nodes); slow devices (1 GFLOP/s) make each stage split its weights
    over its devices."""
    loss_fn, opt, (params, batch) = MODELS[name]()
    stages = [(0, 2, (1, 4), (4,)), (2, 4, (1, 4), (4,))] if virtual == 1 else [(k, k + 1, (1, 4), (4,))
                                                                              for k in range(4)]
    return plan_training(loss_fn, params, batch, optimizer=opt, cluster=make_cluster(4, flops=1e9), nodes=2,
                         num_microbatches=microbatches, schedule=schedule, num_layers=4, has_aux=name in HAS_AUX,
                         stages=stages, virtual_stages=virtual)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    out = tmp_path_factory.mktemp("plans")
    made = {"mlp-gpipe": _plan("mlp", "gpipe"), "mlp-1f1b": _plan("mlp", "1f1b"), "tied-1f1b": _plan("tied", "1f1b"),
            "scan-1f1b": _plan("scan", "1f1b"), "other": _plan("mlp", "gpipe", microbatches=2),
            "mlpeps-interleaved": _plan("mlpeps", "1f1b", virtual=2)}
    paths = {}
    for name, tplan in made.items():
        paths[name] = out / f"{name}.json"
        paths[name].write_text(tplan.to_json())
    return made, paths


def _reference(name):
    """Flat outputs (params, opt state, loss (and aux)) of two single-device steps, then the
    loss (and aux) of the updated params."""
    loss_fn, opt, (params, batch) = MODELS[name.split("-")[0]]()
    aux = name.split("-")[0] in HAS_AUX
    whole = full_batch_loss(loss_fn, aux)   # (tied: a WeightedLoss, with aux)

    def step(p, o, b):
        loss, g = jax.value_and_grad(whole, has_aux=aux)(p, b)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o, loss
    step, state, flat = jax.jit(step), opt.init(params), []
    for _ in range(2):
        params, state, loss = step(params, state, batch)
        flat += [np.asarray(x) for x in jax.tree_util.tree_leaves((params, state, loss))]
    return flat + [np.asarray(x) for x in jax.tree_util.tree_leaves(whole(params, batch))]  # step.evaluate's


def _launch(num, local, args, *, timeout_s=30, env_extra=None, wall_s=240, ranks=None):
    """Start the worker as processes ``ranks`` (default all) of a ``num``-process job; returns
    (exit codes, logs, seconds until each exited); past ``wall_s`` the rest are killed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "AUTOPAR_TEST_TIMEOUT_S": str(timeout_s),
           **(env_extra or {})}
    env.pop("XLA_FLAGS", None)
    port, out_dir = str(free_port()), Path(args[0])
    ranks = list(range(num) if ranks is None else ranks)
    files = [open(out_dir / f"log{i}.txt", "w+") for i in ranks]
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(WORKER), port, str(i), str(num), str(local), *map(str, args)],
                              cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
             for i, f in zip(ranks, files)]
    took = [None] * len(procs)
    try:
        while None in took and time.monotonic() - t0 < wall_s:
            for n, p in enumerate(procs):
                if took[n] is None and p.poll() is not None:
                    took[n] = time.monotonic() - t0
            time.sleep(0.1)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    logs = []
    for f in files:
        f.seek(0)
        logs.append(f.read())
        f.close()
    return [p.returncode for p in procs], logs, took


def _assert_equal_to_reference(out_dir, names):
    for name in names:
        want = _reference(name)
        saved = np.load(out_dir / f"{name}.npz")
        got = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        assert len(got) == len(want), name
        for k, (a, b) in enumerate(zip(got, want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{name}: output leaf {k}")


def test_two_processes_one_stage_each_equal_the_single_device_steps(devices8, plans, tmp_path):
    made, paths = plans
    devs = [s.devices for s in made["mlp-gpipe"].stages]
    assert devs == [[0, 1, 2, 3], [4, 5, 6, 7]]  # process 0's devices, process 1's devices
    # the tied embedding (flat leaf 0) is read by both stages: its copy and gradient cross processes
    assert [s.index for s in made["tied-1f1b"].stages if 0 in s.params] == [0, 1]
    # a scanned stack split per iteration runs in the split form, each slice on its stage's process
    assert made["scan-1f1b"].scan_split is not None
    # interleaved: chunks 0, 2 on process 0, chunks 1, 3 on process 1; chunk 1's output goes back to process 0
    assert [s.devices[0] for s in made["mlpeps-interleaved"].stages] == [0, 4, 0, 4]
    cases = [f"mlp-gpipe={paths['mlp-gpipe']}", f"tied-1f1b={paths['tied-1f1b']}", f"scan-1f1b={paths['scan-1f1b']}",
             f"mlpeps-interleaved={paths['mlpeps-interleaved']}", f"mismatch={paths['mlp-gpipe']},{paths['other']}"]
    codes, logs, _ = _launch(2, 4, [tmp_path, *cases])
    assert codes == [0, 0], "\n----\n".join(logs)[-6000:]
    for pid, log in enumerate(logs):
        assert "placement checked" in log and "PlanMismatchError: the processes of this job hold different " \
            "plans: process(es) [1]" in log, log[-3000:]
    _assert_equal_to_reference(tmp_path, ["mlp-gpipe", "tied-1f1b", "scan-1f1b", "mlpeps-interleaved"])


def test_four_processes_stages_spanning_two_equal_the_single_device_steps(devices8, plans, tmp_path):
    made, paths = plans
    # each stage's intra-op plan moves data between its devices (here: 2 processes)
    assert all(s.plan.predicted.comm_bytes_per_device > 0 for s in made["mlp-1f1b"].stages)
    codes, logs, _ = _launch(4, 2, [tmp_path, f"mlp-1f1b={paths['mlp-1f1b']}"])
    assert codes == [0] * 4, "\n----\n".join(logs)[-6000:]
    _assert_equal_to_reference(tmp_path, ["mlp-1f1b"])


def test_a_killed_process_stops_the_others_with_an_error(plans, tmp_path):
    _, paths = plans
    codes, logs, took = _launch(2, 4, [tmp_path, f"mlp-gpipe={paths['mlp-gpipe']}"], timeout_s=10,
                                env_extra={"DIE_AFTER_STEPS": "1"}, wall_s=120)
    assert codes[1] == 3 and "exiting on purpose" in logs[1], logs[1][-2000:]
    assert codes[0] != 0 and took[0] is not None, logs[0][-2000:]
    assert took[0] - took[1] < 60, took  # process 0 stops within 60 s of process 1's death
    assert "another task died" in logs[0] and "Task 1 heartbeat timeout" in logs[0], logs[0][-3000:]


def test_a_process_that_never_joins_stops_the_others_with_an_error(plans, tmp_path):
    _, paths = plans
    codes, logs, took = _launch(2, 4, [tmp_path, f"mlp-gpipe={paths['mlp-gpipe']}"], timeout_s=5, ranks=[0],
                                wall_s=60)
    assert codes == [1] and took[0] < 30, (codes, took)
    assert "not all 2 processes joined the job" in logs[0], logs[0][-2000:]


def test_a_plan_for_another_device_count_raises_mesh_error(devices8, plans):
    made, _ = plans
    from autopar.pipeline.multistep import MultiProcessStep
    loss_fn, opt, _ = MODELS["mlp"]()
    with pytest.raises(MeshError, match=r"the plan is for 8 devices .* but this job has 4"):
        MultiProcessStep(made["mlp-gpipe"], loss_fn, opt, devices=jax.devices()[:4])


@pytest.mark.parametrize("shape,src,dst,dtype", [
    ((8, 6), ((4,), P("x")), ((2, 2), P(None, "b")), np.float32),  # split rows → columns, replicated over a
    ((8, 6), ((2,), P()), ((2, 2), P("a", "b")), np.float32),        # 2 senders, 4 receivers: 2 rounds
    ((4, 6), ((2, 2), P("b", "a")), ((2,), P(None, "x")), np.int32),  # 4 senders, 2 receivers
    ((), ((4,), P()), ((2,), P()), np.float32),                     # a scalar
], ids=["reshard", "rounds", "fewer-receivers", "scalar"])
def test_transfer_moves_values_between_disjoint_device_sets(devices8, shape, src, dst, dtype):
    devs = jax.devices()
    a = NamedSharding(make_mesh(src[0], ("x",) if len(src[0]) == 1 else ("a", "b"), devs[:int(np.prod(src[0]))]),
                      src[1])
    b_devs = devs[int(np.prod(src[0])):][:int(np.prod(dst[0]))]
    b = NamedSharding(make_mesh(dst[0], ("x",) if len(dst[0]) == 1 else ("a", "b"), b_devs), dst[1])
    value = (np.arange(int(np.prod(shape))).reshape(shape) * 3 - 7).astype(dtype)
    y = Transfer()(jax.device_put(value, a), a, b, shape, dtype)
    assert y.dtype == dtype
    assert y.sharding.is_equivalent_to(b, len(shape))
    np.testing.assert_array_equal(np.asarray(y), value)
    for s in y.addressable_shards:
        np.testing.assert_array_equal(np.asarray(s.data), value[s.index])


@pytest.mark.parametrize("dtype", [np.float32, np.bool_])
def test_transfer_sends_each_block_once_and_fans_out_bit_exactly(devices8, dtype):
    devs = jax.devices()
    a = NamedSharding(make_mesh((2,), ("x",), devs[:2]), P())
    b = NamedSharding(make_mesh((2, 3), ("a", "b"), devs[2:8]), P("a"))  # 2 blocks, each on 3 devices
    value = np.array([[-0.0, np.nan], [np.inf, -np.inf], [1e-45, -1.5], [0.0, 3.0]], np.float32).astype(dtype)
    transfer = Transfer()
    y = transfer(jax.device_put(value, a), a, b, value.shape, dtype)
    (route,) = transfer._routes.values()
    assert route.u_devs == devs[:2] + [devs[2], devs[5]]  # the senders and one head per block
    hlo = route.permute.lower(jax.ShapeDtypeStruct((4, route.rounds, 2, 2), dtype, sharding=route.union)
                              ).compile().as_text()
    assert hlo.count("collective-permute") >= 1 and "{0,2},{1,3}" in hlo.replace(" ", "")
    for sh in y.addressable_shards:  # every replica bit for bit (-0.0, NaN, denormals)
        got, want = np.asarray(sh.data), value[sh.index]
        assert got.tobytes() == np.ascontiguousarray(want).tobytes(), (sh.device, got, want)


def test_launcher_rejects_bad_process_counts_before_starting_anything(monkeypatch):
    from autopar import launch
    from autopar.cli import main
    monkeypatch.delenv(launch.ENV_COORDINATOR, raising=False)
    with pytest.raises(SystemExit, match="--processes must divide the devices: 8 devices over 3 processes"):
        main(["run", "examples/mlp.py:loss_fn", "--train", "--processes", "3"])
    with pytest.raises(SystemExit, match="--processes runs training"):
        main(["run", "examples/mlp.py:mlp_step", "--processes", "2"])
    with pytest.raises(ValueError, match=r"process id must be in \[0, 2\), got process_id=2"):
        launch.initialize("127.0.0.1:1", 2, 2)


def test_readme_launcher_command_runs_word_for_word():
    text = (ROOT / "README.md").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("autopar run") and "--processes" in ln]
    assert len(lines) == 1, lines
    words = shlex.split(re.sub(r"\s+#.*$", "", lines[0]))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    done = subprocess.run([sys.executable, "-m", "autopar", *words[1:]], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "in 2 processes vs the single-device step" in out and "→ OK" in out, out[-3000:]
    assert "[Gloo]" not in out


def test_gloo_connection_messages_are_dropped_even_when_their_pieces_interleave():
    from autopar.launch import drop_gloo_chatter
    # as CI printed them: two threads' messages mixed within and across lines
    seen = [" : 4\n", "1[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n",
            " peer ranks. Expected number of connected peer ranks is : 3\n",
            "[Gloo] Rank 0 is connected to 3 peer ranks. Expected number of connected peer ranks is : 3\n",
            "0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n"]
    assert [drop_gloo_chatter(ln) for ln in seen] == [None] * 5
    assert drop_gloo_chatter("1 is connected to autopar: error: process 1: …\n") == "autopar: error: process 1: …\n"
    assert drop_gloo_chatter("ran 2 stage(s) × 4 micro-batch(es)\n") == "ran 2 stage(s) × 4 micro-batch(es)\n"


def test_the_cli_runs_a_scanned_stack_in_two_processes(tmp_path):
    """``autopar run … --train --processes 2`` of a lax.scan stack: planned split per iteration,
    run in the split form (``apply(stacked=False)``), checked against the single-device loop."""
    src = tmp_path / "scanned.py"
    src.write_text(
        "import jax, jax.numpy as jnp, numpy as np\n"
        "def loss_fn(p, b):\n"
        "    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), b['x'] @ p['emb'], p['layers'])\n"
        "    return jnp.mean((h @ p['emb'].T - b['y']) ** 2)\n"
        "def loss_fn_args(abstract=False):\n"
        "    r = np.random.default_rng(0)\n"
        "    return ({'emb': (r.standard_normal((16, 32)) * 0.3).astype(np.float32),\n"
        "             'layers': (r.standard_normal((4, 32, 32)) * 0.2).astype(np.float32)},\n"
        "            {'x': r.standard_normal((32, 16)).astype(np.float32),\n"
        "             'y': r.standard_normal((32, 16)).astype(np.float32)})\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    done = subprocess.run([sys.executable, "-m", "autopar", "run", f"{src}:loss_fn", "--train", "--microbatches", "4",
                           "--stages", "0-2:1x4,2-4:1x4", "--optimizer", "adam:0.01", "--clip-norm", "0.5",
                           "--processes", "2", "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "scanned layer stack split per iteration" in out and "in 2 processes vs the single-device step" in out \
        and "→ OK" in out, out[-3000:]
