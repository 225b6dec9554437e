"""``autopar.stage_boundary(x)``: a pipeline-stage marker that is the identity in JAX
semantics (forward, gradient, vmap, jit) and shows up in the traced program as the
``stage_boundary`` primitive, so layer clustering can cut there."""
from __future__ import annotations

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

stage_boundary_p = Primitive("stage_boundary")
stage_boundary_p.def_impl(lambda x: x)
stage_boundary_p.def_abstract_eval(lambda x: x)
ad.deflinear2(stage_boundary_p, lambda ct, x: [stage_boundary_p.bind(ct)])
batching.defvectorized(stage_boundary_p)
mlir.register_lowering(stage_boundary_p, lambda ctx, x: [x])


def stage_boundary(tree):
    """Mark the end of a pipeline stage; returns ``tree`` unchanged (any pytree of arrays)."""
    return jax.tree_util.tree_map(stage_boundary_p.bind, tree)
