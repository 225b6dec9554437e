"""Run a single-mesh plan: the program replayed with its constraints under ``jax.jit``."""
from __future__ import annotations

import jax

from .emit import interpret, make_mesh, named
from .trace import trace


class PlanMismatchError(ValueError):
    """The function or arguments differ from the ones the plan was made for."""


def _abstract(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") and hasattr(x, "dtype") else x


class ShardedFunction:
    """Callable returned by ``Plan.apply``: same signature as the planned function."""

    def __init__(self, plan, fn, devices=None):
        self.plan = plan
        self.fn = fn
        self.mesh = make_mesh(plan.mesh_shape, plan.axis_names, devices)
        self.in_shardings = [named(self.mesh, s) for s in plan.input_specs_flat]
        self._cache: dict = {}

    def _compiled_for(self, args):
        flat, tree = jax.tree_util.tree_flatten(args)
        key = (tree, tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x)))) for x in flat))
        hit = self._cache.get(key)
        if hit is not None:
            return hit, flat
        program = trace(self.fn, *jax.tree_util.tree_map(_abstract, args))
        if program.fingerprint != self.plan.fingerprint:
            raise PlanMismatchError(
                f"plan was made for {self.plan.function} (fingerprint {self.plan.fingerprint}) but the function/"
                f"arguments given trace to a different program (fingerprint {program.fingerprint}); "
                f"input shapes planned: {self.plan.input_shapes}. Re-plan with these arguments.")
        out_specs = {e.index: e.out_specs for e in self.plan.eqns}
        in_specs = {(e.index, k): s for e in self.plan.eqns for k, s in e.reshard_inputs.items()}
        body = interpret(program, out_specs, in_specs, self.mesh)
        out_shardings = [named(self.mesh, s if s is not None else []) for s in self.plan.output_specs_flat]
        jitted = jax.jit(body, in_shardings=self.in_shardings, out_shardings=out_shardings,
                         donate_argnums=tuple(self.plan.donated_inputs))
        self._cache[key] = (jitted, program.out_tree)
        return self._cache[key], flat

    def __call__(self, *args):
        (jitted, out_tree), flat = self._compiled_for(args)
        return jax.tree_util.tree_unflatten(out_tree, jitted(*flat))

    def lower(self, *args):
        """``jax.stages.Lowered`` of the sharded program (for ``.compile().as_text()``)."""
        (jitted, _), flat = self._compiled_for(args)
        return jitted.lower(*[_abstract(x) for x in flat])

    def shard_inputs(self, *args):
        """Global arrays with the planned input shardings, built from host data that every
        process holds in full (works under ``jax.distributed`` with several processes)."""
        import numpy as np
        flat, tree = jax.tree_util.tree_flatten(args)
        out = []
        for x, s in zip(flat, self.in_shardings):
            host = np.asarray(x)
            out.append(jax.make_array_from_callback(host.shape, s, lambda idx, h=host: h[idx]))
        return jax.tree_util.tree_unflatten(tree, out)


def apply_plan(plan, fn, *, devices=None) -> ShardedFunction:
    return ShardedFunction(plan, fn, devices)
