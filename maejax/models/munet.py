"""MU-Net: a masked U-Net autoencoder (the CNN MAE of Kraus et al. 2023), with the MAE's training interface.

Random p x p patches of the self-standardised image are zeroed (its mean) at `mask_ratio`; a U-Net
(`cnn.ConvEncoder` + `cnn.ConvDecoder`, skip connections at every resolution) reconstructs the image,
and the loss is the MAE's on the masked patches (MSE + Fourier term). The paper names the model but
publishes no layer-level description, so the stage widths of the variants (S/M/L) are this codebase's.
Embeddings are the global-average-pooled stage outputs of the encoder on the unmasked image (`blocks`,
one row per stage, so block-wise probing works as for ViTs).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from maejax.models import losses
from maejax.models.cnn import ConvDecoder, ConvEncoder, decode_cnn_variant, stage_features
from maejax.models.mae import random_masking
from maejax.models.vit import patchify, unpatchify


class MUNet(nnx.Module):
    """config keys (model section): variant ("M/8": widths of M, masking patch 8), in_channels, mask_ratio,
    fourier_weight."""

    def __init__(self, m: Any, *, rngs: nnx.Rngs):
        dims = decode_cnn_variant(m["variant"])
        self.in_channels = int(m["in_channels"])
        self.encoder = ConvEncoder(self.in_channels, dims["widths"], dims["blocks"], rngs=rngs)
        self.decoder = ConvDecoder(dims["widths"], dims["blocks"], self.in_channels, rngs=rngs)
        self.patch = dims["patch"]
        self.mask_ratio = float(m["mask_ratio"])
        self.fourier_weight = float(m["fourier_weight"])

    def check_size(self, images: jax.Array) -> None:
        b, c, h, w = images.shape
        step = math.lcm(self.patch, 2 ** (len(self.encoder.widths) - 1))
        if c != self.in_channels or h % step or w % step:
            raise ValueError(f"this MU-Net takes {self.in_channels} channels and sizes divisible by {step}, "
                             f"got images of shape {images.shape}")

    def __call__(self, images: jax.Array, key: jax.Array):
        """images (B, C, H, W) -> (reconstruction (B, C, H, W), mask (B, N) with 1 on masked patches)."""
        self.check_size(images)
        b, c, h, w = images.shape
        p = self.patch
        _, mask, _ = random_masking(key, b, (h // p) * (w // p), self.mask_ratio)
        pixel_mask = jnp.repeat(jnp.repeat(mask.reshape(b, h // p, w // p), p, 1), p, 2)
        x = jnp.transpose(images * (1.0 - pixel_mask[:, None]), (0, 2, 3, 1))
        recon = self.decoder(self.encoder(x))
        return jnp.transpose(recon, (0, 3, 1, 2)), mask

    def loss(self, batch: dict[str, jax.Array], key: jax.Array):
        images = batch["image"]
        recon, mask = self(images, key)
        p, c = self.patch, images.shape[1]
        grid = (images.shape[2] // p, images.shape[3] // p)
        return losses.reconstruction_loss(patchify(recon, p), patchify(images, p), mask,
                                          lambda x: unpatchify(x, p, c, grid), self.fourier_weight)

    def embed(self, images: jax.Array, *, full: bool = False) -> dict[str, jax.Array]:
        self.check_size(images)
        return stage_features(self.encoder(jnp.transpose(images, (0, 2, 3, 1))), full)

    def flops_per_crop(self, height: int, width: int) -> dict[str, float]:
        """Training: encoder + decoder on the (masked) full image, x3 for backward. Inference: encoder."""
        enc = self.encoder.flops(height, width)
        dec = self.decoder.flops(height, width, len(self.encoder.widths))
        return {"train": 3 * (enc + dec), "infer": enc}
