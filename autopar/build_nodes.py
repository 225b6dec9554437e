"""The node terms of the solver problem (``autopar.build``): per graph node its strategies,
their cost (µs: roofline compute of the local shard + the collectives inside the op) and
memory (bytes of the node's outputs per device, live from the node to its last use; program
inputs and outputs are live for the whole step; ops XLA fuses away hold none,
``fused_nodes``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from autopar.cost import (ALL_REDUCE, MeshModel, collective, collective_time, compute_time, local_shape,
                          matmul_efficiency, shard_factor)

from .graph import OpGraph
from .strategies import FUSION_RULES, Strategy, enumerate_specs, replicate, spec_name, strategies_for
from .strategies.base import local_nbytes
from .trace import SCAN_BOUNDARY

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
    decides whether XLA undoes ``jax.checkpoint`` (:func:`remat_cse`); with
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
    a loop fusion (:func:`traffic_fused`); ``combined``: its all-reduces join XLA's combined one
    (:func:`combinable_nodes`), their α is charged once per group by ``planner.assemble_plan``."""
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


def live_intervals(graph: OpGraph, donated_nodes: set[int], ends: dict[int, int] | None = None,
                   aliased_outputs: frozenset = frozenset()) -> list[tuple[int, int]]:
    """[born, last use + 1) per node; program inputs live all step (``len(nodes) + 1``)
    unless donated (then until their last read). A program output's buffer is reserved all
    step too (XLA allocates entry outputs apart from the reused temporaries: the zoo's tiny
    unrolled AdamW steps were predicted 16–24 % low when outputs counted from their birth), but
    one aliased to a donated input (``aliased_outputs``, value ids) takes over that input's
    buffer. ``ends``: {value: last use} where XLA reads a value later than its jaxpr consumers
    (``MemoryView.ends``)."""
    n, out = len(graph.nodes), []
    last = (lambda v: ends.get(v, graph.last_use(v))) if ends else graph.last_use
    for node in graph.nodes:
        if node.kind == "input" and node.index not in donated_nodes:
            out.append((0, n + 1))
        elif node.kind == "input":  # donated: its buffer is free after the last read
            out.append((0, last(node.outputs[0].id) + 1))
        else:
            end = max(last(v.id) for v in node.outputs)
            reserved = any(v.id in graph.output_values and v.id not in aliased_outputs for v in node.outputs)
            out.append((0 if reserved else graph.born(node), end + 1))
    return out


def written_into_outputs(graph: OpGraph, view: MemoryView, aliased_outputs: frozenset = frozenset()) -> set[int]:
    """Nodes whose buffer becomes a program output's: an elementwise op making a (not aliased)
    output writes it in place over an operand of the same shape and dtype that dies there
    (XLA fuses the chain or shares the buffer), and so on up an elementwise chain, so those
    operands live in the output's allocation, reserved all step (:func:`live_intervals`):
    e.g. the gradients an SGD update ``p - lr·g`` overwrites."""
    from .strategies.elementwise import ELEMENTWISE
    last = lambda v: view.ends.get(v, graph.last_use(v))  # noqa: E731
    out = set()
    for node in graph.nodes:
        if node.name not in ELEMENTWISE or len(node.outputs) != 1:
            continue
        o = node.outputs[0]
        if o.id not in graph.output_values or o.id in aliased_outputs:
            continue
        reader = node
        while reader is not None:  # one operand's buffer per op of the chain
            nxt = None
            for x in reader.operands:
                if not hasattr(x, "id") or x.shape != o.shape or str(x.dtype) != str(o.dtype):
                    continue
                u = graph.nodes[graph.producer[x.id][0]]
                if u.kind == "eqn" and x.id not in graph.output_values and last(x.id) == reader.index:
                    out.add(u.index)
                    nxt = u if u.name in ELEMENTWISE and len(u.outputs) == 1 else None
                    break
            reader = nxt
    return out


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


def fused_nodes(graph: OpGraph) -> set[int]:
    """Ops whose output XLA never materialises, so they hold no memory: a single-output op
    that is no program output and whose consumers all fit its primitive's registered
    :class:`~autopar.strategies.Fusion` (a broadcast read only by elementwise ops / reductions,
    a transpose read only by dots, a dot read only by one transpose). Measured in
    benchmarks/fidelity.py: on GPT they were 13 % of the predicted peak and 0 % of XLA's."""
    out = set()
    for node in graph.nodes:
        fusion = FUSION_RULES.get(node.name) if node.kind == "eqn" else None
        if fusion is None or len(node.outputs) != 1 or node.outputs[0].id in graph.output_values:
            continue
        users = graph.consumers.get(node.outputs[0].id, [])
        if users and all(graph.nodes[u].name in fusion.into for u, _ in users) \
                and (not fusion.single_consumer or len(users) == 1):
            out.add(node.index)
    return out


# XLA's elementwise ops it will not duplicate into several consumers (``IsExpensive`` in
# xla/service/instruction_fusion.cc): with more than one reader they are materialised.
EXPENSIVE = frozenset({"exp", "exp2", "expm1", "log", "log1p", "tanh", "logistic", "sin", "cos", "tan", "atan2",
                       "pow", "sqrt", "rsqrt", "cbrt", "erf", "erfc", "erf_inv", "lgamma", "digamma", "div", "rem"})
_NOT_FUSED = frozenset({"sharding_constraint", "stage_boundary", "threefry2x32", "random_fold_in"})


def barriers_survive_cse(platform: str) -> bool:
    """Whether ``jax.checkpoint``'s optimization barriers still stand when XLA runs CSE.

    Measured (jax 0.10.2, ``--xla_dump_hlo_pass_re=.*``): XLA:CPU runs
    ``cse_barrier_expander`` (``OptimizationBarrierExpander``: removes every opt-barrier) in
    ``HLO_passes_through_layout_assignment``, before the CSE of
    ``simplification_after_layout_assignment``; the recomputation of a remat'd layer then is
    the forward computation again and CSE merges them (``sgd(fwd_loop_remat)``: 27 dots before
    optimisation, 23 after, the same 23 as without ``jax.checkpoint``; compiled temporaries
    26.2 MB with and without remat). On GPU/TPU the barrier is expanded only after the last
    CSE, so the recomputation stays. ``platform``: "cpu", "gpu" or "tpu" (the cluster's
    device kind, ``MeshModel.device_kind``)."""
    return platform != "cpu"


@dataclass(frozen=True)
class MemoryView:
    free: set[int]           # nodes whose outputs XLA never materialises (fused, or CSE'd)
    ends: dict[int, int]     # value -> node index of its last read in XLA's program
    cse: dict[int, int]      # recomputed value -> the forward value CSE replaced it with


def memory_view(graph: OpGraph, platform: str, *, merge_recompute: bool = True) -> MemoryView:
    """What XLA materialises and until when, beyond program-order liveness of the jaxpr:

    * ``fused_nodes`` and :func:`elementwise_fused` hold no memory; an elementwise op fused
      into its readers is computed inside their fusion, so its operands are read there: their
      last use moves to the op's last reader.
    * :func:`remat_cse` (XLA:CPU only): a recomputed equation of a ``jax.checkpoint`` is
      merged with the forward one, whose value stays live until the recomputation's readers
      (not with ``merge_recompute`` off: the recomputation runs in another executable).
    * a scan body's value that is stacked into the loop's ys is written into the stacked
      buffer where it is made (``dynamic-update-slice`` fusion): its own buffer ends at its
      last other reader; :func:`sliced_in_place` slices hold nothing.
    """
    cse = {} if barriers_survive_cse(platform) or not merge_recompute else remat_cse(graph)
    merged = frozenset(node.index for node in graph.nodes if node.outputs and all(o.id in cse for o in node.outputs))
    chain = elementwise_fused(graph, cross_remat=not barriers_survive_cse(platform)) - merged
    free = fused_nodes(graph) | chain | merged | sliced_in_place(graph)
    # a merged equation is gone: it reads nothing; its readers read the forward value
    ends: dict[int, int] = {v: graph.last_use(v, merged) for v in graph.consumers} if merged else {}
    stacks = frozenset(node.index for node in graph.nodes if node.name == "scan_stack")
    for node in graph.nodes:  # written into its stacked ys as soon as it is made
        for o in node.outputs:
            if o.id not in graph.output_values and any(u in stacks for u, _ in graph.consumers.get(o.id, [])):
                ends[o.id] = graph.last_use(o.id, merged | stacks)
    end = lambda v: ends.get(v, graph.last_use(v))  # noqa: E731
    for node in reversed(graph.nodes):  # readers come after producers: their ends are final
        if node.index in chain:
            last = end(node.outputs[0].id)
            for x in node.operands:
                if hasattr(x, "id") and end(x.id) < last:
                    ends[x.id] = last
        for o in node.outputs:  # read after the merge (not only by other merged equations)
            read = o.id in graph.output_values or any(u not in merged for u, _ in graph.consumers.get(o.id, []))
            if o.id in cse and read and end(cse[o.id]) < end(o.id):
                ends[cse[o.id]] = end(o.id)
    return MemoryView(free, ends, cse)


def sliced_in_place(graph: OpGraph) -> set[int]:
    """A scan iteration's slice of its stacked ``xs`` read only by elementwise ops of the body:
    XLA fuses the dynamic-slice into their loop fusion and reads the stacked buffer in place
    (a slice a dot reads is copied out: ``dynamic-slice_bitcast_fusion`` in the buffer
    assignment)."""
    from .strategies.elementwise import ELEMENTWISE
    out = set()
    for node in graph.nodes:
        if node.name != "scan_slice":
            continue
        users = graph.consumers.get(node.outputs[0].id, [])
        if users and all(graph.nodes[u].name in ELEMENTWISE for u, _ in users):
            out.add(node.index)
    return out


def remat_cse(graph: OpGraph) -> dict[int, int]:
    """{output of a recomputed equation: the earlier value XLA's CSE replaces it with}: an
    equation of an inlined ``jax.checkpoint`` (``Eqn.remat``) with the primitive, parameters
    and operands (after earlier replacements) of an earlier equation. Only where the barriers
    are gone before CSE (:func:`barriers_survive_cse`)."""
    alias: dict[int, int] = {}
    seen: dict[tuple, list] = {}
    for node, sig in zip(graph.nodes, graph.signatures):
        if node.kind != "eqn" or node.name in _NOT_FUSED:
            continue
        ops = tuple(("lit", repr(x.val)) if not hasattr(x, "id") else alias.get(x.id, x.id) for x in node.operands)
        key = (sig, ops, node.eqn.scope)
        if node.eqn.remat is not None and key in seen:
            for o, p in zip(node.outputs, seen[key]):
                alias[o.id] = p.id
        else:
            seen.setdefault(key, node.outputs)
    return alias


def combinable_nodes(graph: OpGraph) -> frozenset[int]:
    """Ops whose all-reduces XLA's all-reduce combiner may merge with others into one op
    (``ClusterSpec.combine_all_reduces``): outside loops, and none of their results reaches a
    dot or convolution, so no later matmul waits for them (weight gradients on their way to the
    update, the loss) — they are independent of one another."""
    heavy = {"dot_general", "ragged_dot_general", "conv_general_dilated"}
    reaches = [False] * len(graph.nodes)
    for node in reversed(graph.nodes):   # readers come after producers
        reaches[node.index] = any(graph.nodes[u].name in heavy or reaches[u]
                                  for o in node.outputs for u, _ in graph.consumers.get(o.id, []))
    return frozenset(n.index for n in graph.nodes if n.kind == "eqn" and n.repeat == 1 and not reaches[n.index])


def _elementwise_names() -> frozenset:
    from .strategies.elementwise import ELEMENTWISE
    return frozenset(ELEMENTWISE) - _NOT_FUSED


def _fusable(graph: OpGraph, elementwise: frozenset):
    """(node, its readers) of every one-output elementwise op that XLA may fuse into its
    readers: read at all, not a program output, and an expensive op (``EXPENSIVE``) read once."""
    for node in graph.nodes:
        if node.kind != "eqn" or node.name not in elementwise or len(node.outputs) != 1:
            continue
        v = node.outputs[0].id
        users = {u for u, _ in graph.consumers.get(v, [])}
        if users and v not in graph.output_values and not (node.name in EXPENSIVE and len(users) > 1):
            yield node, users


def traffic_fused(graph: OpGraph) -> frozenset[int]:
    """Ops whose output XLA keeps inside its readers' loop fusion, for compute time
    (``ClusterSpec.fuse_elementwise``): :func:`fused_nodes`, and every elementwise op whose
    readers are all elementwise ops of the same scope and scan (an expensive one, ``EXPENSIVE``:
    one reader), no program output. Its output is never written and its readers never read it
    from memory; a chain costs what it reads from outside and what it writes at its end.
    Unlike :func:`elementwise_fused` (memory) it does not ask whether the chain frees memory."""
    elementwise = _elementwise_names()
    out = set(fused_nodes(graph))
    for node, users in _fusable(graph, elementwise):
        if all(graph.nodes[u].name in elementwise and graph.nodes[u].eqn.scope == node.eqn.scope
               and graph.nodes[u].repeat == node.repeat for u in users):
            out.add(node.index)
    return frozenset(out)


def elementwise_fused(graph: OpGraph, *, cross_remat: bool = True) -> set[int]:
    """Elementwise ops XLA computes inside their readers' loop fusion, never materialised: one
    output, no program output, every reader elementwise in the same scan body
    (XLA fuses producers into consumers however far apart they are in program order), and, if
    the op is expensive (``EXPENSIVE``), one reader (XLA does not duplicate it). A reader in
    another ``jax.checkpoint`` group reads through an optimization barrier and cannot fuse it,
    unless the barriers are gone (``cross_remat``, XLA:CPU).

    Measured: tanh's derivative ``1 - t`` and ``g·(1 - t)`` (jax's jvp of tanh), computed in
    the forward pass and read in the backward, are one ``multiply_add_fusion`` with the
    backward's ``add_any`` reading ``tanh`` and the dot (``sgd(fwd_loop)``, 4 layers of
    2048×128 → 512, mesh (8,)); charged value by value they were 2.1 MB of the predicted
    8.03 MB, which XLA never holds (compiled peak 6.68 MB)."""
    elementwise = _elementwise_names()
    # not into reductions: XLA:CPU fuses into a reduce only when it reduces the minor-most dim
    # (cpu_instruction_fusion.cc); counting every reduce as a fusion (jax's −x read by a
    # reduce_sum in the backward) predicted MoE 15.5 % low (benchmarks/fidelity.py --quick)
    readers_ok = elementwise
    out = set()
    for node, users in _fusable(graph, elementwise):
        v = node.outputs[0].id
        # only where it frees memory: every array operand is live until the op's last reader
        # anyway. Without this condition (every elementwise op read only by elementwise ops
        # charged none, its operands extended) benchmarks/fidelity.py --quick went from +0.2 % to
        # −12.6 % on GPT (8) and from −12.4 % to −17.8 % on MoE: XLA materialises some of
        # those chains (which, not yet found).
        last = graph.last_use(v)
        ok = all(not hasattr(x, "id") or int(np.prod(x.shape)) <= 1 or graph.last_use(x.id) >= last
                 for x in node.operands)
        for u in users:
            r = graph.nodes[u]
            if r.name not in readers_ok or r.eqn.scope != node.eqn.scope or r.repeat != node.repeat:
                ok = False
            elif not cross_remat and r.eqn.remat is not None and r.eqn.remat != node.eqn.remat:
                ok = False
        if ok:
            out.add(node.index)
    return out
