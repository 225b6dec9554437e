"""Losses normalised by the batch (``autopar.pipeline.loss_form``): a scalar loss divided by a
count computed from the batch (MaxText's and Levanter's masked means) is refused with more
than one micro-batch — averaged over micro-batches it is not the full batch's loss — and the
``WeightedLoss(total, weight)`` it should return instead runs exactly: totals and weights
summed over the micro-batches, gradients divided once, equal to the single-device step of
total / weight; a bare pair (has_aux style) is refused, not read as a weight."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from autopar import WeightedLoss, plan_training, stage_boundary
from autopar.trace import TraceError
from conftest import make_cluster
from test_pipeline import assert_tree_close, reference_step
from test_pipeline_remat import block, params_and_batch

STAGES = [(0, 1, (1, 4), (4,)), (1, 2, (1, 4), (4,))]
KW = dict(cluster=make_cluster(4), nodes=2, remat="none", zero="none", stages=STAGES)
B = 4


def _per_token(params, batch):
    x = batch["x"]
    for i, p in enumerate(params):
        x = block(p, stage_boundary(x) if i else x)
    return jnp.mean(jnp.square(x - batch["y"]), axis=-1)      # (batch, seq)


def masked_mean(params, batch):
    """MaxText's form: the sum over unmasked tokens over their count."""
    mask = batch["mask"].astype(jnp.float32)
    return jnp.sum(_per_token(params, batch) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def total_and_weight(params, batch):
    return WeightedLoss(jnp.sum(_per_token(params, batch) * batch["mask"]), jnp.sum(batch["mask"]))


@pytest.fixture(scope="module")
def model():
    params, batch = params_and_batch(layers=2, d=64, seq=8, batch=16)
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 9, size=16)   # tokens per sequence: each micro-batch its own count
    batch["mask"] = np.arange(8)[None, :] < lengths[:, None]
    return params, batch


def _reference(opt):
    def step(p, o, b):
        loss, g = jax.value_and_grad(lambda p_: masked_mean(p_, b))(p)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o, loss
    return jax.jit(step)


def test_a_loss_divided_by_a_batch_count_is_refused_with_micro_batches(devices8, model):
    params, batch = model
    with pytest.raises(ValueError, match=r"masked_mean divides its loss by a value computed from the batch "
                                         r"\(.*test_pipeline_loss.py.*averaged over 4 micro-batches.*"
                                         r"WeightedLoss\(total, weight\)"):
        plan_training(masked_mean, params, batch, optimizer=optax.sgd(0.1), num_microbatches=B, **KW)
    # with one micro-batch it is the full batch's loss: planned
    plan_training(masked_mean, params, batch, optimizer=optax.sgd(0.1), num_microbatches=1, **KW)


@pytest.mark.parametrize("schedule,mask_dtype", [("gpipe", np.float32), ("1f1b", np.bool_)])
def test_total_and_weight_equal_the_full_batch_masked_mean(devices8, model, schedule, mask_dtype):
    params, batch = model
    batch = dict(batch, mask=batch["mask"].astype(mask_dtype))  # bool: an int32 weight
    opt = optax.chain(optax.clip_by_global_norm(0.05), optax.sgd(0.5))
    tplan = plan_training(total_and_weight, params, batch, optimizer=opt, num_microbatches=B, schedule=schedule, **KW)
    step, ref = tplan.apply(total_and_weight, opt, donate=False), _reference(opt)
    got = want = (params, opt.init(params))
    for _ in range(2):
        got, want = step(*got[:2], batch), ref(*want[:2], batch)
        assert_tree_close(got, want)
    # forward only: the loss of the new parameters, nothing updated
    before = [np.asarray(x).copy() for x in jax.tree_util.tree_leaves(got[0])]
    np.testing.assert_allclose(np.asarray(step.evaluate(got[0], batch)), masked_mean(want[0], batch), rtol=1e-5)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree_util.tree_leaves(got[0])))
    # the average of the micro-batches' masked means is another number: the test can tell
    mbs = [jax.tree_util.tree_map(lambda x: x[m * 4:(m + 1) * 4], batch) for m in range(B)]
    averaged = np.mean([masked_mean(want[0], mb) for mb in mbs])
    full = masked_mean(want[0], batch)
    assert abs(averaged - full) > 1e-3 * abs(full)


def test_a_weight_depending_on_the_parameters_is_refused(devices8, model):
    params, batch = model

    def bad(params, batch):
        return WeightedLoss(jnp.sum(_per_token(params, batch)), jnp.sum(params[0]["scale"]))

    def constant(params, batch):
        return WeightedLoss(jnp.sum(_per_token(params, batch)), 128.0)

    def with_aux(params, batch):  # has_aux style: not read as a weight
        per_token = _per_token(params, batch)
        return jnp.mean(per_token), jnp.sum(batch["mask"])
    with pytest.raises(TraceError, match="weight that depends on the parameters"):
        plan_training(bad, params, batch, optimizer=optax.sgd(0.1), num_microbatches=B, **KW)
    with pytest.raises(TraceError, match="constant weight; return the mean"):
        plan_training(constant, params, batch, optimizer=optax.sgd(0.1), num_microbatches=B, **KW)
    with pytest.raises(TraceError, match=r"or autopar.WeightedLoss\(total, weight\).*a pair \(loss, aux\) needs "
                                         r"plan_training\(..., has_aux=True\)"):
        plan_training(with_aux, params, batch, optimizer=optax.sgd(0.1), num_microbatches=B, **KW)


def test_the_bound_and_the_cli_take_total_and_weight(devices8, model, tmp_path):
    import subprocess
    import sys
    from autopar import step_lower_bound
    params, batch = model
    tplan = plan_training(total_and_weight, params, batch, optimizer=optax.sgd(0.1), num_microbatches=B, **KW)
    bound = step_lower_bound(total_and_weight, params, batch, cluster=KW["cluster"], nodes=2, num_microbatches=B)
    assert 0 < bound <= tplan.predicted.step_time_s
    # the CLI checks a (total, weight) loss against the single-device step of total / weight
    src = tmp_path / "masked.py"
    src.write_text(
        "import jax.numpy as jnp, numpy as np\nfrom autopar import WeightedLoss\n"
        "def loss_fn(w, batch):\n"
        "    err = jnp.mean(jnp.square(jnp.tanh(batch['x'] @ w) - batch['y']), axis=-1)\n"
        "    return WeightedLoss(jnp.sum(err * batch['mask']), jnp.sum(batch['mask']))\n"
        "def loss_fn_args(abstract=False):\n"
        "    r = np.random.default_rng(0)\n"
        "    return (r.standard_normal((16, 16)).astype(np.float32) * 0.3,\n"
        "            {'x': r.standard_normal((8, 4, 16)).astype(np.float32),\n"
        "             'y': r.standard_normal((8, 4, 16)).astype(np.float32),\n"
        "             'mask': (np.arange(4)[None] < r.integers(1, 5, 8)[:, None]).astype(np.float32)})\n")
    r = subprocess.run([sys.executable, "-m", "autopar", "run", f"{src}:loss_fn", "--train", "--microbatches", "4",
                        "--optimizer", "sgd:0.5", "--quiet"], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0 and "→ OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def with_metrics(params, batch):
    """A (loss, aux) loss as for jax.value_and_grad(has_aux=True): the masked mean as a
    WeightedLoss, and metrics — a float mean, an integer count, a float sum (summed over the
    micro-batches, not averaged), per-example errors."""
    per_token = _per_token(params, batch)
    loss = WeightedLoss(jnp.sum(per_token * batch["mask"]), jnp.sum(batch["mask"]))
    return loss, {"mean_error": jnp.mean(per_token), "tokens_above_1": jnp.sum(per_token > 1.0),
                  "per_example": jnp.mean(per_token, axis=-1), "tokens": jnp.sum(batch["mask"].astype(jnp.float32))}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_aux_outputs_equal_the_full_batch_aux(devices8, model, schedule):
    from autopar import TrainingPlan
    from autopar.pipeline.loss_form import full_batch_loss
    params, batch = model
    opt = optax.sgd(0.5)
    tplan = plan_training(with_metrics, params, batch, optimizer=opt, num_microbatches=B, schedule=schedule,
                          has_aux=True, **KW)
    assert tplan.has_aux and tplan.aux_grows == [False, True, False, False]   # (aux keys sorted)
    assert tplan.aux_sums == [False, False, True, False] and not tplan.aux_inexact
    assert ("aux outputs (has_aux): 4 leaves, 1 per-example (concatenated), 1 float sums over the batch (summed), "
            "112 B held over a step") in tplan.report()
    loaded = TrainingPlan.from_json(tplan.to_json())
    assert loaded.has_aux and loaded.aux_grows == tplan.aux_grows and loaded.aux_sums == tplan.aux_sums
    whole = full_batch_loss(with_metrics, has_aux=True)
    reference = reference_step(whole, opt, has_aux=True)
    for plan in (tplan, loaded):
        step = plan.apply(with_metrics, opt, donate=False)
        got = want = (params, opt.init(params))
        for _ in range(2):
            got, want = step(*got[:2], batch), reference(*want[:2], batch)
            assert_tree_close(got, want)   # the aux: averaged, summed (the counts), concatenated
            assert got[2][1]["tokens_above_1"].dtype == jnp.int32 and got[2][1]["per_example"].shape == (16,)
        assert_tree_close(step.evaluate(got[0], batch), whole(jax.tree_util.tree_map(np.asarray, got[0]), batch))


def test_aux_outputs_nonlinear_over_the_batch_are_named(devices8, model):
    """A max or a ratio of sums over the batch has no exact combination of micro-batches:
    averaged, and the plan and report name them; a per-example max is concatenated."""
    params, batch = model

    def with_max(params, batch):
        per_token = _per_token(params, batch)
        return jnp.mean(per_token), {"max_error": jnp.max(per_token), "row_max": jnp.max(per_token, axis=-1),
                                     "masked_mean": jnp.sum(per_token * batch["mask"]) / jnp.sum(batch["mask"])}
    tplan = plan_training(with_max, params, batch, optimizer=optax.sgd(0.1), num_microbatches=B, has_aux=True, **KW)
    assert tplan.aux_inexact == ["aux['masked_mean']", "aux['max_error']"] and tplan.aux_grows == [False, False, True]
    assert ("aux leaves aux['masked_mean'], aux['max_error']: nonlinear statistics over the batch (max, std, a ratio "
            "of sums), averaged over the micro-batches: not jax.jit's value") in tplan.report()


def test_aux_outputs_that_cannot_be_combined_are_refused(devices8, model):
    params, batch = model
    kw = dict(optimizer=optax.sgd(0.1), num_microbatches=B, has_aux=True, **KW)

    def any_flag(params, batch):
        return jnp.mean(_per_token(params, batch)), {"big": jnp.any(_per_token(params, batch) > 1.0)}

    def passes_input(params, batch):
        return jnp.mean(_per_token(params, batch)), {"y": batch["y"]}
    with pytest.raises(ValueError, match=r"any_flag's aux leaf \['big'\] is a bool over the batch.*jnp.sum\(flags\)"):
        plan_training(any_flag, params, batch, **kw)
    with pytest.raises(TraceError, match=r"aux leaf \['y'\] is a constant or an input passed through"):
        plan_training(passes_input, params, batch, **kw)
    with pytest.raises(ValueError, match=r"with_metrics's aux outputs are 2.8e-05 MB per micro-batch, 1.12e-07 GB held "
                                         r"over the step's 4 micro-batches, over 1% of a device's 5e-06 GB.*logits"):
        plan_training(with_metrics, params, batch, **dict(kw, memory_budget_bytes=5e3))
    with pytest.raises(TraceError, match=r"must return a pair \(loss, aux\) with has_aux=True"):
        plan_training(masked_mean, params, batch, **dict(kw, num_microbatches=1))


def test_a_loss_summed_over_the_batch_is_refused_with_micro_batches(devices8, model):
    """jnp.sum of per-example losses: averaged over micro-batches its loss and gradients would
    be 1/B of jax.jit's, silently; a mean, a mean plus a sum over the parameters (L2) and a
    sum with one micro-batch are planned."""
    params, batch = model
    kw = dict(optimizer=optax.sgd(0.1), num_microbatches=B, **KW)

    def summed(params, batch):
        return jnp.sum(_per_token(params, batch))

    def mean_plus_l2(params, batch):
        return jnp.mean(_per_token(params, batch)) + 1e-4 * sum(jnp.sum(p["fc"] ** 2) for p in params)

    def mean_plus_sum(params, batch):   # a second term summed over the batch
        return jnp.mean(_per_token(params, batch)) + 0.5 * jnp.sum(_per_token(params, batch)[:, 0])
    for fn in (summed, mean_plus_sum):
        with pytest.raises(ValueError, match=rf"{fn.__name__} returns a sum over the batch \(.*test_pipeline_loss.py.*"
                                             r"not a mean: .*1/4 of jax.jit's. Return the mean"):
            plan_training(fn, params, batch, **kw)
    plan_training(mean_plus_l2, params, batch, **kw)
    plan_training(summed, params, batch, **dict(kw, num_microbatches=1))
