"""Masked autoencoder (He et al.; Kraus et al. 2023/2024): ViT encoder on the visible 25% of patches, a light
transformer decoder on all patches, MSE on masked patches plus a Fourier-amplitude term.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from maejax.models import flops, losses
from maejax.models.layers import BlockConfig, Dense, layer_norm, param, sincos_2d
from maejax.models.vit import Transformer, ViT, patchify, unpatchify, vit_config


def random_masking(key: jax.Array, batch: int, num_tokens: int, ratio: float):
    """Per-sample uniform random masking (MAE): returns keep (B, K) indices, mask (B, N) with 1 on removed
    tokens, and restore (B, N), the permutation that puts [kept..., removed...] back in order."""
    num_keep = max(1, int(num_tokens * (1 - ratio)))
    noise = jax.random.uniform(key, (batch, num_tokens))
    shuffle = jnp.argsort(noise, axis=1)
    restore = jnp.argsort(shuffle, axis=1)
    keep = shuffle[:, :num_keep]
    mask = (restore >= num_keep).astype(jnp.float32)
    return keep, mask, restore


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, idx[..., None], axis=1)


def decoder_block_config(m: Any, enc_block: BlockConfig) -> BlockConfig:
    """Pre-LN decoder blocks (MLP 4x) of `decoder_width`/`decoder_heads`; LN eps `decoder_norm_eps`
    (0 = the encoder's; OpenPhenom's decoder uses torch's default 1e-5)."""
    width = int(m["decoder_width"])
    return BlockConfig(width=width, mlp_dim=4 * width, num_heads=int(m["decoder_heads"]),
                       block="pre_ln", qkv_bias=True, norm_eps=float(m["decoder_norm_eps"] or enc_block.norm_eps),
                       dtype=enc_block.dtype, param_dtype=enc_block.param_dtype, attention=enc_block.attention)


class MAE(nnx.Module):
    """config keys (model section): variant, in_channels, mask_ratio, decoder_width/depth/heads,
    fourier_weight, norm_pix_loss, plus the encoder keys of `vit_config`."""

    def __init__(self, m: Any, *, rngs: nnx.Rngs):
        self.enc_cfg = vit_config(m, int(m["in_channels"]))
        self.encoder = ViT(self.enc_cfg, rngs=rngs)
        dec = decoder_block_config(m, self.enc_cfg.block)
        kw = dict(rngs=rngs, dtype=dec.dtype, param_dtype=dec.param_dtype)
        self.decoder_embed = Dense(self.enc_cfg.width, dec.width, ("embed", None), **kw)
        self.mask_token = param(rngs, nnx.initializers.normal(0.02), (1, 1, dec.width), (None, None, "norm"),
                                dec.param_dtype)
        self.decoder = Transformer(dec, int(m["decoder_depth"]), rngs=rngs,
                                   scan_layers=self.enc_cfg.scan_layers, remat=self.enc_cfg.remat)
        self.decoder_norm = layer_norm(dec.width, dec.norm_eps, rngs, dec.param_dtype)
        p, c = self.enc_cfg.patch, self.enc_cfg.in_channels
        self.decoder_pred = Dense(dec.width, p * p * c, (None, "patch"), **kw)
        self.mask_ratio = float(m["mask_ratio"])
        self.fourier_weight = float(m["fourier_weight"])
        self.norm_pix_loss = bool(m["norm_pix_loss"])

    def decode(self, x: jax.Array, restore: jax.Array, grid: tuple[int, int]) -> jax.Array:
        """Encoded visible tokens (B, n0+K, D) -> predicted pixels for every patch (B, N, p*p*C)."""
        n0 = self.encoder.num_prefix
        x = self.decoder_embed(x)
        prefix, visible = x[:, :n0], x[:, n0:]
        b, k, d = visible.shape
        n = restore.shape[1]
        masked = jnp.broadcast_to(self.mask_token[...].astype(x.dtype), (b, n - k, d))
        full = gather_tokens(jnp.concatenate([visible, masked], axis=1), restore)
        full = full + jnp.asarray(sincos_2d(*grid, d), full.dtype)
        x, _ = self.decoder(jnp.concatenate([prefix, full], axis=1))
        return self.decoder_pred(self.decoder_norm(x))[:, n0:]

    def __call__(self, images: jax.Array, key: jax.Array):
        """images: standardised (B, C, H, W). Returns (pred (B,N,P), target (B,N,P), mask (B,N))."""
        p = self.enc_cfg.patch
        grid = (images.shape[2] // p, images.shape[3] // p)
        k_mask, k_drop = jax.random.split(key)
        tokens = self.encoder.patch_embed(images)
        keep, mask, restore = random_masking(k_mask, tokens.shape[0], tokens.shape[1], self.mask_ratio)
        x, _ = self.encoder.encode(gather_tokens(tokens, keep), key=k_drop)
        pred = self.decode(self.encoder.head_input(x), restore, grid)
        target = patchify(images, p)
        if self.norm_pix_loss:
            target = losses.normalize_patches(target)
        return pred, target, mask

    def loss(self, batch: dict[str, jax.Array], key: jax.Array):
        images = batch["image"]
        pred, target, mask = self(images, key)
        p, c = self.enc_cfg.patch, images.shape[1]
        grid = (images.shape[2] // p, images.shape[3] // p)
        return losses.reconstruction_loss(pred, target, mask, lambda x: unpatchify(x, p, c, grid),
                                          self.fourier_weight)

    def embed(self, images: jax.Array, *, full: bool = False) -> dict[str, jax.Array]:
        return self.encoder.embed(images, full=full)

    def flops_per_crop(self, height: int, width: int) -> dict[str, float]:
        """Training: encoder on the visible tokens + decoder on all, x3 for backward. Inference: encoder on all."""
        e, p, c = self.enc_cfg, self.enc_cfg.patch, self.enc_cfg.in_channels
        n = (height // p) * (width // p)
        n0 = self.encoder.num_prefix
        keep = max(1, int(n * (1 - self.mask_ratio)))
        dw = self.decoder_embed.kernel.shape[1]
        dec_mlp = self.decoder.blocks.mlp.fc1.kernel.shape[-1]
        embed = flops.dense(n, p * p * c, e.width)
        decoder = (flops.dense(keep + n0, e.width, dw) + flops.transformer(n + n0, dw, dec_mlp, self.decoder.depth)
                   + flops.dense(n + n0, dw, p * p * c))
        return {"train": 3 * (embed + self.encoder.forward_flops(keep) + decoder),
                "infer": embed + self.encoder.forward_flops(n)}
