"""Reconstruction losses of the microscopy MAE papers."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean squared error per token (averaged over its pixels), averaged over masked tokens only.

    pred, target: (B, L, P); mask: (B, L) with 1 on removed (to-be-reconstructed) tokens.
    """
    per_token = ((pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2).mean(-1)
    return (per_token * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def fourier_l1(recon: jax.Array, target: jax.Array) -> jax.Array:
    """L1 between the amplitude spectra of two image stacks (..., H, W), per channel.

    A real 2-D FFT of the *unpatchified* images. (The reference implementation's FourierLoss reshapes
    token-major memory, which is a per-patch FFT only for CA-MAE S/16 at 256 px; this is the spatial FFT
    the papers describe.) "ortho" normalisation keeps amplitudes on the pixel scale.
    """
    fr = jnp.abs(jnp.fft.rfft2(recon.astype(jnp.float32), norm="ortho"))
    ft = jnp.abs(jnp.fft.rfft2(target.astype(jnp.float32), norm="ortho"))
    return jnp.abs(fr - ft).mean()


def normalize_patches(target: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Per-patch normalised pixels (MAE `norm_pix_loss`)."""
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True)
    return (target - mean) / jnp.sqrt(var + eps)
