"""Llama-3-style decoder (plain JAX + optax): RMSNorm, RoPE written with ``jnp.stack`` of the
rotated halves, grouped-query attention (kv heads repeated to the query heads, or handed
to ``jax.nn.dot_product_attention`` as they are), causal mask, SwiGLU MLP, untied output
head, cross-entropy, optax AdamW.

Two layer layouts: ``scan=True`` stacks every layer's weights on a leading (layers, …) dim
and runs them with ``jax.lax.scan``; ``scan=False`` unrolls a list of per-layer dicts.
``attention="einsum"`` writes the attention out (scores materialised, mask by ``jnp.where``);
``attention="dpa"`` calls ``jax.nn.dot_product_attention(q, k, v, is_causal=True,
implementation=cfg.implementation)`` (``None``, ``"xla"`` or ``"cudnn"``; autopar plans
``"cudnn"`` on a CPU by intercepting the call while tracing).

Step functions (as in ``examples/gpt.py``: for every ``FOO`` a ``FOO_args(**knobs)``):

* ``make_train_step(cfg)(params, opt_state, batch) -> (params, opt_state, loss)`` (AdamW)
  / ``train_step_args``
* ``make_forward(cfg)(params, tokens) -> logits`` / ``forward_args``

``batch = {"tokens": int32 (B, S), "labels": int32 (B, S)}``. ``LLAMA3_8B`` is the 8B shape.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

RMS_EPS = 1e-5
ROPE_THETA = 500000.0
INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab: int = 256
    dim: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    seq: int = 32
    batch: int = 8
    scan: bool = False
    attention: str = "einsum"          # "einsum" | "dpa"
    implementation: str | None = None  # jax.nn.dot_product_attention's, with attention="dpa"
    dtype: str = "float32"
    remat: bool = False                # jax.checkpoint each layer (only its input is saved for the backward)
    lr: float = 1e-3
    weight_decay: float = 0.1

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


LLAMA3_8B = LlamaConfig(vocab=128256, dim=4096, layers=32, heads=32, kv_heads=8, ffn=14336, seq=8192, batch=8,
                        scan=True, attention="dpa", dtype="bfloat16", remat=True)


def _layer_shapes(cfg: LlamaConfig) -> dict:
    d, hd = cfg.dim, cfg.head_dim
    return {"attn_norm": (d,), "wq": (d, cfg.heads * hd), "wk": (d, cfg.kv_heads * hd),
            "wv": (d, cfg.kv_heads * hd), "wo": (cfg.heads * hd, d), "mlp_norm": (d,),
            "w1": (d, cfg.ffn), "w3": (d, cfg.ffn), "w2": (cfg.ffn, d)}


def _build(cfg: LlamaConfig, make) -> dict:
    """``make(name, shape)`` → array; norms start at one."""
    layer = _layer_shapes(cfg)
    if cfg.scan:
        layers = {k: make(k, (cfg.layers,) + s) for k, s in layer.items()}
    else:
        layers = [{k: make(f"{i}.{k}", s) for k, s in layer.items()} for i in range(cfg.layers)]
    return {"embed": make("embed", (cfg.vocab, cfg.dim)), "layers": layers,
            "norm": make("norm", (cfg.dim,)), "head": make("head", (cfg.dim, cfg.vocab))}


def init_params(cfg: LlamaConfig, seed: int = 0, abstract: bool = False) -> dict:
    dt = jnp.dtype(cfg.dtype)
    if abstract:
        return _build(cfg, lambda name, shape: jax.ShapeDtypeStruct(shape, dt))
    rng = np.random.default_rng(seed)

    def make(name, shape):
        if name.endswith("norm"):
            return jnp.ones(shape, dt)
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32) * INIT_STD, dt)
    return _build(cfg, make)


def rms_norm(w, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + RMS_EPS)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope(x, positions):
    """Rotate pairs (x[2i], x[2i+1]) by position × θ^(−2i/D); the halves are put back with
    ``jnp.stack`` (the ``stack`` primitive) as in Llama's reference code. x: (B, S, H, D)."""
    d = x.shape[-1]
    freqs = ROPE_THETA ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)          # (D/2,)
    angles = positions[:, None].astype(jnp.float32) * freqs[None, :]             # (S, D/2)
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    xr = x.astype(jnp.float32).reshape(*x.shape[:-1], d // 2, 2)
    x1, x2 = xr[..., 0], xr[..., 1]
    out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def attention(cfg: LlamaConfig, q, k, v):
    """q (B, S, H, D), k/v (B, S, KV, D) → (B, S, H, D), causal."""
    if cfg.attention == "dpa":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=cfg.implementation)
    rep = cfg.heads // cfg.kv_heads
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)   # GQA: kv heads → query heads
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1])).astype(q.dtype)
    seq = q.shape[1]
    mask = jnp.tril(jnp.ones((seq, seq), bool))
    s = jnp.where(mask[None, None], s, jnp.finfo(s.dtype).min)
    p = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def block(cfg: LlamaConfig, p, x, positions):
    b, s, _ = x.shape
    h = rms_norm(p["attn_norm"], x)
    q = (h @ p["wq"]).reshape(b, s, cfg.heads, cfg.head_dim)
    k = (h @ p["wk"]).reshape(b, s, cfg.kv_heads, cfg.head_dim)
    v = (h @ p["wv"]).reshape(b, s, cfg.kv_heads, cfg.head_dim)
    q, k = rope(q, positions), rope(k, positions)
    x = x + attention(cfg, q, k, v).reshape(b, s, -1) @ p["wo"]
    h = rms_norm(p["mlp_norm"], x)
    return x + (jax.nn.silu(h @ p["w1"]) * (h @ p["w3"])) @ p["w2"]


def forward(cfg: LlamaConfig, params, tokens):
    x = jnp.take(params["embed"], tokens, axis=0)
    positions = jnp.arange(tokens.shape[1])
    layer = jax.checkpoint(lambda p, x: block(cfg, p, x, positions)) if cfg.remat else (
        lambda p, x: block(cfg, p, x, positions))
    if cfg.scan:
        x, _ = jax.lax.scan(lambda c, p: (layer(p, c), None), x, params["layers"])
    else:
        for p in params["layers"]:
            x = layer(p, x)
    return rms_norm(params["norm"], x) @ params["head"]


def loss_fn(cfg: LlamaConfig, params, batch):
    logits = forward(cfg, params, batch["tokens"]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1).mean()


def optimizer(cfg: LlamaConfig):
    return optax.adamw(learning_rate=cfg.lr, weight_decay=cfg.weight_decay)


def make_forward(cfg: LlamaConfig) -> Callable:
    def fwd(params, tokens):
        return forward(cfg, params, tokens)
    return fwd


def make_loss_fn(cfg: LlamaConfig) -> Callable:
    def loss(params, batch):
        return loss_fn(cfg, params, batch)
    return loss


def make_train_step(cfg: LlamaConfig) -> Callable:
    opt = optimizer(cfg)

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(cfg, p, batch))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return train_step


def _batch(cfg: LlamaConfig, seed: int, abstract: bool) -> dict:
    if abstract:
        t = jax.ShapeDtypeStruct((cfg.batch, cfg.seq), jnp.int32)
        return {"tokens": t, "labels": t}
    rng = np.random.default_rng(seed + 1)
    toks = rng.integers(0, cfg.vocab, (cfg.batch, cfg.seq + 1)).astype(np.int32)
    return {"tokens": jnp.asarray(toks[:, :-1]), "labels": jnp.asarray(toks[:, 1:])}


def train_step_args(cfg: LlamaConfig | None = None, *, abstract: bool = False, seed: int = 0, **knobs):
    cfg = cfg or LlamaConfig(**knobs)
    params = init_params(cfg, seed, abstract)
    state = jax.eval_shape(optimizer(cfg).init, params) if abstract else optimizer(cfg).init(params)
    return params, state, _batch(cfg, seed, abstract)


def forward_args(cfg: LlamaConfig | None = None, *, abstract: bool = False, seed: int = 0, **knobs):
    cfg = cfg or LlamaConfig(**knobs)
    return init_params(cfg, seed, abstract), _batch(cfg, seed, abstract)["tokens"]


def config(**knobs) -> LlamaConfig:
    return LlamaConfig(**knobs)


def train_step(params, opt_state, batch):
    """The default tiny config's step, unrolled (``make_train_step(LlamaConfig(...))`` for others)."""
    return make_train_step(LlamaConfig())(params, opt_state, batch)
