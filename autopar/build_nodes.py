"""The node terms of the solver problem (``autopar.build``): per graph node its strategies,
their cost (µs: roofline compute of the local shard + the collectives inside the op) and
memory (bytes of the node's outputs per device, live from the node to its last use; program
inputs and outputs are live for the whole step; ops XLA fuses away hold none: what XLA
materialises and until when is ``autopar.xla_view``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from autopar.cost import (ALL_REDUCE, MeshModel, collective, collective_time, compute_time, local_shape,
                          matmul_efficiency, shard_factor)

from .graph import OpGraph
from .strategies import Strategy, enumerate_specs, replicate, spec_name, strategies_for
from .strategies.base import local_nbytes
from .trace import SCAN_BOUNDARY
from .xla_view import combinable_nodes, live_intervals, memory_view, traffic_fused, written_into_outputs

US = 1e6  # solver costs are microseconds
# Among plans of equal predicted time prefer the one holding fewer bytes per device:
# 1 µs per GB of (summed) live outputs — far below any real cost difference.
TIEBREAK_US_PER_BYTE = 1e-9


@dataclass(frozen=True)
class NodeTerms:
    """Per graph node, one entry per strategy."""
    compute_s: list[np.ndarray]
    comm_s: list[np.ndarray]                # collectives inside the op
    costs: list[np.ndarray]                 # µs: the solver's node costs (with the memory tie-break)
    usages: list[np.ndarray]                # bytes per device of the node's outputs
    intervals: list[tuple[int, int]]        # [born, last use + 1) in node order


def node_strategies(graph: OpGraph, mesh: MeshModel, signatures) -> tuple[list[list[Strategy]], dict[int, str]]:
    """(strategies per node, {node: why it falls back to replicated}); equations of one
    signature share one strategy list."""
    strats, fallbacks, cache = [], {}, {}
    for node, sig in zip(graph.nodes, signatures):
        if node.kind == "eqn" and sig in cache:
            strats.append(cache[sig][0])
            if cache[sig][1]:
                fallbacks[node.index] = cache[sig][1]
            continue
        if node.kind == "input":
            v = node.outputs[0]
            strats.append([Strategy(spec_name(s), (s,), ()) for s in enumerate_specs(v.shape, mesh.shape)])
        elif node.kind == "const":
            strats.append([Strategy("replicated", (replicate(len(node.outputs[0].shape)),), ())])
        else:
            s, reason = strategies_for(node, mesh)
            strats.append(s)
            cache[sig] = (s, reason)
            if reason:
                fallbacks[node.index] = reason
    return strats, fallbacks


def restrict_inputs(graph: OpGraph, strats, allowed) -> list:
    """Keep only the strategies ``allowed(node_index, strategy)`` accepts, on program inputs."""
    out = list(strats)
    for node in graph.nodes:
        if node.kind != "input":
            continue
        keep = [s for s in strats[node.index] if allowed(node.index, s)]
        if not keep:
            raise ValueError(f"no allowed sharding for program input {node.index} (shape {node.outputs[0].shape}): "
                             f"the restriction rejects all of {[s.name for s in strats[node.index]]}")
        out[node.index] = keep
    return out


def node_terms(graph: OpGraph, mesh: MeshModel, strats, signatures, *, donated_nodes: set[int],
               aliased_outputs: frozenset = frozenset(), input_usage_scale=None,
               platform: str | None = None, split_backward: bool = False) -> NodeTerms:
    """Costs and memory of every node; ``input_usage_scale`` {input: k} counts k bytes per
    byte of that input, donated inputs are free after their last read. ``platform`` (default:
    the cluster's device kind, ``mesh.device_kind``: the compiler the plan is made for)
    decides whether XLA undoes ``jax.checkpoint`` (``xla_view.remat_cse``); with
    ``split_backward`` (a pipeline stage: ``autopar.pipeline.halves``) the forward and the
    backward are separate executables and nothing is merged across them."""
    view = memory_view(graph, platform or mesh.device_kind, merge_recompute=not split_backward)
    fused = view.free | written_into_outputs(graph, view, aliased_outputs)
    in_fusion = traffic_fused(graph) if mesh.fuse_elementwise else frozenset()
    combined = combinable_nodes(graph) if mesh.combine_all_reduces else frozenset()
    comp_all, comm_all, costs, usages = [], [], [], []
    cost_cache: dict = {}
    for node, ss, sig in zip(graph.nodes, strats, signatures):
        key = sig if node.kind == "eqn" else (node.kind, node.outputs[0].shape, str(node.outputs[0].dtype),
                                               tuple(x.name for x in ss))
        skip = (node.index in in_fusion,
                tuple(hasattr(x, "id") and graph.producer[x.id][0] in in_fusion for x in node.operands))
        key = (key, skip, node.index in combined) if in_fusion or combined else key
        if key not in cost_cache:
            cost_cache[key] = _op_costs(node, ss, mesh, *skip, combined=node.index in combined)
        comp, comm, use = cost_cache[key]
        if input_usage_scale and node.kind == "input" and node.index in input_usage_scale:
            use = use * float(input_usage_scale[node.index])
        if node.index in fused:
            use = use * 0.0
        comp_all.append(comp)
        comm_all.append(comm)
        costs.append((comp + comm) * US + use * TIEBREAK_US_PER_BYTE)
        usages.append(use)
    return NodeTerms(comp_all, comm_all, costs, usages, live_intervals(graph, donated_nodes, view.ends, aliased_outputs))


def _op_costs(node, strats, mesh, skip_out: bool = False, skip_in: tuple = (), combined: bool = False):
    """(compute s, collective s, output bytes per device) per strategy of one node; memory
    traffic leaves out its output (``skip_out``) and the operands (``skip_in``) that stay inside
    a loop fusion (``xla_view.traffic_fused``); ``combined``: its all-reduces join XLA's combined one
    (``xla_view.combinable_nodes``), their α is charged once per group by ``planner.assemble_plan``."""
    comp = np.zeros(len(strats))
    comm = np.zeros(len(strats))
    use = np.zeros(len(strats))
    if node.kind != "eqn":
        use[:] = [local_nbytes(node.outputs[0], s.out_specs[0], mesh.shape) for s in strats]
        return comp, comm, use
    dtype = str(node.outputs[0].dtype)
    view = node.name in SCAN_BOUNDARY  # a scan's slice / stack / carry: XLA reads and writes in place
    for i, s in enumerate(strats):
        factors = [shard_factor(sp, mesh.shape) for sp in s.out_specs]
        factors += [shard_factor(sp, mesh.shape) for sp in s.in_specs if sp is not None]
        div = s.work_div or max(factors, default=1)
        use[i] = sum(local_nbytes(v, sp, mesh.shape) for v, sp in zip(node.outputs, s.out_specs))
        nbytes = 0.0 if skip_out else use[i]
        nbytes += sum(local_nbytes(o, sp, mesh.shape) for k, (o, sp) in enumerate(zip(node.operands, s.in_specs))
                      if not (k < len(skip_in) and skip_in[k]))
        eff = _dot_efficiency(node, s, mesh) if node.name == "dot_general" else \
            _conv_efficiency(node, s, mesh) if node.name == "conv_general_dilated" else \
            ragged_efficiency(node, mesh) if node.name == "ragged_dot_general" else 1.0
        flops = node.flops / div / eff
        comp[i] = 0.0 if view else compute_time(mesh, flops, nbytes * node.repeat, dtype)  # flops × repeat
        comm[i] = sum(collective_time(mesh, k, ax, n, latency=not (combined and k == ALL_REDUCE.name))
                      for k, ax, n in s.comm) * node.repeat
    return comp, comm, use


def _dot_efficiency(node, s: Strategy, mesh: MeshModel) -> float:
    """``cost.matmul_efficiency`` of a dot's local (M, K, N) under strategy ``s`` (1 when the
    spec charges every matmul at peak)."""
    if not mesh.matmul_half_dim or len(s.in_specs) < 2 or s.in_specs[0] is None or s.in_specs[1] is None:
        return 1.0
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    lhs = local_shape(tuple(node.operands[0].shape), s.in_specs[0], mesh.shape)
    rhs = local_shape(tuple(node.operands[1].shape), s.in_specs[1], mesh.shape)
    m = math.prod(d for k, d in enumerate(lhs) if k not in lc and k not in lb)
    n = math.prod(d for k, d in enumerate(rhs) if k not in rc and k not in rb)
    return matmul_efficiency(mesh.matmul_half_dim, (m, math.prod(lhs[k] for k in lc), n))


def ragged_efficiency(node, mesh: MeshModel) -> float:
    """A ragged dot's useful FLOPs over those it runs: 1 where jax lowers it to XLA's grouped
    matmul (GPU, TPU), 1/G on CPU, where it runs as a dense dot over every group
    (``strategies.dot_general.ragged_dot_rule``)."""
    return 1.0 / node.operands[2].shape[-1] if mesh.device_kind == "cpu" else 1.0


def _conv_efficiency(node, s: Strategy, mesh: MeshModel) -> float:
    """``DeviceSpec.conv_efficiency`` × ``cost.matmul_efficiency`` (``conv_half_dim``) of the
    conv's implicit matmul under strategy ``s``: M output positions, K window × input channels,
    N output channels, per device (a gradient conv alike: its dimension numbers say which is which)."""
    if not mesh.conv_half_dim or len(s.in_specs) < 2 or s.in_specs[1] is None:
        return mesh.conv_efficiency
    rhs_spec = node.params["dimension_numbers"].rhs_spec
    rhs = local_shape(tuple(node.operands[1].shape), s.in_specs[1], mesh.shape)
    n = rhs[rhs_spec[0]]
    k = math.prod(rhs[d] for d in rhs_spec[1:])
    out = node.outputs[0]
    m = math.prod(local_shape(tuple(out.shape), s.out_specs[0], mesh.shape)) / max(n, 1)
    return mesh.conv_efficiency * matmul_efficiency(mesh.conv_half_dim, (m, k, n))


def transient_usages(graph: OpGraph, strats) -> list:
    """While an op reduces partial sums (a collective inside it whose ``cost.comm`` record is
    ``partial_live``: all-reduce, reduce-scatter), the unreduced local buffer exists besides
    its output: an item live only at the op; so does a strategy's scratch
    (``Strategy.temp_bytes``: unfused attention's S×S scores)."""
    items, cache = [], {}
    for node, ss in zip(graph.nodes, strats):
        key = id(ss)  # strategy lists are shared between nodes of one signature
        if key not in cache:
            # one buffer however many all-reduces it goes through (one per split reduced dim)
            cache[key] = np.array([max((n for kind, _, n in s.comm if collective(kind).partial_live),
                                       default=0.0) + s.temp_bytes * 1.0 for s in ss])
        if cache[key].any():
            items.append((node.index, cache[key], (node.index, node.index + 1)))
    return items
