"""cost.resharding's collectives vs what XLA's SPMD partitioner emits for the same reshard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from autopar.validate import hlo_collectives
from autopar.cost import load_cluster, mesh_model
from autopar.cost.resharding import resharding

SHAPE = (16, 64, 32)
# src, dst as cost specs on the (4, 2) mesh (axis 0 = x, 1 = y)
CASES = [
    (((0, 1), (), ()), ((), (), (0,))),   # x·y on dim 0 → x on dim 2: XLA replicates fully, then slices
    (((0, 1), (), ()), ((), (0,), ())),   # → x on dim 1: same
    (((0, 1), (), ()), ((), (), (1,))),   # y (minor) moves, x gathered: all-to-all + all-gather
    (((1, 0), (), ()), ((), (), (0,))),   # y·x → x on dim 2 (minor moves): all-to-all + all-gather
    (((0,), (1,), ()), ((), (), (0,))),   # x alone moves, y gathered
    (((0,), (), ()), ((), (), (0,))),     # plain all-to-all
    (((0, 1), (), ()), ((0,), (), (1,))),  # y moves, x stays: all-to-all
]


def _pspec(spec):
    names = "xy"
    return P(*[tuple(names[a] for a in axes) if axes else None for axes in spec])


@pytest.mark.parametrize("src,dst", CASES)
def test_reshard_bytes_match_xla(devices8, src, dst):
    mesh = Mesh(np.array(devices8).reshape(4, 2), ("x", "y"))
    f = jax.jit(lambda a: a * 2, in_shardings=NamedSharding(mesh, _pspec(src)),
                out_shardings=NamedSharding(mesh, _pspec(dst)))
    hlo = f.lower(jax.ShapeDtypeStruct(SHAPE, jnp.float32)).compile().as_text()
    got = sorted((c.kind, c.bytes) for c in hlo_collectives(hlo))
    # no sharding constraint: the reshard is between jit's in and out shardings
    _, colls = resharding(mesh_model(load_cluster("cpu-8"), 1, (4, 2)), SHAPE, 4, src, dst, boundary=True)
    assert sorted((k, round(n)) for k, _, n in colls) == got


# every ordered pair of specs (each axis unused or on a dim it divides; all axis orders within a
# dim where noted), resharded at a with_sharding_constraint as plans are emitted: the model's
# collectives (kind, bytes), collective-permutes included, must be exactly the compiled HLO's
ALL_PAIRS = [((64, 64), (2, 4), True), ((6, 8, 4), (4, 2), False)]


@pytest.mark.parametrize("shape,mesh_shape,all_orders", ALL_PAIRS)
def test_every_spec_pair_matches_xla(devices8, shape, mesh_shape, all_orders):
    import itertools
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from reshard_fidelity import all_specs, compiled_collectives, predicted_collectives

    specs = all_specs(shape, mesh_shape)
    if not all_orders:
        specs = [s for s in specs if all(list(ax) == sorted(ax) for ax in s)]
    bad = []
    for src, dst in itertools.permutations(specs, 2):
        got = sorted(compiled_collectives(shape, mesh_shape, src, dst))
        want = sorted(predicted_collectives(shape, mesh_shape, src, dst))
        if got != want:
            bad.append(f"{src} -> {dst}: predicted {want}, compiled {got}")
    assert not bad, f"{len(bad)} of {len(specs) * (len(specs) - 1)} pairs differ:\n" + "\n".join(bad)
