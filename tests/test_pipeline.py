"""Pipeline training plans: equality with the single-device step, stage choices, errors."""
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import autopar
from autopar import PlanError, TrainingPlan, plan_training
from conftest import make_cluster
from examples import gpt, mlp


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Stage executables are identical across the GPipe/1F1B variants of a case: a persistent
    compilation cache (fresh for this module) compiles each once (XLA:CPU needs ~3 s per GPT stage)."""
    from jax._src import compilation_cache as cc
    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    cc.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    cc.reset_cache()


def reference_step(loss_fn, opt, has_aux=False):
    def step(p, o, b):
        loss, g = jax.value_and_grad(loss_fn, has_aux=has_aux)(p, b)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o, loss
    return jax.jit(step)


def _words(x):
    """A PRNG key leaf (optax.add_noise's state) as its words, any other leaf as it is."""
    return jax.random.key_data(x) if jnp.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key) else x


def assert_tree_close(got, want, rtol=1e-5, atol=1e-6):
    gl, gt = jax.tree_util.tree_flatten(got)
    wl, wt = jax.tree_util.tree_flatten(want)
    assert gt == wt
    for a, b in zip(map(_words, gl), map(_words, wl)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def run_and_compare(loss_fn, params, batch, opt, tplan):
    state = opt.init(params)
    want = reference_step(loss_fn, opt)(params, state, batch)
    jax.block_until_ready(want)
    got = tplan.apply()(params, state, batch)
    assert_tree_close(got, want)
    return got


# 2 stages: one node of 4 each; 4 stages: (1,2) sub-meshes on a 2 × 4 cluster
STAGES = {2: [(0, 2, (1, 4)), (2, 4, (1, 4))],
          4: [(0, 1, (1, 2)), (1, 2, (1, 2)), (2, 3, (1, 2)), (3, 4, (1, 2))]}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("num_stages", [2, 4])
def test_mlp_pipeline_equals_single_device(devices8, schedule, num_stages):
    params, batch = mlp.params_and_batch(batch=32, hidden=64, layers=4, bias=True)
    opt = optax.adam(1e-2)
    tplan = plan_training(mlp.loss_fn, params, batch, optimizer=opt, cluster=make_cluster(4), nodes=2,
                          num_microbatches=4, schedule=schedule, num_layers=4, stages=STAGES[num_stages])
    assert tplan.num_stages == num_stages
    assert [s.layers for s in tplan.stages] == [[a, b] for a, b, _ in STAGES[num_stages]]
    devs = [d for s in tplan.stages for d in s.devices]
    assert len(set(devs)) == len(devs)  # sub-meshes are disjoint
    _, _, loss = run_and_compare(mlp.loss_fn, params, batch, opt, tplan)
    assert np.isfinite(float(loss))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("num_stages", [2, 4])
def test_gpt_pipeline_equals_single_device(devices8, schedule, num_stages):
    # tied embeddings: wte is read by the first and the last stage (copied, gradient sent back)
    # the example marks a layer per transformer block (autopar.stage_boundary between blocks)
    params, batch = gpt.params_and_batch(layers=num_stages, hidden=32, seq=16, vocab=64, batch=8)
    opt = optax.sgd(0.1, momentum=0.9)
    subs = {2: (1, 4), 4: (1, 2)}[num_stages]
    stages = [(k, k + 1, subs, (subs[1],)) for k in range(num_stages)]  # 1D logical meshes: faster to plan
    tplan = plan_training(gpt.loss_fn, params, batch, optimizer=opt, cluster=make_cluster(4), nodes=2,
                          num_microbatches=2, schedule=schedule, stages=stages)
    assert tplan.search.layers_from_markers
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    wte = paths.index("['wte']")
    readers = [s.index for s in tplan.stages if wte in s.params]
    run_and_compare(gpt.loss_fn, params, batch, opt, tplan)
    assert tplan.num_stages == num_stages
    assert readers == [0, num_stages - 1]  # embedding lookup and the tied output projection
    assert "shared parameters" in tplan.report()


def test_two_slow_nodes_and_a_big_model_pick_the_faster_of_node_stages_and_one_stage(devices8):
    # network 1000× slower than the links inside a node; the model does not fit one node. One
    # stage per node sends each micro-batch's activations across the network; one stage over
    # both nodes can split every weight over both (2D tensor parallel: only activation-sized
    # partial sums cross nodes). With the reshard costs replayed from XLA (cost/resharding.py)
    # the latter is predicted slightly faster here (simulated 832.7 vs 838.8 µs): the planner
    # must return the faster one, and the per-node split must place one stage on each node.
    params, batch = mlp.params_and_batch(batch=64, hidden=512, layers=4)
    opt = optax.sgd(0.1, momentum=0.9)  # (Adam turns float noise in ~0 gradients into ±lr updates)
    cluster = make_cluster(4, intra_bw=150e9, inter_bw=0.15e9, alpha_s=1e-6, flops=1e11)
    p_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    # params + gradient accumulator + momentum = 3 × p_bytes: on one node (4 devices) that is
    # ≥ 0.75 × p_bytes per device, on two nodes or half the model per node ≥ 0.375 × p_bytes
    budget = 0.6 * p_bytes
    kw = dict(optimizer=opt, cluster=cluster, nodes=2, num_microbatches=4, num_layers=2, memory_budget_bytes=budget)
    tplan = plan_training(mlp.loss_fn, params, batch, **kw)
    per_node = plan_training(mlp.loss_fn, params, batch, num_stages=2, **kw)
    assert [s.submesh for s in per_node.stages] == [[1, 4], [1, 4]]
    assert sorted(per_node.stages[0].devices) == [0, 1, 2, 3] and sorted(per_node.stages[1].devices) == [4, 5, 6, 7]
    one = plan_training(mlp.loss_fn, params, batch, num_stages=1, **kw)
    assert tplan.predicted.dp_objective_s == min(per_node.predicted.dp_objective_s, one.predicted.dp_objective_s)
    for p in (tplan, per_node):
        assert all(s.memory_bytes_per_device <= budget for s in p.stages)
        run_and_compare(mlp.loss_fn, params, batch, opt, p)
    # the same model and budget with a fast network: one stage over both nodes is faster
    fast = plan_training(mlp.loss_fn, params, batch, optimizer=opt, nodes=2, num_microbatches=4, num_layers=2,
                         cluster=make_cluster(4, intra_bw=150e9, inter_bw=150e9, alpha_s=1e-6, flops=1e11),
                         memory_budget_bytes=budget)
    assert fast.num_stages == 1 and fast.stages[0].submesh == [2, 4]


def test_fast_links_and_a_small_model_give_one_stage(devices8):
    # compute-bound (slow devices) and fast links everywhere: data parallel over all 8 devices
    # scales perfectly, so a pipeline would only add its bubble
    params, batch = mlp.params_and_batch(batch=512, hidden=64, layers=4)
    opt = optax.adam(1e-3)
    tplan = plan_training(mlp.loss_fn, params, batch, optimizer=opt,
                          cluster=make_cluster(4, inter_bw=150e9, flops=1e10), nodes=2, num_microbatches=4,
                          num_layers=2)
    assert tplan.num_stages == 1
    assert tplan.stages[0].submesh == [2, 4]
    assert tplan.predicted.bubble_fraction == 0.0
    run_and_compare(mlp.loss_fn, params, batch, opt, tplan)


def test_json_round_trip_and_apply_from_json(devices8):
    params, batch = mlp.params_and_batch(batch=16, hidden=32, layers=2)
    opt = optax.sgd(0.1)
    tplan = plan_training(mlp.loss_fn, params, batch, optimizer=opt, cluster=make_cluster(4), nodes=2,
                          num_microbatches=2, num_layers=2, stages=[(0, 1, (1, 4)), (1, 2, (1, 4))])
    again = TrainingPlan.from_json(tplan.to_json())
    assert again == tplan
    with pytest.raises(ValueError, match="loaded from JSON"):
        again.apply()
    state = opt.init(params)
    want = reference_step(mlp.loss_fn, opt)(params, state, batch)
    assert_tree_close(again.apply(mlp.loss_fn, opt)(params, state, batch), want)


def test_planning_is_deterministic(devices8):
    params, batch = mlp.params_and_batch(batch=32, hidden=64, layers=4)
    kw = dict(optimizer=optax.adam(1e-3), cluster=make_cluster(4), nodes=2, num_microbatches=4, num_layers=3)
    a = plan_training(mlp.loss_fn, params, batch, **kw)
    b = plan_training(mlp.loss_fn, params, batch, **kw)
    skip = {"timing": True, "stages": {"__all__": {"plan": {"timing"}}}}
    assert a.model_dump(exclude=skip) == b.model_dump(exclude=skip)


def test_identical_layers_are_planned_once(devices8):
    params, batch = mlp.params_and_batch(batch=32, hidden=64, layers=6)
    tplan = plan_training(mlp.loss_fn, params, batch, optimizer=optax.sgd(0.1), cluster=make_cluster(4),
                          num_microbatches=2, num_layers=6, costing="additive")
    # single layers × 3 sub-meshes; the 4 middle layers are identical
    assert tplan.search.cache_hits >= 3 * 3
    assert tplan.search.costing == "additive"


def test_report_timeline_and_stage_boundary_markers(devices8, tmp_path):
    def loss_fn(params, batch):
        h = jnp.tanh(batch["x"] @ params["w1"])
        h = autopar.stage_boundary(h)
        h = jnp.tanh(h @ params["w2"])
        h = autopar.stage_boundary(h)
        return jnp.mean((h @ params["w3"] - batch["y"]) ** 2)
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.normal(size=(32, 32)) / 6, jnp.float32) for k in ("w1", "w2", "w3")}
    batch = {"x": jnp.asarray(rng.normal(size=(16, 32)), jnp.float32), "y": jnp.zeros((16, 32), jnp.float32)}
    opt = optax.adam(1e-2)
    tplan = plan_training(loss_fn, params, batch, optimizer=opt, cluster=make_cluster(4), num_microbatches=4,
                          num_stages=3)
    assert tplan.search.layers_from_markers and tplan.search.num_layers == 3
    assert tplan.num_stages == 3
    run_and_compare(loss_fn, params, batch, opt, tplan)
    rep = tplan.report()
    for word in ("stage", "sub-mesh", "bubble", "in flight", "memory/dev", "['w1']"):
        assert word in rep
    svg = tplan.timeline(str(tmp_path / "t.svg"))
    text = open(svg).read()
    assert text.count('class="task F') == 3 * 4 and text.count('class="task B') == 3 * 4


def test_errors(devices8):
    params, batch = mlp.params_and_batch(batch=30, hidden=16, layers=2)
    opt = optax.sgd(0.1)
    with pytest.raises(ValueError, match="divisible by num_microbatches=4"):
        plan_training(mlp.loss_fn, params, batch, optimizer=opt, num_microbatches=4)
    with pytest.raises(ValueError, match="optax.GradientTransformation"):
        plan_training(mlp.loss_fn, params, batch, optimizer="adam")
    with pytest.raises(ValueError, match="schedule must be one of"):
        plan_training(mlp.loss_fn, params, batch, optimizer=opt, schedule="zb")
    with pytest.raises(autopar.TraceError, match="one scalar floating loss"):
        plan_training(lambda p, b: b["x"] @ p[0]["w"], params, batch, optimizer=opt)
    with pytest.raises(ValueError, match="must tile"):
        plan_training(mlp.loss_fn, params, batch, optimizer=opt, num_layers=2, stages=[(0, 1, (1, 8))])
    with pytest.raises(ValueError, match="is not one of"):
        plan_training(mlp.loss_fn, params, batch, optimizer=opt, num_layers=2,
                      stages=[(0, 1, (1, 3)), (1, 2, (1, 4))])
    with pytest.raises(PlanError, match="smallest budget that fits is"):
        plan_training(mlp.loss_fn, params, batch, optimizer=opt, num_layers=2, memory_budget_bytes=100)
    tplan = plan_training(mlp.loss_fn, params, batch, optimizer=opt, num_layers=2)
    step = tplan.apply()
    bigger, _ = mlp.params_and_batch(batch=30, hidden=32, layers=2)
    with pytest.raises(autopar.PlanMismatchError):
        step(bigger, opt.init(bigger), batch)
    with pytest.raises(autopar.PlanMismatchError):
        tplan.apply(lambda p, b: mlp.loss_fn(p, b) * 2.0)


def test_unequal_layer_costs_get_unequal_submeshes(devices8):
    # layer 0 has twice the FLOPs of layers 1 and 2 (two matmuls vs one); slow links and a large
    # α make intra-op scaling poor, so a 3-stage pipeline wins and the DP gives the heavy
    # layer 4 devices and the light ones 2 each (Alpa's WResNet result had this shape: 4/4/8)
    def loss_fn(p, b):
        x = jnp.tanh(jnp.tanh(b["x"] @ p["a"]) @ p["b"])
        x = autopar.stage_boundary(x)
        x = autopar.stage_boundary(jnp.tanh(x @ p["c"]))
        return jnp.mean((jnp.tanh(x @ p["d"]) - b["y"]) ** 2)
    rng = np.random.default_rng(0)
    h = 1024
    params = {k: jnp.asarray(rng.normal(size=(h, h)) / 32, jnp.float32) for k in "abcd"}
    batch = {"x": jnp.asarray(rng.normal(size=(256, h)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(256, h)), jnp.float32)}
    opt = optax.sgd(0.1)
    kw = dict(optimizer=opt, cluster=make_cluster(8, intra_bw=1e9, inter_bw=1e9, alpha_s=1e-4, flops=1e11),
              num_microbatches=16)
    tplan = plan_training(loss_fn, params, batch, **kw)
    assert [s.layers for s in tplan.stages] == [[0, 1], [1, 2], [2, 3]]
    assert [s.submesh for s in tplan.stages] == [[1, 4], [1, 2], [1, 2]]
    # predicted faster than every equal split: one stage on 8 devices, two stages on 4 + 4
    for n in (1, 2):
        equal = plan_training(loss_fn, params, batch, num_stages=n, **kw)
        assert len({tuple(s.submesh) for s in equal.stages}) == 1
        assert tplan.predicted.dp_objective_s < equal.predicted.dp_objective_s
    run_and_compare(loss_fn, params, batch, opt, tplan)


def test_bfloat16_model_plans_from_shapes(devices8):
    params, batch = gpt.params_and_batch(layers=2, hidden=32, seq=16, vocab=64, batch=8, abstract=True,
                                         dtype=jnp.bfloat16)
    tplan = plan_training(gpt.loss_fn, params, batch, optimizer=optax.sgd(0.1), cluster=make_cluster(4),
                          num_microbatches=2, stages=[(0, 1, (1, 2)), (1, 2, (1, 2))])
    assert tplan.num_stages == 2 and set(tplan.param_dtypes) == {"bfloat16"}



def _inputs(**kw):
    """TrainingInputs for the search steps alone (no traced program): 1 node × 4 devices."""
    from autopar.cost import load_cluster
    from autopar.pipeline.inputs import TrainingInputs
    spec = load_cluster("cpu-8").model_copy(update={"devices_per_node": 4})
    base = dict(loss_fn=None, optimizer=None, name="loss_fn", spec=spec, nodes=1, num_microbatches=4,
                schedule="1f1b", budget=10.0, p_leaves=(), p_tree=None, b_leaves=(), b_tree=None, microbatch_size=1,
                program=None, opt_ratio=1.0, shapes=((1, 1), (1, 2), (1, 4)))
    return TrainingInputs(**{**base, **kw})


class _FakeCoster:
    """Single-layer costs without the ILP: planned with the whole budget a layer replicates its
    parameters (persist 3.0 per device: param + accumulator + momentum) and scales perfectly;
    planned within a share of the budget (share > 1) it shards them (3.0 / n) and is 20 % slower."""

    def __init__(self, lean_latency=1.2):
        self.lean_calls, self.min_need, self.lean_latency = [], float("inf"), lean_latency

    def cost(self, i, j, sub, mesh=None, share=1.0, remat="none", zero=False):
        from autopar.pipeline.costs import StageCost
        n = sub[0] * sub[1]
        plan = types.SimpleNamespace(mesh_shape=mesh or (n,))
        if share > 1:
            self.lean_calls.append((i, tuple(sub), mesh))
            return StageCost(plan=plan, latency=self.lean_latency / n, static=3.0 / n, persist=3.0 / n, act=0.1)
        return StageCost(plan=plan, latency=1.0 / n, static=3.0, persist=3.0, act=0.1)

    def stage(self, i, j):
        return types.SimpleNamespace(params=[i]), f"layer{i}"


def test_additive_costing_plans_layers_leaner_when_a_long_stage_needs_it():
    # 4 layers, 1 node × 4 devices, budget 6.5. Whole-budget layer plans: one stage on 4 devices
    # holds 4 × 3.0 > 6.5, so the best such plan is 2 stages × 2 layers on 2 devices each
    # (2·1.0 + 3·1.0 = 5.0 s). Lean layer plans on (1, 4): 4 × 0.75 + 0.4 fits, 4 × 1.2 / 4 = 1.2 s
    # per micro-batch, objective 4 × 1.2 = 4.8 s — better, and only (1, 4) is planned lean.
    from autopar.pipeline.search import additive_search
    from autopar.progress import Progress
    inputs = _inputs(budget=6.5, p_leaves=(jax.ShapeDtypeStruct((1,), jnp.int8),) * 4)  # 1 byte per layer
    coster = _FakeCoster()
    _, sol = additive_search(coster, inputs, 4, Progress())
    assert [(a, b, sub) for a, b, _, sub, _ in sol.stages] == [(0, 4, (1, 4))]
    assert sol.variants == (1,) and sol.objective_s == pytest.approx(4.8)
    assert set(coster.lean_calls) == {(i, (1, 4), (4,)) for i in range(4)}  # on the mesh variant 0 chose
    # with lean plans no better than the whole-budget ones, the 2 × 2 pipeline stays
    _, sol = additive_search(_FakeCoster(lean_latency=2.0), inputs, 4, Progress())
    assert [(a, b, sub) for a, b, _, sub, _ in sol.stages] == [(0, 2, (1, 2)), (2, 4, (1, 2))]


def test_a_placeholder_used_resolves_every_variant_of_its_sub_mesh():
    """``AdditiveCosts.resolve``: a split relying on one variant's placeholder (here whole-budget
    dots remat on (1, 4)) gets every variant of that sub-mesh planned — the other remat and
    ZeRO-1 options, whole budget and lean — in one round (their placeholders are as optimistic,
    the DP would rely on each next); the other sub-meshes keep their placeholders."""
    from autopar.pipeline.additive import AdditiveCosts
    from autopar.pipeline.costs import StageOption

    class Coster(_FakeCoster):
        def __init__(self):
            super().__init__()
            self.planned = []

        def cost(self, i, j, sub, mesh=None, share=1.0, remat="none", zero=False):
            self.planned.append((tuple(sub), remat, zero, share > 1))
            return super().cost(i, j, sub, mesh, share, remat, zero)

        def activation(self, i, j, remat="none"):
            return 0.1

        def input_bytes(self, i):
            return 0.0
    options = tuple(StageOption(r, z) for z in (False, True) for r in ("none", "dots"))
    coster = Coster()
    costs = AdditiveCosts(coster, 4, [(1, 1), (1, 2), (1, 4)], 4, [1.0] * 4, options)
    assert {p[1:] for p in coster.planned} == {("none", False, False)}  # (the first option only, up front)
    coster.planned.clear()
    s, v = 2, costs.variants.index(("full", StageOption("dots")))
    costs.resolve({(v, s)})
    planned = {p[1:] for p in coster.planned}
    assert {p[0] for p in coster.planned} == {(1, 4)}
    assert planned == {(r, z, lean) for r in ("none", "dots") for z in (False, True) for lean in (False, True)} - {
        ("none", False, False)}
    assert all(costs.layers[u][s] is not None for u in range(len(costs.variants)))
    assert all(costs.layers[u][t] is None for u in range(1, len(costs.variants)) for t in (0, 1))


class _Replans:
    """``plan_stage``'s coster: the whole-budget plan for one micro-batch holds 5 + 1 per
    micro-batch; ``again(calls)`` is the plan for more in flight (each request's (in flight,
    budget) is recorded in ``calls``)."""

    def __init__(self, again):
        self.again, self.calls = again, []

    def cost(self, a, b, sub, mesh=None, remat="none", zero=False, budget=None, inflight=1):
        from autopar.pipeline.costs import StageCost
        if budget is None and inflight == 1:
            return StageCost(plan="fast", static=5.0, act=1.0)
        self.calls.append((inflight, budget))
        return self.again(self.calls)


def test_a_chosen_stage_is_replanned_for_its_in_flight_micro_batches():
    # the whole-budget stage plan holds 5 + 1 (one micro-batch); as the first of 4 stages under
    # 1F1B it keeps 4 micro-batches: 5 + 4·1 > 8, so it is planned again with their residuals held
    from autopar.pipeline.costs import StageCost
    from autopar.pipeline.search import plan_stage
    inputs = _inputs(budget=8.0, num_microbatches=8)
    coster = _Replans(lambda calls: StageCost(plan="lean", static=3.5, act=0.5, held=1.5))
    assert plan_stage(coster, inputs, 0, 2, (1, 4), None, remaining=4).plan == "lean" and coster.calls == [(4, None)]
    assert plan_stage(coster, inputs, 0, 2, (1, 4), None, remaining=2).plan == "fast"   # 5 + 2 ≤ 8
    gpipe = _inputs(budget=8.0, num_microbatches=8, schedule="gpipe")  # all 8 in flight, even in the last stage
    assert plan_stage(coster, gpipe, 0, 2, (1, 4), None, remaining=1).plan == "lean" and coster.calls[-1] == (8, None)


def test_a_stage_planned_in_flight_that_still_overflows_is_planned_within_less():
    # the plan for 4 in flight keeps its residuals in other layouts than the ILP held (3 + 4·1.5
    # = 9 > 8): again within 8 − 1 = 7, which fits
    from autopar.pipeline.costs import StageCost
    from autopar.pipeline.search import plan_stage
    inputs = _inputs(budget=8.0, num_microbatches=8)
    coster = _Replans(lambda calls: StageCost(plan="wide", static=3.0, act=1.5) if len(calls) == 1 else
                      StageCost(plan="lean", static=2.0, act=1.25))
    assert plan_stage(coster, inputs, 0, 2, (1, 4), None, remaining=4).plan == "lean"
    assert coster.calls == [(4, None), (4, 7.0)]
    # when no replan fits, the one needing the least memory with its 4 in flight is returned
    tight = _Replans(lambda calls: StageCost(plan=f"p{len(calls)}", static=4.0, act=1.0 + len(calls)))
    assert plan_stage(tight, inputs, 0, 2, (1, 4), None, remaining=4).plan == "fast"  # 5 + 4·1 < 4 + 4·2 < 4 + 4·3
    assert tight.calls == [(4, None), (4, 4.0)]  # 8 − (12 − 8) = 4, then 4 − (16 − 8) < 0: stop


def test_with_a_worker_pool_each_stage_program_is_one_task_planned_and_replanned_in_one_worker(monkeypatch):
    # three stages, 1F1B: the first two run one stage program (P), the third another (Q). P's
    # whole-budget plan holds 5 + 3·2 > 8 in the first stage, 5 + 2·2 > 8 in the second: planned
    # again for 3 and 2 in flight. With workers, P's stages are one task (``pool.run_tasks``) —
    # planned whole, then again, in stage order, in one worker, without waiting for Q's plan —;
    # Q, planned already and fitting, is no task at all
    from autopar.pipeline import search
    from autopar.pipeline.costs import StageCost
    inputs = _inputs(budget=8.0, num_microbatches=8)
    tasks = []

    def run_tasks(coster, fn, todo, size=len):  # (in order, in this process: what the workers would do)
        tasks.extend(todo)
        for t in todo:
            fn(coster, t)
    monkeypatch.setattr(search, "run_tasks", run_tasks)

    class Coster:
        workers = 2

        def __init__(self):
            self.cache, self.calls = {}, []
            self.cost(4, 6, (1, 2))

        def plan_key(self, a, b, sub, mesh=None, remat="none", zero=False, budget=None, inflight=1):
            return "Q" if a == 4 else "P", tuple(sub), mesh, budget, zero, inflight

        def is_cached(self, *args, **kw):
            return self.plan_key(*args, **kw) in self.cache

        def served(self, i, j, key):
            return None

        def cost(self, a, b, sub, mesh=None, remat="none", zero=False, budget=None, inflight=1):
            key = self.plan_key(a, b, sub, mesh, remat, zero, budget, inflight)
            if key not in self.cache:
                self.calls.append(key[:1] + key[5:])
                self.cache[key] = StageCost(plan=f"{key[0]}{inflight}", static=5.0 if inflight == 1 else 2.0,
                                            act=2.0 if key[0] == "P" else 1.0)
            return self.cache[key]
    coster = Coster()
    stages = [(0, 2, (1, 2)), (2, 4, (1, 2)), (4, 6, (1, 2))]
    chosen = search.plan_stages(coster, inputs, stages, lambda a, b, sub: None)
    assert [[it[:2] + (it[4],) for it in t] for t in tasks] == [[(0, 2, 3), (2, 4, 2)]]
    assert coster.calls == [("Q", 1), ("P", 1), ("P", 3), ("P", 2)]
    assert [c.cost.plan for c in chosen] == ["P3", "P2", "Q1"]  # 2 + 3·2 ≤ 8; 2 + 2·2 ≤ 8; 5 + 1 ≤ 8
    Coster.workers = 1  # one process: plan_stage asks for them itself, in the same order
    tasks.clear()
    one = Coster()
    assert [c.cost.plan for c in search.plan_stages(one, inputs, stages, lambda a, b, sub: None)] == ["P3", "P2", "Q1"]
    assert tasks == [] and one.calls == coster.calls



def test_a_second_split_joins_the_pool_round_only_with_stage_programs_the_first_lacks(monkeypatch):
    # ``search.prefetch_stages(asks, extra)`` (the refinement's next equal split beside the stage
    # DP's): the extra split's stages of a program the first split has (P) are left out — in a
    # task of P they would change its order —, those of a new program (R) are a task of their own
    from autopar.pipeline import search
    from autopar.pipeline.costs import StageOption
    inputs = _inputs(budget=8.0, num_microbatches=8)
    tasks = []

    def run_tasks(coster, fn, todo, size=len):
        tasks.extend(todo)
    monkeypatch.setattr(search, "run_tasks", run_tasks)

    class Coster:
        workers, cache = 2, {}

        def plan_key(self, a, b, sub, mesh=None, remat="none", zero=False, budget=None, inflight=1):
            return {0: "R"}.get(a, "P"), tuple(sub), mesh, budget, zero, inflight

        def served(self, i, j, key):
            return None

        def is_cached(self, *args, **kw):
            return False
    none = StageOption()
    first = [(1, 2, (1, 2), None, none), (2, 4, (1, 2), None, none)]
    extra = [(0, 2, (1, 2), None, none), (2, 4, (1, 2), None, none)]
    search.prefetch_stages(Coster(), inputs, first, extra)
    assert [[it[:2] + (it[4],) for it in t] for t in tasks] == [[(1, 2, 2), (2, 4, 1)], [(0, 2, 2)]]
    tasks.clear()
    search.prefetch_stages(Coster(), inputs, first)
    assert [[it[:2] for it in t] for t in tasks] == [[(1, 2), (2, 4)]]


def test_additive_refinement_plans_equal_splits_exactly_and_keeps_the_fastest_that_fits():
    # the stage DP's split (one stage on 4 devices) is estimated best, but planned exactly it is
    # 0.9 s per micro-batch on the (2, 2) mesh that layers 2-3 chose (1.0 s on layers 0-1's (4,)):
    # 3.6 s for 4; two equal stages on 2 devices each are 0.6 s (≈ 3.0 s); four single-layer
    # stages are estimated at 7 s, above the best exact step: not planned
    import dataclasses
    from autopar.pipeline.additive import AdditiveCosts
    from autopar.pipeline.costs import INFEASIBLE, StageCost
    from autopar.pipeline.refine import refine
    from autopar.progress import Progress
    inputs = _inputs()
    exact = {(0, 4, (4,)): (1.0, 2.0), (0, 4, (2, 2)): (0.9, 2.0), (0, 2, (2,)): (0.6, 2.0), (2, 4, (2,)): (0.6, 2.0),
             # on every logical mesh of the sub-mesh (a stage far above its estimate is tried there too)
             (0, 4, None): (0.95, 2.0), (0, 2, None): (0.6, 2.0), (2, 4, None): (0.6, 2.0)}
    planned = []

    def layer(mesh, t, near=()):  # near: (mesh, objective) of the other logical meshes tried
        cands = [types.SimpleNamespace(mesh_shape=list(m), objective_s=o) for m, o in [(mesh, t), *near]]
        return StageCost(plan=types.SimpleNamespace(mesh_shape=mesh, mesh_candidates=cands), latency=t)
    # single layers: 1.0 s on 1 device, 0.25 on 2, on 4 0.15 (layers 0-1, mesh (4,)) or 0.1 (2-3, (2, 2))
    full = [[layer((1,), 1.0), layer((2,), 0.25), layer((4,) if i < 2 else (2, 2), 0.15 if i < 2 else 0.1)]
            for i in range(4)]

    class Coster:
        progress = Progress()
        min_need = math.inf
        mesh_search = "auto"

        def cost(self, a, b, sub, mesh=None, share=1.0, remat="none", zero=False, budget=None, inflight=1):
            if budget is not None or inflight > 1:  # no leaner plan
                return INFEASIBLE
            if b == a + 1 and mesh is None:
                return full[a][inputs.shapes.index(tuple(sub))]
            planned.append((a, b, tuple(sub), mesh))
            t, static = exact[(a, b, mesh)]
            return StageCost(plan=types.SimpleNamespace(mesh_shape=mesh or (2, 2)), latency=t, static=static, act=0.5)
    costs = AdditiveCosts(Coster(), 4, inputs.shapes, 4, [0.0] * 4)
    sol = types.SimpleNamespace(stages=[(0, 4, 2, (1, 4), 0.5)], objective_s=2.0, variants=(0,))
    chosen, refined = refine(Coster(), inputs, 4, costs, sol, Progress())
    assert [r.source for r in refined] == ["stage DP", "equal stages ×2", "equal stages ×4"]
    assert [(c.start, c.end, c.submesh) for c in chosen] == [(0, 2, (1, 2)), (2, 4, (1, 2))]
    assert [r.chosen for r in refined] == [False, True, False] and refined[2].skipped
    assert refined[1].estimate_s == pytest.approx(2.5) and refined[2].estimate_s == pytest.approx(7.0)
    assert refined[0].step_s == pytest.approx(3.6) and refined[1].step_s < 3.5
    # each stage on the meshes its layers chose (the most expensive layer's first); a stage that
    # fits is not planned again up to ``GROSS_MISS`` × its estimate (0.9 vs 0.5; 0.6 vs 0.5)
    assert planned == [(0, 4, (1, 4), (4,)), (0, 4, (1, 4), (2, 2)), (0, 2, (1, 2), (2,)), (2, 4, (1, 2), (2,))]
    # when the equal split does not fit the budget (static 2 + 2 in flight × 0.5 > 2.6), the DP's split stays
    exact[(0, 4, (4,))], exact[(0, 4, (2, 2))] = (1.0, 0.5), (0.9, 0.5)
    chosen, refined = refine(Coster(), dataclasses.replace(inputs, budget=2.6), 4, costs, sol, Progress())
    assert [(c.start, c.end, c.submesh) for c in chosen] == [(0, 4, (1, 4))] and chosen[0].cost.latency == 0.9
    assert [r.fits for r in refined[:2]] == [True, False] and refined[0].chosen

    def tight():  # the layers' costs as they are now, planned within 2.6
        planned.clear()
        return refine(Coster(), dataclasses.replace(inputs, budget=2.6), 4,
                      AdditiveCosts(Coster(), 4, inputs.shapes, 4, [0.0] * 4), sol, Progress())
    # a stage that does not fit on its layers' meshes is planned on the sub-mesh's other meshes
    # (only those: the (4,) no layer chose) and kept when it fits there (4 × 1.0 s)
    for i in range(4):
        full[i][2] = layer((2, 2), 0.1)
    exact[(0, 4, (2, 2))], exact[(0, 4, (4,))] = (0.9, 5.0), (1.0, 0.5)
    chosen, refined = tight()
    assert planned[:2] == [(0, 4, (1, 4), (2, 2)), (0, 4, (1, 4), (4,))]
    assert chosen[0].cost.latency == 1.0 and refined[0].step_s == pytest.approx(4.0) and refined[0].chosen
    # one that fits but comes out above ``GROSS_MISS`` × its estimate (1.2 vs 0.5) is tried there too
    exact[(0, 4, (2, 2))], exact[(0, 4, (4,))] = (1.2, 0.5), (0.7, 0.5)
    chosen, refined = tight()
    assert planned[:2] == [(0, 4, (1, 4), (2, 2)), (0, 4, (1, 4), (4,))]
    assert chosen[0].cost.latency == 0.7 and refined[0].step_s == pytest.approx(2.8) and refined[0].chosen
    exact[(0, 4, (2, 2))] = (0.99, 0.5)  # 1.98 × 0.5: kept without a try on (4,)
    chosen, refined = tight()
    assert planned[:1] == [(0, 4, (1, 4), (2, 2))] and (0, 4, (1, 4), (4,)) not in planned
    assert chosen[0].cost.latency == 0.99
    # a mesh on which a layer came within ``MESH_TIE`` of its choice is planned for the stage too
    # (0.1005 vs 0.1 on (4,); (2, 2) and (4,) tie alone, the stage is faster on (4,)), one 2 % off is not
    full[3][2] = layer((2, 2), 0.1, near=[((4,), 0.1005)])
    exact[(0, 4, (4,))] = (0.8, 0.5)
    chosen, refined = tight()
    assert planned[:2] == [(0, 4, (1, 4), (2, 2)), (0, 4, (1, 4), (4,))] and chosen[0].cost.latency == 0.8
    full[3][2] = layer((2, 2), 0.1, near=[((4,), 0.102)])
    chosen, refined = tight()
    assert (0, 4, (1, 4), (4,)) not in planned and chosen[0].cost.latency == 0.99
    # a lean variant's layers are planned on one mesh each: the ties come from the whole-budget plans
    full[3][2] = layer((2, 2), 0.1, near=[((4,), 0.1005)])
    costs = AdditiveCosts(Coster(), 4, inputs.shapes, 4, [0.0] * 4)
    costs.layers[1][inputs.shapes.index((1, 4))] = [layer((2, 2), 0.2) for _ in range(4)]
    assert costs.variants[1][0] == "lean" and costs.layer_meshes(1, 0, 4, (1, 4)) == [(2, 2), (4,)]


def test_single_layers_and_lean_shares_get_their_own_time_limits():
    """``StageCoster.cost``: one layer's ILP stops after ``LAYER_TIME_LIMIT_S`` (within a share
    of the budget: ``LEAN_TIME_LIMIT_S``), a longer range's after the coster's limit; a smaller
    limit given to ``plan_training`` wins."""
    from autopar.pipeline import stage_cost
    from autopar.pipeline.costs import INFEASIBLE
    coster = stage_cost.StageCoster.__new__(stage_cost.StageCoster)
    calls = []

    def cost_within(i, j, sub, mesh, budget, time_limit_s=None, remat="none", zero=False, inflight=1):
        calls.append((j - i, budget, time_limit_s))
        return INFEASIBLE if budget < 100 else types.SimpleNamespace(fits=True)
    coster.cost_within, coster.budget = cost_within, 100.0
    for user, layer, lean in ((None, stage_cost.LAYER_TIME_LIMIT_S, stage_cost.LEAN_TIME_LIMIT_S), (0.25, 0.25, 0.25)):
        coster.time_limit_s, calls[:] = user, []
        coster.cost(0, 1, (1, 8))
        coster.cost(0, 3, (1, 8))
        coster.cost(0, 1, (1, 8), share=4.0)  # does not fit its share: the whole budget, as one layer
        coster.cost(0, 3, (1, 8), budget=150.0)  # within a given budget (``search.plan_stage``)
        coster.cost(0, 1, (1, 8), budget=150.0)
        assert calls == [(1, 100.0, layer), (3, 100.0, None), (1, 25.0, lean), (1, 100.0, layer), (3, 150.0, None),
                         (1, 150.0, layer)]


def test_zero1_and_plain_stages_of_one_program_are_separate_tasks_only_when_zero1_comes_first():
    # a plain plan may serve a later ZeRO-1 request of the same program (``reuse.zero_of``), a
    # ZeRO-1 plan never serves a plain one: apart only when no plain stage precedes a ZeRO-1 one
    from autopar.pipeline.costs import StageOption
    from autopar.pipeline.search import _independent
    z, p = StageOption(zero=True), StageOption()
    first = [(0, 3, (4, 8), None, 9, z), (3, 6, (4, 8), None, 8, z), (6, 9, (4, 8), None, 7, p)]
    assert _independent(first) == [first[:2], first[2:]]
    mixed = [first[2], first[0]]
    assert _independent(mixed) == [mixed] and _independent(first[:2]) == [first[:2]]


def test_range_sums_equal_adding_layers_one_by_one():
    """``costs.range_sums`` (every range at once, as additive costing fills its arrays) gives
    bit for bit what ``Sums`` gives adding a range's layers one by one: sends between layers
    dropped, parameters summed, the largest temporary part, activations summed; a layer that
    does not fit makes every range over it ∞."""
    from autopar.pipeline.costs import INFEASIBLE, StageCost, Sums, cumulative, range_sums
    rng = np.random.default_rng(3)
    for L in (1, 2, 7):
        layers = []
        for _ in range(L):
            static = float(rng.uniform(1, 9))
            layers.append(StageCost(plan=object(), latency=float(rng.uniform(0.1, 1)), send=float(rng.uniform(0, .05)),
                                    static=static, persist=static * float(rng.uniform(0, 1)),
                                    act=float(rng.uniform(0, 3)), gather_s=float(rng.uniform(0, .2)),
                                    num_microbatches=3))
        if L > 2:
            layers[1] = INFEASIBLE
        t, m, a = range_sums(layers)
        x = rng.uniform(0, 1, size=L)
        c = cumulative(x, skip=1)
        for i in range(L):
            run = Sums()
            for j in range(i + 1, L + 1):
                assert (t[i, j - 1], m[i, j - 1], a[i, j - 1]) == run.add(layers[j - 1])
                total = 0.0  # (left to right: Python ≥ 3.12's ``sum`` of floats compensates)
                for y in x[i + 1:j].tolist():
                    total += y
                assert c[i, j - 1] == total
        assert (L <= 2) or (np.isinf(t[0, 1:]).all() and np.isfinite(t[2:, 2:][np.triu_indices(L - 2)]).all())
