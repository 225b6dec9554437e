"""Shared pieces of the zoo: the optimizers, sizes, the AdamW / SGD step builder."""
from __future__ import annotations

from typing import Callable

import jax
import optax

LEARNING_RATE = 1e-3
OPTIMIZER = optax.adamw(LEARNING_RATE, weight_decay=0.01)
SGD = optax.sgd(0.1)
SIZES = ("tiny", "full")


def check_size(size: str) -> str:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return size


def make_step(loss_fn: Callable, optimizer=OPTIMIZER, name: str = "step") -> Callable:
    """``loss_fn(params, batch) -> loss`` → ``step(params, opt_state, batch) -> (params, opt_state, loss)``."""
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    step.__name__ = step.__qualname__ = name
    return step


def step_args(init_params: Callable, batch, *, optimizer=OPTIMIZER, abstract: bool, make_batch: Callable):
    """``(params, opt_state, batch)``: ShapeDtypeStructs (``abstract``) or concrete arrays."""
    def init():
        params = init_params()
        return params, optimizer.init(params)
    if abstract:
        params, state = jax.eval_shape(init)
        return params, state, batch
    params, state = jax.jit(init)()
    return params, state, make_batch()
