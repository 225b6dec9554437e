"""What XLA makes of a traced program beyond its jaxpr, for the node terms
(``autopar.build_nodes``): the ops it fuses away (never materialised), the recomputation of a
``jax.checkpoint`` its CSE merges back into the forward (XLA:CPU), how long each buffer lives
in its program (``MemoryView``, ``live_intervals``), the outputs written in place over their
operands, and the all-reduces its combiner may merge.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import OpGraph
from .strategies import FUSION_RULES


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
