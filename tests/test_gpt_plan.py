"""The GPT example end to end: planned, executed on 8 CPU devices, equal to unsharded."""
import jax
import numpy as np
import pytest
from conftest import make_cluster

import autopar
from examples import gpt

CLUSTER = make_cluster(8, flops=2e9, alpha_s=1e-6)  # slow devices: sharding pays at test sizes


def _leaves_close(got, want, rtol=1e-5, atol=1e-6):
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize("mesh", [(8,), (2, 4)], ids=["1d", "2d"])
def test_gpt_sgd_step_matches_unsharded(mesh, devices8):
    make = lambda: gpt.sgd_train_step_args(layers=2, hidden=64, seq=32, vocab=256, batch=8)  # noqa: E731
    plan = autopar.plan(gpt.sgd_train_step, *make(), cluster=CLUSTER, mesh_shape=mesh, donate_argnums=(0,))
    specs = jax.tree_util.tree_leaves(plan.input_specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    assert any(any(d is not None for d in s) for s in specs), plan.report()  # something is split
    _leaves_close(plan.apply(gpt.sgd_train_step)(*make()), jax.jit(gpt.sgd_train_step)(*make()))
    v = plan.validate(*make())
    assert v.bytes_error() <= 0.05, v.table()


def test_gpt_adamw_step_loss_and_state(devices8):
    # Adam turns float noise on zero-gradient parameters into ±lr updates (DESIGN.md), so the
    # AdamW step is compared on the loss and the first moments (0.1 × the gradients), fp32 rtol 1e-5
    make = lambda: gpt.train_step_args(layers=2, hidden=64, seq=32, vocab=256, batch=8)  # noqa: E731
    plan = autopar.plan(gpt.train_step, *make(), cluster=CLUSTER, mesh_shape=(8,), donate_argnums=(0, 1))
    _, state, loss = plan.apply(gpt.train_step)(*make())
    _, want_state, want_loss = jax.jit(gpt.train_step)(*make())
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    _leaves_close(state[0].mu, want_state[0].mu)


def test_repeated_layers_are_tied(devices8):
    args = gpt.sgd_train_step_args(layers=6, hidden=64, seq=32, vocab=256, batch=8, abstract=True)
    plan = autopar.plan(gpt.sgd_train_step, *args, cluster=CLUSTER, mesh_shape=(8,))
    six = plan.solver.nodes
    args = gpt.sgd_train_step_args(layers=12, hidden=64, seq=32, vocab=256, batch=8, abstract=True)
    plan12 = autopar.plan(gpt.sgd_train_step, *args, cluster=CLUSTER, mesh_shape=(8,))
    assert len(plan12.eqns) > 1.8 * len(plan.eqns)
    assert plan12.solver.nodes < 1.1 * six  # depth adds (almost) no solver nodes
    # the same layer position gets the same strategy in every block
    blocks = [s for s in plan12.input_specs[0]["blocks"]]
    assert all(b == blocks[0] for b in blocks[::2]) and all(b == blocks[1] for b in blocks[1::2])
