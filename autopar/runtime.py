"""Run a single-mesh plan: the program replayed with its constraints under ``jax.jit``."""
from __future__ import annotations

import warnings

import jax

from .emit import interpret, make_mesh, named
from .pytree_json import leaf_paths
from .trace import trace


class PlanMismatchError(ValueError):
    """The function or arguments differ from the ones the plan was made for."""


class ReshardWarning(UserWarning):
    """``Plan.apply`` moved arguments into the plan's input layouts before the call (e.g. a
    training loop feeding back outputs laid out otherwise)."""


def _abstract(x):
    """An array as a ShapeDtypeStruct (weak type kept: it changes the traced program); other leaves as they are."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=bool(getattr(x, "weak_type", False)))
    return x


def abstract_args(args) -> tuple:
    """Example arguments as ``jax.ShapeDtypeStruct`` pytrees (to re-trace without the data)."""
    return jax.tree_util.tree_map(_abstract, tuple(args))


def mismatch_message(plan, program, paths) -> str:
    """Why ``program`` (the function traced on the arguments given) is not the planned one:
    the leaves whose shape or dtype differ, side by side, else a different function."""
    given = [(tuple(program.values[v].shape), str(program.values[v].dtype)) for v in program.invars]
    planned = [(tuple(s), d) for s, d in zip(plan.input_shapes, plan.input_dtypes or [None] * len(plan.input_shapes))]
    head = f"the plan was made for {plan.function} with other arguments or another function: "
    fix = " Re-plan with these arguments (autopar.plan), or pass the arguments the plan was made for."
    if len(given) != len(planned):
        return (head + f"it has {len(planned)} input leaves, the arguments given have {len(given)}; planned "
                f"shapes {[s for s, _ in planned]}, given {[s for s, _ in given]}." + fix)
    paths = paths or [f"[{i}]" for i in range(len(given))]
    rows = [(p, g, w) for p, g, w in zip(paths, given, planned) if g[0] != w[0] or (w[1] and g[1] != w[1])]
    if not rows:
        return (head + f"the arguments have the planned shapes and dtypes, but the function traces to another "
                f"program (fingerprint {program.fingerprint}, planned {plan.fingerprint}): a different function, "
                "or different static values/closures." + " Re-plan with this function.")
    width = max(len(p) for p, _, _ in rows)
    lines = [f"  {p:<{width}}  planned {w[0]} {w[1] or '?'}  given {g[0]} {g[1]}" for p, g, w in rows[:12]]
    more = f"\n  … and {len(rows) - 12} more" if len(rows) > 12 else ""
    return head + f"{len(rows)} argument leaves differ:\n" + "\n".join(lines) + more + "\n" + fix.strip()


class ShardedFunction:
    """Callable returned by ``Plan.apply``: same signature as the planned function."""

    def __init__(self, plan, fn, devices=None):
        self.plan = plan
        self.fn = fn
        self.mesh = make_mesh(plan.mesh_shape, plan.axis_names, devices)
        self.in_shardings = [named(self.mesh, s) for s in plan.input_specs_flat]
        self._cache: dict = {}
        self._warned: set = set()
        self._in_paths = None

    def _compiled_for(self, args):
        flat, tree = jax.tree_util.tree_flatten(args)
        if self._in_paths is None:
            self._in_paths = leaf_paths(tree)
        key = (tree, tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x)))) for x in flat))
        hit = self._cache.get(key)
        if hit is not None:
            return hit, flat
        program = trace(self.fn, *jax.tree_util.tree_map(_abstract, args))
        if program.fingerprint != self.plan.fingerprint:
            raise PlanMismatchError(mismatch_message(self.plan, program, self._in_paths))
        out_specs = {e.index: e.out_specs for e in self.plan.eqns}
        in_specs = {(e.index, k): s for e in self.plan.eqns for k, s in e.reshard_inputs.items()}
        body = interpret(program, out_specs, in_specs, self.mesh, materialized=self.plan.materialized)
        out_shardings = [named(self.mesh, s if s is not None else []) for s in self.plan.output_specs_flat]
        jitted = jax.jit(body, in_shardings=self.in_shardings, out_shardings=out_shardings,
                         donate_argnums=tuple(self.plan.donated_inputs))
        self._cache[key] = (jitted, program.out_tree)
        return self._cache[key], flat

    def __call__(self, *args):
        (jitted, out_tree), flat = self._compiled_for(args)
        flat = self.conform(flat)
        try:
            out = jitted(*flat)
        except ValueError as err:
            if "does not match the sharding" not in str(err):
                raise
            raise PlanMismatchError(  # conform() should have prevented it: say what to do, not XLA's words
                f"an argument of {self.plan.function} is not laid out as the plan expects and could not be "
                f"moved ({err}); pass host arrays or arrays on the plan's devices") from None
        return jax.tree_util.tree_unflatten(out_tree, out)

    def conform(self, flat: list) -> list:
        """``flat`` with every committed array whose sharding differs from the plan's input
        sharding moved into it (``jax.device_put``), so ``jit`` never rejects a fed-back
        output. One :class:`ReshardWarning` per set of moved leaves names them and the
        predicted time of the moves."""
        out, moved = list(flat), []
        for i, (x, want) in enumerate(zip(flat, self.in_shardings)):
            if isinstance(x, jax.Array) and x.committed and not x.sharding.is_equivalent_to(want, x.ndim):
                moved.append((i, x.sharding))
                out[i] = jax.device_put(x, want)
        if moved and tuple(i for i, _ in moved) not in self._warned:
            self._warned.add(tuple(i for i, _ in moved))
            warnings.warn(self._reshard_message(flat, moved), ReshardWarning, stacklevel=3)
        return out

    def _reshard_message(self, flat, moved) -> str:
        from autopar.cost import mesh_model, resharding

        from .emit import to_pspec
        from .report import _time
        paths = self._in_paths or [f"[{i}]" for i in range(len(flat))]
        mesh = mesh_model(self.plan.cluster, self.plan.nodes, tuple(self.plan.mesh_shape))
        names = list(self.plan.axis_names)
        total, parts = 0.0, []
        for i, src in moved:
            dst_names = self.plan.input_specs_flat[i]
            dst = tuple(tuple(names.index(a) for a in axes) for axes in dst_names)
            x = flat[i]
            if isinstance(src, jax.sharding.NamedSharding) and src.mesh == self.mesh:
                spec = tuple(src.spec) + (None,) * (x.ndim - len(src.spec))
                axes = [() if p is None else (p,) if isinstance(p, str) else tuple(p) for p in spec]
                src_spec = tuple(tuple(names.index(a) for a in ax) for ax in axes)
                src_text = str(src.spec)
            else:  # another device set: priced as a gather of the whole value, then a slice
                src_spec = tuple(() for _ in range(x.ndim))
                src_text = type(src).__name__
            total += resharding(mesh, tuple(x.shape), x.dtype.itemsize, src_spec, dst)[0]
            parts.append(f"{paths[i]} {src_text} -> {to_pspec(dst_names)}")
        return (f"autopar: {self.plan.function}: moved {len(moved)} argument leaves into the plan's input layouts "
                f"before the call (predicted {_time(total)} per call): {'; '.join(parts)}. This happens when a "
                "loop feeds back outputs laid out otherwise; the plan's report shows the layouts.")

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
