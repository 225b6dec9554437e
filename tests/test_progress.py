"""Progress of planning: silent by default in the API, on stderr with verbose=True, on the
"autopar" logger for users who configure logging, a live display in the CLI."""
import logging

import autopar
from autopar.progress import Progress
from conftest import make_cluster
from examples import mlp
from test_cli import autopar as cli


class Recorder(Progress):
    def __init__(self):
        self.events = []

    def phase(self, name, total=None):
        self.events.append(("phase", name, total))

    def advance(self, n=1, *, detail="", incumbent_s=None, gap=None):
        self.events.append(("advance", detail, incumbent_s, gap))


ARGS = mlp.mlp_step_args(batch=64, hidden=256, abstract=True)


def test_api_is_silent_by_default(capfd):
    autopar.plan(mlp.mlp_step, *ARGS)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_verbose_prints_meshes_done_of_total_with_incumbent(capfd):
    autopar.plan(mlp.mlp_step, *ARGS, verbose=True)
    err = capfd.readouterr().err
    assert "autopar: " in err and "solve meshes 3/3" in err and "best " in err and "gap " in err, err
    assert not logging.getLogger("autopar").handlers  # the handler is removed after the call


def test_progress_goes_to_the_autopar_logger(caplog):
    with caplog.at_level(logging.INFO, logger="autopar"):
        autopar.plan(mlp.mlp_step, *ARGS, mesh_shape=(8,))
    assert any("solve meshes 1/1" in r.getMessage() for r in caplog.records)


def test_a_progress_object_receives_phases_and_incumbents():
    rec = Recorder()
    autopar.plan(mlp.mlp_step, *ARGS, verbose=rec)
    assert ("phase", "solve meshes", 3) in rec.events
    adv = [e for e in rec.events if e[0] == "advance"]
    assert len(adv) == 3 and all(e[2] is not None and e[2] > 0 for e in adv)
    import optax
    rec = Recorder()
    params, x, y = mlp.mlp_step_args(batch=16, hidden=32, layers=4, abstract=True)
    autopar.plan_training(mlp.loss_fn, params, {"x": x, "y": y}, optimizer=optax.sgd(0.1),
                          cluster=make_cluster(8), num_microbatches=2, num_layers=4, costing="additive", verbose=rec)
    phases = [e[1] for e in rec.events if e[0] == "phase"]
    assert phases[0].startswith("trace") and any("additive" in p for p in phases) \
        and any(p.startswith("stage DP") for p in phases) and "plan splits exactly" in phases, phases
    assert sum(e[0] == "advance" for e in rec.events) >= 4 * 3  # a stage ILP per layer × sub-mesh


def test_cli_shows_live_progress_on_stderr_unless_quiet():
    r = cli("plan", "examples/mlp.py:mlp_step", "--arg", "hidden=256")
    assert r.returncode == 0 and "solve meshes" in r.stderr and "3/3" in r.stderr, r.stderr
    assert "solve meshes" not in r.stdout
    r = cli("plan", "examples/mlp.py:mlp_step", "--arg", "hidden=256", "--quiet")
    assert r.returncode == 0 and r.stderr == "", r.stderr
