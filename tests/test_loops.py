"""Plans used the way users use them: in a training loop without donation, on models written
with flax linen, flax NNX and equinox, with their own pytree types."""
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import freeze
from jax.sharding import NamedSharding, PartitionSpec as P

import autopar
from autopar.carry import carried_pairs
from autopar.runtime import ReshardWarning
from autopar.trace import trace
from conftest import make_cluster
from examples import flax_lm, mlp

CLUSTER = make_cluster(8)


def _allclose(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _sharded_somewhere(plan) -> bool:
    return any(any(axes for axes in s) for s in plan.input_specs_flat)


def test_sgd_loop_without_donation_equals_unsharded(devices8):
    params, x, y = mlp.mlp_step_args(batch=64, hidden=256)
    plan = autopar.plan(mlp.mlp_step, params, x, y, cluster=CLUSTER, mesh_shape=(2, 4))
    assert _sharded_somewhere(plan) and plan.carried == [[0, 0], [1, 1]]
    step, ref = plan.apply(mlp.mlp_step), jax.jit(mlp.mlp_step)
    a, b = params, params
    for _ in range(3):  # the second call used to raise "Sharding passed to jit does not match …"
        a, la = step(a, x, y)
        b, lb = ref(b, x, y)
        _allclose(la, lb)
    _allclose(a, b)


def test_flax_adamw_loop_without_donation(devices8):
    """A flax linen AdamW step (112 state leaves) fed back three times. AdamW turns float noise
    on (near-)zero gradients into ±lr updates (the attention key bias's gradient is exactly
    zero), so, as DESIGN.md says, the comparison is on what the updates are made of: the loss
    of every step and the first moments (a running sum of the gradients), both at rtol 1e-5;
    steps 2 and 3 see the updated parameters, so a wrong update shows in their losses."""
    params, state, tokens = flax_lm.adamw_step_args()
    plan = autopar.plan(flax_lm.adamw_step, params, state, tokens, cluster=CLUSTER, mesh_shape=(2, 4))
    n_state = len(jax.tree.leaves((params, state)))
    assert len(plan.carried) == n_state and _sharded_somewhere(plan)
    step, ref = plan.apply(flax_lm.adamw_step), jax.jit(flax_lm.adamw_step)
    a, b = (params, state), (params, state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReshardWarning)
        for _ in range(3):
            *a, la = step(*a, tokens)
            *b, lb = ref(*b, tokens)
            np.testing.assert_allclose(float(la), float(lb), rtol=1e-5)
            _allclose(a[1][0].mu, b[1][0].mu)


def test_apply_reshards_arguments_laid_out_otherwise_and_warns_once(devices8):
    params, x, y = mlp.mlp_step_args(batch=64, hidden=256)
    plan = autopar.plan(mlp.mlp_step, params, x, y, cluster=CLUSTER, mesh_shape=(2, 4))
    step = plan.apply(mlp.mlp_step)
    w = plan.input_specs[0][0]["w"]
    other = P("y", "x") if w != P("y", "x") else P("x", "y")
    moved = jax.device_put(params[0]["w"], NamedSharding(step.mesh, other))
    args = ([{"w": moved}, *params[1:]], x, y)
    with pytest.warns(ReshardWarning, match=r"moved 1 argument leaves.*predicted .*s per call.*\[0\]\[0\]\['w'\] P\('y', 'x'\) -> ") as rec:
        got = step(*args)
    assert len(rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReshardWarning)  # same leaves again: no second warning
        step(*args)
    _allclose(got, jax.jit(mlp.mlp_step)(params, x, y))


def test_carried_pairs_follow_paths():
    def swapped(x, params):  # params second in, first out
        return jax.tree.map(lambda p: p * 2, params), jnp.sum(x)

    x = jax.ShapeDtypeStruct((4, 4), jnp.float32)
    params = {"a": x, "b": jax.ShapeDtypeStruct((4,), jnp.float32)}
    assert carried_pairs(trace(swapped, x, params)) == [(1, 0), (2, 1)]
    assert carried_pairs(trace(lambda x: x + 1, x)) == []  # a plain function of one array: no loop


def test_specs_keep_equinox_module_tree(devices8):
    model = eqx.nn.MLP(32, 32, 64, 2, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_array)

    def loss(params, x):
        return jnp.mean(jax.vmap(eqx.combine(params, static))(x) ** 2)

    x = jnp.ones((16, 32))
    plan = autopar.plan(loss, params, x, cluster=CLUSTER)
    specs = plan.input_specs[0]
    assert isinstance(specs, eqx.nn.MLP)
    jax.tree.map(lambda a, s: None, params, specs)  # raises if the trees differ
    loaded = autopar.Plan.from_json(plan.to_json())
    assert not isinstance(loaded.input_specs[0], eqx.nn.MLP)  # JSON keeps containers only…
    again = loaded.specs_like(params, x)[0]  # …specs_like re-attaches the user's tree
    assert isinstance(again, eqx.nn.MLP)
    assert jax.tree.leaves(again) == jax.tree.leaves(specs)
    with pytest.raises(ValueError, match="input leaves"):
        loaded.specs_like(params)


def test_specs_keep_nnx_state_and_flax_dicts(devices8):
    model = nnx.Sequential(nnx.Linear(32, 64, rngs=nnx.Rngs(0)), nnx.Linear(64, 32, rngs=nnx.Rngs(1)))
    graphdef, state = nnx.split(model)

    def loss(state, x):
        return jnp.mean(nnx.merge(graphdef, state)(x) ** 2)

    x = jnp.ones((16, 32))
    plan = autopar.plan(loss, state, x, cluster=CLUSTER)
    specs = plan.input_specs[0]
    assert type(specs) is type(state)
    jax.tree.map(lambda a, s: None, state, specs)  # same tree

    frozen = freeze({"dense": {"kernel": jnp.ones((32, 32)), "bias": jnp.zeros(32)}})

    def f(p, x):
        return jnp.sum(x @ p["dense"]["kernel"] + p["dense"]["bias"])

    plan = autopar.plan(f, frozen, x, cluster=CLUSTER)
    assert type(plan.input_specs[0]) is type(frozen)
    assert plan.output_specs == P()
