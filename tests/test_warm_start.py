"""Planning one problem many times. Warm starts from a hand-written layout rule
(``PlanHooks(warm_start=)``, ``IntraProblem.restricted``, ``WarmStart.start_for``): the rule's
plan found on the unrestricted problem equals the baseline's, and a solver that stops early can
never return something worse than it. A built problem planned again at another budget
(``PlanHooks(problems=)``).
"""
import math

import pytest
from conftest import make_cluster

import autopar
from autopar import solvers
import autopar.solvers.driver as driver
from autopar.solvers.relaxation import Relaxation
from autopar.baselines import layout_rule
from autopar.build import build_problem
from autopar.graph import build_graph
from autopar.planner import MIP_GAP, PlanHooks, plan_with
from autopar.trace import trace
from autopar.warm_start import WarmStart
from autopar.cost import load_cluster, mesh_model
from examples import gpt, mlp

CLUSTER = make_cluster(8, flops=1e11, alpha_s=1e-6)
MESH = (2, 4)


def _args():
    return gpt.sgd_train_step_args(layers=1, hidden=64, seq=32, vocab=256, batch=8)


def _rule(mesh=MESH):
    return layout_rule("dp_tp", _args(), mesh_shape=mesh, batch_axes=(0,), state_kind="tensor", batch_argnums=(1,))


@pytest.fixture(scope="module")
def base(devices8):
    return autopar.baselines.dp_tp(gpt.sgd_train_step, *_args(), mesh_shape=MESH, cluster=CLUSTER, batch_argnums=(1,))


@pytest.fixture
def crippled(monkeypatch):
    """Every solver gives up at once on unrestricted problems (a time limit hit before any
    incumbent); the rule's problems (named "… (rule)") solve normally."""
    real = {k: getattr(driver, k) for k in ("solve_ilp", "relax", "solve_heuristic")}

    def wrap(name, give_up):
        def f(problem, *a, **kw):
            return real[name](problem, *a, **kw) if problem.name.endswith("(rule)") else give_up
        return f
    nothing = solvers.Solution(choice=(), cost=math.inf, feasible=False, status="unknown")
    monkeypatch.setattr(driver, "solve_ilp", wrap("solve_ilp", nothing))
    monkeypatch.setattr(driver, "relax", wrap("relax", Relaxation(optimal=False, bound=-math.inf, choice=None,
                                                                   support=None, seconds=0.0, stats={})))
    monkeypatch.setattr(driver, "solve_heuristic", wrap("solve_heuristic", nothing))


def test_the_rules_plan_on_the_full_problem_equals_the_baselines(base):
    """Masking the unrestricted problem (same strategy indices) finds the same optimum as the
    baseline, whose problem is built with the input strategies filtered out."""
    program = trace(gpt.sgd_train_step, *_args())
    ip = build_problem(build_graph(program), mesh_model(load_cluster(CLUSTER), 1, MESH),
                       memory_budget_bytes=load_cluster(CLUSTER).device.memory_bytes)
    sol = solvers.solve(ip.restricted(**_rule()), gap_rel=1e-9)
    assert sol.cost / 1e6 == pytest.approx(base.solver.objective_s, rel=1e-6)
    assert solvers.evaluate(ip.problem, sol.choice)[:2] == (sol.cost, True)  # a choice of the full problem
    free = solvers.solve(ip.problem, gap_rel=1e-9)
    assert free.cost <= sol.cost * (1 + 1e-9)


def test_a_solver_that_gives_up_returns_the_rules_plan(base, crippled):
    with pytest.raises(autopar.PlanError):  # without a warm start: nothing found
        plan_with(gpt.sgd_train_step, _args(), cluster=CLUSTER, mesh_shape=MESH)
    p = plan_with(gpt.sgd_train_step, _args(), cluster=CLUSTER, mesh_shape=MESH,
                  hooks=PlanHooks(warm_start=lambda s: WarmStart(**_rule(s))))
    assert p.solver.solver.endswith("+start") and p.solver.status == "feasible"
    assert p.solver.objective_s == pytest.approx(base.solver.objective_s, rel=1e-6)
    assert p.predicted.step_time_s == pytest.approx(base.predicted.step_time_s, rel=1e-6)
    assert "+start: the solver stopped" in p.report()


def test_the_rules_plan_is_reused_across_budgets(devices8):
    program = trace(gpt.sgd_train_step, *_args())
    spec = load_cluster(CLUSTER)
    graph, mesh = build_graph(program), mesh_model(spec, 1, MESH)
    warm = WarmStart(**_rule())
    loose = build_problem(graph, mesh, memory_budget_bytes=spec.device.memory_bytes)
    first = warm.start_for(loose, solver="auto", time_limit_s=None, gap_rel=MIP_GAP)(None)
    peak = solvers.evaluate(loose.problem, first)[2]
    tight = build_problem(graph, mesh, memory_budget_bytes=peak * 1.01)
    assert warm.start_for(tight, solver="auto", time_limit_s=None, gap_rel=MIP_GAP)(None) == first
    assert len(warm.solved) == 1  # still fits: reused
    tighter = build_problem(graph, mesh, memory_budget_bytes=peak * 0.9)
    again = warm.start_for(tighter, solver="auto", time_limit_s=2.0, gap_rel=MIP_GAP)(None)
    assert len(warm.solved) == 2  # did not fit: solved again under the tighter limit
    assert again is None or solvers.evaluate(tighter.problem, again)[1]


def test_a_problem_built_once_is_planned_again_at_another_budget(devices8):
    """PlanHooks(problems=…) (a stage planned at several budgets): the second budget reuses the
    built problem and gives the plan a fresh build gives."""
    problems, args = {}, (lambda: mlp.mlp_step_args(batch=256, hidden=256))
    loose = plan_with(mlp.mlp_step, args(), cluster=CLUSTER, mesh_shape=MESH, hooks=PlanHooks(problems=problems))
    built = problems[MESH]
    budget = loose.predicted.peak_memory_bytes * 0.8
    again = plan_with(mlp.mlp_step, args(), cluster=CLUSTER, mesh_shape=MESH, hooks=PlanHooks(problems=problems),
                      memory_budget_bytes=budget)
    fresh = plan_with(mlp.mlp_step, args(), cluster=CLUSTER, mesh_shape=MESH, memory_budget_bytes=budget)
    assert problems[MESH] is built and built.problem.usage_limit == loose.memory_budget_bytes  # not changed
    assert again.predicted.peak_memory_bytes <= budget < loose.predicted.peak_memory_bytes
    assert again.solver.objective_s == pytest.approx(fresh.solver.objective_s, rel=1e-9)
    assert again.predicted.peak_memory_bytes == pytest.approx(fresh.predicted.peak_memory_bytes, rel=1e-9)


def test_the_rule_is_not_solved_when_its_lp_bound_reaches_the_cutoff(devices8):
    """``start(left, cutoff=c)``: the main solve already has a choice costing c; when the rule's
    LP relaxation proves it has none cheaper, its ILP is skipped (None, not remembered)."""
    program = trace(gpt.sgd_train_step, *_args())
    spec = load_cluster(CLUSTER)
    ip = build_problem(build_graph(program), mesh_model(spec, 1, MESH), memory_budget_bytes=spec.device.memory_bytes)
    warm = WarmStart(**_rule())
    start = warm.start_for(ip, solver="auto", time_limit_s=None, gap_rel=MIP_GAP)
    rule = solvers.solve(ip.restricted(**_rule()), gap_rel=MIP_GAP)
    assert start(None, cutoff=rule.lower_bound * 0.5) is None  # nothing of the rule's costs less than that
    assert warm.cutoffs == 1 and warm.solved == []
    got = start(None, cutoff=rule.cost * 2)  # the rule may beat that: solved, and remembered
    assert got is not None and solvers.evaluate(ip.problem, got)[0] == pytest.approx(rule.cost)
    assert warm.cutoffs == 1 and len(warm.solved) == 1


def test_a_rule_solve_that_finds_nothing_in_its_time_is_not_remembered(devices8, monkeypatch):
    """A rule solve that ends without a plan and without proving there is none (its time limit)
    says nothing about the next request: it is solved again then (measured on GPT-175B's LM
    head: a 0.5 s rule solve that found nothing left every later budget on that mesh without
    the rule's plan, 0.107 s instead of 0.025 s)."""
    import autopar.warm_start as ws
    program = trace(gpt.sgd_train_step, *_args())
    spec = load_cluster(CLUSTER)
    ip = build_problem(build_graph(program), mesh_model(spec, 1, MESH), memory_budget_bytes=spec.device.memory_bytes)
    warm = WarmStart(**_rule())
    real, calls = ws.solvers.solve, []

    def timed_out_once(problem, **kw):
        calls.append(problem.name)
        if len(calls) == 1:
            return solvers.Solution(choice=(), cost=math.inf, feasible=False, status="unknown")
        return real(problem, **kw)
    monkeypatch.setattr(ws.solvers, "solve", timed_out_once)
    start = warm.start_for(ip, solver="auto", time_limit_s=0.01, gap_rel=MIP_GAP)
    assert start(None) is None and warm.solved == []
    got = start(None)
    assert len(calls) == 2 and got is not None and solvers.evaluate(ip.problem, got)[1]
    assert warm.solved == [(ip.problem.usage_limit, got)]
