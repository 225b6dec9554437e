"""autopar: an auto-parallelization planner for JAX.

    plan = autopar.plan(fn, *example_args, cluster="cpu-8")
    print(plan.report())
    sharded = plan.apply(fn)          # jitted, same arguments as fn
"""
from cost import ClusterSpec, ClusterSpecError, known_clusters, load_cluster

from .emit import MeshError
from .plan import Plan
from .planner import PlanError, candidate_meshes, plan
from .report import format_report
from .runtime import PlanMismatchError, ShardedFunction
from .stage_boundary import stage_boundary
from .trace import TraceError

__all__ = ["ClusterSpec", "ClusterSpecError", "MeshError", "Plan", "PlanError", "PlanMismatchError",
           "ShardedFunction", "TraceError", "candidate_meshes", "format_report", "known_clusters",
           "load_cluster", "plan", "stage_boundary"]
