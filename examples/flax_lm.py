"""A small decoder-only language model written with flax linen and optax AdamW, the way users
write one (``nn.Module``s, ``nn.MultiHeadDotProductAttention``, ``optax.adamw``), and its
training step ``adamw_step(params, opt_state, tokens) -> (params, opt_state, loss)``.

The attention's key bias gets an exactly-zero gradient (softmax is shift invariant), so
AdamW turns float noise there into ±lr updates: two correct programs can differ by ~2·lr in
those parameters (see ``autopar run``'s comparison).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

LEARNING_RATE = 1e-3
OPTIMIZER = optax.adamw(LEARNING_RATE, weight_decay=0.01)


class Block(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        h = nn.LayerNorm()(x)
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], dtype=jnp.int32))
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=d)(h, h, mask=mask)
        h = nn.LayerNorm()(x)
        h = nn.Dense(4 * d)(h)
        return x + nn.Dense(d)(nn.gelu(h))


class LM(nn.Module):
    vocab: int
    d: int
    heads: int
    layers: int

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d)(tokens)
        for _ in range(self.layers):
            x = Block(self.heads)(x)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def _model(vocab=128, d=64, heads=4, layers=2) -> LM:
    return LM(vocab=vocab, d=d, heads=heads, layers=layers)


def loss_fn(params, tokens, *, model: LM | None = None):
    model = model or _model(**_shape_of(params))
    logits = model.apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _shape_of(params) -> dict:
    vocab, d = params["Embed_0"]["embedding"].shape
    layers = sum(1 for k in params if k.startswith("Block_"))
    heads = params["Block_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape[1]
    return {"vocab": vocab, "d": d, "heads": heads, "layers": layers}


def adamw_step(params, opt_state, tokens):
    """One AdamW step: (params, opt_state, tokens) -> (params, opt_state, loss)."""
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def adamw_step_args(*, batch: int = 8, seq: int = 17, vocab: int = 128, d: int = 64, heads: int = 4,
                    layers: int = 2, abstract: bool = False, seed: int = 0) -> tuple:
    """Example ``(params, opt_state, tokens)`` (``abstract=True``: ShapeDtypeStructs, nothing allocated)."""
    model = _model(vocab, d, heads, layers)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def init():
        params = model.init(jax.random.PRNGKey(seed), jnp.zeros((batch, seq - 1), jnp.int32))["params"]
        return params, OPTIMIZER.init(params)
    if abstract:
        params, state = jax.eval_shape(init)
        return params, state, tokens
    params, state = init()
    return params, state, jax.random.randint(jax.random.PRNGKey(seed + 1), (batch, seq), 0, vocab)
