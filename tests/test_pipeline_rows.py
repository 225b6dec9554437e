"""Losses whose batch rows meet (BatchNorm, load-balancing over all tokens, in-batch
negatives, capacity across the batch) are found before they run on micro-batches
(``autopar.pipeline.row_form``): refused, or run per micro-batch when asked, and checked
against JAX."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import autopar
from autopar.pipeline.inputs import microbatch_shapes
from autopar.pipeline.loss_form import per_microbatch_loss
from autopar.pipeline.row_form import check_rows


def judge(loss, params, batch, num_microbatches=2, loss_leaves=1):
    mb = microbatch_shapes(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch),
                           num_microbatches)
    closed = jax.make_jaxpr(loss)(params, mb)
    return check_rows(closed, jax.tree_util.tree_leaves(mb), len(jax.tree_util.tree_leaves(params)), loss_leaves)


W = {"w": jnp.ones((8, 8)) * 0.1, "e": jnp.ones((8, 4)) * 0.1}
X = {"x": jnp.ones((16, 6, 8))}


def _gates(p, x):
    return jax.nn.softmax(x @ p["e"], axis=-1)                       # (B, S, E)


def lb_per_sequence(p, b):
    g = _gates(p, b["x"])
    f = jnp.mean(jax.nn.one_hot(jnp.argmax(g, -1), 4), axis=1)        # (B, E): per sequence
    return jnp.mean(jnp.sum(f * jnp.mean(g, axis=1), -1)) + jnp.mean(b["x"] @ p["w"])


def lb_all_tokens(p, b):
    g = _gates(p, b["x"]).reshape(-1, 4)                              # every token of the batch
    f = jnp.mean(jax.nn.one_hot(jnp.argmax(g, -1), 4), axis=0)
    return jnp.sum(f * jnp.mean(g, axis=0)) + jnp.mean(b["x"] @ p["w"])


def batch_norm(p, b):
    h = b["x"] @ p["w"]
    h = (h - h.mean(axis=(0, 1))) * jax.lax.rsqrt(h.var(axis=(0, 1)) + 1e-5)
    return jnp.mean(h ** 2)


def in_batch_negatives(p, b):
    q = jnp.mean(b["x"] @ p["w"], axis=1)                             # (B, 8)
    logits = q @ q.T                                                   # every pair of examples
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, -1)))


def capacity_across_batch(p, b):
    g = _gates(p, b["x"]).reshape(-1, 4)
    slot = jnp.cumsum(jax.nn.one_hot(jnp.argmax(g, -1), 4), axis=0)   # slots counted over all tokens
    return jnp.mean(g * (slot < 8))


def expert_choice(p, b):
    g = _gates(p, b["x"]).reshape(-1, 4).T                            # (E, tokens of the batch)
    top, _ = jax.lax.top_k(g, 8)                                       # each expert picks its tokens
    return jnp.mean(top)


def shifted_negatives(p, b):   # each example's negative: the next example of the batch (jnp.roll)
    q = jnp.mean(b["x"] @ p["w"], axis=1)                             # (B, 8)
    neg = jnp.roll(q, 1, axis=0)
    return jnp.mean(jax.nn.softplus(-jnp.sum(q * q, -1)) + jax.nn.softplus(jnp.sum(q * neg, -1)))


def mixup(p, b):   # each example mixed with the batch's reversed order
    x = 0.7 * b["x"] + 0.3 * b["x"][::-1]
    return jnp.mean((x @ p["w"]) ** 2)


def rolled_sum(p, b):   # a sum over moved rows is the rows' sum
    h = b["x"] @ p["w"]
    return jnp.mean(jnp.roll(h, 3, axis=0) ** 2) + jnp.mean(h[::-1] * 2.0)


def squared_mean(p, b):
    return jnp.mean(b["x"] @ p["w"]) ** 2


def first_row(p, b):
    return jnp.mean(b["x"][0] @ p["w"])


def per_example_keys(p, b):   # dropout with a key per example, drawn under vmap
    keys = jax.vmap(lambda k: jax.random.split(k, 2))(b["keys"])[:, 0]
    h = b["x"] @ p["w"]
    keep = jax.vmap(lambda k: jax.random.bernoulli(k, 0.9, h.shape[1:]))(keys)
    return jnp.mean(jnp.where(keep, h / 0.9, 0.0))


def scanned(p, b):
    def body(h, w):
        return jnp.tanh(h @ w), None
    h, _ = jax.lax.scan(body, b["x"], jnp.stack([p["w"], p["w"]]))
    return jnp.mean(jax.checkpoint(lambda z: z ** 2)(h))


@pytest.mark.parametrize("loss", [lb_per_sequence, scanned, per_example_keys, rolled_sum])
def test_losses_that_keep_rows_apart_are_checked(loss):
    got = judge(loss, W, {**X, "keys": jax.random.split(jax.random.key(0), 16)})
    assert got.coupled is None and got.unjudged is None and got.line() == "kept apart (checked)"


@pytest.mark.parametrize("loss, why", [
    (batch_norm, "a statistic over the batch's rows"),
    (lb_all_tokens, "nonlinear function of sums over the batch"),
    (in_batch_negatives, "rows are multiplied with other rows"),
    (capacity_across_batch, "a cumulative sum"),
    (expert_choice, "a top-k runs along the batch's rows"),
    (squared_mean, "nonlinear function of sums over the batch"),
    (shifted_negatives, "rows are combined with rows of the batch moved along it at concatenate"),
    (mixup, "rows are combined with rows of the batch moved along it at rev"),
])
def test_losses_whose_rows_meet_are_found(loss, why):
    got = judge(loss, W, X)
    assert got.coupled is not None and why in got.coupled and "test_pipeline_rows.py" in got.coupled, got


def test_only_what_reaches_the_loss_counts():
    def loss(p, b):   # (loss, aux): the aux's batch-normalised values are not the loss's
        h = b["x"] @ p["w"]
        return jnp.mean(h ** 2), {"centred": h - h.mean(axis=0), "first": h[0]}
    got = judge(loss, W, X)
    assert got == (None, None), got


def dropless_sort(p, b):   # every token of the batch sorted by expert, then put back
    g = _gates(p, b["x"]).reshape(-1, 4)
    order = jnp.argsort(jnp.argmax(g, -1))
    y = g[order] * 2.0
    return jnp.mean(jnp.zeros_like(y).at[order].set(y))


@pytest.mark.parametrize("loss, where", [(first_row, "slice"), (dropless_sort, "sort")])
def test_an_unjudged_primitive_is_named(loss, where):
    got = judge(loss, W, X)
    assert got.coupled is None and got.unjudged.startswith(where) and "test_pipeline_rows.py" in got.unjudged, got


def test_flax_batchnorm_is_found():
    model = nn.Sequential([nn.Dense(8), nn.BatchNorm(use_running_average=False), nn.relu, nn.Dense(1)])
    variables = model.init(jax.random.key(0), jnp.ones((4, 8)))

    def loss(params, b):
        y, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, b["x"],
                           mutable=["batch_stats"])
        return jnp.mean((y - b["y"]) ** 2)
    got = judge(loss, variables["params"], {"x": jnp.ones((16, 8)), "y": jnp.ones((16, 1))})
    assert got.coupled is not None and "flax/linen/normalization.py" in got.coupled, got


def _bn_problem():
    k = jax.random.split(jax.random.key(1), 4)
    params = {"w1": jax.random.normal(k[0], (8, 16)) * 0.3, "w2": jax.random.normal(k[1], (16, 4)) * 0.3}
    batch = {"x": jax.random.normal(k[2], (16, 8)), "y": jax.random.normal(k[3], (16, 4))}

    def loss(p, b):
        h = b["x"] @ p["w1"]
        h = (h - h.mean(axis=0)) * jax.lax.rsqrt(h.var(axis=0) + 1e-5)   # BatchNorm, training mode
        h = autopar.stage_boundary(jax.nn.relu(h))
        return jnp.mean((h @ p["w2"] - b["y"]) ** 2)
    return loss, params, batch


def test_plan_refuses_rows_that_meet_and_says_where(devices8):
    loss, params, batch = _bn_problem()
    with pytest.raises(ValueError, match=r"lets the batch's rows meet: a statistic over the batch's rows .* at "
                                         r"\w+ \(.*test_pipeline_rows.py:\d+") as err:
        autopar.plan_training(loss, params, batch, optimizer=optax.sgd(0.1), num_microbatches=4, num_layers=2)
    assert "coupled_rows='per_microbatch'" in str(err.value) and "num_microbatches=1" in str(err.value)
    with pytest.raises(ValueError, match="coupled_rows must be one of"):
        autopar.plan_training(loss, params, batch, optimizer=optax.sgd(0.1), coupled_rows="ignore")


def test_rows_that_meet_run_per_microbatch_when_asked(devices8):
    """``coupled_rows="per_microbatch"``: 2 stages × 4 micro-batches, each normalised over its
    own 4 rows, equal to the single-device gradient-accumulation step; the report says so."""
    loss, params, batch = _bn_problem()
    opt = optax.sgd(0.1)
    plan = autopar.plan_training(loss, params, batch, optimizer=opt, num_microbatches=4, num_layers=2,
                                 stages=[(0, 1, (1, 4)), (1, 2, (1, 4))], coupled_rows="per_microbatch")
    assert plan.rows_meet and plan.rows_check.startswith("rows meet: a statistic")
    assert "each micro-batch computes them over its own rows" in plan.report()
    again = autopar.TrainingPlan.from_json(plan.to_json())
    assert again.rows_meet and again.rows_check == plan.rows_check
    new_p, _, got_loss = plan.apply(loss, opt)(params, opt.init(params), batch)

    ref = per_microbatch_loss(loss, 4)
    want_loss, g = jax.value_and_grad(ref)(params, batch)
    want_p = optax.apply_updates(params, opt.update(g, opt.init(params), params)[0])
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(new_p), jax.tree_util.tree_leaves(want_p)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # and it is not the whole batch's step: the statistics really are per micro-batch
    assert abs(float(jax.jit(loss)(params, batch)) - float(got_loss)) > 1e-3


def test_rows_that_meet_with_dropout_use_the_whole_batch_s_draw(devices8):
    """Rows that meet run per micro-batch with a dropout mask over the batch: each micro-batch
    draws its rows of the whole batch's mask, in the pipeline step and in the single-device
    reference (``per_microbatch_loss``) alike — equal; a reference that drew a micro-batch's
    mask afresh per micro-batch (the first 4 rows' mask, four times) is another step."""
    _, params, batch = _bn_problem()
    batch = {**batch, "key": jax.random.key(7)}

    def loss(p, b):
        h = b["x"] @ p["w1"]
        h = (h - h.mean(axis=0)) * jax.lax.rsqrt(h.var(axis=0) + 1e-5)
        h = jnp.where(jax.random.bernoulli(b["key"], 0.8, h.shape), h / 0.8, 0.0)
        return jnp.mean((autopar.stage_boundary(jax.nn.relu(h)) @ p["w2"] - b["y"]) ** 2)
    opt = optax.sgd(0.1)
    plan = autopar.plan_training(loss, params, batch, optimizer=opt, num_microbatches=4, num_layers=2,
                                 stages=[(0, 1, (1, 4)), (1, 2, (1, 4))], coupled_rows="per_microbatch")
    new_p, _, got_loss = plan.apply(loss, opt, donate=False)(params, opt.init(params), batch)
    want_loss, g = jax.value_and_grad(per_microbatch_loss(loss, 4))(params, batch)
    want_p = optax.apply_updates(params, opt.update(g, opt.init(params), params)[0])
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(new_p), jax.tree_util.tree_leaves(want_p)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    cuts = [{k: v if not v.shape else v[4 * m:4 * m + 4] for k, v in batch.items()} for m in range(4)]
    repeated = sum(float(loss(params, mb)) for mb in cuts) / 4
    assert abs(repeated - float(got_loss)) > 1e-3


def test_a_plan_of_rows_kept_apart_says_checked(devices8):
    loss, params, batch = _bn_problem()

    def layer_norm_loss(p, b):   # the same model, normalised per example: nothing to refuse
        h = b["x"] @ p["w1"]
        h = (h - h.mean(axis=-1, keepdims=True)) * jax.lax.rsqrt(h.var(axis=-1, keepdims=True) + 1e-5)
        return jnp.mean((autopar.stage_boundary(jax.nn.relu(h)) @ p["w2"] - b["y"]) ** 2)
    plan = autopar.plan_training(layer_norm_loss, params, batch, optimizer=optax.sgd(0.1), num_microbatches=4,
                                 num_layers=2, stages=[(0, 1, (1, 4)), (1, 2, (1, 4))])
    assert plan.rows_check == "kept apart (checked)" and not plan.rows_meet
    assert "batch rows across micro-batches: kept apart (checked)" in plan.report()


def _zoo(name):
    import examples.moe as moe
    import examples.wresnet as wresnet
    from examples.zoo import eqx_transformer, linen_transformer, llama, nnx_transformer, vit
    from examples.zoo import moe as zoo_moe
    import examples.llama as llama_model
    if name in ("moe", "wresnet"):
        mod = {"moe": moe, "wresnet": wresnet}[name]
        params, batch = mod.loss_fn_args(abstract=True)
        return mod.make_loss_fn(), params, batch
    if name == "llama_scan":
        params, _, batch = llama.llama_scan_step_args("tiny", abstract=True)
        return llama_model.make_loss_fn(llama._config_of(params, scan=True)), params, batch
    mod, step = {"linen_scan": (linen_transformer, "linen_scan_step"), "nnx_scan": (nnx_transformer, "nnx_scan_step"),
                 "eqx": (eqx_transformer, "eqx_step"), "zoo_moe": (zoo_moe, "moe_step"),
                 "vit": (vit, "vit_step")}[name]
    params, _, batch = getattr(mod, step + "_args")("tiny", abstract=True)
    return mod.loss_fn, params, batch


@pytest.mark.parametrize("name", ["linen_scan", "nnx_scan", "eqx", "zoo_moe", "vit", "llama_scan", "moe", "wresnet"])
def test_zoo_and_example_losses_keep_rows_apart(name):
    loss, params, batch = _zoo(name)
    got = judge(loss, params, batch)
    assert got == (None, None), got


def test_flax_batchnorm_runs_per_microbatch_with_its_running_stats(devices8):
    """A flax linen BatchNorm model returning its updated ``batch_stats`` as aux (has_aux),
    run with ``coupled_rows="per_microbatch"`` in 2 stages × 4 micro-batches: equal to the
    single-device step over the same micro-batches; the running mean (linear in the rows)
    combines exactly, the running variance is named inexact."""
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.BatchNorm(use_running_average=False)(nn.Dense(16)(x)))
            return nn.Dense(4)(autopar.stage_boundary(x))
    model = Net()
    k = jax.random.split(jax.random.key(2), 3)
    variables = model.init(k[0], jnp.ones((4, 8)))
    stats = variables["batch_stats"]
    batch = {"x": jax.random.normal(k[1], (16, 8)), "y": jax.random.normal(k[2], (16, 4))}

    def loss(params, b):
        y, new = model.apply({"params": params, "batch_stats": stats}, b["x"], mutable=["batch_stats"])
        return jnp.mean((y - b["y"]) ** 2), new["batch_stats"]
    opt = optax.sgd(0.1)   # (not Adam: the bias before BatchNorm has a zero gradient, Adam turns its noise into ±lr)
    params = variables["params"]
    plan = autopar.plan_training(loss, params, batch, optimizer=opt, num_microbatches=4, num_layers=2, has_aux=True,
                                 stages=[(0, 1, (1, 4)), (1, 2, (1, 4))], coupled_rows="per_microbatch")
    assert plan.rows_meet and "flax/linen/normalization.py" in plan.rows_check
    assert plan.aux_inexact == ["aux['BatchNorm_0']['var']"]
    (got_p, _, (got_loss, got_stats)) = plan.apply(loss, opt, donate=False)(params, opt.init(params), batch)
    ref = per_microbatch_loss(loss, 4, True, plan.aux_grows, plan.aux_sums)
    (want_loss, want_stats), g = jax.value_and_grad(ref, has_aux=True)(params, batch)
    want_p = optax.apply_updates(params, opt.update(g, opt.init(params), params)[0])
    for a, b in zip(jax.tree_util.tree_leaves((got_p, got_loss, got_stats)),
                    jax.tree_util.tree_leaves((want_p, want_loss, want_stats))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)


def test_the_grid_baseline_refuses_or_runs_rows_that_meet_alike(devices8):
    from autopar.baselines import dp_tp_pp
    loss, params, batch = _bn_problem()
    kw = dict(optimizer=optax.sgd(0.1), num_microbatches=4, num_layers=2)
    with pytest.raises(ValueError, match="lets the batch's rows meet"):
        dp_tp_pp(loss, params, batch, **kw)
    assert dp_tp_pp(loss, params, batch, coupled_rows="per_microbatch", **kw).rows_meet
