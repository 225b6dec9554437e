"""Solvers for the sharding problem (no JAX): ILP (CBC/HiGHS), heuristics, brute force, stage DP."""
from .problem import InfeasibleError, Problem, Solution, evaluate

__all__ = ["InfeasibleError", "Problem", "Solution", "evaluate"]
