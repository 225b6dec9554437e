"""Cost model: cluster specs, α+nβ collectives, roofline compute, resharding. No JAX here."""
from .cluster import (ClusterSpec, ClusterSpecError, DeviceSpec, LinkSpec, cluster_from_dict,
                      known_clusters, load_cluster)
from .comm import (ALL_GATHER, ALL_REDUCE, ALL_TO_ALL, COLLECTIVE_PERMUTE, COLLECTIVES, HLO_OPS, P2P, REDUCE_SCATTER,
                   AxisLink, Collective, CollectiveOp, MeshModel, collective, collective_time, compute_time, matmul_efficiency, mesh_model,
                   p2p_time)
from .resharding import resharding
from .spec import Spec, axes_size, local_shape, shard_factor

__all__ = [
    "ClusterSpec", "ClusterSpecError", "DeviceSpec", "LinkSpec", "cluster_from_dict", "known_clusters",
    "load_cluster", "ALL_GATHER", "ALL_REDUCE", "ALL_TO_ALL", "COLLECTIVE_PERMUTE", "COLLECTIVES", "HLO_OPS", "P2P",
    "REDUCE_SCATTER", "AxisLink", "Collective", "CollectiveOp", "MeshModel", "collective", "collective_time",
    "compute_time", "matmul_efficiency", "mesh_model", "p2p_time", "resharding", "Spec", "axes_size", "local_shape", "shard_factor",
]
