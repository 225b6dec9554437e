"""A GPT-style decoder written with equinox as users write it (``eqx.Module`` fields,
``eqx.nn.MultiheadAttention`` / ``Linear`` / ``LayerNorm`` / ``Embedding`` applied per token
with ``jax.vmap``), split with ``eqx.partition`` into arrays and static parts so the optax
AdamW step is jittable: ``eqx_step(params, opt_state, tokens)`` with ``params =
eqx.filter(model, eqx.is_array)``; the step rebuilds the static part from the shapes and
``eqx.combine``s them.

Sizes: ``tiny`` (vocab 128, d 64, 4 heads, 2 layers, batch 8 × seq 16) and ``full`` (d 2048,
16 heads, 24 layers, vocab 32000, seq 1024, batch 8; 1.34e9 parameters).
"""
from __future__ import annotations

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from examples.zoo.common import DecoderConfig, check_size, make_step, token_step_args


Config = DecoderConfig
TINY = Config(vocab=128, d=64, heads=4, layers=2, seq=16, batch=8)
FULL = Config(vocab=32000, d=2048, heads=16, layers=24, seq=1024, batch=8)


class Block(eqx.Module):
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, d: int, heads: int, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.ln1, self.ln2 = eqx.nn.LayerNorm(d), eqx.nn.LayerNorm(d)
        self.attn = eqx.nn.MultiheadAttention(heads, d, use_query_bias=True, use_key_bias=True,
                                              use_value_bias=True, use_output_bias=True, key=k1)
        self.up, self.down = eqx.nn.Linear(d, 4 * d, key=k2), eqx.nn.Linear(4 * d, d, key=k3)

    def __call__(self, x):  # x: (seq, d), one sequence
        mask = jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool))
        h = jax.vmap(self.ln1)(x)
        x = x + self.attn(h, h, h, mask=mask)
        return x + jax.vmap(self.down)(jax.nn.gelu(jax.vmap(self.up)(jax.vmap(self.ln2)(x))))


class Decoder(eqx.Module):
    embed: eqx.nn.Embedding
    pos: jax.Array
    blocks: list
    ln: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, cfg: Config, key):
        keys = jax.random.split(key, cfg.layers + 3)
        self.embed = eqx.nn.Embedding(cfg.vocab, cfg.d, key=keys[0])
        self.pos = jax.random.normal(keys[1], (cfg.seq, cfg.d)) * 0.02
        self.blocks = [Block(cfg.d, cfg.heads, k) for k in keys[3:]]
        self.ln = eqx.nn.LayerNorm(cfg.d)
        self.head = eqx.nn.Linear(cfg.d, cfg.vocab, key=keys[2])

    def __call__(self, tokens):  # tokens: (seq,)
        x = jax.vmap(self.embed)(tokens) + self.pos[: tokens.shape[0]]
        for blk in self.blocks:
            x = blk(x)
        return jax.vmap(self.head)(jax.vmap(self.ln)(x))


def _config_of(params: Decoder) -> Config:
    vocab, d = params.embed.weight.shape
    return Config(vocab, d, params.blocks[0].attn.num_heads, len(params.blocks), params.pos.shape[0])


def _is_leaf_array(x) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct))


@functools.lru_cache(maxsize=None)
def static_part(cfg: Config):
    """The model's non-array part (``eqx.partition``), built abstractly."""
    return eqx.partition(eqx.filter_eval_shape(Decoder, cfg, jax.random.PRNGKey(0)), _is_leaf_array)[1]


def loss_fn(params, tokens):
    model = eqx.combine(params, static_part(_config_of(params)))
    logits = jax.vmap(model)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


eqx_step = make_step(loss_fn, name="eqx_step")


def eqx_step_args(size: str = "tiny", abstract: bool = False, seed: int = 0):
    """``(params, opt_state, tokens)`` of ``eqx_step``; ``params = eqx.filter(model, eqx.is_array)``."""
    cfg = TINY if check_size(size) == "tiny" else FULL
    model_cfg = dataclasses.replace(cfg, batch=0)

    def init():
        return eqx.filter(Decoder(model_cfg, jax.random.PRNGKey(seed)), eqx.is_array)
    return token_step_args(init, cfg, abstract=abstract, seed=seed)
