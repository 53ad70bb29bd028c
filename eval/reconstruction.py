"""Has the MAE learned anything? Its masked reconstruction error next to a baseline that knows nothing:
interpolating the visible pixels into the masked patches.

Both are scored on the same crops, normalised as in training, with the same random masks (the MAE's own
`random_masking` with the same key), on the MAE's target (normalised per patch when `norm_pix_loss`):
the mean squared error per masked patch, the main term of the training loss (without its small Fourier
term). The interpolation is a normalised Gaussian convolution of the visible pixels,
blur(x * visible) / blur(visible), per channel; it is scored at several widths and the best is reported,
so the baseline gets its best shot. A loss well below it means the model predicts structure it cannot
see, which is what an MAE must learn.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maejax.models import losses
from maejax.models.vit import patchify

SIGMAS = (1.0, 2.0, 4.0, 8.0)   # interpolation widths tried, in pixels


def _gaussian_blur(x: jax.Array, sigma: float) -> jax.Array:
    """Separable Gaussian blur of (B, C, H, W) with zero padding."""
    radius = int(np.ceil(3 * sigma))
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k = jnp.asarray(k / k.sum())
    b, c, h, w = x.shape
    flat = x.reshape(b * c, 1, h, w)
    flat = jax.lax.conv_general_dilated(flat, k.reshape(1, 1, -1, 1), (1, 1), [(radius, radius), (0, 0)])
    flat = jax.lax.conv_general_dilated(flat, k.reshape(1, 1, 1, -1), (1, 1), [(0, 0), (radius, radius)])
    return flat.reshape(b, c, h, w)


def interpolate_visible(images: jax.Array, visible: jax.Array, sigma: float) -> jax.Array:
    """images (B, C, H, W), visible (B, 1, H, W) in {0, 1} -> every pixel predicted from the visible ones."""
    num = _gaussian_blur(images * visible, sigma)
    den = _gaussian_blur(jnp.broadcast_to(visible, images.shape), sigma)
    return num / jnp.maximum(den, 1e-6)


def reconstruction_losses(model, images: np.ndarray, key: jax.Array, sigmas: Sequence[float] = SIGMAS,
                          batch_size: int = 128) -> dict[str, float]:
    """Masked-patch MSE of `model` (an MAE) and of the best interpolation, on normalised images (N, C, H, W).

    Returns {"mae": x, "interpolation": y, "interpolation_sigma": s, "interpolation_by_sigma": {...},
    "zero": z, "num_crops": N, "mask_ratio": r}; `zero` is the error of predicting 0 (the per-patch mean of
    normalised-pixel targets, the crop or plate mean otherwise): a floor any learner must beat too."""
    p = model.enc_cfg.patch
    mae_sum, zero_sum, interp_sum, count = 0.0, 0.0, np.zeros(len(sigmas)), 0.0

    graphdef, state = nnx.split(model)

    @jax.jit
    def score(state, x, k):
        pred, target, mask = nnx.merge(graphdef, state)(x, k)
        mae = losses.masked_mse(pred, target, mask) * mask.sum()
        grid = (x.shape[2] // p, x.shape[3] // p)
        pixel_mask = jnp.repeat(jnp.repeat(mask.reshape(x.shape[0], 1, *grid), p, axis=2), p, axis=3)
        visible = 1.0 - pixel_mask
        out = []
        for s in sigmas:
            guess = patchify(interpolate_visible(x, visible, s), p)
            if model.norm_pix_loss:
                guess = losses.normalize_patches(guess)
            out.append(losses.masked_mse(guess, target, mask) * mask.sum())
        zero = losses.masked_mse(jnp.zeros_like(target), target, mask) * mask.sum()
        return mae, jnp.stack(out), zero, mask.sum()

    for i, start in enumerate(range(0, len(images), batch_size)):
        x = jnp.asarray(images[start:start + batch_size], jnp.float32)
        mae, interp, zero, n = score(state, x, jax.random.fold_in(key, i))
        mae_sum += float(mae)
        zero_sum += float(zero)
        interp_sum += np.asarray(interp, np.float64)
        count += float(n)
    by_sigma = interp_sum / count
    best = int(np.argmin(by_sigma))
    return {"mae": mae_sum / count, "interpolation": float(by_sigma[best]),
            "interpolation_sigma": float(sigmas[best]),
            "interpolation_by_sigma": {str(s): float(v) for s, v in zip(sigmas, by_sigma)},
            "zero": zero_sum / count,
            "num_crops": int(len(images)), "mask_ratio": float(model.mask_ratio)}
