"""Solvers for the sharding problem (no JAX): ILP (CBC/HiGHS), heuristics, brute force, stage DP.

``solve(problem)`` is the entry point: presolve, the right solver, choice mapped back."""
from .driver import solve
from .problem import InfeasibleError, Problem, Solution, evaluate

__all__ = ["InfeasibleError", "Problem", "Solution", "evaluate", "solve"]
