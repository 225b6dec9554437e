"""autopar: an auto-parallelization planner for JAX.

    plan = autopar.plan(fn, *example_args, cluster="cpu-8")
    print(plan.report())
    sharded = plan.apply(fn)          # jitted, same arguments as fn
    dp = autopar.baselines.data_parallel(fn, *example_args)   # hand-written baselines, same Plan type

The JAX-free halves live in the repository's top-level folders and install under this
namespace: ``autopar.cost`` (``cost/``), ``autopar.solvers`` (``solvers/``) and
``autopar.cluster_specs`` (``cluster_specs/``). Names below are imported on first use, so
``import autopar.cost`` or ``import autopar.solvers`` does not import JAX.
"""
from __future__ import annotations

import importlib
import os

# In a source checkout the JAX-free packages sit next to this one (an installed copy holds them
# inside it, by pyproject's package-dir mapping): search the checkout's root for them too.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cost")) \
        and os.path.isdir(os.path.join(_root, "cost")):
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821

_EXPORTS = {
    "ClusterSpec": "autopar.cost", "ClusterSpecError": "autopar.cost", "known_clusters": "autopar.cost",
    "load_cluster": "autopar.cost",
    "MeshError": "autopar.emit",
    "Plan": "autopar.plan_types",
    "PlanError": "autopar.planner", "candidate_meshes": "autopar.planner", "plan": "autopar.planner",
    "format_report": "autopar.report",
    "PlanMismatchError": "autopar.runtime", "ShardedFunction": "autopar.runtime",
    "stage_boundary": "autopar.pipeline.boundary",
    "TraceError": "autopar.trace",
    "plan_training": "autopar.pipeline.training",
    "step_lower_bound": "autopar.pipeline.bound",
    "TrainingPlan": "autopar.pipeline.training_plan",
    "WeightedLoss": "autopar.pipeline.loss_form",
}
_MODULES = {"baselines"}

__all__ = sorted([*_EXPORTS, *_MODULES])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(f"autopar.{name}")
    else:
        raise AttributeError(f"module 'autopar' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
