"""The same plan under jax.distributed: 2 processes × 4 CPU devices on 127.0.0.1."""
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

import autopar
from examples import mlp

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, devices8):
    args = mlp.mlp_step_args(batch=128, hidden=1024)
    plan = autopar.plan(mlp.mlp_step, *args, cluster="cpu-8", mesh_shape=(2, 4))
    single = [np.asarray(x) for x in jax.tree_util.tree_leaves(plan.apply(mlp.mlp_step)(*args))]
    plan_path, out_path = tmp_path / "plan.json", tmp_path / "out.npz"
    plan_path.write_text(plan.to_json())
    port = str(_free_port())
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    import os
    env = {**os.environ, **env}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "distributed_worker.py"), port, str(i),
                               str(plan_path), str(out_path)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(logs)[-4000:]
    multi = np.load(out_path)
    got = [multi[f"arr_{i}"] for i in range(len(multi.files))]
    assert len(got) == len(single)
    for a, b in zip(got, single):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
