"""Plan decisions → JAX objects: meshes, PartitionSpecs, NamedShardings and the function
re-interpreted with ``with_sharding_constraint`` on every planned value.

This is the only module that turns specs into ``jax.sharding`` objects.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .graph import is_constant_broadcast
from .trace import Lit, Program

AXIS_NAMES = ("x", "y", "z")


class MeshError(ValueError):
    """The plan's mesh cannot be built on the visible devices."""


def axis_names(ndim: int) -> tuple[str, ...]:
    return AXIS_NAMES[:ndim]


def make_mesh(mesh_shape: Sequence[int], names: Sequence[str], devices=None) -> Mesh:
    """A mesh with Auto axes (``with_sharding_constraint`` needs them) over ``devices``."""
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(mesh_shape)
    if len(devices) < need:
        raise MeshError(
            f"the plan needs {need} devices for mesh {tuple(mesh_shape)} but JAX sees {len(devices)} "
            f"({devices[0].platform if devices else 'none'}); plan for the devices you have, or on CPU set "
            "JAX_NUM_CPU_DEVICES / jax.config.update('jax_num_cpu_devices', N) before JAX starts"
        )
    return Mesh(np.array(devices[:need]).reshape(tuple(mesh_shape)), tuple(names))


def to_pspec(spec_names: Sequence[Sequence[str]]) -> PartitionSpec:
    """[["x"], [], ["x", "y"]] → PartitionSpec("x", None, ("x", "y"))."""
    parts = []
    for axes in spec_names:
        axes = tuple(axes)
        parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while parts and parts[-1] is None:
        parts.pop()
    return PartitionSpec(*parts)


def named(mesh: Mesh, spec_names) -> NamedSharding:
    return NamedSharding(mesh, to_pspec(spec_names))


def interpret(program: Program, out_specs: dict[int, list], in_specs: dict[tuple[int, int], list], mesh: Mesh):
    """A function of the flat inputs that replays ``program`` with sharding constraints.

    ``out_specs[eqn_index]``: spec (axis names per dim) of each output; ``in_specs[(eqn, k)]``:
    spec operand k is resharded to before the equation (only where it differs). A constant
    broadcast (``graph.is_constant_broadcast``) is not resharded but recomputed in that spec.
    """
    wsc = jax.lax.with_sharding_constraint
    constants = {e.outputs[0]: e for e in program.eqns if is_constant_broadcast(e)}

    def run(*flat_args):
        env = dict(zip(program.invars, flat_args))
        env.update(program.consts)

        def read(x):
            return x.val if isinstance(x, Lit) else env[x]

        for i, eqn in enumerate(program.eqns):
            ins = [read(x) for x in eqn.inputs]
            for k in range(len(ins)):
                spec = in_specs.get((i, k))
                if spec is not None:
                    src = constants.get(eqn.inputs[k]) if not isinstance(eqn.inputs[k], Lit) else None
                    if src is not None:
                        ins[k] = src.prim.bind(*[read(x) for x in src.inputs], **src.prim.get_bind_params(src.params))
                    ins[k] = wsc(ins[k], named(mesh, spec))
            outs = eqn.prim.bind(*ins, **eqn.prim.get_bind_params(eqn.params))
            if not eqn.prim.multiple_results:
                outs = [outs]
            specs = out_specs.get(i)
            for k, (o, val) in enumerate(zip(eqn.outputs, outs)):
                if specs is not None and specs[k] is not None and hasattr(val, "shape"):
                    val = wsc(val, named(mesh, specs[k]))
                env[o] = val
        return [read(x) for x in program.outvars]

    return run
