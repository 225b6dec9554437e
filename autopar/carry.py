"""Loop-carried values: the outputs a training loop feeds back as the next call's inputs.

``params, loss = step(params, x)`` called twice passes the first call's outputs, laid out as
the plan's *output* specs, where the plan expects its *input* specs. ``carried_pairs`` finds
those (input leaf, output leaf) pairs from the pytree paths; the planner charges each pair
the resharding of the output into the input's layout (``build_problem(carried=…)``), so the
solver keeps them equal unless differing pays, and ``Plan.apply`` reshards what still differs
before the call (``runtime.conform``).
"""
from __future__ import annotations

import jax


def _keys(treedef) -> list[tuple]:
    n = treedef.num_leaves
    try:
        return [tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(treedef.unflatten(list(range(n))))[0]]
    except Exception:
        return [(i,) for i in range(n)]


def carried_pairs(program, exclude_inputs=(), exclude_outputs=()) -> list[tuple[int, int]]:
    """(flat input leaf, flat output leaf) pairs a loop feeds back: same shape and dtype, and
    the same pytree path (``step(params, x) -> (params, loss)``: ``[0]['w']`` → ``[0]['w']``),
    or, for a tuple of outputs, the same path below the argument (``step(x, params) ->
    (params, loss)``: ``[1]['w']`` → ``[0]['w']``) where that match is unique. Donated pairs
    (``exclude_*``) are already tied by their alias constraint."""
    if program.in_tree is None or program.out_tree is None:
        return []
    ins, outs = _keys(program.in_tree), _keys(program.out_tree)
    if len(ins) != len(program.invars) or len(outs) != len(program.outvars):
        return []

    def same_value(i: int, k: int) -> bool:
        o = program.outvars[k]
        if not isinstance(o, int):
            return False
        a, b = program.values[program.invars[i]], program.values[o]
        return a.shape == b.shape and str(a.dtype) == str(b.dtype)

    free_in = [i for i in range(len(ins)) if i not in set(exclude_inputs)]
    free_out = [k for k in range(len(outs)) if k not in set(exclude_outputs)]
    pairs, used_in, used_out = [], set(), set()
    by_path = {ins[i]: i for i in free_in}
    for k in free_out:
        i = by_path.get(outs[k])
        if i is not None and same_value(i, k):
            pairs.append((i, k))
            used_in.add(i)
            used_out.add(k)
    if program.out_tree.node_data() is not None and program.out_tree.node_data()[0] in (tuple, list):
        tails: dict[tuple, list[int]] = {}
        for i in free_in:
            if i not in used_in and ins[i][1:]:
                tails.setdefault(ins[i][1:], []).append(i)
        for k in free_out:
            cands = [i for i in tails.get(outs[k][1:], []) if same_value(i, k)] if k not in used_out else []
            if len(cands) == 1 and cands[0] not in used_in:
                pairs.append((cands[0], k))
                used_in.add(cands[0])
    return sorted(pairs)
