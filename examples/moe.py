"""GShard-style mixture-of-experts transformer example (plain JAX + optax, no flax).

Convention used by ``autopar plan examples/moe.py:FUNC``: for every public step function
``FOO`` this module defines ``FOO_args(**knobs) -> tuple`` returning the example positional
arguments of ``FOO``. Every knob is a keyword argument with a small default. With
``abstract=True`` the arguments are ``jax.ShapeDtypeStruct`` pytrees built with
``jax.eval_shape`` -- nothing is allocated, so the 70B model can be described on a laptop.
Concrete arguments are drawn with numpy from fixed seeds (deterministic, no XLA
compilation; the values differ from those of the JAX-key ``init_params``).

Public step functions and their argument builders:

* ``train_step(params, opt_state, batch) -> (params, opt_state, loss)``  (AdamW, ``OPTIMIZER``)
                                                   / ``train_step_args``
* ``sgd_train_step(params, batch) -> (params, loss)``  (plain SGD) / ``sgd_train_step_args``
* ``forward(params, tokens) -> (logits, aux_loss)`` / ``forward_args``
* ``loss_fn(params, batch) -> loss``               / ``loss_fn_args`` (= ``params_and_batch``)

``batch = {"tokens": int32 (B, S), "labels": int32 (B, S)}`` (labels = next tokens).
``loss = mean next-token cross-entropy + AUX_LOSS_COEF * sum over MoE layers of the
load-balancing loss``.

Model: a pre-LayerNorm causal decoder like ``examples/gpt.py`` (tied embeddings, learned
positions) in which, as in GShard and Alpa's ``alpa/model/moe.py``, every other layer's FFN
is a mixture of experts: layers 0, 2, 4, ... are MoE layers, layers 1, 3, ... dense.

* Attention weights carry the head count in their shapes (``q``/``k``/``v``: (h, heads, h/heads),
  ``o``: (heads, h/heads, h)), so no function needs to be told the number of heads.
* MoE layer: router ``gate`` (h, E), expert weights ``wi`` (E, h, f) and ``wo`` (E, f, h),
  ``f = ffn_factor * h``, ReLU, no expert biases (GShard). Dense FFN: (h, f) and (f, h) with
  biases, GELU.
* Gating (GShard top-2, ``top_k=2``; ``top_k=1`` gives Switch-style top-1): softmax gates;
  expert 1 = ``argmax``, expert 2 = ``argmax`` of the gates with expert 1 masked out
  (argmax/one-hot, no ``lax.top_k``, deterministic: no random second-expert policy); the two
  gates are renormalized to sum to 1; a token's position in an expert's buffer is a
  ``cumsum`` of the one-hot masks over the group, and tokens past the capacity
  ``C = min(S, ceil(capacity_factor * top_k * S / E))`` are dropped (top-1 choices are
  placed before top-2 choices).
* **A group is one sequence** (G = batch, S = seq): routing and capacity never look across
  sequences, so splitting a batch into micro-batches does not change the result (the
  pipeline requirement; Alpa's ``expert_group_size`` would mix sequences).
* Dispatch and combine are dense einsums, ``"gsec,gsm->egcm"``, ``"egcm,emf->egcf"``,
  ``"egcf,efm->egcm"``, ``"gsec,egcm->gsm"``: with the experts sharded on E and the groups
  on the batch the dispatch/combine become all-to-alls.
* Load-balancing loss (GShard): ``E * sum_e mean_s(top-1 mask)_e * mean_s(gates)_e`` per
  group, averaged over groups (1 for a uniform router).

``ffn_factor``: the brief said ``4h``; Alpa's MoE benchmark uses ``intermediate_size =
8 * hidden`` (for the dense and the expert FFNs), and the nominal sizes of the suite only come
out with 8, so ``SUITE`` uses ``ffn_factor=8`` while the small default config uses 4.

Parameter counts (``param_count``, all within 2 % of the nominal sizes):
moe-380m 0.384e9, moe-1.3b 1.347e9, moe-2.4b 2.383e9, moe-10b 10.168e9,
moe-27b 26.644e9, moe-70b 70.401e9.

``top_k`` and ``capacity_factor`` cannot be read from shapes: the module-level functions use
``TOP_K`` and ``CAPACITY_FACTOR``; ``make_loss_fn(cfg)`` / ``make_train_step(cfg)`` /
``make_sgd_train_step(cfg)`` / ``make_forward(cfg)`` bake in a config's values.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from autopar import stage_boundary
from examples import steps

HEAD_DIM = 16            # head size used by ``default_heads`` outside the suite sizes
SUITE_HEADS = 16
TOP_K = 2
CAPACITY_FACTOR = 1.0    # C = ceil(CAPACITY_FACTOR * TOP_K * S / E)  (GShard / Alpa: 2S/E)
AUX_LOSS_COEF = 0.01
LEARNING_RATE = 1e-3     # AdamW (``train_step``)
WEIGHT_DECAY = 0.01
SGD_LEARNING_RATE = 0.1  # ``sgd_train_step``
INIT_STD = 0.02
LN_EPS = 1e-5

OPTIMIZER = optax.adamw(learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

_PARAM_SEED = 0
_DATA_SEED = 1


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    vocab: int = 256
    seq: int = 32
    hidden: int = 64
    heads: int = 4
    layers: int = 2          # layers 0, 2, ... have an MoE FFN, 1, 3, ... a dense one
    experts: int = 4
    ffn_factor: int = 4      # FFN width = ffn_factor * hidden (dense and expert FFNs)
    top_k: int = TOP_K
    capacity_factor: float = CAPACITY_FACTOR
    batch: int = 8
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} not divisible by heads={self.heads}")
        if self.top_k not in (1, 2):
            raise ValueError(f"top_k must be 1 or 2, got {self.top_k}")
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} needs at least as many experts, got {self.experts}")
        if self.layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.layers}")

    @property
    def capacity(self) -> int:
        return expert_capacity(self.seq, self.experts, self.top_k, self.capacity_factor)


def expert_capacity(group: int, experts: int, top_k: int = TOP_K,
                    capacity_factor: float = CAPACITY_FACTOR) -> int:
    """Buffer slots per expert and group: ``min(S, ceil(capacity_factor * top_k * S / E))``."""
    return max(1, min(group, math.ceil(capacity_factor * top_k * group / experts)))


def is_moe_layer(i: int) -> bool:
    """Layer ``i`` has an MoE FFN (every other layer, starting with the first, as in Alpa)."""
    return i % 2 == 0


# Alpa's GShard MoE suite (seq 1024, vocab 32000, 16 heads, FFN 8h). Batch is left at the
# default; override with dataclasses.replace(SUITE[name], batch=...).
_S = dict(vocab=32000, seq=1024, heads=SUITE_HEADS, ffn_factor=8)
SUITE: dict[str, MoEConfig] = {
    "moe-380m": MoEConfig(hidden=768, layers=8, experts=8, **_S),
    "moe-1.3b": MoEConfig(hidden=768, layers=16, experts=16, **_S),
    "moe-2.4b": MoEConfig(hidden=1024, layers=16, experts=16, **_S),
    "moe-10b": MoEConfig(hidden=1536, layers=16, experts=32, **_S),
    "moe-27b": MoEConfig(hidden=2048, layers=16, experts=48, **_S),
    "moe-70b": MoEConfig(hidden=2048, layers=32, experts=64, **_S),
}

_SUITE_HIDDEN = {cfg.hidden for cfg in SUITE.values()}


def default_heads(hidden: int) -> int:
    """Head count used when none is given: 16 for the suite's hidden sizes, else hidden // HEAD_DIM."""
    return SUITE_HEADS if hidden in _SUITE_HIDDEN else max(1, hidden // HEAD_DIM)


def param_count(cfg: MoEConfig) -> int:
    """Number of parameters of ``init_params(cfg, ...)`` (tied embeddings, biases and LNs included)."""
    h, f, E = cfg.hidden, cfg.ffn_factor * cfg.hidden, cfg.experts
    attn = 2 * h + 4 * h * h + 4 * h + 2 * h          # ln1, q/k/v/o + biases, ln2
    dense = h * f + f + f * h + h
    moe = h * E + 2 * E * h * f
    n_moe = sum(is_moe_layer(i) for i in range(cfg.layers))
    return (cfg.vocab * h + cfg.seq * h + cfg.layers * attn + n_moe * moe
            + (cfg.layers - n_moe) * dense + 2 * h)


# ----------------------------------------------------------------------------- parameters

def _build_params(cfg: MoEConfig, normal: Callable, xp) -> dict:
    """Parameter pytree; ``normal(shape)`` draws N(0, 1) float32 samples, ``xp`` is np or jnp."""
    dtype = jnp.dtype(cfg.dtype)
    h, nh, f, E = cfg.hidden, cfg.heads, cfg.ffn_factor * cfg.hidden, cfg.experts
    d = h // nh
    w = lambda *shape: (INIT_STD * normal(shape)).astype(dtype)  # noqa: E731
    zeros = lambda *shape: xp.zeros(shape, dtype)  # noqa: E731
    ln = lambda: {"scale": xp.ones((h,), dtype), "bias": zeros(h)}  # noqa: E731
    wte, wpe = w(cfg.vocab, h), w(cfg.seq, h)
    blocks = []
    for i in range(cfg.layers):
        attn = {"q": {"w": w(h, nh, d), "b": zeros(nh, d)}, "k": {"w": w(h, nh, d), "b": zeros(nh, d)},
                "v": {"w": w(h, nh, d), "b": zeros(nh, d)}, "o": {"w": w(nh, d, h), "b": zeros(h)}}
        blk = {"ln1": ln(), "attn": attn, "ln2": ln()}
        if is_moe_layer(i):
            blk["moe"] = {"gate": w(h, E), "wi": w(E, h, f), "wo": w(E, f, h)}
        else:
            blk["mlp"] = {"fc": {"w": w(h, f), "b": zeros(f)}, "proj": {"w": w(f, h), "b": zeros(h)}}
        blocks.append(blk)
    return {"wte": wte, "wpe": wpe, "blocks": blocks, "ln_f": ln()}


def init_params(cfg: MoEConfig, key) -> dict:
    """{"wte": (vocab, h), "wpe": (seq, h), "blocks": [block] * layers, "ln_f": LN}.

    block = {"ln1", "attn": {"q"/"k"/"v": {"w": (h, heads, h/heads), "b": (heads, h/heads)},
             "o": {"w": (heads, h/heads, h), "b": (h,)}}, "ln2",
             "moe": {"gate": (h, E), "wi": (E, h, f), "wo": (E, f, h)}   (even layers)
             | "mlp": {"fc": {"w": (h, f), "b"}, "proj": {"w": (f, h), "b"}}}  (odd layers)
    Weights ~ N(0, INIT_STD^2), biases 0, LN scales 1. Jittable / eval_shape-able.
    """
    counter = iter(range(1 << 30))
    normal = lambda shape: jax.random.normal(jax.random.fold_in(key, next(counter)), shape, jnp.float32)  # noqa: E731
    return _build_params(cfg, normal, jnp)


def _numpy_params(cfg: MoEConfig, seed: int) -> dict:
    """Same pytree as ``init_params`` drawn with numpy (no XLA compilation: fast example args)."""
    rng = np.random.default_rng(seed)
    return _build_params(cfg, lambda shape: rng.standard_normal(shape, dtype=np.float32), np)


def _abstract_params(cfg) -> dict:
    """Same pytree as ``init_params`` as ShapeDtypeStructs (``jax.eval_shape``; zeros instead of
    random draws only to trace faster -- nothing is allocated either way)."""
    return jax.eval_shape(lambda: _build_params(cfg, lambda shape: jnp.zeros(shape, jnp.float32), jnp))


def config_of(params, batch: int = MoEConfig.batch, top_k: int = TOP_K,
              capacity_factor: float = CAPACITY_FACTOR) -> MoEConfig:
    """The MoEConfig matching ``params``' shapes (top_k, capacity factor and batch: given)."""
    vocab, hidden = params["wte"].shape
    blk = params["blocks"][0]
    return MoEConfig(vocab=vocab, seq=params["wpe"].shape[0], hidden=hidden,
                     heads=blk["attn"]["q"]["w"].shape[1], layers=len(params["blocks"]),
                     experts=blk["moe"]["gate"].shape[1], ffn_factor=blk["moe"]["wi"].shape[2] // hidden,
                     top_k=top_k, capacity_factor=capacity_factor, batch=batch, dtype=params["wte"].dtype)


# ----------------------------------------------------------------------------- model

def _layer_norm(p, x):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * p["scale"] + p["bias"]


def _attention(p, x):
    S = x.shape[1]
    d = p["q"]["w"].shape[2]
    proj = lambda q: jnp.einsum("bsh,hnd->bsnd", x, q["w"]) + q["b"]  # noqa: E731
    q, k, v = proj(p["q"]), proj(p["k"]), proj(p["v"])             # (B, S, nh, d)
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / jnp.asarray(math.sqrt(d), x.dtype)
    row = jax.lax.broadcasted_iota(jnp.int32, (S, S), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (S, S), 1)
    scores = jnp.where(col <= row, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bnqk,bknd->bqnd", probs, v)
    return jnp.einsum("bqnd,ndh->bqh", out, p["o"]["w"]) + p["o"]["b"]


def _mlp(p, x):
    return jax.nn.gelu(x @ p["fc"]["w"] + p["fc"]["b"]) @ p["proj"]["w"] + p["proj"]["b"]


def _gating(gates, top_k, capacity):
    """GShard top-2 (or top-1) gating of one group per row: gates (G, S, E) ->
    (combine (G, S, E, C), dispatch (G, S, E, C), aux loss scalar)."""
    G, S, E = gates.shape
    dt = gates.dtype
    mask1 = jax.nn.one_hot(jnp.argmax(gates, axis=-1), E, dtype=dt)         # (G, S, E)
    # load balancing (GShard): E^2 * mean_e(fraction routed to e (top-1) * mean gate of e)
    aux = jnp.mean(jnp.mean(mask1, axis=1) * jnp.mean(gates, axis=1)) * (E * E)
    gate1 = jnp.sum(gates * mask1, axis=-1)                                   # (G, S)
    masks, gs = [mask1], [gate1]
    if top_k == 2:
        rest = gates * (1 - mask1)
        mask2 = jax.nn.one_hot(jnp.argmax(rest, axis=-1), E, dtype=dt)
        gate2 = jnp.sum(rest * mask2, axis=-1)
        denom = gate1 + gate2
        denom = jnp.where(denom > 0, denom, jnp.ones_like(denom))
        masks, gs = [mask1, mask2], [gate1 / denom, gate2 / denom]
    dispatch = jnp.zeros((G, S, E, capacity), dt)
    combine = jnp.zeros((G, S, E, capacity), dt)
    filled = jnp.zeros((G, 1, E), dt)                 # slots already used by earlier choices
    for mask, g in zip(masks, gs):
        pos = jnp.cumsum(mask, axis=1) - mask + filled                      # slot in expert's buffer
        mask = mask * (pos < capacity).astype(dt)                           # drop over capacity
        filled = filled + jnp.sum(mask, axis=1, keepdims=True)
        slot = jnp.sum(pos * mask, axis=-1).astype(jnp.int32)               # (G, S)
        d = jnp.einsum("gse,gsc->gsec", mask, jax.nn.one_hot(slot, capacity, dtype=dt))
        dispatch = dispatch + d
        combine = combine + d * g[:, :, None, None]
    return combine, dispatch, aux


def _moe(p, x, top_k, capacity_factor):
    """GShard MoE FFN; x (B, S, h), one group per sequence. Returns (y, aux loss)."""
    G, S, _ = x.shape
    E = p["gate"].shape[1]
    capacity = expert_capacity(S, E, top_k, capacity_factor)
    logits = jnp.einsum("gsm,me->gse", x, p["gate"]).astype(jnp.float32)
    gates = jax.nn.softmax(logits, axis=-1)
    combine, dispatch, aux = _gating(gates, top_k, capacity)
    combine, dispatch = combine.astype(x.dtype), dispatch.astype(x.dtype)
    expert_in = jnp.einsum("gsec,gsm->egcm", dispatch, x)                  # all-to-all when E is split
    h = jax.nn.relu(jnp.einsum("egcm,emf->egcf", expert_in, p["wi"]))
    expert_out = jnp.einsum("egcf,efm->egcm", h, p["wo"])
    return jnp.einsum("gsec,egcm->gsm", combine, expert_out), aux


def _forward(params, tokens, top_k, capacity_factor):
    S = tokens.shape[1]
    x = jnp.take(params["wte"], tokens, axis=0) + params["wpe"][:S]
    aux = jnp.zeros((), jnp.float32)
    for i, blk in enumerate(params["blocks"]):
        if i:
            x, aux = stage_boundary((x, aux))  # identity; pipeline planning cuts layers here (a block per layer)
        x = x + _attention(blk["attn"], _layer_norm(blk["ln1"], x))
        y = _layer_norm(blk["ln2"], x)
        if "moe" in blk:
            y, a = _moe(blk["moe"], y, top_k, capacity_factor)
            aux = aux + a
        else:
            y = _mlp(blk["mlp"], y)
        x = x + y
    x = _layer_norm(params["ln_f"], x)
    return x @ params["wte"].T, aux                                 # tied embeddings


def _loss(params, batch, top_k, capacity_factor):
    logits, aux = _forward(params, batch["tokens"], top_k, capacity_factor)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]
    return jnp.mean(nll) + AUX_LOSS_COEF * aux


def _routing(cfg):
    return (TOP_K, CAPACITY_FACTOR) if cfg is None else (cfg.top_k, cfg.capacity_factor)


def make_forward(cfg: MoEConfig | None = None) -> Callable:
    """``forward(params, tokens) -> (logits, aux_loss)`` with ``cfg``'s top_k / capacity factor
    (None: ``TOP_K`` / ``CAPACITY_FACTOR``)."""
    top_k, cf = _routing(cfg)

    def forward(params, tokens):
        return _forward(params, tokens, top_k, cf)
    return forward


def make_loss_fn(cfg: MoEConfig | None = None) -> Callable:
    """``loss_fn(params, batch) -> mean next-token cross-entropy + AUX_LOSS_COEF * aux``."""
    top_k, cf = _routing(cfg)

    def loss_fn(params, batch):
        return _loss(params, batch, top_k, cf)
    return loss_fn


def make_train_step(cfg: MoEConfig | None = None, optimizer=None) -> Callable:
    """``train_step(params, opt_state, batch) -> (params, opt_state, loss)`` (default: ``OPTIMIZER``)."""
    return steps.optax_train_step(make_loss_fn(cfg), OPTIMIZER if optimizer is None else optimizer)


def make_sgd_train_step(cfg: MoEConfig | None = None, lr: float = SGD_LEARNING_RATE) -> Callable:
    """``sgd_train_step(params, batch) -> (params, loss)``: plain SGD with a constant step size."""
    return steps.sgd_train_step(make_loss_fn(cfg), lr)


forward = make_forward()
loss_fn = make_loss_fn()
train_step = make_train_step()
sgd_train_step = make_sgd_train_step()


# ----------------------------------------------------------------------------- example args

def _numpy_batch(cfg: MoEConfig, seed: int) -> dict:
    toks = np.random.default_rng(seed).integers(0, cfg.vocab, (cfg.batch, cfg.seq + 1), dtype=np.int32)
    return {"tokens": toks[:, :-1].copy(), "labels": toks[:, 1:].copy()}


_KINDS = ("train_step", "sgd_train_step", "forward", "loss_fn")


def args_for(cfg: MoEConfig, kind: str = "train_step", *, abstract: bool = False,
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
        params = _abstract_params(cfg)
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


def config_from_knobs(*, layers: int = 2, hidden: int = 64, experts: int = 4, seq: int = 32,
                      vocab: int = 256, batch: int = 8, heads: int | None = None, ffn_factor: int = 4,
                      dtype: Any = jnp.float32, suite: str | None = None) -> MoEConfig:
    """MoEConfig from the ``*_args`` knobs. ``suite`` (a ``SUITE`` key) overrides layers/hidden/
    experts/heads/seq/vocab/ffn_factor; ``heads`` defaults to ``default_heads(hidden)``."""
    dtype = jnp.dtype(dtype)
    if suite is not None:
        if suite not in SUITE:
            raise ValueError(f"unknown suite config {suite!r}; known: {sorted(SUITE)}")
        return dataclasses.replace(SUITE[suite], batch=batch, dtype=dtype)
    return MoEConfig(vocab=vocab, seq=seq, hidden=hidden, heads=default_heads(hidden) if heads is None else heads,
                     layers=layers, experts=experts, ffn_factor=ffn_factor, batch=batch, dtype=dtype)


def _knob_args(kind, *, layers=2, hidden=64, experts=4, seq=32, vocab=256, batch=8, heads=None,
               ffn_factor=4, abstract=False, dtype=jnp.float32, suite=None):
    cfg = config_from_knobs(layers=layers, hidden=hidden, experts=experts, seq=seq, vocab=vocab,
                            batch=batch, heads=heads, ffn_factor=ffn_factor, dtype=dtype, suite=suite)
    return args_for(cfg, kind, abstract=abstract)


def train_step_args(*, layers: int = 2, hidden: int = 64, experts: int = 4, seq: int = 32,
                    vocab: int = 256, batch: int = 8, heads: int | None = None, ffn_factor: int = 4,
                    abstract: bool = False, dtype: Any = jnp.float32, suite: str | None = None) -> tuple:
    """Example ``(params, opt_state, batch)`` for ``train_step``."""
    return _knob_args("train_step", layers=layers, hidden=hidden, experts=experts, seq=seq, vocab=vocab,
                      batch=batch, heads=heads, ffn_factor=ffn_factor, abstract=abstract, dtype=dtype,
                      suite=suite)


def sgd_train_step_args(*, layers: int = 2, hidden: int = 64, experts: int = 4, seq: int = 32,
                        vocab: int = 256, batch: int = 8, heads: int | None = None, ffn_factor: int = 4,
                        abstract: bool = False, dtype: Any = jnp.float32, suite: str | None = None) -> tuple:
    """Example ``(params, batch)`` for ``sgd_train_step``."""
    return _knob_args("sgd_train_step", layers=layers, hidden=hidden, experts=experts, seq=seq, vocab=vocab,
                      batch=batch, heads=heads, ffn_factor=ffn_factor, abstract=abstract, dtype=dtype,
                      suite=suite)


def forward_args(*, layers: int = 2, hidden: int = 64, experts: int = 4, seq: int = 32,
                 vocab: int = 256, batch: int = 8, heads: int | None = None, ffn_factor: int = 4,
                 abstract: bool = False, dtype: Any = jnp.float32, suite: str | None = None) -> tuple:
    """Example ``(params, tokens)`` for ``forward``."""
    return _knob_args("forward", layers=layers, hidden=hidden, experts=experts, seq=seq, vocab=vocab,
                      batch=batch, heads=heads, ffn_factor=ffn_factor, abstract=abstract, dtype=dtype,
                      suite=suite)


def params_and_batch(*, layers: int = 2, hidden: int = 64, experts: int = 4, seq: int = 32,
                     vocab: int = 256, batch: int = 8, heads: int | None = None, ffn_factor: int = 4,
                     abstract: bool = False, dtype: Any = jnp.float32, suite: str | None = None) -> tuple:
    """Example ``(params, batch)`` for ``loss_fn`` (pipeline-style API)."""
    return _knob_args("loss_fn", layers=layers, hidden=hidden, experts=experts, seq=seq, vocab=vocab,
                      batch=batch, heads=heads, ffn_factor=ffn_factor, abstract=abstract, dtype=dtype,
                      suite=suite)


loss_fn_args = params_and_batch

__all__ = [
    "MoEConfig", "SUITE", "HEAD_DIM", "TOP_K", "CAPACITY_FACTOR", "AUX_LOSS_COEF", "LEARNING_RATE",
    "WEIGHT_DECAY", "SGD_LEARNING_RATE", "OPTIMIZER", "default_heads", "expert_capacity", "is_moe_layer",
    "param_count", "init_params", "config_of", "config_from_knobs", "args_for",
    "make_forward", "make_loss_fn", "make_train_step", "make_sgd_train_step",
    "forward", "loss_fn", "train_step", "sgd_train_step",
    "forward_args", "loss_fn_args", "train_step_args", "sgd_train_step_args", "params_and_batch",
]
