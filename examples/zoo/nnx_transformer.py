"""A GPT-style decoder written with flax NNX as users write it (``nnx.Module``s holding their
``nnx.Linear`` / ``nnx.MultiHeadAttention`` / ``nnx.LayerNorm`` / ``nnx.Embed``, ``nnx.split``
into a graphdef and a ``State``, optax AdamW on the ``State``) — unrolled (``nnx_step``: an
``nnx.List`` of blocks) and scanned (``nnx_scan_step``: blocks created with ``nnx.vmap``,
run with ``nnx.scan``).

Sizes: ``tiny`` (vocab 128, d 64, 4 heads, 2 layers, batch 8 × seq 16) and ``full``
(unrolled: d 2048, 16 heads, 24 layers, vocab 32000, seq 1024, batch 8, 1.34e9 parameters;
scanned: d 5120, 40 heads, 40 layers, vocab 32000, seq 1024, batch 16, 12.92e9 parameters).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from examples.zoo.common import DecoderConfig, check_size, make_step, token_step_args


Config = DecoderConfig
TINY = Config(vocab=128, d=64, heads=4, layers=2, seq=16, batch=8)
FULL = Config(vocab=32000, d=2048, heads=16, layers=24, seq=1024, batch=8)
FULL_SCAN = Config(vocab=32000, d=5120, heads=40, layers=40, seq=1024, batch=16, scan=True)


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
        self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, keep_rngs=False, rngs=rngs)
        self.up, self.down = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        mask = nnx.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        h = self.ln1(x)
        x = x + self.attn(h, h, h, mask=mask)
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class Decoder(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.scan = cfg.scan
        self.embed = nnx.Embed(cfg.vocab, cfg.d, rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (cfg.seq, cfg.d)) * 0.02)
        if cfg.scan:
            @nnx.vmap(in_axes=0, out_axes=0)
            def make(key):
                return Block(cfg.d, cfg.heads, rngs=nnx.Rngs(params=key))
            self.blocks = make(jax.random.split(rngs.params(), cfg.layers))
        else:
            self.blocks = nnx.List([Block(cfg.d, cfg.heads, rngs=rngs) for _ in range(cfg.layers)])
        self.ln = nnx.LayerNorm(cfg.d, rngs=rngs)
        self.head = nnx.Linear(cfg.d, cfg.vocab, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        if self.scan:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(h, blk):
                return blk(h)
            x = body(x, self.blocks)
        else:
            for blk in self.blocks:
                x = blk(x)
        return self.head(self.ln(x))


def _shape(v):
    return tuple(getattr(v, "shape", None) or jnp.shape(getattr(v, "value", v)))


def _config_of(state) -> Config:
    vocab, d = _shape(state["embed"]["embedding"])
    seq = _shape(state["pos"])[0]
    blocks = state["blocks"]
    if "attn" in blocks:  # scanned: stacked (layers, d, heads, head_dim)
        q = _shape(blocks["attn"]["query"]["kernel"])
        return Config(vocab, d, q[2], q[0], seq, scan=True)
    return Config(vocab, d, _shape(blocks[0]["attn"]["query"]["kernel"])[1], len(blocks), seq)


@functools.lru_cache(maxsize=None)
def graphdef(cfg: Config):
    """The model's graphdef (built abstractly: nothing allocated)."""
    return nnx.graphdef(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))


def loss_fn(state, tokens):
    model = nnx.merge(graphdef(_config_of(state)), state)
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


nnx_step = make_step(loss_fn, name="nnx_step")
nnx_scan_step = make_step(loss_fn, name="nnx_scan_step")


def _args(cfg: Config, abstract: bool, seed: int = 0):
    model_cfg = dataclasses.replace(cfg, batch=0)

    def init():
        return nnx.state(Decoder(model_cfg, rngs=nnx.Rngs(seed)))
    return token_step_args(init, cfg, abstract=abstract, seed=seed)


def nnx_step_args(size: str = "tiny", abstract: bool = False):
    """``(state, opt_state, tokens)`` of ``nnx_step`` (unrolled)."""
    return _args(TINY if check_size(size) == "tiny" else FULL, abstract)


def nnx_scan_step_args(size: str = "tiny", abstract: bool = False):
    """``(state, opt_state, tokens)`` of ``nnx_scan_step`` (``nnx.scan``)."""
    return _args(dataclasses.replace(TINY, scan=True) if check_size(size) == "tiny" else FULL_SCAN, abstract)
