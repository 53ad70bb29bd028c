"""Vision Transformer encoder: variants by string ("L/8"), stacked blocks under scan or a loop, remat,
and every block's output from one forward pass (for block-wise probing).

Block parameters are stacked on a leading "layers" axis (nnx.vmap at construction), so a checkpoint is the
same whether the forward pass scans over layers (fast compile, O(1) program size) or unrolls them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maejax.models import flops
from maejax.models.layers import BLOCKS, BlockConfig, Dense, layer_norm, param, sincos_2d
from maejax.sharding import constrain

# name: (width, depth, mlp_dim, heads). S/B/L/H/g/G follow big_vision (G = ViT-G/8 of "ViTally Consistent").
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "mu": (64, 2, 256, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def decode_variant(variant: str) -> dict[str, int]:
    """"L/8" -> dict(width=1024, depth=24, mlp_dim=4096, num_heads=16, patch=8)."""
    name, _, patch = variant.partition("/")
    if name not in VARIANTS or not patch.isdigit():
        raise ValueError(f"unknown ViT variant {variant!r}: use NAME/PATCH with NAME in {sorted(VARIANTS)}, "
                         "e.g. 'S/16' or 'L/8'")
    width, depth, mlp_dim, heads = VARIANTS[name]
    return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch=int(patch))


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    block: BlockConfig
    depth: int
    patch: int
    in_channels: int
    cls_token: bool = True
    final_norm: str = "tokens"   # "tokens": LN on every token (MAE); "pooled": LN after mean-pooling (timm avg)
    scan_layers: bool = True
    remat: str = "none"
    drop_path_schedule: str = "linear"
    pool: str = "mean"           # per-block features (`embed()["blocks"]`): mean | mean_std | cls

    @property
    def width(self) -> int:
        return self.block.width


def vit_config(m: Any, in_channels: int) -> ViTConfig:
    """Builds the encoder config from a complete `model` section (maejax.models.build completes it)."""
    dims = decode_variant(m["variant"])
    for k in ("width", "depth", "mlp_dim", "num_heads"):   # explicit overrides of the variant (0: the variant's)
        if m[k]:
            dims[k] = int(m[k])
    if m["remat"] not in REMAT_POLICIES:
        raise ValueError(f"model.remat={m['remat']!r}: choose one of {sorted(REMAT_POLICIES)}")
    if m["block"] not in BLOCKS:
        raise ValueError(f"model.block={m['block']!r}: choose one of {sorted(BLOCKS)}")
    block = BlockConfig(
        width=dims["width"], mlp_dim=dims["mlp_dim"], num_heads=dims["num_heads"],
        block=m["block"], qkv_bias=m["qkv_bias"], qk_norm=m["qk_norm"],
        layerscale=m["layerscale"], drop_path=float(m["drop_path"]),
        norm_eps=float(m["norm_eps"]), dtype=jnp.dtype(m["dtype"]),
        param_dtype=jnp.dtype(m["param_dtype"]), attention=m["attention"])
    return ViTConfig(block=block, depth=dims["depth"], patch=dims["patch"], in_channels=in_channels,
                     cls_token=m["cls_token"], final_norm=m["final_norm"], scan_layers=m["scan_layers"],
                     remat=m["remat"], drop_path_schedule=m["drop_path_schedule"],
                     pool=_pool(m["pool"], m["cls_token"]))


POOLS = ("mean", "mean_std", "cls")


def _pool(pool: str, cls_token: bool) -> str:
    if pool not in POOLS:
        raise ValueError(f"model.pool={pool!r}: choose one of {POOLS}")
    if pool == "cls" and not cls_token:
        raise ValueError("model.pool='cls' needs model.cls_token=True")
    return pool


DROP_PATH_SCHEDULES = ("linear", "uniform")


class Transformer(nnx.Module):
    """`depth` blocks with parameters stacked on a leading "layers" axis.

    Stochastic depth: `cfg.drop_path` is the rate of the last block; with the "linear" schedule (timm's
    `drop_path_rate`, used by MAE and OpenPhenom) block i gets `rate * i / (depth - 1)`, with "uniform"
    every block gets `rate`.
    """

    def __init__(self, cfg: BlockConfig, depth: int, *, rngs: nnx.Rngs, scan_layers=True, remat="none",
                 drop_path_schedule: str = "linear"):
        block_cls = BLOCKS[cfg.block]
        if drop_path_schedule not in DROP_PATH_SCHEDULES:
            raise ValueError(f"drop_path_schedule={drop_path_schedule!r}: choose one of {DROP_PATH_SCHEDULES}")

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs):
            return block_cls(cfg, rngs=rngs)

        self.blocks = make(rngs)
        self.depth = depth
        self.scan_layers = scan_layers
        self.remat = remat
        self.drop_path = cfg.drop_path
        self.drop_path_schedule = drop_path_schedule

    def drop_path_rates(self) -> np.ndarray:
        if self.drop_path_schedule == "uniform" or self.depth == 1:
            return np.full((self.depth,), self.drop_path, np.float32)
        return np.linspace(0.0, self.drop_path, self.depth, dtype=np.float32)

    def __call__(self, x, *, key=None, mask=None, pool=None):
        """Runs every block. `pool(x) -> pytree` (optional) is applied to each block's output and stacked.

        `mask`: boolean attention mask broadcastable to (B, heads, T, T). Returns (x, per_block) where
        per_block has a leading depth axis on every leaf (None when pool is None).
        """
        train = key is not None and self.drop_path > 0
        keys = jax.random.split(key, self.depth) if train else None
        rates = jnp.asarray(self.drop_path_rates()) if train else None

        def step(x, block, k, r):
            x = block(x, key=k, mask=mask, rate=r)
            return x, (pool(x) if pool is not None else None)

        if self.remat != "none":
            step = nnx.remat(step, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)

        if self.scan_layers:
            if not train:
                body = nnx.scan(lambda x, b: step(x, b, None, None), in_axes=(nnx.Carry, 0),
                                out_axes=(nnx.Carry, 0))
                return body(x, self.blocks)
            body = nnx.scan(step, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))
            return body(x, self.blocks, keys, rates)

        graphdef, state = nnx.split(self.blocks)
        outs = []
        for i in range(self.depth):
            block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
            x, o = step(x, block, None if keys is None else keys[i], None if rates is None else rates[i])
            outs.append(o)
        return x, (jax.tree.map(lambda *a: jnp.stack(a), *outs) if pool is not None else None)


def patchify(images: jax.Array, p: int) -> jax.Array:
    """(B, C, H, W) -> (B, (H/p)*(W/p), p*p*C), patches in raster order, pixels in (row, col, channel) order."""
    b, c, h, w = images.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.transpose(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, p: int, channels: int, grid: tuple[int, int]) -> jax.Array:
    """Inverse of `patchify`: (B, gh*gw, p*p*C) -> (B, C, gh*p, gw*p)."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, p, p, channels)
    return x.transpose(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * p, gw * p)


class PatchEmbed(nnx.Module):
    """Linear projection of p x p x C patches (a stride-p convolution) plus fixed sin-cos positions."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        p, c, b = cfg.patch, cfg.in_channels, cfg.block
        self.proj = Dense(p * p * c, cfg.width, ("patch", "embed"), rngs=rngs, dtype=b.dtype,
                          param_dtype=b.param_dtype)
        self.patch, self.in_channels = p, c

    def __call__(self, images: jax.Array) -> jax.Array:
        if images.shape[1] != self.in_channels:
            raise ValueError(f"this encoder takes {self.in_channels} channels, got images of shape {images.shape}")
        gh, gw = images.shape[2] // self.patch, images.shape[3] // self.patch
        x = self.proj(patchify(images, self.patch))
        return x + jnp.asarray(sincos_2d(gh, gw, x.shape[-1]), x.dtype)


def attention_mask(valid: jax.Array | None, num_prefix: int) -> jax.Array | None:
    """Key-padding mask (B, 1, 1, n0 + N) from patch-token validity (B, N); prefix tokens are always valid."""
    if valid is None:
        return None
    prefix = jnp.ones((valid.shape[0], num_prefix), bool)
    return jnp.concatenate([prefix, valid.astype(bool)], axis=1)[:, None, None, :]


class ViT(nnx.Module):
    """Encoder. `patch_embed(images) -> (B, N, D)` tokens with positions; blocks; optional final norm."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs, patch_embed: nnx.Module | None = None):
        self.cfg = cfg
        self.patch_embed = patch_embed if patch_embed is not None else PatchEmbed(cfg, rngs=rngs)
        d, pd = cfg.width, cfg.block.param_dtype
        self.cls = (param(rngs, nnx.initializers.normal(0.02), (1, 1, d), (None, None, "norm"), pd)
                    if cfg.cls_token else None)
        self.transformer = Transformer(cfg.block, cfg.depth, rngs=rngs, scan_layers=cfg.scan_layers,
                                       remat=cfg.remat, drop_path_schedule=cfg.drop_path_schedule)
        self.norm = layer_norm(d, cfg.block.norm_eps, rngs, pd)

    @property
    def num_prefix(self) -> int:
        return 1 if self.cfg.cls_token else 0

    def encode(self, tokens: jax.Array, *, key=None, valid: jax.Array | None = None, pool=None):
        """tokens (B, N, D) (positions already added) -> (final tokens incl. cls, per-block pooled).

        `valid` (B, N) bool marks real tokens; the others (padding) are never attended to.
        """
        tokens = tokens.astype(self.cfg.block.dtype)
        if self.cls is not None:
            cls = jnp.broadcast_to(self.cls[...].astype(tokens.dtype), (tokens.shape[0], 1, tokens.shape[2]))
            tokens = jnp.concatenate([cls, tokens], axis=1)
        tokens = constrain(tokens, "act_batch", "act_seq", "act_embed")
        return self.transformer(tokens, key=key, mask=attention_mask(valid, self.num_prefix), pool=pool)

    def head_input(self, x: jax.Array) -> jax.Array:
        """Encoder output handed to a decoder: final LN on tokens (MAE) or the raw stream (timm avg-pool)."""
        return self.norm(x) if self.cfg.final_norm == "tokens" else x

    def forward_flops(self, num_tokens: int) -> float:
        """Matmul FLOPs of the blocks on `num_tokens` patch tokens (+ the prefix), one crop."""
        b = self.cfg.block
        return flops.transformer(num_tokens + self.num_prefix, b.width, b.mlp_dim, self.cfg.depth)

    def embed(self, images: jax.Array, *, token_weights: jax.Array | None = None, full: bool = False,
              key: jax.Array | None = None) -> dict[str, jax.Array]:
        """Features of unmasked images from one forward pass.

        blocks:  (B, depth, D) after each block, pooled as `cfg.pool` says: mean of the patch tokens (cls
                 excluded, no norm), mean and std of them (B, depth, 2D), or the cls token
        predict: (B, D) mean of the last block's patch tokens (OpenPhenom `predict`)
        pooled:  (B, D) the normalised pooled feature (final LN on tokens then mean, or LN after the mean)
        cls:     (B, D) the class token after the last block (when the model has one)
        tokens:  (B, depth, n0 + N, D) every block's full output, cls first (only with `full=True`)
        `token_weights` (B, N) restricts the means to some patch tokens (e.g. padding masked out).
        `key` turns on stochastic depth (a supervised model training through its features).
        """
        return self.embed_tokens(self.patch_embed(images), token_weights=token_weights, full=full, key=key)[0]

    def embed_tokens(self, tokens: jax.Array, *, token_weights: jax.Array | None = None,
                     valid: jax.Array | None = None, full: bool = False, key: jax.Array | None = None):
        """`embed` on already-embedded tokens (B, N, D); `valid` (B, N) also masks padding out of attention.

        Returns (features dict, final token stream (B, n0 + N, D)).
        """
        n0 = self.num_prefix

        def mean(x):
            x = x[:, n0:].astype(jnp.float32)
            if token_weights is None:
                return x.mean(axis=1)
            w = token_weights.astype(jnp.float32)[..., None]
            return (x * w).sum(1) / jnp.maximum(w.sum(1), 1.0)

        def block_feature(x):
            """`cfg.pool` of one block's output: (B, D), or (B, 2D) for mean_std (mean first)."""
            if self.cfg.pool == "cls":
                return x[:, 0].astype(jnp.float32)
            if self.cfg.pool == "mean_std":
                m = mean(x)
                return jnp.concatenate([m, jnp.sqrt(jnp.maximum(mean(x * x) - m * m, 0.0) + 1e-6)], axis=-1)
            return mean(x)

        # The full token tensors are stacked only when asked for: the default path stores (B, D) per block.
        pool = (lambda x: (block_feature(x), x.astype(jnp.float32))) if full else block_feature
        x, per_block = self.encode(tokens, key=key, valid=valid, pool=pool)
        pooled_blocks = per_block[0] if full else per_block
        out = {"blocks": jnp.swapaxes(pooled_blocks, 0, 1),
               "predict": mean(x)}
        if full:
            out["tokens"] = jnp.swapaxes(per_block[1], 0, 1)
        if self.cfg.final_norm == "tokens":
            out["pooled"] = mean(self.norm(x))
        else:
            out["pooled"] = self.norm(pooled_blocks[-1])
        if self.cls is not None:
            out["cls"] = x[:, 0].astype(jnp.float32)
        return out, x
