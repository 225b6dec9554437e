"""``plan_training(grad_accum="float32")``: bfloat16 parameters' gradients summed over the
micro-batches in float32 accumulators, cast back once before the update — as close to the
exact gradient as ``jax.jit``'s one rounding, where bfloat16 accumulators round once per
micro-batch —, and the memory model counting the larger accumulators."""
import jax
import jax.numpy as jnp
import optax
import pytest

import autopar

BF = jnp.bfloat16
B = 64
STAGES = [(0, 1, (1, 4)), (1, 2, (1, 4))]
# the optimizer state keeps the gradient it was given (trace with decay 0), parameters unchanged
OPT = optax.chain(optax.trace(0.0), optax.scale(0.0))


def loss(p, b):
    h = autopar.stage_boundary(jnp.tanh(b["x"] @ p["w1"]))
    return jnp.mean(((h @ p["w2"]).astype(jnp.float32) - b["y"].astype(jnp.float32)) ** 2)


@pytest.fixture(scope="module")
def problem():
    k = jax.random.split(jax.random.key(0), 4)
    params = {"w1": (jax.random.normal(k[0], (64, 128)) * 0.1).astype(BF),
              "w2": (jax.random.normal(k[1], (128, 64)) * 0.1).astype(BF)}
    batch = {"x": jax.random.normal(k[2], (256, 64)).astype(BF), "y": jax.random.normal(k[3], (256, 64)).astype(BF)}
    exact = jax.grad(loss)(*jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), (params, batch)))
    return params, batch, exact


def _error(grads, exact) -> float:
    return max(float(jnp.linalg.norm(g.astype(jnp.float32) - e) / jnp.linalg.norm(e))
               for g, e in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(exact)))


def test_float32_accumulators_are_as_close_as_jit_and_counted(devices8, problem):
    params, batch, exact = problem
    plans = {acc: autopar.plan_training(loss, params, batch, optimizer=OPT, num_microbatches=B, num_layers=2,
                                        stages=STAGES, grad_accum=acc) for acc in ("params", "float32")}
    errors = {}
    for acc, plan in plans.items():
        _, state, _ = plan.apply(loss, OPT, donate=False)(params, OPT.init(params), batch)
        errors[acc] = _error(state[0].trace, exact)
    jit_error = _error(jax.jit(jax.grad(loss))(params, batch), exact)
    # 64 bfloat16 roundings of the running sum against one
    assert errors["float32"] < 1.5 * jit_error and errors["params"] > 1.5 * errors["float32"], (errors, jit_error)
    # the predicted memory grows by the accumulators' extra 2 bytes per bfloat16 parameter, as laid out
    for s_bf, s_32 in zip(plans["params"].stages, plans["float32"].stages):
        sizes = dict(zip(s_32.plan.axis_names, s_32.plan.mesh_shape))
        extra = sum(2 * x.size / autopar.cost.shard_factor(spec, sizes)
                    for x, spec in zip([params["w1"]] if s_32.index == 0 else [params["w2"]],
                                       s_32.plan.input_specs_flat[:1]))
        assert s_32.plan.input_specs_flat[:1] == s_bf.plan.input_specs_flat[:1]
        assert s_32.memory_bytes_per_device - s_bf.memory_bytes_per_device == pytest.approx(extra), s_32.index
    plan = plans["float32"]
    assert "gradients accumulated over the micro-batches in float32" in plan.report()
    assert autopar.TrainingPlan.from_json(plan.to_json()).grad_accum == "float32"
    assert "grad_accum" not in plans["params"].to_json()
    with pytest.raises(ValueError, match="grad_accum must be one of"):
        autopar.plan_training(loss, params, batch, optimizer=OPT, grad_accum="bfloat16")
