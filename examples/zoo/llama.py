"""The zoo's entry for ``examples/llama.py`` (Llama-3 style: RMSNorm, RoPE with ``jnp.stack``,
GQA, SwiGLU, AdamW), which is used as it is: ``llama_step`` unrolls the layers and writes the
attention out as einsums; ``llama_scan_step`` scans stacked layers (``jax.lax.scan``) and calls
``jax.nn.dot_product_attention`` (``implementation=None``).

The head counts cannot be read from the weights' shapes, so the steps look the config up by
(vocab, dim, ffn) among the sizes below. Sizes: ``tiny`` (examples/llama.py's default: vocab
256, dim 64, 2 layers, 4 heads / 2 kv heads, ffn 128, batch 8 × seq 32) and ``full``
(unrolled: Llama-3.2-1B shape, dim 2048, 16 layers, 32 / 8 heads, ffn 8192, vocab 128256,
seq 2048, batch 8, bf16, untied head: 1.50e9 parameters; scanned: Llama-3-8B shape, dim 4096,
32 layers, 32 / 8 heads, ffn 14336, vocab 128256, seq 8192, batch 8, bf16: 8.03e9 parameters).
"""
from __future__ import annotations

import dataclasses


from examples import llama
from examples.zoo.common import check_size

TINY = llama.LlamaConfig()
FULL = llama.LlamaConfig(vocab=128256, dim=2048, layers=16, heads=32, kv_heads=8, ffn=8192, seq=2048, batch=8,
                         dtype="bfloat16")
FULL_SCAN = dataclasses.replace(llama.LLAMA3_8B, implementation=None)
_KNOWN = {(c.vocab, c.dim, c.ffn): c for c in (TINY, FULL, FULL_SCAN)}


def _config_of(params, scan: bool) -> llama.LlamaConfig:
    vocab, dim = params["embed"].shape
    layers = params["layers"]
    ffn = (layers["w1"] if scan else layers[0]["w1"]).shape[-1]
    cfg = _KNOWN.get((vocab, dim, ffn))
    if cfg is None:
        raise ValueError(f"no zoo llama config with vocab {vocab}, dim {dim}, ffn {ffn}")
    n = layers["w1"].shape[0] if scan else len(layers)
    return dataclasses.replace(cfg, layers=n, scan=scan, attention="dpa" if scan else "einsum")


def llama_step(params, opt_state, batch):
    """AdamW step, unrolled layers, einsum attention."""
    return llama.make_train_step(_config_of(params, scan=False))(params, opt_state, batch)


def llama_scan_step(params, opt_state, batch):
    """AdamW step, ``lax.scan`` over stacked layers, ``jax.nn.dot_product_attention``."""
    return llama.make_train_step(_config_of(params, scan=True))(params, opt_state, batch)


def _cfg(size: str, scan: bool) -> llama.LlamaConfig:
    base = TINY if check_size(size) == "tiny" else (FULL_SCAN if scan else FULL)
    return dataclasses.replace(base, scan=scan, attention="dpa" if scan else "einsum")


def llama_step_args(size: str = "tiny", abstract: bool = False):
    return llama.train_step_args(_cfg(size, scan=False), abstract=abstract)


def llama_scan_step_args(size: str = "tiny", abstract: bool = False):
    return llama.train_step_args(_cfg(size, scan=True), abstract=abstract)
