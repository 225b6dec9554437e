"""A Vision Transformer written with flax linen as users write it (patches embedded by a
strided ``nn.Conv``, a class token and learned position embeddings as ``self.param``s,
pre-LayerNorm encoder blocks with ``nn.MultiHeadDotProductAttention`` and a GELU MLP, a
linear head on the class token), image classification trained with optax AdamW:
``vit_step(params, opt_state, batch)`` with ``batch = {"images": (B, H, W, 3) float32,
"labels": (B,) int32}``.

Sizes: ``tiny`` (16×16 images, patch 4, d 64, 4 heads, 2 layers, 10 classes, batch 8) and
``full`` (ViT-L/16: 224×224, d 1024, 16 heads, 24 layers, MLP 4096, 1000 classes, batch 128;
0.30e9 parameters).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from examples.zoo.common import check_size, make_step, step_args


@dataclasses.dataclass(frozen=True)
class Config:
    image: int
    patch: int
    d: int
    heads: int
    layers: int
    classes: int
    batch: int = 0


TINY = Config(image=16, patch=4, d=64, heads=4, layers=2, classes=10, batch=8)
FULL = Config(image=224, patch=16, d=1024, heads=16, layers=24, classes=1000, batch=128)


class EncoderBlock(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=d)(h, h)
        h = nn.Dense(4 * d)(nn.LayerNorm()(x))
        return x + nn.Dense(d)(nn.gelu(h))


class ViT(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, images):
        cfg = self.cfg
        x = nn.Conv(cfg.d, (cfg.patch, cfg.patch), strides=(cfg.patch, cfg.patch), padding="VALID",
                    name="patch_embed")(images)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, h * w + 1, d))
        for i in range(cfg.layers):
            x = EncoderBlock(cfg.heads, name=f"block_{i}")(x)
        return nn.Dense(cfg.classes, name="head")(nn.LayerNorm()(x[:, 0]))


def _config_of(params) -> Config:
    p, _, _, d = params["patch_embed"]["kernel"].shape
    tokens = params["pos"].shape[1] - 1
    image = int(round(tokens ** 0.5)) * p
    heads = params["block_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape[1]
    layers = sum(1 for k in params if k.startswith("block_"))
    return Config(image, p, d, heads, layers, params["head"]["kernel"].shape[1])


def loss_fn(params, batch):
    logits = ViT(_config_of(params)).apply({"params": params}, batch["images"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


vit_step = make_step(loss_fn, name="vit_step")


def vit_step_args(size: str = "tiny", abstract: bool = False, seed: int = 0):
    """``(params, opt_state, batch)`` of ``vit_step``."""
    cfg = TINY if check_size(size) == "tiny" else FULL
    model = ViT(dataclasses.replace(cfg, batch=0))
    batch = {"images": jax.ShapeDtypeStruct((cfg.batch, cfg.image, cfg.image, 3), jnp.float32),
             "labels": jax.ShapeDtypeStruct((cfg.batch,), jnp.int32)}

    def make_batch():
        k1, k2 = jax.random.split(jax.random.PRNGKey(seed + 1))
        return {"images": jax.random.normal(k1, batch["images"].shape),
                "labels": jax.random.randint(k2, (cfg.batch,), 0, cfg.classes)}
    return step_args(lambda: model.init(jax.random.PRNGKey(seed), jnp.zeros((1, cfg.image, cfg.image, 3)))["params"],
                     batch, abstract=abstract, make_batch=make_batch)
