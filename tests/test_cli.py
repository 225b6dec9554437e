"""The command line, as a user runs it (subprocesses)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parent.parent


def autopar(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("JAX_NUM_CPU_DEVICES", None)  # `run` must set the devices up itself
    return subprocess.run([sys.executable, "-m", "autopar", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_clusters_lists_specs():
    r = autopar("clusters")
    assert r.returncode == 0, r.stderr
    for name in ("cpu-8", "dgx-a100-80g", "dgx-h100", "p3.16xlarge"):
        assert name in r.stdout


def test_plan_prints_report_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    r = autopar("plan", "examples/mlp.py:mlp_step", "--cluster", "dgx-a100-80g", "--nodes", "2", "--mesh", "2x8",
                "--donate", "0", "--json", str(out))
    assert r.returncode == 0, r.stderr
    for part in ("mesh: (2, 8)", "predicted step time", "per-device memory", "[0][0]['w']", "collectives",
                 "solver:", "fallback ops"):
        assert part in r.stdout, r.stdout
    plan = json.loads(out.read_text())
    assert plan["mesh_shape"] == [2, 8] and plan["nodes"] == 2 and plan["donated_inputs"] == [0, 1]


def test_run_checks_against_unsharded(tmp_path):
    r = autopar("run", "examples/mlp.py:mlp_step", "--arg", "hidden=512")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "ran on 8 cpu devices" in r.stdout and "→ OK" in r.stdout


def test_run_saved_plan(tmp_path):
    out = tmp_path / "plan.json"
    assert autopar("plan", "examples.mlp:mlp_step", "--mesh", "8", "--json", str(out)).returncode == 0
    r = autopar("run", "examples.mlp:mlp_step", "--plan", str(out))
    assert r.returncode == 0 and "→ OK" in r.stdout, r.stderr + r.stdout


def test_errors_are_one_line_messages():
    r = autopar("plan", "examples/mlp.py:mlp_step", "--cluster", "nope")
    assert r.returncode == 2 and "known clusters: cpu-8" in r.stderr and "Traceback" not in r.stderr
    r = autopar("plan", "examples/mlp.py:mlp_step", "--mesh", "3x3")
    assert r.returncode == 2 and "mesh_shape=(3, 3)" in r.stderr and "Traceback" not in r.stderr
    r = autopar("plan", "examples/mlp.py:no_such_fn")
    assert r.returncode != 0 and "no function 'no_such_fn'" in r.stderr
    r = autopar("plan", "examples/mlp.py:mlp_step", "--arg", "widht=3")
    assert r.returncode != 0 and "widht" in r.stderr


def test_training_plan_run_timeline_and_saved_plan(tmp_path):
    svg, saved = tmp_path / "t.svg", tmp_path / "train.json"
    knobs = ["--arg", "batch=16", "--arg", "hidden=32", "--arg", "layers=2", "--train", "--microbatches", "2",
             "--optimizer", "sgd:0.1", "--clip-norm", "0.01", "--stages", "0-1:1x4,1-2:1x4", "--layers", "2"]
    r = autopar("run", "examples/mlp.py:loss_fn", *knobs, "--timeline", str(svg), "--json", str(saved))
    assert r.returncode == 0, r.stderr + r.stdout
    for part in ("2 stage(s), 2 micro-batch(es)", "sub-mesh", "in flight", "→ OK",
                 "optimizer update across stages (a global norm): 2 rounds"):
        assert part in r.stdout, r.stdout
    assert svg.read_text().startswith("<") and json.loads(saved.read_text())["kind"] == "training"
    r = autopar("run", "examples/mlp.py:loss_fn", *knobs, "--plan", str(saved))
    assert r.returncode == 0 and "→ OK" in r.stdout, r.stderr + r.stdout
    r = autopar("plan", "examples/mlp.py:loss_fn", *knobs[:7], "--microbatches", "1,2", "--layers", "2", "--bound")
    assert r.returncode == 0 and "micro-batch counts tried" in r.stdout and "→" in r.stdout, r.stderr + r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("compute bound: "))
    assert float(line.rsplit(" ", 2)[-2].rstrip("×")) >= 1.0, line   # "… is 1.23× it"
    r = autopar("plan", "examples/mlp.py:loss_fn", "--train", "--stages", "0-1:1x3", "--layers", "1")
    assert r.returncode == 2 and "is not one of" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_file_target_imports_its_sibling_modules(tmp_path):
    (tmp_path / "helpers.py").write_text("import jax.numpy as jnp\n\ndef layer(w, x):\n    return jnp.tanh(x @ w)\n")
    (tmp_path / "model.py").write_text(
        "import jax, jax.numpy as jnp\nfrom helpers import layer\n\n"
        "def fwd(w, x):\n    return jnp.sum(layer(w, x))\n\n"
        "def fwd_args(abstract=False):\n"
        "    return jnp.ones((64, 64)), jnp.ones((32, 64))\n")
    r = autopar("plan", str(tmp_path / "model.py") + ":fwd", "--mesh", "8")
    assert r.returncode == 0 and "mesh: (8,)" in r.stdout, r.stderr
    assert "Running HiGHS" not in r.stdout + r.stderr and "Copyright" not in r.stdout  # no solver banner


def test_run_accepts_a_correct_adamw_step_and_says_what_it_compared():
    r = autopar("run", "examples/flax_lm.py:adamw_step", "--steps", "3")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "3 step(s)" in r.stdout and ("→ OK (loss)" in r.stdout or "→ OK\n" in r.stdout + "\n"), r.stdout


def test_run_rejects_a_wrong_plan(monkeypatch, capsys, devices8):
    """A plan whose execution is wrong (here: every fed-back output nudged by 1e-3, as a
    broken reshard would) fails `autopar run`, even though Adam-style noise is tolerated."""
    from autopar import cli
    from autopar.runtime import ShardedFunction

    real = ShardedFunction.__call__

    def broken(self, *args):
        params, loss = real(self, *args)
        return jax.tree.map(lambda p: p + 1e-3, params), loss

    monkeypatch.setattr(ShardedFunction, "__call__", broken)
    rc = cli.main(["run", "examples/mlp.py:mlp_step", "--arg", "hidden=64", "--arg", "batch=32", "--mesh", "8"])
    out = capsys.readouterr().out
    assert rc == 1 and "→ MISMATCH" in out and "step 2:" in out, out


def test_run_a_loss_with_dropout_and_aux_outputs(tmp_path):
    """``--has-aux``: a loss returning (loss, aux) with dropout drawn from a key in the batch,
    run in 2 stages × 4 micro-batches and checked against the single-device step, aux included."""
    (tmp_path / "drop.py").write_text(
        "import jax, jax.numpy as jnp\nfrom autopar import stage_boundary\n\n"
        "def loss(p, b):\n"
        "    h = jnp.tanh(b['x'] @ p['w1'])\n"
        "    h = jnp.where(jax.random.bernoulli(b['dropout'], 0.8, h.shape), h / 0.8, 0.0)\n"
        "    err = jnp.mean((stage_boundary(h) @ p['w2'] - b['y']) ** 2, axis=-1)\n"
        "    return jnp.mean(err), {'row_error': err, 'rows_above_1': jnp.sum(err > 1.0), 'worst': jnp.max(err)}\n\n"
        "def loss_args(abstract=False):\n"
        "    k = jax.random.split(jax.random.key(0), 4)\n"
        "    p = {'w1': jax.random.normal(k[0], (16, 32)) * 0.3, 'w2': jax.random.normal(k[1], (32, 16)) * 0.3}\n"
        "    return p, {'x': jax.random.normal(k[2], (16, 16)), 'y': jax.random.normal(k[3], (16, 16)),\n"
        "               'dropout': jax.random.key(7)}\n")
    r = autopar("run", str(tmp_path / "drop.py") + ":loss", "--train", "--has-aux", "--microbatches", "4",
                "--stages", "0-1:1x4,1-2:1x4", "--layers", "2", "--optimizer", "sgd:0.1")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "random draws over the batch (dropout masks …): 1" in r.stdout and "→ OK" in r.stdout, r.stdout
    # a max over the batch: averaged over micro-batches, named, and not compared
    assert "not compared (nonlinear over the batch, averaged over micro-batches): loss[1]['worst']" in r.stdout
    r = autopar("run", str(tmp_path / "drop.py") + ":loss", "--train", "--microbatches", "4", "--layers", "2")
    assert r.returncode == 2 and "needs plan_training(..., has_aux=True)" in r.stderr, r.stderr


def test_run_a_loss_whose_rows_meet(tmp_path):
    """A BatchNorm-style loss is refused on micro-batches with where its rows meet; with
    ``--coupled-rows per_microbatch`` it runs each micro-batch's statistics over its own rows,
    checked against the single-device step over the same micro-batches — dropout included,
    each micro-batch drawing its rows of the whole batch's mask in both."""
    (tmp_path / "bn.py").write_text(
        "import jax, jax.numpy as jnp\nfrom autopar import stage_boundary\n\n"
        "def loss(p, b):\n"
        "    h = b['x'] @ p['w1']\n"
        "    h = (h - h.mean(axis=0)) * jax.lax.rsqrt(h.var(axis=0) + 1e-5)\n"
        "    h = jnp.where(jax.random.bernoulli(b['key'], 0.8, h.shape), h / 0.8, 0.0)\n"
        "    return jnp.mean((stage_boundary(jnp.tanh(h)) @ p['w2'] - b['y']) ** 2)\n\n"
        "def loss_args(abstract=False):\n"
        "    k = jax.random.split(jax.random.key(0), 4)\n"
        "    p = {'w1': jax.random.normal(k[0], (16, 32)) * 0.3, 'w2': jax.random.normal(k[1], (32, 16)) * 0.3}\n"
        "    return p, {'x': jax.random.normal(k[2], (16, 16)), 'y': jax.random.normal(k[3], (16, 16)),\n"
        "               'key': jax.random.key(5)}\n")
    args = ["run", str(tmp_path / "bn.py") + ":loss", "--train", "--microbatches", "4", "--layers", "2",
            "--stages", "0-1:1x4,1-2:1x4", "--optimizer", "sgd:0.1"]
    r = autopar(*args)
    assert r.returncode == 2 and "lets the batch's rows meet" in r.stderr and "bn.py:6" in r.stderr, r.stderr
    r = autopar(*args, "--coupled-rows", "per_microbatch")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "batch rows across micro-batches: rows meet" in r.stdout and "→ OK" in r.stdout, r.stdout


def test_a_file_inside_a_package_imports_from_anywhere(tmp_path):
    """``autopar plan examples/zoo/vit.py:vit_step`` run outside the checkout, no PYTHONPATH:
    the zoo module imports ``examples.zoo.common``, found above its outermost package."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAX_NUM_CPU_DEVICES")}
    r = subprocess.run([sys.executable, "-m", "autopar", "plan", str(ROOT / "examples/zoo/vit.py") + ":vit_step",
                        "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "fallback ops: none" in r.stdout, r.stderr[-2000:]
    (tmp_path / "missing_dep.py").write_text("import no_such_module\n")
    r = subprocess.run([sys.executable, "-m", "autopar", "plan", str(tmp_path / "missing_dep.py") + ":f"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "autopar: cannot import" in r.stderr and "no_such_module" in r.stderr, r.stderr


def test_run_interleaved_chunks(tmp_path):
    """``--virtual-stages 2`` with four given chunks on two device groups: planned, run and
    checked against the single-device step; the timeline has one row per group."""
    svg = tmp_path / "t.svg"
    r = autopar("run", "examples/mlp.py:loss_fn", "--arg", "batch=16", "--arg", "hidden=32", "--arg", "layers=4",
                "--train", "--microbatches", "2", "--optimizer", "sgd:0.1", "--layers", "4",
                "--stages", "0-1:1x4,1-2:1x4,2-3:1x4,3-4:1x4", "--virtual-stages", "2", "--timeline", str(svg))
    assert r.returncode == 0, r.stderr + r.stdout
    assert "interleaved ×2 (stage k on device group k mod 2, 2 groups)" in r.stdout and "→ OK" in r.stdout, r.stdout
    assert svg.read_text().count('class="row"') == 2
    r = autopar("plan", "examples/mlp.py:loss_fn", "--train", "--virtual-stages", "two")
    assert r.returncode == 2 and "expected auto or a count" in r.stderr and "Traceback" not in r.stderr, r.stderr
