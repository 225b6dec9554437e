"""Multi-layer perceptron example (plain JAX, no flax).

Convention used by ``autopar plan examples/mlp.py:FUNC``: for every public step function
``FOO`` this module defines ``FOO_args(**knobs) -> tuple`` returning the example positional
arguments of ``FOO``. Every knob is a keyword argument with a small default. With
``abstract=True`` the arguments are ``jax.ShapeDtypeStruct`` pytrees built with
``jax.eval_shape`` (nothing is allocated); otherwise they are concrete arrays built from
fixed PRNG seeds, so the result is deterministic
(drawn with numpy: no XLA compilation, so building them is instant; the values differ
from those of the JAX-key ``init_*`` function).

Public step functions and their argument builders:

* ``mlp_step(params, x, y) -> (new_params, loss)``   / ``mlp_step_args``
* ``mlp_forward(params, x) -> out``                  / ``mlp_forward_args``
* ``mlp_loss(params, x, y) -> loss``                 / ``mlp_loss_args``
* ``loss_fn(params, batch) -> loss``                 / ``loss_fn_args`` (= ``params_and_batch``)

``params`` is a list of ``{"w": (d_in, d_out)}`` dicts (plus ``"b": (d_out,)`` when
``bias=True``). ReLU between layers, no activation after the last one.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

LEARNING_RATE = 0.01  # SGD step size of ``mlp_step`` (a Python constant, not an argument)

_PARAM_SEED = 0
_DATA_SEED = 1


def _mlp_dims(layers, hidden, in_dim, out_dim):
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    in_dim = hidden if in_dim is None else in_dim
    out_dim = hidden if out_dim is None else out_dim
    return [in_dim] + [hidden] * (layers - 1) + [out_dim]


def _build_mlp(dims, normal: Callable, xp, bias, dtype) -> list[dict]:
    """``normal(shape)`` draws N(0, 1) float32 samples; ``xp`` is np or jnp."""
    params = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layer = {"w": (normal((d_in, d_out)) / np.float32(np.sqrt(d_in))).astype(dtype)}
        if bias:
            layer["b"] = xp.zeros((d_out,), dtype)
        params.append(layer)
    return params


def init_mlp(key, *, layers: int, hidden: int, in_dim: int | None = None,
             out_dim: int | None = None, bias: bool = False, dtype: Any = jnp.float32) -> list[dict]:
    """Parameters of a ``layers``-deep MLP: in_dim -> hidden -> ... -> hidden -> out_dim.

    ``in_dim`` and ``out_dim`` default to ``hidden``. Weights ~ N(0, 1/fan_in), biases 0.
    """
    dims = _mlp_dims(layers, hidden, in_dim, out_dim)
    keys = iter(jax.random.split(key, layers))
    normal = lambda shape: jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
    return _build_mlp(dims, normal, jnp, bias, jnp.dtype(dtype))


def mlp_forward(params, x):
    """ReLU between layers, no activation after the last layer."""
    h = x
    for i, layer in enumerate(params):
        h = h @ layer["w"]
        if "b" in layer:
            h = h + layer["b"]
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    return h


def mlp_loss(params, x, y):
    """Mean squared error."""
    out = mlp_forward(params, x)
    return jnp.mean(jnp.square(out.astype(jnp.float32) - y.astype(jnp.float32)))


def mlp_step(params, x, y):
    """One SGD step; only ``params`` are differentiated (no gradient w.r.t. ``x``)."""
    loss, grads = jax.value_and_grad(mlp_loss)(params, x, y)
    new_params = jax.tree.map(lambda p, g: p - jnp.asarray(LEARNING_RATE, p.dtype) * g.astype(p.dtype),
                              params, grads)
    return new_params, loss


def loss_fn(params, batch):
    """``mlp_loss`` with a batch dict ``{"x": ..., "y": ...}`` (pipeline-style API)."""
    return mlp_loss(params, batch["x"], batch["y"])


# ----------------------------------------------------------------------------- example args

def _args(batch, hidden, layers, in_dim, out_dim, bias, abstract, dtype):
    """(params, x, y): ShapeDtypeStructs, or arrays drawn with numpy from fixed seeds (no
    XLA compilation; not the values of ``init_mlp(key, ...)``)."""
    dtype = jnp.dtype(dtype)
    dims = _mlp_dims(layers, hidden, in_dim, out_dim)
    if abstract:
        params = jax.eval_shape(lambda: _build_mlp(dims, lambda s: jnp.zeros(s, jnp.float32), jnp, bias, dtype))
        return params, jax.ShapeDtypeStruct((batch, dims[0]), dtype), jax.ShapeDtypeStruct((batch, dims[-1]), dtype)
    rng = np.random.default_rng(_PARAM_SEED)
    params = _build_mlp(dims, lambda s: rng.standard_normal(s, dtype=np.float32), np, bias, dtype)
    rng = np.random.default_rng(_DATA_SEED)
    x = rng.standard_normal((batch, dims[0]), dtype=np.float32).astype(dtype)
    y = rng.standard_normal((batch, dims[-1]), dtype=np.float32).astype(dtype)
    return jax.device_put((params, x, y))


def mlp_step_args(*, batch: int = 128, hidden: int = 1024, layers: int = 2, in_dim: int | None = None,
                  out_dim: int | None = None, bias: bool = False, abstract: bool = False,
                  dtype: Any = jnp.float32) -> tuple:
    """Example ``(params, x, y)`` for ``mlp_step``."""
    return tuple(_args(batch, hidden, layers, in_dim, out_dim, bias, abstract, dtype))


def mlp_loss_args(**knobs) -> tuple:
    """Example ``(params, x, y)`` for ``mlp_loss`` (same knobs as ``mlp_step_args``)."""
    return mlp_step_args(**knobs)


def mlp_forward_args(*, batch: int = 128, hidden: int = 1024, layers: int = 2, in_dim: int | None = None,
                     out_dim: int | None = None, bias: bool = False, abstract: bool = False,
                     dtype: Any = jnp.float32) -> tuple:
    """Example ``(params, x)`` for ``mlp_forward``."""
    params, x, _ = _args(batch, hidden, layers, in_dim, out_dim, bias, abstract, dtype)
    return params, x


def params_and_batch(*, batch: int = 128, hidden: int = 1024, layers: int = 2, in_dim: int | None = None,
                     out_dim: int | None = None, bias: bool = False, abstract: bool = False,
                     dtype: Any = jnp.float32) -> tuple:
    """Example ``(params, {"x": x, "y": y})`` for ``loss_fn``."""
    params, x, y = _args(batch, hidden, layers, in_dim, out_dim, bias, abstract, dtype)
    return params, {"x": x, "y": y}


loss_fn_args = params_and_batch

__all__ = ["LEARNING_RATE", "init_mlp", "mlp_forward", "mlp_loss", "mlp_step", "loss_fn",
           "mlp_step_args", "mlp_loss_args", "mlp_forward_args", "params_and_batch", "loss_fn_args"]
