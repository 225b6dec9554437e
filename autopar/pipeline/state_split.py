"""How a pipeline step's optimizer state splits over its stages (``PipelineStep``): each
stage's skeleton — ``optimizer.init`` of the parameters it owns, None for the others — lined
up with the full state by key path, the stage each state leaf is returned from, the stages
keeping a copy of it, and the parameter leaf each state leaf mirrors (Adam's mu/nu: laid out
as that parameter's state). Shapes only: no devices."""
from __future__ import annotations

import jax


def _is_none(x) -> bool:
    return x is None


class StateSplit:
    """The optimizer state of ``params_abs`` (a ``p_tree``) split over ``num_stages`` stages,
    parameter leaf i owned by stage ``own[i]`` (see the module docstring)."""

    def __init__(self, optimizer, p_tree, params_abs, own: list[int], num_stages: int):
        flat_abs = jax.tree_util.tree_leaves(params_abs)
        self.masked_abs = [p_tree.unflatten([x if own[i] == k else None for i, x in enumerate(flat_abs)])
                           for k in range(num_stages)]
        self.full_abs = jax.eval_shape(optimizer.init, params_abs)
        self.leaves_abs, self.tree = jax.tree_util.tree_flatten(self.full_abs)
        # a stage's skeleton (the state of its params, the others None) lines up with the full
        # state by key path: ``slots[j]``, the position of full leaf j among the skeleton's leaves
        # flattened with None as a leaf (None: the stage has no such leaf). Paths, not positions:
        # a wrapper may mark a missing leaf differently (optax.masked: MaskedNode in the full
        # state, None in a skeleton)
        full_paths = [tuple(path) for path, _ in jax.tree_util.tree_flatten_with_path(self.full_abs)[0]]
        self.skeletons = []
        for masked in self.masked_abs:
            skel = jax.eval_shape(optimizer.init, masked)
            with_none, tree = jax.tree_util.tree_flatten_with_path(skel, is_leaf=_is_none)
            at = {tuple(path): pos for pos, (path, x) in enumerate(with_none) if x is not None}
            slots = [at.get(path) for path in full_paths]
            leaves = [None if n is None else with_none[n][1] for n in slots]
            if len(at) != sum(n is not None for n in slots) or any(
                    s is not None and (tuple(s.shape) != tuple(g.shape) or s.dtype != g.dtype)
                    for s, g in zip(leaves, self.leaves_abs)):
                raise ValueError(
                    "the optimizer state does not split per parameter (optimizer.init of some of the params "
                    "makes leaves the state of all of them does not have); pipeline plans need optax optimizers "
                    "whose state is kept per parameter, such as sgd, momentum, adam or adamw, alone, chained "
                    "(clip_by_global_norm …), masked or partitioned (optax.multi_transform)")
            self.skeletons.append((leaves, tree, slots))
        # the stages keeping a copy of each state leaf; a step count (or other leaf not
        # mirroring a param) is returned from its first stage
        self.stages = [{k for k, (sk, _, _) in enumerate(self.skeletons) if sk[j] is not None}
                       for j in range(len(self.leaves_abs))]
        self.home = [min(ks, default=0) for ks in self.stages]
        shapes = [tuple(x.shape) for x in flat_abs]
        self.mirrors = [self._mirrors(k, p_tree, own, shapes) for k in range(num_stages)]

    def full(self, leaves, k: int):
        """Stage k's optimizer-state leaves (one per leaf of the full state) → its skeleton tree."""
        _, skel_tree, slots = self.skeletons[k]
        full = [None] * skel_tree.num_leaves
        for n, x in zip(slots, leaves):
            if n is not None:
                full[n] = x
        return skel_tree.unflatten(full)

    def _mirrors(self, k: int, p_tree, own, shapes) -> list[int]:
        """For each leaf of stage k's optimizer-state skeleton: the param leaf it mirrors
        (a subtree shaped like the masked params, e.g. Adam's mu/nu), else −1 (step counts)."""
        ptree = jax.tree_util.tree_structure(self.masked_abs[k])
        index_tree = p_tree.unflatten([i if own[i] == k else None for i in range(len(own))])
        leaves, _, slots = self.skeletons[k]
        skel_abs = self.full(leaves, k)

        def visit(sub):
            if sub is not None and jax.tree_util.tree_structure(sub) == ptree:
                return index_tree
            return jax.tree_util.tree_map(lambda _: -1, sub)
        marked = jax.tree_util.tree_map(visit, skel_abs, is_leaf=lambda t: t is None or
                                        jax.tree_util.tree_structure(t) == ptree)
        flat = jax.tree_util.tree_flatten(marked, is_leaf=_is_none)[0]
        flat = [None if n is None else flat[n] for n in slots]
        out = []
        for i, leaf in zip(flat, leaves):
            ok = leaf is not None and isinstance(i, int) and i >= 0 and tuple(leaf.shape) == shapes[i]
            out.append(i if ok else -1)
        return out
