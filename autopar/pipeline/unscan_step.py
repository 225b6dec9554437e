"""The user-facing step over a scanned layer stack split per iteration
(``autopar.pipeline.unscan``): the stages run the split form — each stacked parameter leaf a
list of per-iteration slices, each slice owned by the stage running its iteration.

* :class:`SplitStep` (``tplan.apply()``) takes and returns the user's stacked form: slices cut
  per step, the updated slices (and their optimizer state) stacked again on one device;
* ``tplan.apply(stacked=False)`` returns the stages' own step, which takes and returns the
  split form (nothing gathered: what a full-size model needs, and what runs under
  ``jax.distributed``), with :class:`SplitForms` converting a tree between the two forms
  (``step.split(tree)`` / ``step.stack(tree)``);
* :func:`check_split_optimizer` refuses an optimizer whose update of a stacked leaf differs
  from its slices' (lamb, adafactor).
"""
from __future__ import annotations

import jax
import numpy as np

from .unscan import ScanSplit, _matches, join_leaves, map_param_subtrees, split_tree


def check_split_optimizer(optimizer, split: ScanSplit, user_def, user_leaves) -> None:
    """Raise ``ValueError`` unless ``optimizer`` updates a stacked leaf as it updates each of
    its slices apart — the split form the stages run (``optax.lamb``'s trust ratio, a norm of
    the whole leaf, is not). Checked by running both forms for two steps on a small stand-in of
    the parameters (every dimension cut to at most 3, stacks to 2 slices, float32 normals)."""
    rng = np.random.default_rng(0)
    small = ScanSplit(stacked=split.stacked, lengths=(2,) * len(split.stacked))
    n = small.length_of()
    shapes = [((2,) if i in n else ()) + tuple(min(int(d), 3) for d in x.shape[1 if i in n else 0:])
              for i, x in enumerate(user_leaves)]

    def draw():
        return [rng.standard_normal(s).astype(np.float32) for s in shapes]
    params = draw()
    state = optimizer.init(user_def.unflatten(params))
    split_def = jax.tree_util.tree_structure(split_tree(small, user_def, params))
    to_split = lambda leaves: split_tree(small, user_def, leaves)  # noqa: E731
    split_state = map_param_subtrees(to_split, state, user_def, shapes)
    split_shapes = [tuple(x.shape) for x in split_def.flatten_up_to(to_split(params))]
    for _ in range(2):
        grads = draw()
        try:
            upd, state = optimizer.update(user_def.unflatten(grads), state, user_def.unflatten(params))
            s_upd, split_state = optimizer.update(to_split(grads), split_state, to_split(params))
            joined = join_leaves(small, user_def, split_def.flatten_up_to(s_upd))
            state_back = map_param_subtrees(lambda leaves: user_def.unflatten(join_leaves(small, user_def, leaves)),
                                            split_state, split_def, split_shapes)
        except Exception as err:
            raise ValueError(
                f"the optimizer cannot update the scanned layer stack's parameters split per layer ({type(err).__name__}: "
                f"{err}): its state is not kept in subtrees shaped like the parameters (e.g. adafactor's factored "
                "moments). Plan with split_scans=False (each scan whole in one stage) or use an optimizer such as "
                "adam, adamw, sgd or lion") from err
        want = user_def.flatten_up_to(upd)
        bad = [i for i, (a, b) in enumerate(zip(want, joined))
               if not np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)]
        if bad or jax.tree_util.tree_structure(state_back) != jax.tree_util.tree_structure(state):
            paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(upd)[0]]
            path = paths[bad[0]] if bad else "its state"
            raise ValueError(
                f"the optimizer's update of a scanned layer stack's parameter ({path}) differs when the stack is split "
                "per layer, as the pipeline stages run it: it treats the stacked leaf as one array (e.g. optax.lamb's "
                "trust ratio, a norm of the whole leaf). Plan with split_scans=False (each scan whole in one stage) or "
                "use an optimizer acting elementwise or over all parameters (adam, adamw, sgd, lion, "
                "clip_by_global_norm)")
        params = [np.asarray(p) + np.asarray(u) for p, u in zip(params, want)]


class SplitStep:
    """A pipeline step over split parameters, called with (and returning) the user's stacked
    form: ``step(params, opt_state, batch) -> (params, opt_state, loss)``. Stacked leaves are
    sliced for the stages each step and the updated slices stacked again on ``device``."""

    def __init__(self, inner, split: ScanSplit, user_def, user_shapes, device):
        self.inner, self.split, self.user_def, self.device = inner, split, user_def, device
        self.user_shapes = [tuple(s) for s in user_shapes]
        self.split_def = inner.p_tree
        self.split_shapes = [tuple(s) for s in inner.plan.param_shapes]

    @property
    def split_update(self):
        """The stages' optimizer update in rounds, if it crosses stages (``PipelineStep``)."""
        return self.inner.split_update

    def _check(self, params):
        from ..runtime import PlanMismatchError
        if not _matches(params, self.user_def, self.user_shapes):
            raise PlanMismatchError(
                f"params do not match the plan: planned structure {self.user_def} with shapes {self.user_shapes}; "
                "re-plan with plan_training for these params")

    def evaluate(self, params, batch):
        """The loss through the stages, forward only (``PipelineStep.evaluate``)."""
        self._check(params)
        return self.inner.evaluate(split_tree(self.split, self.user_def, self.user_def.flatten_up_to(params)), batch)

    def __call__(self, params, opt_state, batch):
        self._check(params)

        def to_split(leaves):
            return split_tree(self.split, self.user_def, leaves)

        def to_user(leaves):
            return self.user_def.unflatten(join_leaves(self.split, self.user_def, leaves, self.device))
        p, o, loss = self.inner(to_split(self.user_def.flatten_up_to(params)),
                                map_param_subtrees(to_split, opt_state, self.user_def, self.user_shapes), batch)
        return (to_user(self.split_def.flatten_up_to(p)),
                map_param_subtrees(to_user, o, self.split_def, self.split_shapes), loss)


class SplitForms:
    """Convert a tree between the user's stacked form and the split form the stages run: the
    parameters, or an optimizer state (its subtrees shaped like the parameters: Adam's mu/nu …;
    other leaves such as step counts kept)."""

    def __init__(self, split: ScanSplit, user_def, user_shapes):
        self.scan_split, self.user_def = split, user_def
        self.user_shapes = [tuple(s) for s in user_shapes]
        abstract = [jax.ShapeDtypeStruct(s, np.float32) for s in self.user_shapes]
        split_abs = split_tree(split, user_def, abstract)
        self.split_def = jax.tree_util.tree_structure(split_abs)
        self.split_shapes = [tuple(x.shape) for x in jax.tree_util.tree_leaves(split_abs)]

    def split(self, tree):
        """Stacked form → split form (slices of the arrays given, where they live)."""
        return map_param_subtrees(lambda leaves: split_tree(self.scan_split, self.user_def, leaves), tree,
                                  self.user_def, self.user_shapes)

    def stack(self, tree):
        """Split form → stacked form, as host (numpy) arrays — e.g. to save a checkpoint (in a
        multi-process job, read the tree with ``multistep.to_host`` first)."""
        n = self.scan_split.length_of()

        def join(leaves):
            host, out, k = [np.asarray(jax.device_get(x)) for x in leaves], [], 0
            for i in range(self.user_def.num_leaves):
                out.append(np.stack(host[k:k + n[i]]) if i in n else host[k])
                k += n.get(i, 1)
            return self.user_def.unflatten(out)
        return map_param_subtrees(join, tree, self.split_def, self.split_shapes)
