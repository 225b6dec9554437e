"""A Mixtral-style sparse decoder in plain JAX + optax: ``examples/llama.py``'s layer (RMSNorm,
RoPE, GQA through ``jax.nn.dot_product_attention``) with its SwiGLU feed-forward replaced by a
**dropless top-2 mixture of experts** written as JAX users write one without a custom kernel:

* the router's logits (h, E) → ``lax.top_k`` over the experts → softmax over the two kept
  logits (Mixtral's weights);
* every (token, choice) pair sorted by expert (``jnp.argsort`` over all the batch's pairs),
  the group sizes a ``jnp.bincount``, each expert's SwiGLU a **``jax.lax.ragged_dot``** over
  its contiguous rows (no capacity, no token dropped), the pairs put back by the inverse
  permutation (a gather) and summed with their weights;
* layers stacked and run under ``jax.lax.scan`` (MaxText's default), AdamW.

No router load-balancing loss: Mixtral's is a product of means over every token of the batch,
which a pipeline refuses to cut into micro-batches (``autopar.pipeline.row_form``).

Sizes: ``tiny`` (vocab 256, dim 64, 2 layers, 4 / 2 heads, 4 experts of ffn 128, batch 8 ×
seq 16) and ``full`` (Mixtral-8x7B shape: vocab 32000, dim 4096, 32 layers, 32 / 8 heads,
8 experts of ffn 14336, top 2, seq 4096, batch 8, bf16: 46.7e9 parameters).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from examples import llama
from examples.zoo.common import OPTIMIZER, check_size, make_step, step_args


@dataclasses.dataclass(frozen=True)
class MixtralConfig(llama.LlamaConfig):
    """``llama.LlamaConfig``'s sizes (``dpa`` attention) with ``experts`` SwiGLU experts of
    ``ffn`` each, ``top_k`` per token."""
    experts: int = 4
    top_k: int = 2
    seq: int = 16
    attention: str = "dpa"


TINY = MixtralConfig()
FULL = MixtralConfig(vocab=32000, dim=4096, layers=32, heads=32, kv_heads=8, ffn=14336, experts=8, seq=4096,
                     batch=8, dtype="bfloat16")
_KNOWN = {(c.vocab, c.dim, c.experts): c for c in (TINY, FULL)}


def init_params(cfg: MixtralConfig) -> dict:
    """Zeros of the right shapes and dtype (``step_args`` draws the values)."""
    d, hd, L, E, dt = cfg.dim, cfg.head_dim, cfg.layers, cfg.experts, jnp.dtype(cfg.dtype)
    z = lambda *s: jnp.zeros(s, dt)  # noqa: E731
    layers = {"attn_norm": z(L, d), "wq": z(L, d, cfg.heads * hd), "wk": z(L, d, cfg.kv_heads * hd),
              "wv": z(L, d, cfg.kv_heads * hd), "wo": z(L, cfg.heads * hd, d), "mlp_norm": z(L, d),
              "router": z(L, d, E), "w1": z(L, E, d, cfg.ffn), "w3": z(L, E, d, cfg.ffn), "w2": z(L, E, cfg.ffn, d)}
    return {"embed": z(cfg.vocab, d), "layers": layers, "norm": z(d), "head": z(d, cfg.vocab)}


def moe(cfg: MixtralConfig, p, h):
    """Dropless top-k MoE of h (B, S, D): pairs sorted by expert, ``ragged_dot`` per group."""
    b, s, d = h.shape
    tokens = h.reshape(b * s, d)
    logits = (tokens @ p["router"]).astype(jnp.float32)
    top, experts = jax.lax.top_k(logits, cfg.top_k)                      # (T, k)
    weights = jax.nn.softmax(top, axis=-1).astype(h.dtype)
    flat = experts.reshape(-1)                                            # (T·k,)
    order = jnp.argsort(flat)
    rows = jnp.take(tokens, order // cfg.top_k, axis=0)                   # pairs grouped by expert
    sizes = jnp.bincount(flat, length=cfg.experts).astype(jnp.int32)
    act = jax.nn.silu(jax.lax.ragged_dot(rows, p["w1"], sizes)) * jax.lax.ragged_dot(rows, p["w3"], sizes)
    out = jax.lax.ragged_dot(act, p["w2"], sizes)
    back = jnp.take(out, jnp.argsort(order), axis=0).reshape(b * s, cfg.top_k, d)   # the pairs' order again
    return jnp.einsum("tkd,tk->td", back, weights).reshape(b, s, d)


def block(cfg: MixtralConfig, p, x, positions):
    b, s, _ = x.shape
    h = llama.rms_norm(p["attn_norm"], x)
    q = (h @ p["wq"]).reshape(b, s, cfg.heads, cfg.head_dim)
    k = (h @ p["wk"]).reshape(b, s, cfg.kv_heads, cfg.head_dim)
    v = (h @ p["wv"]).reshape(b, s, cfg.kv_heads, cfg.head_dim)
    q, k = llama.rope(q, positions), llama.rope(k, positions)
    x = x + llama.attention(cfg, q, k, v).reshape(b, s, -1) @ p["wo"]
    return x + moe(cfg, p, llama.rms_norm(p["mlp_norm"], x))


def _config_of(params) -> MixtralConfig:
    vocab, dim = params["embed"].shape
    cfg = _KNOWN.get((vocab, dim, params["layers"]["router"].shape[-1]))
    if cfg is None:
        raise ValueError(f"no zoo mixtral config with vocab {vocab}, dim {dim}")
    return cfg


def loss_fn(params, tokens):
    """Next-token cross-entropy of ``tokens`` (B, S + 1)."""
    cfg = _config_of(params)
    x = jnp.take(params["embed"], tokens[:, :-1], axis=0)
    positions = jnp.arange(x.shape[1])
    x, _ = jax.lax.scan(lambda c, p: (block(cfg, p, c, positions), None), x, params["layers"])
    logits = (llama.rms_norm(params["norm"], x) @ params["head"]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


mixtral_step = make_step(loss_fn, name="mixtral_step")


def mixtral_step_args(size: str = "tiny", abstract: bool = False):
    cfg = {"tiny": TINY, "full": FULL}[check_size(size)]
    tokens = jax.ShapeDtypeStruct((cfg.batch, cfg.seq + 1), jnp.int32)
    return step_args(lambda: init_params(cfg), tokens, optimizer=OPTIMIZER, abstract=abstract,
                     make_batch=lambda: jax.random.randint(jax.random.PRNGKey(1), tokens.shape, 0, cfg.vocab))


__all__ = ["FULL", "TINY", "MixtralConfig", "loss_fn", "mixtral_step", "mixtral_step_args"]
