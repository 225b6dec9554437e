"""A stage planned within a smaller budget reuses an earlier plan of the same stage that fits
it (``StageCoster.served``): it costs what planning it afresh within that budget costs; a plan
that does not fit the smaller budget is planned again."""
import pytest

from autopar.pipeline.inputs import prepare_inputs
from autopar.pipeline.layers import layers_of
from autopar.pipeline.stage_cost import StageCoster, autopar_options
from conftest import make_cluster
from test_pipeline_remat import OPT, loss_fn, params_and_batch

SUB = (1, 4)


def coster():
    params, batch = params_and_batch(layers=2, d=64)
    inputs = prepare_inputs(loss_fn, params, batch, optimizer=OPT, cluster=make_cluster(4), nodes=2,
                            num_microbatches=2, schedule="gpipe", memory_budget_bytes=None)
    return StageCoster(inputs, layers_of(inputs.program).eqn_ranges(inputs.program),
                       autopar_options(inputs, "auto", None, "auto"))


@pytest.mark.parametrize("zero", [False, True], ids=["plain", "zero1"])
def test_a_smaller_budget_reuses_a_plan_that_fits_it(zero):
    c = coster()
    big = c.cost(0, 2, SUB, zero=zero)
    limit = big.plan.predicted.peak_memory_bytes
    budget = limit * 1.01 + (c.budget - c.ilp_limit(0, 2, SUB, c.budget, zero))  # the ILP's limit: 1 % above the peak
    solves = c.solves
    for mesh in (None, tuple(big.plan.mesh_shape)):  # every mesh, or the one the plan chose
        assert c.cost_within(0, 2, SUB, mesh, budget, zero=zero) is big
    assert c.solves == solves
    fresh = coster().cost_within(0, 2, SUB, None, budget, zero=zero)
    assert fresh.fits and fresh.latency == pytest.approx(big.latency, rel=1e-3)  # (the ILP's gap)
    tight = c.cost_within(0, 2, SUB, None, budget - 0.05 * limit, zero=zero)
    assert c.solves == solves + 1 and tight is not big  # planned again
    if tight.fits:
        assert tight.plan.predicted.peak_memory_bytes <= limit * 0.97


def test_zero1_from_a_memory_free_plain_plan_costs_what_its_ilp_does():
    """``reuse.zero_of``: the ZeRO-1 stage taken from the plain plan (no ILP) has the latency,
    memory and all-gather of the ZeRO-1 ILP's own plan."""
    c = coster()
    plain = c.cost(0, 2, SUB)
    assert plain.memory_free  # a small stage within a large budget: the memory rows never bind
    solves = c.solves
    derived = c.cost(0, 2, SUB, zero=True)
    assert c.solves == solves and derived.zero and derived.plan.mesh_shape == plain.plan.mesh_shape
    solved = coster().cost(0, 2, SUB, zero=True)  # a fresh coster plans it
    assert derived.latency == pytest.approx(solved.latency, rel=1e-3)
    for field in ("static", "act", "persist", "optimizer", "param_dev", "gather_s"):
        assert getattr(derived, field) == pytest.approx(getattr(solved, field), rel=1e-6), field
    assert derived.plan.predicted.peak_memory_bytes == pytest.approx(solved.plan.predicted.peak_memory_bytes, rel=1e-6)
