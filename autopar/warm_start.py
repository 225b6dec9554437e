"""Warm-starting the intra-op ILP from an input layout rule (``autopar.rules``, e.g.
Megatron's DP × TP layout of a pipeline stage): the rule's plan of the same problem is the
ILP's warm start (``solvers.solve(start=)``), so a solve that stops at its time limit never
returns a plan worse than the rule's. The rule only seeds the search; it forbids nothing
(that is ``PlanHooks.restrict``)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from autopar import solvers

from .build import IntraProblem


@dataclass
class WarmStart:
    """An input layout rule whose plan warm-starts the ILP (``PlanHooks.warm_start``): the
    ``build_problem`` filters ``allowed`` / ``allowed_reshard``, applied to the unrestricted
    problem as ∞ costs (``IntraProblem.restricted``), and the rule's plans found so far on
    this problem at other memory budgets, as (usage limit, choice or None: proven to have none):
    one found under a limit at least as high that still fits is reused (pipeline stages are
    planned at several budgets on the same mesh). A solve that ends without a plan and
    without a proof (its time limit) is not remembered: a later request solves it again."""
    allowed: Callable | None = None
    allowed_reshard: Callable | None = None
    solved: list = field(default_factory=list)
    cutoffs: int = 0  # solves skipped: the rule had no plan cheaper than the main solve's incumbent

    def start_for(self, ip: IntraProblem, *, solver: str, time_limit_s: float | None, gap_rel: float,
                  relaxations=None):
        """The ``start`` for ``solvers.solve(ip.problem)``: a function of the seconds left that
        returns the best plan of ``ip`` under the rule, solved within ``time_limit_s`` of its
        own (the rule's plan is what the main solve must not lose to, so it does not share that
        solve's time), or None when the rule has no plan that fits — or, given ``cutoff`` (the
        cost of a choice the main solve already has), when the rule's LP relaxation proves it has
        none cheaper (``solvers.solve(cutoff=)``): it could neither seed nor beat the main
        solve, so the guarantee (never worse than the rule's plan) holds without its ILP.
        ``relaxations``: the LP relaxations the rule's solves share (``solvers.solve``)."""
        def start(left, cutoff=None):
            limit = ip.problem.usage_limit
            for lim, choice in self.solved:
                if lim is None or (limit is not None and lim >= limit):
                    if choice is None:
                        return None  # none under a looser limit
                    if solvers.evaluate(ip.problem, choice)[1]:
                        return choice
            try:
                # (``cutoff``: the main solve already has a choice at that cost; when the rule's
                # LP bound proves it has none cheaper, its ILP is not solved: None, not remembered)
                sol = solvers.solve(ip.restricted(self.allowed, self.allowed_reshard), solver=solver,
                                    gap_rel=gap_rel, time_limit_s=time_limit_s,
                                    cutoff=cutoff if solver in ("auto", "highs") else None,
                                    relaxations=relaxations)
                if sol.status == "cutoff":
                    self.cutoffs += 1
                    return None
                if not sol.feasible:  # (found nothing in its time: no proof, not remembered)
                    return None
                choice = sol.choice
            except solvers.InfeasibleError:
                choice = None
            self.solved.append((limit, choice))
            return choice
        return start
