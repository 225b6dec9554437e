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
from .trace import SCAN_BOUNDARY, Lit, Program

AXIS_NAMES = ("x", "y", "z")

# Primitives whose split strategies XLA's SPMD partitioner does not keep local: it all-gathers
# a top_k's operand whatever its sharding (measured on CPU, jax 0.10, TopK custom call and
# sort-based alike). Their rules split only dims the op is independent along, with one spec
# for the operand and every output; ``interpret`` binds them under ``shard_map`` in that spec,
# so each device runs the primitive on its own shard (no collective, the same values).
PER_SHARD = frozenset({"top_k"})


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


def interpret(program: Program, out_specs: dict[int, list], in_specs: dict[tuple[int, int], list], mesh: Mesh,
              materialized: dict[int, list] | None = None, custom_calls: bool = False):
    """A function of the flat inputs that replays ``program`` with sharding constraints.

    ``out_specs[eqn_index]``: spec (axis names per dim) of each output; ``in_specs[(eqn, k)]``:
    spec operand k is resharded to before the equation (only where it differs);
    ``materialized[value]``: a spec the value is converted into once, right after it is
    produced, for all its readers (``autopar.build_shared``). A constant
    broadcast (``graph.is_constant_broadcast``) is not resharded but recomputed in that spec.
    An expanded scan (``trace.Region``) is replayed as a ``lax.scan`` whose body carries its
    equations' constraints, so the loop stays a loop (compile time does not grow with the
    trip count). ``custom_calls``: an inlined ``custom_jvp`` / ``custom_vjp`` / ``jax.checkpoint``
    call (``trace.CustomCall``) is bound as the call it was, so differentiating the replay uses
    the user's derivative rule or recomputes as the checkpoint's policy says (a pipeline stage's
    forward; its equations then get no constraints: give it no specs). A checkpoint the block
    holds only part of (a stage boundary inside it) is replayed equation by equation.
    """
    wsc = jax.lax.with_sharding_constraint
    constants = {e.outputs[0]: e for e in program.eqns if is_constant_broadcast(e)}

    shared = materialized or {}

    def constrain(val, spec):
        return wsc(val, named(mesh, spec)) if spec is not None and hasattr(val, "shape") else val

    def produced(vid, val, spec):
        """``val`` as value ``vid`` is kept: in its spec, then in its shared spec if any."""
        return constrain(constrain(val, spec), shared.get(vid))

    def operand(i, k, x, env):
        spec = in_specs.get((i, k))
        if spec is None:
            return raw(x, env)
        src = None if isinstance(x, Lit) else constants.get(x)
        val = raw(x, env) if src is None else src.prim.bind(*[raw(y, env) for y in src.inputs],
                                                             **src.prim.get_bind_params(src.params))
        return wsc(val, named(mesh, spec))

    def out_spec(i, k=0):
        specs = out_specs.get(i)
        return specs[k] if specs is not None else None

    def per_shard(i, eqn):
        """The spec ``eqn`` runs under ``shard_map`` in (``PER_SHARD``, split), else None."""
        if mesh is None or eqn.prim.name not in PER_SHARD:
            return None
        specs = out_specs.get(i)
        if not specs or not any(any(axes) for axes in specs[0]):
            return None
        assert all(list(map(list, s)) == list(map(list, specs[0])) for s in specs), specs
        return to_pspec(specs[0])

    def run_eqn(i, eqn, env):
        ins = [operand(i, k, x, env) for k, x in enumerate(eqn.inputs)]
        params = eqn.prim.get_bind_params(eqn.params)
        pspec = per_shard(i, eqn)
        def bind(*args):
            outs = eqn.prim.bind(*args, **params)
            return tuple(outs) if eqn.prim.multiple_results else (outs,)
        if pspec is None:
            outs = bind(*ins)
        else:
            outs = jax.shard_map(bind, mesh=mesh, in_specs=(pspec,) * len(ins),
                                 out_specs=(pspec,) * len(eqn.outputs))(*ins)
        for k, (o, val) in enumerate(zip(eqn.outputs, outs)):
            env[o] = produced(o, val, out_spec(i, k))

    def custom_call(eqn, depth, group, split):
        """The call ``eqn`` belongs to, if it starts at this nesting (scan depth, checkpoint
        group) and is to be bound whole (not in ``split``: calls this block holds in part)."""
        if not custom_calls or eqn.custom is None or eqn.custom in split:
            return None
        c = program.customs[eqn.custom]
        return c if c.remat == group and len(c.scope) == depth else None

    def run_custom(c, env):
        outs = c.prim.bind(*[raw(x, env) for x in c.inputs], **c.prim.get_bind_params(c.params))
        for o, val in zip(c.outputs, outs if c.prim.multiple_results else (outs,)):
            env[o] = val

    def run_block(block, env, depth, group=None):
        pos, split = 0, set()
        while pos < len(block):
            i, eqn = block[pos]
            c = custom_call(eqn, depth, group, split)
            if c is not None:  # an inlined custom call: contiguous
                end = pos
                while end < len(block) and block[end][1].custom == eqn.custom:
                    end += 1
                whole = end - pos == c.eqns and all(isinstance(x, Lit) or x in env for x in c.inputs)
                if whole:
                    run_custom(c, env)
                    pos = end
                    continue
                if c.rule:  # (layers never cut one: autopar.pipeline.layers)
                    raise ValueError(f"a jax.custom_jvp/custom_vjp call ({c.prim.name}) is cut by a stage boundary; "
                                     "keep autopar.stage_boundary markers outside custom-derivative functions")
                split.add(eqn.custom)  # a checkpoint cut by a stage boundary: replayed as its equations
            if eqn.remat is not None and eqn.remat != group:  # an inlined jax.checkpoint: contiguous
                end = pos
                while end < len(block) and block[end][1].remat == eqn.remat:
                    end += 1
                run_remat(block[pos:end], env, depth, eqn.remat)
                pos = end
            elif len(eqn.scope) > depth:  # a scan region starts: its equations are contiguous
                rid, end = eqn.scope[depth], pos
                while end < len(block) and len(block[end][1].scope) > depth and block[end][1].scope[depth] == rid:
                    end += 1
                run_scan(program.regions[rid], block[pos:end], env, depth + 1, group)
                pos = end
            else:
                run_eqn(i, eqn, env)
                pos += 1

    def typed(val, e, lead: int = 0):
        """``val`` as an array of boundary equation ``e``'s output type (without the ``lead``
        leading dims): a literal is broadcast, a weak type made strong (carries keep one type)."""
        v = program.values[e.outputs[0]]
        return jax.lax.convert_element_type(jax.numpy.broadcast_to(val, v.shape[lead:]), v.dtype)

    def raw(x, env):
        return x.val if isinstance(x, Lit) else env[x]

    def run_remat(block, env, depth, group):
        """The equations of one inlined ``jax.checkpoint`` read their outside inputs through an
        ``optimization_barrier``, as jax lowers ``checkpoint(prevent_cse=True)``: XLA then cannot
        merge a backward-pass recomputation with the forward computation it repeats."""
        made = {o for _, e in block for o in e.outputs}
        ext = sorted({x for _, e in block for x in e.inputs
                      if not isinstance(x, Lit) and x not in made and x in env and x not in program.consts})
        if not ext:
            return run_block(block, env, depth, group)
        outer = [env[x] for x in ext]
        for x, val in zip(ext, jax.lax.optimization_barrier(outer)):
            env[x] = val
        run_block(block, env, depth, group)
        for x, val in zip(ext, outer):  # values are written once: restore the unbarriered ones
            env[x] = val

    def run_scan(region, block, env, depth, group):
        def boundary(name):
            return sorted(((i, e) for i, e in block if e.prim.name == name and len(e.scope) == depth),
                          key=lambda ie: ie[1].params["index"])
        carry_in, slices = boundary("scan_carry_in"), boundary("scan_slice")
        carry_out, stacks = boundary("scan_carry_out"), boundary("scan_stack")
        body = [(i, e) for i, e in block if not (e.prim.name in SCAN_BOUNDARY and len(e.scope) == depth)]
        init = [constrain(typed(operand(i, 0, e.inputs[0], env), e), out_spec(i)) for i, e in carry_in]
        xs = [operand(i, 0, e.inputs[0], env) for i, e in slices]

        def step(carry, x):
            benv = dict(env)  # the body reads outer values (the scan's consts) by closure
            for (i, e), c in zip(carry_in, carry):
                benv[e.outputs[0]] = produced(e.outputs[0], c, out_spec(i))
            for (i, e), v in zip(slices, x):
                benv[e.outputs[0]] = produced(e.outputs[0], v, out_spec(i))
            run_block(body, benv, depth, group)
            # the next iteration's carry, and the final one, keep the carry's layout (graph.ties)
            new = [constrain(typed(raw(e.inputs[0], benv), e), out_spec(j))
                   for (_, e), (j, _) in zip(carry_out, carry_in)]
            return new, [typed(operand(i, 0, e.inputs[0], benv), e, lead=1) for i, e in stacks]

        final, ys = jax.lax.scan(step, init, xs, length=region.length, reverse=region.reverse, unroll=region.unroll)
        for (i, e), val in zip(carry_out + stacks, final + ys):
            env[e.outputs[0]] = produced(e.outputs[0], val, out_spec(i))

    def run(*flat_args):
        env = {v: produced(v, x, None) for v, x in zip(program.invars, flat_args)}
        env.update(program.consts)
        run_block(list(enumerate(program.eqns)), env, 0)
        return [raw(x, env) for x in program.outvars]

    return run
