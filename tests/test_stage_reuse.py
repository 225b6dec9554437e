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


def coster(layers=2, zero="none"):
    params, batch = params_and_batch(layers=layers, d=64)
    inputs = prepare_inputs(loss_fn, params, batch, optimizer=OPT, cluster=make_cluster(4), nodes=2,
                            num_microbatches=2, schedule="gpipe", memory_budget_bytes=None, zero=zero)
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


def test_the_zero1_lean_variant_is_the_plain_lean_plans_run_with_zero1():
    """Additive costing's ZeRO-1 lean variant takes the plain lean plans' layouts with the
    optimizer state split (``StageCoster.as_zero``): no ILP of its own, each a feasible ZeRO-1
    plan within the lean budget, as fast as the plain one and holding less memory."""
    from autopar.pipeline.additive import AdditiveCosts
    from autopar.pipeline.costs import StageOption
    c = coster(layers=4, zero="auto")
    assert StageOption(zero=True) in c_options(c)
    asked = []
    within = c.cost_within
    c.cost_within = lambda i, j, sub, mesh, budget, **kw: asked.append((budget, kw.get("zero"))) or within(
        i, j, sub, mesh, budget, **kw)
    costs = AdditiveCosts(c, 4, [(1, 1), (1, 2), (1, 4), (2, 4)], 8, [1.0] * 4, c_options(c))
    s = costs.shapes.index((1, 4))
    assert costs.share(s) == 2
    lean0 = costs.variants.index(("lean", StageOption(zero=True)))
    costs.resolve({(lean0, s)})
    plain = costs.layers[costs.variants.index(("lean", StageOption()))][s]
    zero = costs.layers[lean0][s]
    assert not [a for a in asked if a[1] and a[0] < c.budget]  # no ZeRO-1 ILP within a lean budget
    for i, (p, z) in enumerate(zip(plain, zero)):
        assert p.fits and z.fits and z.zero and not p.zero and not z.memory_free
        assert z.plan.mesh_shape == p.plan.mesh_shape and z.plan.input_specs_flat == p.plan.input_specs_flat
        assert z.latency == pytest.approx(p.latency) and z.static < p.static
        assert z.plan.predicted.peak_memory_bytes <= c.ilp_limit(i, i + 1, (1, 4), p.plan.memory_budget_bytes, True)
    from autopar.pipeline.costs import Sums
    run = Sums()
    total = [run.add(z) for z in zero][-1]
    assert (costs.latency[lean0, 0, 4, s], costs.memory[lean0, 0, 4, s]) == pytest.approx(total[:2])
    # a plan that does not fit has no ZeRO-1 run
    from autopar.pipeline.costs import INFEASIBLE
    assert c.as_zero(0, 1, (1, 4), INFEASIBLE) is None


def c_options(c):
    from autopar.pipeline.costs import StageOption
    return (StageOption(), StageOption(zero=True))
