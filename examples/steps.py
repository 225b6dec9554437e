"""Training steps shared by the example models: ``loss_fn(params, batch) -> mean loss`` →
an optax step or a plain-SGD step (the functions autopar plans and runs)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def optax_train_step(loss_fn: Callable, opt) -> Callable:
    """``train_step(params, opt_state, batch) -> (params, opt_state, loss)``."""
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return train_step


def sgd_train_step(loss_fn: Callable, lr: float) -> Callable:
    """``sgd_train_step(params, batch) -> (params, loss)``: plain SGD with a constant step size."""
    def sgd_train_step(params, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        params = jax.tree.map(lambda p, g: p - jnp.asarray(lr, p.dtype) * g.astype(p.dtype), params, grads)
        return params, loss
    return sgd_train_step
