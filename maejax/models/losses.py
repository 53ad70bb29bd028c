"""Reconstruction losses of the microscopy MAE papers."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean squared error per token (averaged over its pixels), averaged over masked tokens only.

    pred, target: (B, L, P); mask: (B, L) with 1 on removed (to-be-reconstructed) tokens.
    """
    per_token = ((pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2).mean(-1)
    return (per_token * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def fourier_l1(recon: jax.Array, target: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """L1 between the amplitude spectra of two image stacks (..., H, W), per channel.

    A real 2-D FFT of the *unpatchified* images. (The reference implementation's FourierLoss reshapes
    token-major memory, which is a per-patch FFT only for CA-MAE S/16 at 256 px; this is the spatial FFT
    the papers describe.) "ortho" normalisation keeps amplitudes on the pixel scale.
    `weights` (...) weighs each (H, W) plane, e.g. a (B, C) channel mask that leaves padded channels out.
    """
    fr = jnp.abs(jnp.fft.rfft2(recon.astype(jnp.float32), norm="ortho"))
    ft = jnp.abs(jnp.fft.rfft2(target.astype(jnp.float32), norm="ortho"))
    per_plane = jnp.abs(fr - ft).mean(axis=(-2, -1))
    if weights is None:
        return per_plane.mean()
    w = jnp.broadcast_to(weights.astype(jnp.float32), per_plane.shape)
    return (per_plane * w).sum() / jnp.maximum(w.sum(), 1.0)


def normalize_patches(target: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Per-patch normalised pixels (MAE `norm_pix_loss`)."""
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True)
    return (target - mean) / jnp.sqrt(var + eps)


def reconstruction_loss(pred: jax.Array, target: jax.Array, mask: jax.Array,
                        to_images: Callable[[jax.Array], jax.Array], fourier_weight: float,
                        plane_weights: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The papers' objective: (1 - a) * masked MSE + a * Fourier L1, a = `fourier_weight` (0.01).

    pred, target: (B, L, P) patches; mask: (B, L), 1 on tokens to reconstruct; `to_images` maps patches to
    (B, C, H, W). The spectrum is taken of the composite image (visible patches given, masked ones predicted),
    so the Fourier term, like the MSE, only trains reconstruction. `plane_weights` (B, C) drops padded channels.
    """
    mse = masked_mse(pred, target, mask)
    metrics = {"mse": mse}
    loss = mse
    if fourier_weight:
        composite = jnp.where(mask[..., None] > 0, pred.astype(jnp.float32), target.astype(jnp.float32))
        ft = fourier_l1(to_images(composite), to_images(target), plane_weights)
        loss = (1 - fourier_weight) * mse + fourier_weight * ft
        metrics["fourier"] = ft
    metrics["loss"] = loss
    return loss, metrics
