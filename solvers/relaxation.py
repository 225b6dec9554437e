"""The problem the LP relaxation is solved on: the problem presolved as if it had no usage limit.

"auto" (``driver._lp_first``) and ``driver.lower_bound`` solve the marginal LP without memory
rows: it bounds the cost of every choice, fitting or not. That LP need not see memory at
all, and neither need the presolve in front of it: without a usage limit every node may be
folded as a leaf or a series node and dominance compares costs only (``solvers.presolve``,
items 5–8), so the LP is smaller. Its optimum is still a lower bound of the real problem:

    LP(memory-free presolved) ≤ min cost without the limit (presolve is exact) ≤ min cost with it.

Measured on twelve LPs of a GPT-175B plan on 1,024 H100s (layers and 3-layer stages, already
presolved with memory: 219–832 nodes): 0–61 % fewer nodes, 93k–166k instead of 93k–246k
columns, 0.44–2.12 s instead of 0.93–3.81 s (plus 0.03–0.21 s of presolve), and the same
optimum on all twelve.

The LP's answer is mapped back with the presolve's own restore: its rounded choice becomes
a choice of the original problem with the same cost (``choice``; whether it fits is the
caller's question), its support (the strategies with a positive LP value) becomes a set of
strategies per original node (``support``: a folded node gets each value its restore table
gives over its neighbours' sets).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .presolve import Presolved, presolve
from .problem import Problem


@dataclass(frozen=True)
class MemoryFree:
    """``problem`` presolved without its usage limit (``presolved.problem``: the LP's problem)."""
    presolved: Presolved

    @property
    def problem(self) -> Problem:
        return self.presolved.problem

    def choice(self, reduced_choice) -> tuple[int, ...]:
        """The original problem's choice for a choice of the reduced one: the same cost."""
        return self.presolved.restore(reduced_choice)

    def support(self, reduced_support) -> list[np.ndarray]:
        """Strategies per original node for the reduced problem's LP support (one array of
        reduced strategy indices per reduced node)."""
        return self.presolved.restore_sets(reduced_support)


def memory_free(problem: Problem) -> MemoryFree:
    """``problem`` presolved as if it had no usage limit (InfeasibleError as ``presolve``:
    a node with no finite-cost strategy)."""
    free = dataclasses.replace(problem, usage_limit=None) if problem.usage_limit is not None else problem
    return MemoryFree(presolve(free))
