"""Pipelines of parameters that are custom pytrees (equinox Modules): the step takes and
returns the user's own structure, including the Module's None fields (the non-array parts
``eqx.filter`` leaves out), and equals the single-device step."""
import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import autopar
from examples.zoo import eqx_transformer as et
from examples.zoo.common import OPTIMIZER
from test_pipeline_scan import _assert_equal, _reference, _run


def test_equinox_decoder_pipeline_equals_the_single_device_step():
    params, opt_state, tokens = et.eqx_step_args()
    assert any(x is None for x in jax.tree.leaves(params, is_leaf=lambda x: x is None))  # Nones of its own
    tplan = autopar.plan_training(et.loss_fn, params, tokens, optimizer=OPTIMIZER, cluster="cpu-8",
                                  num_microbatches=2, num_stages=2)
    assert tplan.num_stages == 2
    want = _reference(et.loss_fn, OPTIMIZER, params, opt_state, tokens, 1)
    got = _run(tplan, params, opt_state, tokens, 1)
    assert isinstance(got[0], et.Decoder)
    _assert_equal(got, want, rtol=1e-4, atol=1e-5)
    # a plan loaded from JSON cannot rebuild the Module: it says so, and params_like gives it
    back = autopar.TrainingPlan.from_json(tplan.to_json())
    with pytest.raises(ValueError, match=r"custom pytree nodes \(.*Decoder.*params_like=params"):
        back.apply(et.loss_fn, OPTIMIZER)
    step = back.apply(et.loss_fn, OPTIMIZER, params_like=params, donate=False)
    _assert_equal(step(params, opt_state, tokens), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(autopar.PlanMismatchError, match="params_like does not match the plan"):
        back.apply(et.loss_fn, OPTIMIZER, params_like=params.blocks)


class _Mlp(eqx.Module):
    layers: eqx.nn.Linear   # stacked: one leading axis over the layers (eqx.filter_vmap)
    head: eqx.nn.Linear
    act: object = eqx.field(static=True, default=jnp.tanh)

    def __call__(self, x):
        dynamic, static = eqx.partition(self.layers, eqx.is_array)

        def body(h, layer):
            return self.act(eqx.combine(layer, static)(h)), None
        h, _ = jax.lax.scan(body, x, dynamic)
        return self.head(h)


def _mlp_loss(model, batch):
    return jnp.mean((jax.vmap(model)(batch["x"]) - batch["y"]) ** 2)


def test_equinox_scanned_layer_stack_pipelines_per_layer():
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    layers = eqx.filter_vmap(lambda k: eqx.nn.Linear(16, 16, key=k))(keys[:4])
    model = _Mlp(layers, eqx.nn.Linear(16, 2, key=keys[4]))
    batch = {"x": jax.random.normal(keys[0], (8, 16)), "y": jnp.zeros((8, 2))}
    opt_state = OPTIMIZER.init(model)
    tplan = autopar.plan_training(_mlp_loss, model, batch, optimizer=OPTIMIZER, cluster="cpu-8",
                                  num_microbatches=2, stages=[(0, 2, (1, 4)), (2, 4, (1, 4))])
    assert tplan.scan_split is not None and tplan.search.num_layers == 4
    got = _run(tplan, model, opt_state, batch, 2)
    assert isinstance(got[0], _Mlp)
    _assert_equal(got, _reference(_mlp_loss, OPTIMIZER, model, opt_state, batch, 2), rtol=1e-4, atol=1e-5)
