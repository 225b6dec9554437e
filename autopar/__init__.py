"""autopar: an auto-parallelization planner for JAX.

    plan = autopar.plan(fn, *example_args, cluster="cpu-8")
    print(plan.report())
    sharded = plan.apply(fn)          # jitted, same arguments as fn
    dp = autopar.baselines.data_parallel(fn, *example_args)   # hand-written baselines, same Plan type
"""
from cost import ClusterSpec, ClusterSpecError, known_clusters, load_cluster

from .emit import MeshError
from .plan import Plan
from .planner import PlanError, candidate_meshes, plan
from .report import format_report
from .runtime import PlanMismatchError, ShardedFunction
from .stage_boundary import stage_boundary
from .trace import TraceError
from .training import plan_training
from .training_plan import TrainingPlan

from . import baselines  # noqa: E402  (after .planner, which it uses)

__all__ = ["ClusterSpec", "ClusterSpecError", "MeshError", "Plan", "PlanError", "PlanMismatchError",
           "ShardedFunction", "TraceError", "baselines", "candidate_meshes", "format_report", "known_clusters",
           "load_cluster", "plan", "plan_training", "stage_boundary", "TrainingPlan"]
