"""The collective registry (``cost.comm.COLLECTIVES``): one record per kind, and the compiled-HLO
checks (``autopar.validate``) read their op names and bytes rule from it."""
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from autopar import validate
from autopar.cost import COLLECTIVES, HLO_OPS, collective, collective_time, load_cluster, mesh_model


def test_each_hlo_op_belongs_to_one_record():
    ops = [op for c in COLLECTIVES.values() for op in c.hlo_ops]
    assert len(ops) == len(set(ops)) and set(ops) == set(HLO_OPS)
    assert all(COLLECTIVES[HLO_OPS[op].name] is HLO_OPS[op] for op in ops)


def test_unknown_kind_names_the_registry():
    with pytest.raises(ValueError, match="expected one of .*'all-reduce'"):
        collective("all_reduce")


@pytest.mark.parametrize("kind", sorted(COLLECTIVES))
def test_a_record_and_its_name_price_alike(kind):
    m = mesh_model(load_cluster("cpu-8"), 1, (2, 4))
    assert collective_time(m, kind, (1,), 1e6) == collective_time(m, COLLECTIVES[kind], (1,), 1e6) > 0


@pytest.mark.parametrize("op", sorted(HLO_OPS))
@pytest.mark.parametrize("start", ["", "-start"])
def test_validate_parses_every_registered_op(op, start):
    """A synthetic per-device HLO line of each op: kind = the record's name, bytes by its rule."""
    result = "f32[4,16]{1,0}" if not start else "((f32[8,16]{1,0}), f32[4,16]{1,0})"  # async: (operands), result
    line = (f"  %x.1 = {result} {op}{start}(f32[8,16]{{1,0}} %p), channel_id=1, "
            "replica_groups={{0,1},{2,3},{4,5},{6,7}}, use_global_device_ids=true")
    (c,) = validate.hlo_collectives("ENTRY %main (p: f32[8,16]) -> f32[4,16] {\n" + line + "\n}\n")
    assert c.kind == HLO_OPS[op].name and c.group_size == 2
    assert c.bytes == HLO_OPS[op].full_bytes(4 * 16 * 4, 2) == 4 * 16 * 4 * (2 if HLO_OPS[op].counts_input else 1)


def test_tests_name_only_registered_collectives():
    """Every collective kind a test compares against the compiled HLO is a registry name."""
    named = set()
    for path in pathlib.Path(__file__).parent.glob("test_*.py"):
        named |= set(re.findall(r"\"((?:all|reduce|collective)-[a-z-]+)\"", path.read_text()))
    assert named and named <= set(COLLECTIVES), sorted(named - set(COLLECTIVES))


def test_every_collective_xla_emits_is_registered(devices8):
    """A compiled program's collective ops (any ``all-*`` / ``reduce-scatter`` / ``collective-*``
    op, async ``-start`` / ``-done`` folded) are all HLO op names of registry records."""
    mesh = jax.sharding.Mesh(np.array(devices8).reshape(2, 4), ("x", "y"))

    def step(a, b):
        return (a @ b).sum(0), a.T

    fn = jax.jit(step, in_shardings=(NamedSharding(mesh, P("x", "y")), NamedSharding(mesh, P("y", None))),
                 out_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("x", "y"))))
    a, b = jnp.ones((16, 32)), jnp.ones((32, 8))
    text = fn.lower(a, b).compile().as_text()
    ops = {re.sub(r"-(start|done)$", "", m.group(1)) for line in text.splitlines()
           if (m := re.search(r" = .*?[\]})]\s+([a-z][a-z-]*)\(", line))}
    emitted = {op for op in ops if op.startswith(("all-", "collective-")) or op == "reduce-scatter"}
    assert emitted and emitted <= set(HLO_OPS), (sorted(emitted), text)
    assert {c.kind for c in validate.hlo_collectives(text)} == {HLO_OPS[op].name for op in emitted}
