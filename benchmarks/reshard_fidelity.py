"""Reshard fidelity: ``cost.resharding``'s collectives vs what XLA's SPMD partitioner emits.

    python benchmarks/reshard_fidelity.py [--shapes 64,64 8,8,4 ...] [--meshes 2,4 4,2 8]
                                          [--boundary] [-v]

For every (shape, mesh) and every ordered pair of distinct specs (each mesh axis unused or on
one dim it divides, every order of the axes within a dim), compiles
``jax.jit(lambda a: with_sharding_constraint(a * 2, dst), in_shardings=src, out_shardings=dst)``
(how plans are emitted; ``--boundary``: without the constraint, the reshard then happens
between jit's in and out shardings, priced by ``resharding(..., boundary=True)``) on simulated
CPU devices and compares the multiset of (kind, bytes) of the HLO's collectives (``autopar.validate
.hlo_collectives``: all-gather its result, all-to-all and collective-permute their buffer) with
the model's. Prints one line per (shape, mesh): mismatches over pairs in canonical axis order
(what ``enumerate_specs`` produces) and over all orders; ``-v`` lists each mismatch.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # XLA warns on every full rematerialization

DEFAULT_SHAPES = ["64", "24", "64,64", "12,20", "8,2", "8,8,4", "6,8,4", "16,64,32"]
DEFAULT_MESHES = ["8", "2,4", "4,2"]


def all_specs(shape, mesh_shape):
    """Every spec of ``shape`` on the mesh, with every order of the axes inside a dim."""
    axes = [a for a, n in enumerate(mesh_shape) if n > 1]
    out = set()
    for assign in itertools.product([None, *range(len(shape))], repeat=len(axes)):
        per = [[] for _ in shape]
        for a, d in zip(axes, assign):
            if d is not None:
                per[d].append(a)
        if any(shape[d] % math.prod(mesh_shape[a] for a in per[d]) for d in range(len(shape))):
            continue
        for perms in itertools.product(*[itertools.permutations(p) for p in per]):
            out.add(tuple(tuple(p) for p in perms))
    return sorted(out)


def compiled_collectives(shape, mesh_shape, src, dst, itemsize=4, boundary=False):
    """[(kind, bytes)] of the compiled reshard ``src → dst`` (float32 unless itemsize says)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from autopar.validate import hlo_collectives

    names = ("x", "y", "z")[:len(mesh_shape)]
    mesh = Mesh(np.array(jax.devices()[:math.prod(mesh_shape)]).reshape(mesh_shape), names)
    pspec = lambda s: P(*[tuple(names[a] for a in ax) if ax else None for ax in s])
    dtype = {2: jnp.bfloat16, 4: jnp.float32, 8: jnp.float64}[itemsize]
    out = NamedSharding(mesh, pspec(dst))
    fn = (lambda a: a * 2) if boundary else (lambda a: jax.lax.with_sharding_constraint(a * 2, out))
    f = jax.jit(fn, in_shardings=NamedSharding(mesh, pspec(src)), out_shardings=out)
    hlo = f.lower(jax.ShapeDtypeStruct(shape, dtype)).compile().as_text()
    return [(c.kind, c.bytes) for c in hlo_collectives(hlo)]


def predicted_collectives(shape, mesh_shape, src, dst, itemsize=4, boundary=False):
    from autopar.cost import load_cluster, mesh_model, resharding

    nodes = 1
    mesh = mesh_model(load_cluster("cpu-8"), nodes, mesh_shape)
    return [(kind, round(nbytes)) for kind, _, nbytes in resharding(mesh, shape, itemsize, src, dst, boundary)[1]]


def compare(shape, mesh_shape, verbose=False, boundary=False):
    specs = all_specs(shape, mesh_shape)
    bad = bad_canon = total = total_canon = 0
    for src, dst in itertools.permutations(specs, 2):
        canon = all(list(ax) == sorted(ax) for s in (src, dst) for ax in s)
        got = sorted(compiled_collectives(shape, mesh_shape, src, dst, boundary=boundary))
        want = sorted(predicted_collectives(shape, mesh_shape, src, dst, boundary=boundary))
        total += 1
        total_canon += canon
        if got != want:
            bad += 1
            bad_canon += canon
            if verbose:
                print(f"  {src} -> {dst}: predicted {want}, compiled {got}")
    return bad_canon, total_canon, bad, total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES)
    ap.add_argument("--meshes", nargs="*", default=DEFAULT_MESHES)
    ap.add_argument("--boundary", action="store_true", help="reshard between jit's in/out shardings")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    for m in args.meshes:
        for s in args.shapes:
            shape, mesh_shape = tuple(map(int, s.split(","))), tuple(map(int, m.split(",")))
            bc, tc, b, t = compare(shape, mesh_shape, args.verbose, args.boundary)
            print(f"shape {str(shape):14} mesh {str(mesh_shape):7} mismatches: canonical order "
                  f"{bc:3}/{tc:3}, all orders {b:3}/{t:3}", flush=True)


if __name__ == "__main__":
    main()
