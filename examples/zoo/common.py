"""Shared pieces of the zoo: the optimizers, sizes, the AdamW / SGD step builder."""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
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


def step_args(init_params: Callable, batch, *, optimizer=OPTIMIZER, abstract: bool, make_batch: Callable,
              seed: int = 0):
    """``(params, opt_state, batch)``: ShapeDtypeStructs (``abstract``, from the model's own
    ``init`` under ``jax.eval_shape``: nothing allocated) or concrete arrays. Concrete
    parameters are drawn with numpy (normal × 0.02 from a fixed seed, in the shapes and pytree
    the model's ``init`` gives): no XLA compilation of the initializers, which took longer than
    planning the tiny models."""
    shapes = jax.eval_shape(init_params)
    if abstract:
        return shapes, jax.eval_shape(optimizer.init, shapes), batch
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: jnp.asarray((rng.standard_normal(s.shape) * 0.02).astype(s.dtype)), shapes)
    return params, optimizer.init(params), make_batch()


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Sizes of the zoo's decoder-only transformers (linen, NNX, equinox)."""
    vocab: int
    d: int
    heads: int
    layers: int
    seq: int
    batch: int = 0
    scan: bool = False


def token_step_args(init_params: Callable, cfg, *, abstract: bool, seed: int = 0):
    """``step_args`` of a language model: ``(batch, seq + 1)`` int32 tokens below ``cfg.vocab``."""
    tokens = jax.ShapeDtypeStruct((cfg.batch, cfg.seq + 1), jnp.int32)
    return step_args(init_params, tokens, abstract=abstract, make_batch=lambda: jax.random.randint(
        jax.random.PRNGKey(seed + 1), tokens.shape, 0, cfg.vocab))
