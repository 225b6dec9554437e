"""A GPT-style decoder written with flax linen as users write it (``nn.Module``s,
``nn.MultiHeadDotProductAttention`` with a causal mask, ``nn.LayerNorm``, ``nn.Dense``, GELU,
an untied LM head) and trained with optax AdamW — unrolled (``linen_step``: a Python loop of
``Block``s) and scanned over layers (``linen_scan_step``: ``nn.scan`` of the same ``Block``,
stacked parameters, the MaxText / t5x way).

Sizes: ``tiny`` (vocab 128, d 64, 4 heads, 2 layers, batch 8 × seq 16) and ``full``:
unrolled GPT-1.3B shape (d 2048, 32 heads, 24 layers, vocab 51200, seq 1024, batch 8; untied head,
1.42e9 parameters), scanned GPT-6.7B shape (d 4096, 32 heads, 32 layers, vocab 51200, seq 1024,
batch 16; 6.87e9 parameters).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from examples.zoo.common import DecoderConfig, check_size, make_step, token_step_args


Config = DecoderConfig
TINY = Config(vocab=128, d=64, heads=4, layers=2, seq=16, batch=8)
FULL = Config(vocab=51200, d=2048, heads=32, layers=24, seq=1024, batch=8)
FULL_SCAN = Config(vocab=51200, d=4096, heads=32, layers=32, seq=1024, batch=16, scan=True)


class Block(nn.Module):
    heads: int
    dropout: float = 0.0     # attention-probability and residual dropout (GPT-2's), off by default

    @nn.compact
    def __call__(self, x, _=None):
        d, train = x.shape[-1], self.dropout > 0
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        h = nn.LayerNorm()(x)
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=d, dropout_rate=self.dropout,
                                            deterministic=not train)(h, h, mask=mask)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Dense(4 * d)(nn.LayerNorm()(x))
        return x + nn.Dropout(self.dropout, deterministic=not train)(nn.Dense(d)(nn.gelu(h))), None


class Decoder(nn.Module):
    cfg: Config
    remat: bool = False   # each block under nn.remat (only its input saved), the MaxText default
    dropout: float = 0.0

    @nn.compact
    def __call__(self, tokens):
        cfg = self.cfg
        x = nn.Embed(cfg.vocab, cfg.d)(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (cfg.seq, cfg.d))[: tokens.shape[1]]
        block = nn.remat(Block, prevent_cse=not cfg.scan, policy=jax.checkpoint_policies.nothing_saveable) \
            if self.remat else Block
        if cfg.scan:
            blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                             length=cfg.layers)
            x, _ = blocks(cfg.heads, self.dropout, name="blocks")(x, None)
        else:
            for i in range(cfg.layers):
                x, _ = block(cfg.heads, self.dropout, name=f"block_{i}")(x)
        return nn.Dense(cfg.vocab, name="head")(nn.LayerNorm()(x))


def _config_of(params) -> Config:
    vocab, d = params["Embed_0"]["embedding"].shape
    seq = params["pos"].shape[0]
    if "blocks" in params:
        q = params["blocks"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
        return Config(vocab, d, q.shape[2], q.shape[0], seq, 0, scan=True)
    layers = sum(1 for k in params if k.startswith("block_"))
    return Config(vocab, d, params["block_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape[1],
                  layers, seq, 0)


def loss_fn(params, tokens, remat: bool = False):
    cfg = _config_of(params)
    logits = Decoder(dataclasses.replace(cfg, batch=0), remat=remat).apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def dropout_loss_fn(params, batch, rate: float = 0.1):
    """``loss_fn`` in training mode, GPT-2's dropout ``rate`` on the attention probabilities and
    the residual branches: ``batch = {"tokens": …, "dropout": a jax.random.key}``, a fresh key
    per step."""
    cfg = _config_of(params)
    logits = Decoder(dataclasses.replace(cfg, batch=0), dropout=rate).apply(
        {"params": params}, batch["tokens"][:, :-1], rngs={"dropout": batch["dropout"]})
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:]).mean()


def remat_loss_fn(params, tokens):
    """``loss_fn`` with every block under ``nn.remat`` (same parameters)."""
    return loss_fn(params, tokens, remat=True)


linen_step = make_step(loss_fn, name="linen_step")
linen_scan_step = make_step(loss_fn, name="linen_scan_step")


def _args(cfg: Config, abstract: bool, seed: int = 0):
    model = Decoder(dataclasses.replace(cfg, batch=0))
    def init():
        return model.init(jax.random.PRNGKey(seed), jnp.zeros((1, cfg.seq), jnp.int32))["params"]
    return token_step_args(init, cfg, abstract=abstract, seed=seed)


def linen_step_args(size: str = "tiny", abstract: bool = False):
    """``(params, opt_state, tokens)`` of ``linen_step`` (unrolled)."""
    return _args(TINY if check_size(size) == "tiny" else FULL, abstract)


def linen_scan_step_args(size: str = "tiny", abstract: bool = False):
    """``(params, opt_state, tokens)`` of ``linen_scan_step`` (``nn.scan``)."""
    return _args(dataclasses.replace(TINY, scan=True) if check_size(size) == "tiny" else FULL_SCAN, abstract)
