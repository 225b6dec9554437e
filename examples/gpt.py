"""GPT-2-style decoder example (plain JAX + optax, no flax).

Convention used by ``autopar plan examples/gpt.py:FUNC``: for every public step function
``FOO`` this module defines ``FOO_args(**knobs) -> tuple`` returning the example positional
arguments of ``FOO``. Every knob is a keyword argument with a small default. With
``abstract=True`` the arguments are ``jax.ShapeDtypeStruct`` pytrees built with
``jax.eval_shape`` -- nothing is allocated, so a 39B-parameter model can be described on a
laptop. Concrete arguments come from fixed PRNG seeds (deterministic)
(drawn with numpy: no XLA compilation, so building them is instant; the values differ
from those of the JAX-key ``init_*`` function).

Public step functions and their argument builders:

* ``train_step(params, opt_state, batch) -> (params, opt_state, loss)``  (AdamW, ``OPTIMIZER``)
                                                   / ``train_step_args``
* ``sgd_train_step(params, batch) -> (params, loss)``  (plain SGD) / ``sgd_train_step_args``
* ``forward(params, tokens) -> logits``            / ``forward_args``
* ``loss_fn(params, batch) -> loss``               / ``loss_fn_args`` (= ``params_and_batch``)

``batch = {"tokens": int32 (B, S), "labels": int32 (B, S)}`` (labels = next tokens).

Configuration: the parameters carry no config. ``vocab``, ``hidden``, ``seq`` and ``layers``
are read from the parameter shapes. The number of attention heads is the only thing shapes
cannot tell; two ways to fix it:

* the module-level functions above use ``default_heads(hidden)``: the head count of the
  Alpa GPT suite (``SUITE``) when ``hidden`` is one of its sizes, else ``hidden // HEAD_DIM``
  (``HEAD_DIM = 16``; the default ``GPTConfig()`` has hidden 64 -> 4 heads);
* ``make_train_step(cfg)``, ``make_sgd_train_step(cfg)``, ``make_forward(cfg)`` and
  ``make_loss_fn(cfg)`` return the same plain pure functions with ``cfg.heads`` baked in.

Suite models: ``train_step_args(suite="gpt-39b", abstract=True)`` (knob ``suite`` sets
layers/hidden/heads/seq/vocab from ``SUITE``; ``batch`` and ``dtype`` stay knobs), or
``args_for(SUITE["gpt-39b"], "train_step", abstract=True)``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from autopar import stage_boundary
from examples import steps

HEAD_DIM = 16            # head size used by ``default_heads`` outside the suite sizes
LEARNING_RATE = 1e-3     # AdamW (``train_step``)
WEIGHT_DECAY = 0.01
SGD_LEARNING_RATE = 0.1  # ``sgd_train_step``
INIT_STD = 0.02
LN_EPS = 1e-5

OPTIMIZER = optax.adamw(learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

_PARAM_SEED = 0
_DATA_SEED = 1


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab: int = 256
    seq: int = 32
    hidden: int = 64
    heads: int = 4
    layers: int = 2
    batch: int = 8
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} not divisible by heads={self.heads}")


# Alpa's GPT benchmark suite (seq 1024, vocab 51200). Batch is left at the GPTConfig default;
# override with dataclasses.replace(SUITE[name], batch=...).
SUITE: dict[str, GPTConfig] = {
    "gpt-350m": GPTConfig(vocab=51200, seq=1024, hidden=1024, heads=16, layers=24),
    "gpt-1.3b": GPTConfig(vocab=51200, seq=1024, hidden=2048, heads=32, layers=24),
    "gpt-2.6b": GPTConfig(vocab=51200, seq=1024, hidden=2560, heads=32, layers=32),
    "gpt-6.7b": GPTConfig(vocab=51200, seq=1024, hidden=4096, heads=32, layers=32),
    "gpt-15b": GPTConfig(vocab=51200, seq=1024, hidden=5120, heads=40, layers=48),
    "gpt-39b": GPTConfig(vocab=51200, seq=1024, hidden=8192, heads=64, layers=48),
}

_SUITE_HEADS = {cfg.hidden: cfg.heads for cfg in SUITE.values()}


def default_heads(hidden: int) -> int:
    """Head count used when none is given: the suite's for its hidden sizes, else hidden // HEAD_DIM."""
    return _SUITE_HEADS.get(hidden, max(1, hidden // HEAD_DIM))


def param_count(cfg: GPTConfig) -> int:
    """Number of parameters of ``init_params(cfg, ...)`` (tied embeddings, biases and LNs included)."""
    h, f = cfg.hidden, 4 * cfg.hidden
    per_layer = (2 * h                 # ln1
                 + h * 3 * h + 3 * h   # qkv
                 + h * h + h           # attn proj
                 + 2 * h               # ln2
                 + h * f + f           # fc
                 + f * h + h)          # mlp proj
    return cfg.vocab * h + cfg.seq * h + cfg.layers * per_layer + 2 * h


# ----------------------------------------------------------------------------- parameters

def _build_params(cfg: GPTConfig, normal: Callable, xp) -> dict:
    """Parameter pytree; ``normal(shape)`` draws N(0, 1) float32 samples, ``xp`` is np or jnp."""
    dtype = jnp.dtype(cfg.dtype)
    h = cfg.hidden
    w = lambda *shape: (INIT_STD * normal(shape)).astype(dtype)  # noqa: E731
    dense = lambda d_in, d_out: {"w": w(d_in, d_out), "b": xp.zeros((d_out,), dtype)}  # noqa: E731
    ln = lambda: {"scale": xp.ones((h,), dtype), "bias": xp.zeros((h,), dtype)}  # noqa: E731
    wte, wpe = w(cfg.vocab, h), w(cfg.seq, h)
    blocks = [{"ln1": ln(), "attn": {"qkv": dense(h, 3 * h), "proj": dense(h, h)},
               "ln2": ln(), "mlp": {"fc": dense(h, 4 * h), "proj": dense(4 * h, h)}}
              for _ in range(cfg.layers)]
    return {"wte": wte, "wpe": wpe, "blocks": blocks, "ln_f": ln()}


def init_params(cfg: GPTConfig, key) -> dict:
    """{"wte": (vocab, h), "wpe": (seq, h), "blocks": [block] * layers, "ln_f": LN}.

    block = {"ln1", "attn": {"qkv": {"w": (h, 3h), "b"}, "proj": {"w": (h, h), "b"}},
             "ln2", "mlp": {"fc": {"w": (h, 4h), "b"}, "proj": {"w": (4h, h), "b"}}}
    Weights ~ N(0, INIT_STD^2), biases 0, LN scales 1. Jittable / eval_shape-able.
    """
    counter = iter(range(1 << 30))
    normal = lambda shape: jax.random.normal(jax.random.fold_in(key, next(counter)), shape, jnp.float32)  # noqa: E731
    return _build_params(cfg, normal, jnp)


def _numpy_params(cfg: GPTConfig, seed: int) -> dict:
    """Same pytree as ``init_params`` drawn with numpy (no XLA compilation: fast example args)."""
    rng = np.random.default_rng(seed)
    return _build_params(cfg, lambda shape: rng.standard_normal(shape, dtype=np.float32), np)


def config_of(params, heads: int | None = None, batch: int = GPTConfig.batch) -> GPTConfig:
    """The GPTConfig matching ``params``' shapes (heads: given, else ``default_heads``)."""
    vocab, hidden = params["wte"].shape
    return GPTConfig(vocab=vocab, seq=params["wpe"].shape[0], hidden=hidden,
                     heads=default_heads(hidden) if heads is None else heads,
                     layers=len(params["blocks"]), batch=batch, dtype=params["wte"].dtype)


# ----------------------------------------------------------------------------- model

def _layer_norm(p, x):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * p["scale"] + p["bias"]


def _linear(p, x):
    return x @ p["w"] + p["b"]


def _attention(p, x, heads):
    B, S, H = x.shape
    d = H // heads
    qkv = _linear(p["qkv"], x)                                   # (B, S, 3H)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    split = lambda t: t.reshape(B, S, heads, d).transpose(0, 2, 1, 3)  # noqa: E731  (B, nh, S, d)
    q, k, v = split(q), split(k), split(v)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.asarray(math.sqrt(d), x.dtype)
    row = jax.lax.broadcasted_iota(jnp.int32, (S, S), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (S, S), 1)
    scores = jnp.where(col <= row, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)                # (B, nh, S, d)
    out = out.transpose(0, 2, 1, 3).reshape(B, S, H)
    return _linear(p["proj"], out)


def _mlp(p, x):
    return _linear(p["proj"], jax.nn.gelu(_linear(p["fc"], x)))


def _forward(params, tokens, heads, markers: bool = True):
    S = tokens.shape[1]
    x = jnp.take(params["wte"], tokens, axis=0) + params["wpe"][:S]
    for i, blk in enumerate(params["blocks"]):
        if i and markers:
            x = stage_boundary(x)  # identity; pipeline planning cuts layers here (one block per layer)
        x = x + _attention(blk["attn"], _layer_norm(blk["ln1"], x), heads)
        x = x + _mlp(blk["mlp"], _layer_norm(blk["ln2"], x))
    x = _layer_norm(params["ln_f"], x)
    return x @ params["wte"].T                                   # tied embeddings


def _loss(params, batch, heads, markers: bool = True):
    logits = _forward(params, batch["tokens"], heads, markers).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]
    return jnp.mean(nll)


def _heads(params, heads):
    return default_heads(params["wte"].shape[1]) if heads is None else heads


def make_forward(cfg: GPTConfig | None = None) -> Callable:
    """``forward(params, tokens) -> logits`` with ``cfg.heads`` (None: ``default_heads``)."""
    heads = None if cfg is None else cfg.heads

    def forward(params, tokens):
        return _forward(params, tokens, _heads(params, heads))
    return forward


def make_loss_fn(cfg: GPTConfig | None = None, *, markers: bool = True) -> Callable:
    """``loss_fn(params, batch) -> mean next-token cross-entropy``; ``markers=False``: without
    the ``stage_boundary`` between blocks (the planner then finds the layers itself)."""
    heads = None if cfg is None else cfg.heads

    def loss_fn(params, batch):
        return _loss(params, batch, _heads(params, heads), markers)
    return loss_fn


def make_train_step(cfg: GPTConfig | None = None, optimizer=None) -> Callable:
    """``train_step(params, opt_state, batch) -> (params, opt_state, loss)`` (default: ``OPTIMIZER``)."""
    return steps.optax_train_step(make_loss_fn(cfg), OPTIMIZER if optimizer is None else optimizer)


def make_sgd_train_step(cfg: GPTConfig | None = None, lr: float = SGD_LEARNING_RATE) -> Callable:
    """``sgd_train_step(params, batch) -> (params, loss)``: plain SGD with a constant step size."""
    return steps.sgd_train_step(make_loss_fn(cfg), lr)


forward = make_forward()
loss_fn = make_loss_fn()
train_step = make_train_step()
sgd_train_step = make_sgd_train_step()


# ----------------------------------------------------------------------------- example args

def _numpy_batch(cfg: GPTConfig, seed: int) -> dict:
    toks = np.random.default_rng(seed).integers(0, cfg.vocab, (cfg.batch, cfg.seq + 1), dtype=np.int32)
    return {"tokens": toks[:, :-1].copy(), "labels": toks[:, 1:].copy()}


_KINDS = ("train_step", "sgd_train_step", "forward", "loss_fn")


def args_for(cfg: GPTConfig, kind: str = "train_step", *, abstract: bool = False,
             optimizer=None) -> tuple:
    """Example positional arguments of the ``kind`` step function for ``cfg``.

    kind: "train_step" -> (params, opt_state, batch); "sgd_train_step" / "loss_fn" ->
    (params, batch); "forward" -> (params, tokens). ``abstract=True``: ShapeDtypeStructs
    via ``jax.eval_shape`` (no allocation). Concrete values are drawn with numpy from fixed
    seeds (deterministic, no compilation); they are not those of ``init_params(cfg, key)``.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    opt = OPTIMIZER if optimizer is None else optimizer
    if abstract:
        params = jax.eval_shape(functools.partial(init_params, cfg), jax.ShapeDtypeStruct((2,), jnp.uint32))
        sds = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
        batch = {"tokens": sds((cfg.batch, cfg.seq)), "labels": sds((cfg.batch, cfg.seq))}
    else:
        params = jax.device_put(_numpy_params(cfg, _PARAM_SEED))
        batch = jax.device_put(_numpy_batch(cfg, _DATA_SEED))
    if kind == "train_step":
        opt_state = jax.eval_shape(opt.init, params) if abstract else opt.init(params)
        return params, opt_state, batch
    if kind == "forward":
        return params, batch["tokens"]
    return params, batch


def config_from_knobs(*, layers: int = 2, hidden: int = 64, seq: int = 32, vocab: int = 256,
                      batch: int = 8, heads: int | None = None, dtype: Any = jnp.float32,
                      suite: str | None = None) -> GPTConfig:
    """GPTConfig from the ``*_args`` knobs. ``suite`` (a ``SUITE`` key) overrides layers/hidden/
    heads/seq/vocab; ``heads`` defaults to ``default_heads(hidden)``."""
    dtype = jnp.dtype(dtype)
    if suite is not None:
        if suite not in SUITE:
            raise ValueError(f"unknown suite config {suite!r}; known: {sorted(SUITE)}")
        return dataclasses.replace(SUITE[suite], batch=batch, dtype=dtype)
    return GPTConfig(vocab=vocab, seq=seq, hidden=hidden,
                     heads=default_heads(hidden) if heads is None else heads,
                     layers=layers, batch=batch, dtype=dtype)


def _knob_args(kind, *, layers=2, hidden=64, seq=32, vocab=256, batch=8, abstract=False,
               dtype=jnp.float32, suite=None):
    cfg = config_from_knobs(layers=layers, hidden=hidden, seq=seq, vocab=vocab, batch=batch,
                            dtype=dtype, suite=suite)
    return args_for(cfg, kind, abstract=abstract)


def train_step_args(*, layers: int = 2, hidden: int = 64, seq: int = 32, vocab: int = 256,
                    batch: int = 8, abstract: bool = False, dtype: Any = jnp.float32,
                    suite: str | None = None) -> tuple:
    """Example ``(params, opt_state, batch)`` for ``train_step``."""
    return _knob_args("train_step", layers=layers, hidden=hidden, seq=seq, vocab=vocab, batch=batch,
                      abstract=abstract, dtype=dtype, suite=suite)


def sgd_train_step_args(*, layers: int = 2, hidden: int = 64, seq: int = 32, vocab: int = 256,
                        batch: int = 8, abstract: bool = False, dtype: Any = jnp.float32,
                        suite: str | None = None) -> tuple:
    """Example ``(params, batch)`` for ``sgd_train_step``."""
    return _knob_args("sgd_train_step", layers=layers, hidden=hidden, seq=seq, vocab=vocab, batch=batch,
                      abstract=abstract, dtype=dtype, suite=suite)


def forward_args(*, layers: int = 2, hidden: int = 64, seq: int = 32, vocab: int = 256,
                 batch: int = 8, abstract: bool = False, dtype: Any = jnp.float32,
                 suite: str | None = None) -> tuple:
    """Example ``(params, tokens)`` for ``forward``."""
    return _knob_args("forward", layers=layers, hidden=hidden, seq=seq, vocab=vocab, batch=batch,
                      abstract=abstract, dtype=dtype, suite=suite)


def params_and_batch(*, layers: int = 2, hidden: int = 64, seq: int = 32, vocab: int = 256,
                     batch: int = 8, abstract: bool = False, dtype: Any = jnp.float32,
                     suite: str | None = None) -> tuple:
    """Example ``(params, batch)`` for ``loss_fn`` (pipeline-style API)."""
    return _knob_args("loss_fn", layers=layers, hidden=hidden, seq=seq, vocab=vocab, batch=batch,
                      abstract=abstract, dtype=dtype, suite=suite)


loss_fn_args = params_and_batch

__all__ = [
    "GPTConfig", "SUITE", "HEAD_DIM", "LEARNING_RATE", "WEIGHT_DECAY", "SGD_LEARNING_RATE", "OPTIMIZER",
    "default_heads", "param_count", "init_params", "config_of", "config_from_knobs", "args_for",
    "make_forward", "make_loss_fn", "make_train_step", "make_sgd_train_step",
    "forward", "loss_fn", "train_step", "sgd_train_step",
    "forward_args", "loss_fn_args", "train_step_args", "sgd_train_step_args", "params_and_batch",
]
