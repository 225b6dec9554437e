"""A GShard mixture-of-experts decoder written with flax linen: every other block's FFN is a
``MoE`` layer — a router ``nn.Dense(E)``, **top-2 routing with ``jax.lax.top_k``** on the
softmax gates (renormalised), expert capacity ``C = ceil(capacity_factor · k · S / E)`` per
group (a group = one sequence) with a token's slot given by a ``cumsum`` of its one-hot
choices, and **dense dispatch / combine einsums** (``"gsec,gsm->egcm"`` … ``"gsec,egcm->gsm"``,
GShard / Switch / MaxText's dense path); expert weights are ``(E, d, f)`` / ``(E, f, d)``
params. Trained with optax AdamW; the loss adds GShard's load-balancing term.

Sizes: ``tiny`` (vocab 128, d 64, 4 heads, 2 layers, 4 experts, batch 8 × seq 16) and
``full`` (GShard MoE-1.3B shape: d 768, 16 heads, 16 layers, 16 experts, ffn 8·d, vocab
32000, seq 1024, batch 8; 1.37e9 parameters).
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from examples.zoo.common import check_size, make_step, token_step_args

TOP_K = 2
CAPACITY_FACTOR = 1.0
AUX_LOSS_COEF = 0.01


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int
    d: int
    heads: int
    layers: int
    experts: int
    ffn: int
    seq: int
    batch: int = 0


TINY = Config(vocab=128, d=64, heads=4, layers=2, experts=4, ffn=4, seq=16, batch=8)
FULL = Config(vocab=32000, d=768, heads=16, layers=16, experts=16, ffn=8, seq=1024, batch=8)


class MoE(nn.Module):
    experts: int
    ffn: int

    @nn.compact
    def __call__(self, x):  # x: (groups, seq, d)
        g, s, d = x.shape
        e, f = self.experts, self.ffn * d
        cap = min(s, math.ceil(CAPACITY_FACTOR * TOP_K * s / e))
        gates = jax.nn.softmax(nn.Dense(e, use_bias=False, name="router")(x), axis=-1)   # (g, s, e)
        top_gates, top_idx = jax.lax.top_k(gates, TOP_K)                                 # (g, s, k)
        top_gates = top_gates / jnp.sum(top_gates, axis=-1, keepdims=True)
        masks = jax.nn.one_hot(top_idx, e, dtype=x.dtype)                               # (g, s, k, e)
        # slots: the k-th choices queue behind all earlier choices (top-1 first)
        flat = jnp.swapaxes(masks, 1, 2).reshape(g, TOP_K * s, e)
        pos = (jnp.cumsum(flat, axis=1) - 1.0) * flat
        pos = jnp.swapaxes(pos.reshape(g, TOP_K, s, e), 1, 2)                           # (g, s, k, e)
        keep = masks * (pos < cap)
        slot = jax.nn.one_hot(jnp.sum(pos * keep, axis=-1).astype(jnp.int32), cap, dtype=x.dtype)  # (g, s, k, c)
        dispatch = jnp.einsum("gske,gskc->gsec", keep, slot)
        combine = jnp.einsum("gsk,gske,gskc->gsec", top_gates, keep, slot)
        wi = self.param("wi", nn.initializers.lecun_normal(), (e, d, f))
        wo = self.param("wo", nn.initializers.lecun_normal(), (e, f, d))
        h = jnp.einsum("gsec,gsm->egcm", dispatch, x)
        h = jnp.einsum("egcf,efm->egcm", jax.nn.relu(jnp.einsum("egcm,emf->egcf", h, wi)), wo)
        y = jnp.einsum("gsec,egcm->gsm", combine, h)
        aux = e * jnp.mean(jnp.sum(jnp.mean(masks[:, :, 0], axis=1) * jnp.mean(gates, axis=1), axis=-1))
        return y, aux


class Block(nn.Module):
    cfg: Config
    moe: bool

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.cfg.heads, qkv_features=d)(h, h, mask=mask)
        h = nn.LayerNorm()(x)
        if self.moe:
            y, aux = MoE(self.cfg.experts, self.cfg.ffn)(h)
            return x + y, aux
        return x + nn.Dense(d)(nn.gelu(nn.Dense(self.cfg.ffn * d)(h))), 0.0


class Decoder(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, tokens):
        cfg = self.cfg
        x = nn.Embed(cfg.vocab, cfg.d)(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (cfg.seq, cfg.d))[: tokens.shape[1]]
        aux = 0.0
        for i in range(cfg.layers):
            x, a = Block(cfg, moe=i % 2 == 0, name=f"block_{i}")(x)
            aux = aux + a
        return nn.Dense(cfg.vocab, name="head")(nn.LayerNorm()(x)), aux


def _config_of(params) -> Config:
    vocab, d = params["Embed_0"]["embedding"].shape
    b0 = params["block_0"]
    e, _, f = b0["MoE_0"]["wi"].shape
    heads = b0["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape[1]
    layers = sum(1 for k in params if k.startswith("block_"))
    return Config(vocab, d, heads, layers, e, f // d, params["pos"].shape[0])


def loss_fn(params, tokens):
    logits, aux = Decoder(_config_of(params)).apply({"params": params}, tokens[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return ce + AUX_LOSS_COEF * aux


moe_step = make_step(loss_fn, name="moe_step")


def moe_step_args(size: str = "tiny", abstract: bool = False, seed: int = 0):
    """``(params, opt_state, tokens)`` of ``moe_step``."""
    cfg = TINY if check_size(size) == "tiny" else FULL
    model = Decoder(dataclasses.replace(cfg, batch=0))
    return token_step_args(lambda: model.init(jax.random.PRNGKey(seed), jnp.zeros((1, cfg.seq), jnp.int32))["params"],
                           cfg, abstract=abstract, seed=seed)
