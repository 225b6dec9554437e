"""Wide-ResNet example (plain JAX + optax, no flax): Alpa's Wide-ResNet benchmark model.

Convention used by ``autopar plan examples/wresnet.py:FUNC``: for every public step function
``FOO`` this module defines ``FOO_args(**knobs) -> tuple`` returning the example positional
arguments of ``FOO``. Every knob is a keyword argument with a small default. With
``abstract=True`` the arguments are ``jax.ShapeDtypeStruct`` pytrees built with
``jax.eval_shape`` -- nothing is allocated, so the 13B model can be described on a laptop.
Concrete arguments are drawn with numpy from fixed seeds (deterministic, no XLA
compilation; the values differ from those of the JAX-key ``init_params``).

Public step functions and their argument builders:

* ``train_step(params, opt_state, batch) -> (params, opt_state, loss)``  (AdamW, ``OPTIMIZER``)
                                                   / ``train_step_args``
* ``sgd_train_step(params, batch) -> (params, loss)``  (plain SGD) / ``sgd_train_step_args``
* ``forward(params, images) -> logits``            / ``forward_args``
* ``loss_fn(params, batch) -> loss``               / ``loss_fn_args`` (= ``params_and_batch``)

``batch = {"images": float (B, image, image, 3) NHWC, "labels": int32 (B,)}``; the loss is
the mean softmax cross-entropy over the batch.

Architecture (Alpa's ``alpa/model/wide_resnet.py``, itself flax's ImageNet ResNet v1 with a
width factor), interpretation of the suite's ``L / c / w``:

* ``L`` (knob ``layers``) is the ResNet depth, ``3 * blocks + 2`` for bottleneck blocks:
  L50 = stages of (3, 4, 6, 3) blocks, L101 = (3, 4, 23, 3) (also 152, 200 as in Alpa). Any
  other ``L`` with ``(L - 2) % 3 == 0`` and ``L >= 14`` spreads ``(L - 2) / 3`` blocks over the
  4 stages (extra blocks go to stage 2, then 1, then 3, then 0): L14 = (1, 1, 1, 1),
  L26 = (2, 2, 2, 2), the small test sizes.
* ``c`` (knob ``channels``) is the stem width ``num_filters``. Stage ``i`` has
  ``f = c * 2**i`` filters; a bottleneck block is conv1x1 (-> f), conv3x3 (-> ``w * f``, stride
  2 in the first block of stages 1-3), conv1x1 (-> 4f), each followed by a normalization,
  ReLU after the first two and after the residual sum. The first block of every stage has a
  projection shortcut (conv1x1 with the block's stride -> 4f, normalized).
* ``w`` (knob ``width``) widens the 3x3 conv (and the input of the last 1x1), as in Alpa.
* stem: conv7x7/2 (-> c), norm, ReLU, max-pool 3x3/2 (SAME); head: global average pool and a
  dense layer to ``classes`` (1000 in the suite). No conv biases (as in Alpa).

So channels double and the spatial size halves from stage to stage: later blocks hold ~4x
the parameters of the previous stage and far smaller activations, i.e. layer costs are
deliberately unequal (the point of this model for the pipeline stage DP).

Differences from Alpa's model, on purpose:

* **No BatchNorm.** Batch statistics would make a micro-batched pipeline compute something
  different from the full batch (``plan_training`` refuses such a loss on micro-batches, or
  runs it per micro-batch with ``coupled_rows="per_microbatch"``). Every normalization is a per-example **LayerNorm over the
  channels of each pixel** (ConvNeXt-style; scale 1 and bias 0 at init, ``scale``/``bias``
  parameters of shape (C,), the same parameter count as BatchNorm's scale/offset). Hence the
  loss of a batch is exactly the mean of the losses of its halves.
* The max-pool is written as the maximum of 9 strided slices of the (-inf padded) input
  instead of ``lax.reduce_window``, so the planner sees pad/slice/max (which it can shard)
  instead of ``reduce_window_max``/``select_and_scatter_add`` (which it would replicate).
  Same values; where several window entries tie for the maximum the gradient is split
  between them instead of going to one.
* The last norm of a block starts with scale 1, not 0 (Alpa's zero-init): with zero scales
  most gradients of a first step are exactly zero, which would make equality tests vacuous.

Parameter counts (``param_count``; all within 3 % of the nominal sizes):
wresnet-250m 0.254e9 (L50 c160 w2), wresnet-1b 1.005e9 (c320), wresnet-2b 1.965e9 (c448),
wresnet-4b 4.000e9 (c640), wresnet-6.8b 6.727e9 (L50 c320 w16), wresnet-13b 12.633e9
(L101 c320 w16).
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

LEARNING_RATE = 1e-3     # AdamW (``train_step``)
WEIGHT_DECAY = 0.01
SGD_LEARNING_RATE = 0.1  # ``sgd_train_step``
HEAD_STD = 0.01          # classifier weights; convs use He init N(0, 2 / fan_in)
LN_EPS = 1e-5
STEM_KERNEL = 7
IN_CHANNELS = 3

OPTIMIZER = optax.adamw(learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

_PARAM_SEED = 0
_DATA_SEED = 1

# ResNet depth -> blocks per stage (Alpa's / flax's bottleneck table)
STAGE_SIZES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}
_EXTRA_BLOCK_ORDER = (2, 1, 3, 0)


def stage_sizes(layers: int) -> tuple[int, int, int, int]:
    """Blocks per stage for a ResNet of depth ``layers`` (= 3 * blocks + 2)."""
    if layers in STAGE_SIZES:
        return STAGE_SIZES[layers]
    if layers < 14 or (layers - 2) % 3:
        raise ValueError(f"layers (ResNet depth) must be 3 * blocks + 2 with at least 4 blocks "
                         f"(14, 17, 20, ..., 50, 101), got {layers}")
    n = (layers - 2) // 3
    sizes = [n // 4] * 4
    for i in range(n % 4):
        sizes[_EXTRA_BLOCK_ORDER[i]] += 1
    return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class WResNetConfig:
    layers: int = 14        # ResNet depth (see ``stage_sizes``)
    channels: int = 8       # stem width ``c``; stage i has c * 2**i filters
    width: int = 2          # width factor ``w`` of the 3x3 convs
    image: int = 32         # image height = width (224 in the suite)
    classes: int = 10
    batch: int = 8
    dtype: Any = jnp.float32

    def __post_init__(self):
        stage_sizes(self.layers)  # validates
        for name in ("channels", "width", "image", "classes", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def stage_sizes(self) -> tuple[int, int, int, int]:
        return stage_sizes(self.layers)


# Alpa's Wide-ResNet suite (224px images, 1000 classes). Batch is left at the default;
# override with dataclasses.replace(SUITE[name], batch=...).
SUITE: dict[str, WResNetConfig] = {
    "wresnet-250m": WResNetConfig(layers=50, channels=160, width=2, image=224, classes=1000),
    "wresnet-1b": WResNetConfig(layers=50, channels=320, width=2, image=224, classes=1000),
    "wresnet-2b": WResNetConfig(layers=50, channels=448, width=2, image=224, classes=1000),
    "wresnet-4b": WResNetConfig(layers=50, channels=640, width=2, image=224, classes=1000),
    "wresnet-6.8b": WResNetConfig(layers=50, channels=320, width=16, image=224, classes=1000),
    "wresnet-13b": WResNetConfig(layers=101, channels=320, width=16, image=224, classes=1000),
}


def _block_dims(cfg: WResNetConfig):
    """[(stage, block, in_channels, filters, stride)] for every bottleneck block, in order."""
    dims, c_in = [], cfg.channels
    for i, n in enumerate(cfg.stage_sizes):
        f = cfg.channels * 2 ** i
        for j in range(n):
            dims.append((i, j, c_in, f, 2 if i > 0 and j == 0 else 1))
            c_in = 4 * f
    return dims


def param_count(cfg: WResNetConfig) -> int:
    """Number of parameters of ``init_params(cfg, ...)`` (norm scales/biases included)."""
    w = cfg.width
    n = STEM_KERNEL * STEM_KERNEL * IN_CHANNELS * cfg.channels + 2 * cfg.channels
    for _, j, c_in, f, _ in _block_dims(cfg):
        n += c_in * f + 2 * f + 9 * f * w * f + 2 * w * f + w * f * 4 * f + 2 * 4 * f
        if j == 0:
            n += c_in * 4 * f + 2 * 4 * f
    feat = 4 * cfg.channels * 2 ** (len(cfg.stage_sizes) - 1)
    return n + feat * cfg.classes + cfg.classes


def block_param_counts(cfg: WResNetConfig) -> list[int]:
    """Parameters per bottleneck block, in network order (shows the unequal layer sizes)."""
    w, out = cfg.width, []
    for _, j, c_in, f, _ in _block_dims(cfg):
        n = c_in * f + 2 * f + 9 * f * w * f + 2 * w * f + w * f * 4 * f + 8 * f
        out.append(n + (c_in * 4 * f + 8 * f if j == 0 else 0))
    return out


# ----------------------------------------------------------------------------- parameters

def _build_params(cfg: WResNetConfig, normal: Callable, xp) -> dict:
    """Parameter pytree; ``normal(shape)`` draws N(0, 1) float32 samples, ``xp`` is np or jnp."""
    dtype = jnp.dtype(cfg.dtype)

    def conv(k, c_in, c_out):   # HWIO, He init
        std = np.float32(math.sqrt(2.0 / (k * k * c_in)))
        return (std * normal((k, k, c_in, c_out))).astype(dtype)

    norm = lambda c: {"scale": xp.ones((c,), dtype), "bias": xp.zeros((c,), dtype)}  # noqa: E731
    stem = {"conv": conv(STEM_KERNEL, IN_CHANNELS, cfg.channels), "norm": norm(cfg.channels)}
    stages = [[] for _ in cfg.stage_sizes]
    for i, j, c_in, f, _ in _block_dims(cfg):
        wf = cfg.width * f
        blk = {"conv1": conv(1, c_in, f), "norm1": norm(f),
               "conv2": conv(3, f, wf), "norm2": norm(wf),
               "conv3": conv(1, wf, 4 * f), "norm3": norm(4 * f)}
        if j == 0:
            blk["proj"] = {"conv": conv(1, c_in, 4 * f), "norm": norm(4 * f)}
        stages[i].append(blk)
    feat = 4 * cfg.channels * 2 ** (len(cfg.stage_sizes) - 1)
    head = {"w": (HEAD_STD * normal((feat, cfg.classes))).astype(dtype),
            "b": xp.zeros((cfg.classes,), dtype)}
    return {"stem": stem, "stages": stages, "head": head}


def init_params(cfg: WResNetConfig, key) -> dict:
    """{"stem": {"conv": (7, 7, 3, c), "norm"}, "stages": [[block] * n_i for 4 stages],
    "head": {"w": (16c, classes), "b": (classes,)}}.

    block = {"conv1": (1, 1, in, f), "norm1", "conv2": (3, 3, f, w*f), "norm2",
             "conv3": (1, 1, w*f, 4f), "norm3"[, "proj": {"conv": (1, 1, in, 4f), "norm"}]}
    (convs HWIO, norm = {"scale": (C,), "bias": (C,)}). Jittable / eval_shape-able.
    """
    counter = iter(range(1 << 30))
    normal = lambda shape: jax.random.normal(jax.random.fold_in(key, next(counter)), shape, jnp.float32)  # noqa: E731
    return _build_params(cfg, normal, jnp)


def _numpy_params(cfg: WResNetConfig, seed: int) -> dict:
    """Same pytree as ``init_params`` drawn with numpy (no XLA compilation: fast example args)."""
    rng = np.random.default_rng(seed)
    return _build_params(cfg, lambda shape: rng.standard_normal(shape, dtype=np.float32), np)


def _abstract_params(cfg) -> dict:
    """Same pytree as ``init_params`` as ShapeDtypeStructs (``jax.eval_shape``; zeros instead of
    random draws only to trace faster -- nothing is allocated either way)."""
    return jax.eval_shape(lambda: _build_params(cfg, lambda shape: jnp.zeros(shape, jnp.float32), jnp))


def config_of(params, image: int = WResNetConfig.image, batch: int = WResNetConfig.batch) -> WResNetConfig:
    """The WResNetConfig matching ``params``' shapes (image size and batch: given)."""
    sizes = tuple(len(s) for s in params["stages"])
    depth = 3 * sum(sizes) + 2
    if stage_sizes(depth) != sizes:
        raise ValueError(f"stage sizes {sizes} are not those of any depth this module builds")
    blk = params["stages"][0][0]
    c = params["stem"]["conv"].shape[-1]
    return WResNetConfig(layers=depth, channels=c, width=blk["conv2"].shape[-1] // c, image=image,
                         classes=params["head"]["w"].shape[-1], batch=batch,
                         dtype=params["stem"]["conv"].dtype)


# ----------------------------------------------------------------------------- model

def _norm(p, x):
    """Per-example LayerNorm over the channels of every pixel (NHWC: the last axis)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * p["scale"] + p["bias"]


def _conv(x, w, stride=1, padding="SAME"):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _max_pool_3x3_s2(x):
    """``nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')`` as 9 strided slices."""
    B, H, W, C = x.shape
    Ho, Wo = -(-H // 2), -(-W // 2)
    ph, pw = max((Ho - 1) * 2 + 3 - H, 0), max((Wo - 1) * 2 + 3 - W, 0)
    neg = jnp.asarray(-jnp.inf, x.dtype)
    xp = jax.lax.pad(x, neg, ((0, 0, 0), (ph // 2, ph - ph // 2, 0), (pw // 2, pw - pw // 2, 0), (0, 0, 0)))
    out = None
    for di in range(3):
        for dj in range(3):
            s = jax.lax.slice(xp, (0, di, dj, 0), (B, di + 2 * (Ho - 1) + 1, dj + 2 * (Wo - 1) + 1, C),
                              (1, 2, 2, 1))
            out = s if out is None else jnp.maximum(out, s)
    return out


def _block(p, x, stride):
    y = jax.nn.relu(_norm(p["norm1"], _conv(x, p["conv1"])))
    y = jax.nn.relu(_norm(p["norm2"], _conv(y, p["conv2"], stride)))
    y = _norm(p["norm3"], _conv(y, p["conv3"]))
    if "proj" in p:
        x = _norm(p["proj"]["norm"], _conv(x, p["proj"]["conv"], stride))
    return jax.nn.relu(x + y)


def _forward(params, images):
    pad = STEM_KERNEL // 2
    x = _conv(images, params["stem"]["conv"], 2, ((pad, pad), (pad, pad)))
    x = jax.nn.relu(_norm(params["stem"]["norm"], x))
    x = _max_pool_3x3_s2(x)
    for i, stage in enumerate(params["stages"]):
        for j, blk in enumerate(stage):
            if i or j:
                x = stage_boundary(x)  # identity; pipeline planning cuts layers here (a block per layer)
            x = _block(blk, x, 2 if i > 0 and j == 0 else 1)
    x = jnp.mean(x, axis=(1, 2))                                   # global average pool
    return x @ params["head"]["w"] + params["head"]["b"]


def _loss(params, batch):
    logits = _forward(params, batch["images"]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["labels"][:, None], axis=-1)[:, 0]
    return jnp.mean(nll)


def make_forward(cfg: WResNetConfig | None = None) -> Callable:
    """``forward(params, images) -> logits`` (the config is read from the shapes)."""
    def forward(params, images):
        return _forward(params, images)
    return forward


def make_loss_fn(cfg: WResNetConfig | None = None) -> Callable:
    """``loss_fn(params, batch) -> mean softmax cross-entropy``."""
    def loss_fn(params, batch):
        return _loss(params, batch)
    return loss_fn


def make_train_step(cfg: WResNetConfig | None = None, optimizer=None) -> Callable:
    """``train_step(params, opt_state, batch) -> (params, opt_state, loss)`` (default: ``OPTIMIZER``)."""
    return steps.optax_train_step(make_loss_fn(cfg), OPTIMIZER if optimizer is None else optimizer)


def make_sgd_train_step(cfg: WResNetConfig | None = None, lr: float = SGD_LEARNING_RATE) -> Callable:
    """``sgd_train_step(params, batch) -> (params, loss)``: plain SGD with a constant step size."""
    return steps.sgd_train_step(make_loss_fn(cfg), lr)


forward = make_forward()
loss_fn = make_loss_fn()
train_step = make_train_step()
sgd_train_step = make_sgd_train_step()


# ----------------------------------------------------------------------------- example args

def _numpy_batch(cfg: WResNetConfig, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((cfg.batch, cfg.image, cfg.image, IN_CHANNELS), dtype=np.float32)
    labels = rng.integers(0, cfg.classes, (cfg.batch,), dtype=np.int32)
    return {"images": images.astype(jnp.dtype(cfg.dtype)), "labels": labels}


_KINDS = ("train_step", "sgd_train_step", "forward", "loss_fn")


def args_for(cfg: WResNetConfig, kind: str = "train_step", *, abstract: bool = False,
             optimizer=None) -> tuple:
    """Example positional arguments of the ``kind`` step function for ``cfg``.

    kind: "train_step" -> (params, opt_state, batch); "sgd_train_step" / "loss_fn" ->
    (params, batch); "forward" -> (params, images). ``abstract=True``: ShapeDtypeStructs
    via ``jax.eval_shape`` (no allocation). Concrete values are drawn with numpy from fixed
    seeds (deterministic, no compilation); they are not those of ``init_params(cfg, key)``.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    opt = OPTIMIZER if optimizer is None else optimizer
    if abstract:
        params = _abstract_params(cfg)
        batch = {"images": jax.ShapeDtypeStruct((cfg.batch, cfg.image, cfg.image, IN_CHANNELS),
                                                jnp.dtype(cfg.dtype)),
                 "labels": jax.ShapeDtypeStruct((cfg.batch,), jnp.int32)}
    else:
        params = jax.device_put(_numpy_params(cfg, _PARAM_SEED))
        batch = jax.device_put(_numpy_batch(cfg, _DATA_SEED))
    if kind == "train_step":
        opt_state = jax.eval_shape(opt.init, params) if abstract else opt.init(params)
        return params, opt_state, batch
    if kind == "forward":
        return params, batch["images"]
    return params, batch


def config_from_knobs(*, layers: int = 14, channels: int = 8, width: int = 2, image: int = 32,
                      classes: int = 10, batch: int = 8, dtype: Any = jnp.float32,
                      suite: str | None = None) -> WResNetConfig:
    """WResNetConfig from the ``*_args`` knobs. ``suite`` (a ``SUITE`` key) overrides
    layers/channels/width/image/classes; ``batch`` and ``dtype`` stay knobs."""
    dtype = jnp.dtype(dtype)
    if suite is not None:
        if suite not in SUITE:
            raise ValueError(f"unknown suite config {suite!r}; known: {sorted(SUITE)}")
        return dataclasses.replace(SUITE[suite], batch=batch, dtype=dtype)
    return WResNetConfig(layers=layers, channels=channels, width=width, image=image, classes=classes,
                         batch=batch, dtype=dtype)


def _knob_args(kind, *, layers=14, channels=8, width=2, image=32, classes=10, batch=8,
               abstract=False, dtype=jnp.float32, suite=None):
    cfg = config_from_knobs(layers=layers, channels=channels, width=width, image=image, classes=classes,
                            batch=batch, dtype=dtype, suite=suite)
    return args_for(cfg, kind, abstract=abstract)


def train_step_args(*, layers: int = 14, channels: int = 8, width: int = 2, image: int = 32,
                    classes: int = 10, batch: int = 8, abstract: bool = False, dtype: Any = jnp.float32,
                    suite: str | None = None) -> tuple:
    """Example ``(params, opt_state, batch)`` for ``train_step``."""
    return _knob_args("train_step", layers=layers, channels=channels, width=width, image=image,
                      classes=classes, batch=batch, abstract=abstract, dtype=dtype, suite=suite)


def sgd_train_step_args(*, layers: int = 14, channels: int = 8, width: int = 2, image: int = 32,
                        classes: int = 10, batch: int = 8, abstract: bool = False, dtype: Any = jnp.float32,
                        suite: str | None = None) -> tuple:
    """Example ``(params, batch)`` for ``sgd_train_step``."""
    return _knob_args("sgd_train_step", layers=layers, channels=channels, width=width, image=image,
                      classes=classes, batch=batch, abstract=abstract, dtype=dtype, suite=suite)


def forward_args(*, layers: int = 14, channels: int = 8, width: int = 2, image: int = 32,
                 classes: int = 10, batch: int = 8, abstract: bool = False, dtype: Any = jnp.float32,
                 suite: str | None = None) -> tuple:
    """Example ``(params, images)`` for ``forward``."""
    return _knob_args("forward", layers=layers, channels=channels, width=width, image=image,
                      classes=classes, batch=batch, abstract=abstract, dtype=dtype, suite=suite)


def params_and_batch(*, layers: int = 14, channels: int = 8, width: int = 2, image: int = 32,
                     classes: int = 10, batch: int = 8, abstract: bool = False, dtype: Any = jnp.float32,
                     suite: str | None = None) -> tuple:
    """Example ``(params, batch)`` for ``loss_fn`` (pipeline-style API)."""
    return _knob_args("loss_fn", layers=layers, channels=channels, width=width, image=image,
                      classes=classes, batch=batch, abstract=abstract, dtype=dtype, suite=suite)


loss_fn_args = params_and_batch

__all__ = [
    "WResNetConfig", "SUITE", "STAGE_SIZES", "LEARNING_RATE", "WEIGHT_DECAY", "SGD_LEARNING_RATE",
    "OPTIMIZER", "stage_sizes", "param_count", "block_param_counts", "init_params", "config_of",
    "config_from_knobs", "args_for", "make_forward", "make_loss_fn", "make_train_step",
    "make_sgd_train_step", "forward", "loss_fn", "train_step", "sgd_train_step",
    "forward_args", "loss_fn_args", "train_step_args", "sgd_train_step_args", "params_and_batch",
]
