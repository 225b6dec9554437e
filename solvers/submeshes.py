"""Sub-mesh shapes of the stage search (``solvers.stage_dp``) and Megatron-style equal splits.

A sub-mesh (n, m) is n nodes of m devices each: (1, 1), (1, 2), (1, 4), … inside one node,
(1, M) a whole node and (k, M) k whole nodes. Every choice with Σ devices = N·M tiles the
cluster (Alpa §5.2).
"""
from __future__ import annotations


# clusters up to this many nodes get every whole-node count k = 2..N (Alpa's set); larger ones
# the powers of two and N itself (``submesh_shapes``)
EVERY_NODE_COUNT_UP_TO = 8


def node_counts(num_nodes: int) -> list[int]:
    """Whole-node sub-mesh sizes k ≥ 2 (``submesh_shapes``)."""
    if num_nodes <= EVERY_NODE_COUNT_UP_TO:
        return list(range(2, num_nodes + 1))
    return sorted({2 ** e for e in range(1, num_nodes.bit_length()) if 2 ** e <= num_nodes} | {num_nodes})


def submesh_shapes(num_nodes: int, devices_per_node: int) -> list[tuple[int, int]]:
    """(1,1), (1,2), (1,4), … (powers of two below M), (1,M), then (k,M) for k in
    ``node_counts(N)``: every k = 2..N on up to ``EVERY_NODE_COUNT_UP_TO`` nodes, beyond that
    the powers of two and N (a restriction of the search space, as Alpa's powers of two inside
    a node are: log N whole-node shapes instead of N, each costing an intra-op plan per
    distinct layer; any N·M devices are still tiled — N's binary digits)."""
    shapes, w = [], 1
    while w < devices_per_node:
        shapes.append((1, w))
        w *= 2
    return shapes + [(1, devices_per_node)] + [(k, devices_per_node) for k in node_counts(num_nodes)]


def uniform_submeshes(num_layers: int, num_nodes: int, devices_per_node: int) -> list[tuple[int, tuple[int, int]]]:
    """Megatron-style equal splits ``(pp, submesh)``: ``pp`` ≤ the layers divides the
    devices and every stage gets ``N / pp`` of them, as whole nodes ``(k, M)`` or an
    aligned part of one node ``(1, m)``."""
    M, N = devices_per_node, num_nodes * devices_per_node
    out = []
    for pp in range(1, min(N, num_layers) + 1):
        if N % pp:
            continue
        d = N // pp
        if d >= M and d % M == 0 and (d // M == 1 or d // M in node_counts(num_nodes)):
            out.append((pp, (d // M, M)))
        elif d < M and M % d == 0:
            out.append((pp, (1, d)))
    return out


def uniform_stages(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """``pp`` contiguous layer ranges whose sizes differ by at most one (larger ones last)."""
    bounds = [round(s * num_layers / pp) for s in range(pp + 1)]
    return list(zip(bounds, bounds[1:]))


__all__ = ["EVERY_NODE_COUNT_UP_TO", "node_counts", "submesh_shapes", "uniform_submeshes", "uniform_stages"]
