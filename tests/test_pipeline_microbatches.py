"""plan_training / dp_tp_pp with several micro-batch counts: each planned, the fastest kept."""
import optax
import pytest
from conftest import assert_step_equals_single_device, make_cluster

import autopar
from autopar import PlanError, TrainingPlan
from autopar.baselines import dp_tp_pp
from examples import gpt

COUNTS = (1, 2, 4)


@pytest.fixture(scope="module")
def case(devices8):
    params, batch = gpt.params_and_batch(layers=4, hidden=32, seq=16, vocab=64, batch=16)
    opt = optax.sgd(0.1, momentum=0.9)
    kw = dict(optimizer=opt, cluster=make_cluster(4), nodes=1)
    many = autopar.plan_training(gpt.loss_fn, params, batch, num_microbatches=list(COUNTS), **kw)
    single = {B: autopar.plan_training(gpt.loss_fn, params, batch, num_microbatches=B, **kw) for B in COUNTS}
    return params, batch, opt, kw, many, single


def test_the_fastest_count_is_the_plan_and_every_count_is_listed(case):
    *_, many, single = case
    steps = {B: tp.predicted.step_time_s for B, tp in single.items()}
    assert [m.num_microbatches for m in many.microbatch_search] == list(COUNTS)
    for m in many.microbatch_search:
        assert m.step_s == pytest.approx(steps[m.num_microbatches], rel=1e-9) and m.error is None
    best = min(COUNTS, key=lambda B: (steps[B], B))
    assert [m.num_microbatches for m in many.microbatch_search if m.chosen] == [best]
    assert many.num_microbatches == best
    assert many.predicted.step_time_s == pytest.approx(steps[best], rel=1e-9)
    assert len(set(round(s, 12) for s in steps.values())) > 1   # the count matters on this case
    report = many.report()
    assert "micro-batch counts tried" in report and f"→ {best:>5} micro-batches" in report


def test_the_chosen_count_runs_equal_to_the_single_device_step(case):
    params, batch, opt, _, many, _ = case
    assert_step_equals_single_device(gpt.loss_fn, params, batch, opt, many)


def test_json_round_trip_keeps_the_counts(case):
    *_, many, _ = case
    back = TrainingPlan.model_validate_json(many.model_dump_json())
    assert back.microbatch_search == many.microbatch_search
    assert "microbatch_search" not in case[5][1].model_dump_json()   # absent for a single count


def test_baseline_takes_the_same_counts(case):
    params, batch, _, kw, _, _ = case
    base = dp_tp_pp(gpt.loss_fn, params, batch, num_microbatches=(2, 4), **kw)
    tried = {g.num_microbatches for g in base.baseline_grid}
    assert tried == {2, 4} and base.num_microbatches in tried


def test_bad_counts_are_rejected_with_a_clear_error(case):
    params, batch, _, kw, _, _ = case
    for bad in ([], [0], [2, -1], "4", [2.5], True):
        with pytest.raises(ValueError, match="num_microbatches must be a positive int"):
            autopar.plan_training(gpt.loss_fn, params, batch, num_microbatches=bad, **kw)
    traced = []

    def loss_fn(p, b):
        traced.append(1)
        return gpt.loss_fn(p, b)
    with pytest.raises(ValueError, match="divisible by num_microbatches=3"):
        autopar.plan_training(loss_fn, params, batch, num_microbatches=[2, 3], **kw)
    assert not traced  # refused before count 2 was planned


def test_no_count_fits_raises_plan_error_naming_the_counts(case):
    params, batch, _, kw, _, _ = case
    with pytest.raises(PlanError, match=r"no micro-batch count of \[1, 2\] has a plan that fits") as err:
        autopar.plan_training(gpt.loss_fn, params, batch, num_microbatches=(1, 2), memory_budget_bytes=1e3, **kw)
    assert err.value.min_bytes_per_device is not None and err.value.min_bytes_per_device > 1e3


def test_batch_leaves_must_share_the_batch_axis_and_the_loss_its_signature():
    """A leaf whose axis 0 is not the examples' (positions (T,) beside tokens (B, T)) would be
    cut into micro-batches as if it were: refused; so is a train step given as the loss."""
    import jax.numpy as jnp
    params, batch = gpt.params_and_batch(layers=2, hidden=32, seq=16, vocab=64, batch=16)
    opt = optax.sgd(0.1)
    with pytest.raises(ValueError, match=r"batch leaf \['pos'\] has 8 along axis 0 where \['labels'\] has 16.*"
                                         r"close over values every example shares"):
        autopar.plan_training(gpt.loss_fn, params, {**batch, "pos": jnp.arange(8)}, optimizer=opt, num_microbatches=2)

    def train_step(params, opt_state, batch):
        return params, opt_state, gpt.loss_fn(params, batch)
    with pytest.raises(ValueError, match=r"train_step\(params, opt_state, batch\) cannot be called as "
                                         r"train_step\(params, batch\): plan_training takes the loss"):
        autopar.plan_training(train_step, params, batch, optimizer=opt)
    # a batch of Python lists, a loss failing under tracing: named, not a traceback from inside
    with pytest.raises(TypeError, match=r"batch leaf \['labels'\]\[0\]\[0\] is not an array \(int\)"):
        autopar.plan_training(gpt.loss_fn, params, {**batch, "labels": [[0] * 16] * 16}, optimizer=opt)
    from autopar.trace import TraceError
    with pytest.raises(TraceError, match=r"could not trace '<lambda>' with jax.make_jaxpr: KeyError: 'nope'"):
        autopar.plan_training(lambda p, b: p["nope"], params, batch, optimizer=opt, num_microbatches=2)
