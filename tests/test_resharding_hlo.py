"""cost.resharding's collectives vs what XLA's SPMD partitioner emits for the same reshard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from autopar.validate import hlo_collectives
from cost import load_cluster, mesh_model
from cost.resharding import resharding

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
    got = {}
    for c in hlo_collectives(hlo):
        if c.kind != "collective-permute":
            got[c.kind] = got.get(c.kind, 0) + c.bytes
    _, colls = resharding(mesh_model(load_cluster("cpu-8"), 1, (4, 2)), SHAPE, 4, src, dst)
    want = {}
    for kind, _axes, nbytes in colls:
        if kind != "collective-permute":
            want[kind] = want.get(kind, 0) + nbytes
    assert want == got
