"""``Plan.explain`` / ``autopar explain``: why is a weight replicated?

The model is the nanoGPT-style example (``examples/gpt.py``): a fused QKV projection whose
output is cut by ``jnp.split(qkv, 3, axis=-1)``. On 8 devices the planner keeps the QKV weight
replicated while the MLP weights are split; ``explain`` must name what splitting it would
cost: the weight gathered back whole for the matmuls that read it (once for all of them,
``autopar.build_shared``), or, kept split (tensor parallel), the layer norm's output gathered
and the matmul's partial sums reduce-scattered. (Before reshards were shared, each reader paid
its own gather and the cheapest split was the one the ``jnp.split`` pieces then re-laid out;
``hint`` still names such a cut when it is among the costliest causes.)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_cluster

import autopar
from autopar.explain import ExplainError, leaf_paths
from autopar.planner import PlanHooks, plan_with
from autopar.cost import shard_factor
from examples import gpt

ROOT = Path(__file__).resolve().parent.parent
KNOBS = dict(layers=2, hidden=192, seq=64, vocab=512, batch=8)
CLUSTER = dict(flops=20e12, alpha_s=5e-6)   # sharding pays, collectives are not free
QKV = "[0]['blocks'][0]['attn']['qkv']['w']"
FC = "[0]['blocks'][0]['mlp']['fc']['w']"
SPLIT_LINE = next(i for i, line in enumerate((ROOT / "examples" / "gpt.py").read_text().splitlines(), 1)
                  if "jnp.split(qkv" in line)


@pytest.fixture(scope="module")
def planned():
    args = gpt.sgd_train_step_args(**KNOBS, abstract=True)
    kw = dict(cluster=make_cluster(8, **CLUSTER), mesh_shape=(8,), donate_argnums=(0,))
    plan = autopar.plan(gpt.sgd_train_step, *args, **kw)
    return plan, args, kw


def _index(plan, path):
    return leaf_paths(plan).index(path)


def test_replicated_qkv_names_its_costs(planned):
    plan, _, _ = planned
    specs = dict(zip(leaf_paths(plan), plan.input_specs_flat))
    assert specs[QKV] == [[], []] and specs[FC] == [[], ["x"]]   # the situation
    e = plan.explain(QKV)
    assert e.state == "replicated" and e.split_factor == 1 and e.spec == "P()"
    a = e.alternative
    assert a is not None and a.leaf_split_factor == 8 and a.extra_time_s > 0
    top = a.costlier[0]   # split further: gathered back whole, once, for its readers
    assert "once, for all its readers" in top.item and "all-gather" in top.forced, top
    assert top.where.startswith("gpt.py:") and "dot_general" in top.primitives
    tp = e.used_split     # kept split where it is read: activations gathered, partial sums reduced
    assert tp is not None and tp.extra_time_s > a.extra_time_s
    assert any("reduce-scatter" in c.forced or "all-gather" in c.forced for c in tp.costlier), tp.costlier
    text = str(e)
    assert "cheapest plan that splits it further" in text and "what makes it expensive" in text
    assert "once, for all its readers" in text


def test_hint_names_a_cut_or_a_reshape():
    from autopar.explain_compare import hint
    cut = hint([("split", f"gpt.py:{SPLIT_LINE} (_attention)")])
    assert f"split at gpt.py:{SPLIT_LINE}" in cut and "(d, 3, heads, head_dim)" in cut
    assert "reshape at x.py:3" in hint([("reshape", "x.py:3 (f)")]) and hint([]) == ""


def test_extra_cost_is_the_difference_of_two_solved_objectives(planned):
    plan, args, kw = planned
    e = plan.explain(QKV, top=10**6)
    idx = _index(plan, QKV)
    forced = plan_with(gpt.sgd_train_step, args, **kw, hooks=PlanHooks(restrict=lambda shape: {
        "allowed": lambda u, s: u != idx or shard_factor(s.out_specs[0], shape) > 1}))
    a = e.alternative
    assert a.extra_time_s == forced.solver.objective_s - plan.solver.objective_s
    assert a.objective_s == forced.solver.objective_s
    assert a.peak_memory_bytes == forced.predicted.peak_memory_bytes
    assert a.extra_memory_bytes == forced.predicted.peak_memory_bytes - plan.predicted.peak_memory_bytes
    assert a.leaf_spec == str(forced.input_specs[0]["blocks"][0]["attn"]["qkv"]["w"])
    # the node-by-node / edge-by-edge attribution adds up to the objectives' difference
    listed = sum(c.delta_s for c in a.costlier + a.cheaper)
    assert listed == pytest.approx(a.extra_time_s, rel=0.02, abs=1e-7)
    if e.used_split is not None:   # the tensor-parallel variant: no all-gather of the leaf where it is read
        def kept(u, src, dst):
            return u != idx or {x for axes in src for x in axes} <= {x for axes in dst for x in axes}
        tp = plan_with(gpt.sgd_train_step, args, **kw, hooks=PlanHooks(restrict=lambda shape: {
            "allowed": lambda u, s: u != idx or shard_factor(s.out_specs[0], shape) > 1, "allowed_reshard": kept}))
        assert e.used_split.extra_time_s == tp.solver.objective_s - plan.solver.objective_s


def test_split_leaf_reports_it_is_split(planned):
    plan, _, _ = planned
    e = plan.explain(FC)
    assert e.state == "split" and e.split_factor == 8 and e.alternative is None
    assert "already split over all 8 devices" in str(e)


def test_leaf_by_flat_index_and_loose_path(planned):
    plan, _, _ = planned
    idx = _index(plan, QKV)
    by_index, by_path = plan.explain(idx), plan.explain('[0]["blocks"][0]["attn"]["qkv"]["w"]')
    assert by_index.leaf == by_path.leaf == QKV and by_index.index == idx
    assert by_index.alternative.extra_time_s == by_path.alternative.extra_time_s


def test_bad_path_lists_valid_paths(planned):
    plan, _, _ = planned
    with pytest.raises(ExplainError, match="valid paths") as err:
        plan.explain("[0]['blocks'][0]['attn']['qvk']['w']")
    assert isinstance(err.value, ValueError) and "Did you mean" in str(err.value) and QKV in str(err.value)
    with pytest.raises(ExplainError, match="out of range"):
        plan.explain(10_000)
    with pytest.raises(ExplainError, match="matches 2 leaves"):
        plan.explain("['attn']['qkv']['w']")


def test_loaded_plan_needs_fn_and_args(planned):
    plan, args, _ = planned
    loaded = autopar.Plan.from_json(plan.to_json())
    with pytest.raises(ExplainError, match="fn=the_function"):
        loaded.explain(QKV)
    e = loaded.explain(QKV, fn=gpt.sgd_train_step, args=args)
    assert e.alternative.extra_time_s == plan.explain(QKV).alternative.extra_time_s
    other = gpt.sgd_train_step_args(**{**KNOBS, "hidden": 128}, abstract=True)
    with pytest.raises(ExplainError, match="different program"):
        loaded.explain(QKV, fn=gpt.sgd_train_step, args=other)


def _autopar(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "autopar", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_explain(tmp_path):
    spec = tmp_path / "cluster.json"
    spec.write_text(make_cluster(8, **CLUSTER).model_dump_json())
    common = ["examples/gpt.py:sgd_train_step", *[f"--arg={k}={v}" for k, v in KNOBS.items()],
              "--cluster", str(spec), "--mesh", "8", "--donate", "0"]
    r = _autopar("explain", common[0], QKV, *common[1:])
    assert r.returncode == 0, r.stderr
    assert "replicated" in r.stdout and "once, for all its readers" in r.stdout, r.stdout
    assert "predicted time +" in r.stdout
    r = _autopar("explain", common[0], "[0]['nope']", *common[1:])
    assert r.returncode == 2 and "valid paths" in r.stderr and QKV in r.stderr and "Traceback" not in r.stderr
    saved = tmp_path / "plan.json"
    assert _autopar("plan", *common, "--json", str(saved)).returncode == 0
    r = _autopar("explain", common[0], FC, *common[1:], "--plan", str(saved))
    assert r.returncode == 0 and "already split over all 8 devices" in r.stdout, r.stderr + r.stdout
    assert json.loads(saved.read_text())["mesh_shape"] == [8]


@pytest.fixture(scope="module")
def planned_2d():
    """The issue's situation on a 2D mesh: MLP weights split over the tensor axis, QKV replicated."""
    args = gpt.sgd_train_step_args(**KNOBS, abstract=True)
    return autopar.plan(gpt.sgd_train_step, *args, cluster=make_cluster(8, **CLUSTER), mesh_shape=(2, 4),
                        donate_argnums=(0,))


def test_2d_mesh_partly_split_and_forced_axis(planned_2d):
    plan = planned_2d
    specs = dict(zip(leaf_paths(plan), plan.input_specs_flat))
    assert specs[QKV] == [[], []] and specs[FC] == [[], ["y"]]
    fc = plan.explain(FC)
    assert fc.state == "partly split" and fc.split_factor == 4 and "over 4 of 8 devices" in str(fc)
    assert fc.alternative is not None and fc.alternative.leaf_split_factor == 8
    qkv = plan.explain(QKV, axis="y")   # over the tensor axis, where the MLP weights are split
    for alt in (qkv.alternative, qkv.used_split):
        if alt is not None:
            assert "'y'" in alt.leaf_spec and alt.leaf_split_factor >= 4
    assert "over axis 'y'" in str(qkv)
    causes = [c for alt in (qkv.alternative, qkv.used_split) if alt is not None for c in alt.costlier]
    assert any("once, for all its readers" in c.item and "all-gather over y" in c.forced for c in causes), \
        [c.what for c in causes]
    with pytest.raises(ExplainError, match="use one of"):
        plan.explain(QKV, axis="z")


def test_infeasible_forced_split_says_so(planned, monkeypatch):
    from autopar import solvers

    def no_fit(problem, **kw):
        raise solvers.InfeasibleError("over the limit", min_peak_usage=2 * problem.usage_limit)
    monkeypatch.setattr("autopar.explain.solvers.solve", no_fit)
    plan, _, _ = planned
    e = plan.explain(QKV)
    assert e.alternative is None and "infeasible" in e.note and "does not fit the memory budget" in str(e)
