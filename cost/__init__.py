"""Cost model: cluster specs, α+nβ collectives, roofline compute, resharding. No JAX here."""
from .cluster import (ClusterSpec, ClusterSpecError, DeviceSpec, LinkSpec, cluster_from_dict,
                      known_clusters, load_cluster)
from .comm import AxisLink, MeshModel, collective_time, compute_time, mesh_model, p2p_time
from .resharding import Spec, local_shape, resharding, shard_factor

__all__ = [
    "ClusterSpec", "ClusterSpecError", "DeviceSpec", "LinkSpec", "cluster_from_dict", "known_clusters",
    "load_cluster", "AxisLink", "MeshModel", "collective_time", "compute_time", "mesh_model", "p2p_time",
    "Spec", "local_shape", "resharding", "shard_factor",
]
