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
from maejax.models.vit import patchify, unpatchify

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


# --------------------------------------------------------------------------------------------------------
# A picture of the reconstructions: masked input, reconstruction, target, per channel
# --------------------------------------------------------------------------------------------------------
PICTURE_CROPS = 4      # crops in eval.job's picture
MASK_GREY = 128        # the masked patches' grey in the masked-input panel


def masked_views(model, images: np.ndarray, key: jax.Array, channel_ids: Sequence[int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """An autoencoder (MAE, CA-MAE, MU-Net) on normalised images (N, C, H, W) with its own random masks ->
    (masked input with NaN on the masked patches, reconstruction: the prediction on the masked patches and
    the visible pixels elsewhere, target: the images), each (N, C, H, W) float32. With `norm_pix_loss` the
    prediction (per-patch normalised) is mapped back with each patch's mean and std, as the MAE paper's
    figures do. None for a model that does not reconstruct (supervised). `channel_ids`: a CA-MAE's
    vocabulary id of each image channel (its decoders; default 0..C-1)."""
    from maejax.models.ca_mae import CAMAE, channel_images, channel_patches
    from maejax.models.mae import MAE
    from maejax.models.munet import MUNet
    if not isinstance(model, (MAE, CAMAE, MUNet)):
        return None
    graphdef, state = nnx.split(model)
    b, c, h, w = images.shape

    def denormalise(pred, patches):   # per-patch normalised prediction -> pixels of the patch's mean and std
        mean, var = patches.mean(-1, keepdims=True), patches.var(-1, keepdims=True)
        return pred * jnp.sqrt(var + 1e-6) + mean

    def pixels(patch_mask, p, channels):   # (B, channels * gh * gw) -> (B, channels, H, W)
        m = patch_mask.reshape(b, channels, h // p, w // p)
        return jnp.repeat(jnp.repeat(m, p, axis=2), p, axis=3)

    @jax.jit
    def run(state, x, k):
        m = nnx.merge(graphdef, state)
        if isinstance(m, MUNet):
            recon, mask = m(x, k)
            return recon, pixels(mask, m.patch, 1)
        p = m.enc_cfg.patch
        grid = (h // p, w // p)
        if isinstance(m, CAMAE):
            ids = None if channel_ids is None else jnp.broadcast_to(jnp.asarray(channel_ids, jnp.int32), (b, c))
            pred, _, mask, _ = m(x, k, channel_ids=ids)
            if m.norm_pix_loss:
                pred = denormalise(pred, channel_patches(x, p))
            return channel_images(pred, p, c, grid), pixels(mask, p, c)
        pred, _, mask = m(x, k)
        if m.norm_pix_loss:
            pred = denormalise(pred, patchify(x, p))
        return unpatchify(pred, p, c, grid), pixels(mask, p, 1)

    x = jnp.asarray(images, jnp.float32)
    recon, mask = run(state, x, key)
    masked = np.broadcast_to(np.asarray(mask, bool), x.shape)
    target = np.asarray(x, np.float32)
    return (np.where(masked, np.nan, target), np.where(masked, np.asarray(recon, np.float32), target), target)


def picture(masked: np.ndarray, reconstruction: np.ndarray, target: np.ndarray, gap: int = 2) -> np.ndarray:
    """`masked_views` -> one grey image per crop, uint8 (N, C*H + (C-1)*gap, 3*W + 2*gap, 1): a row per
    channel, the columns masked input | reconstruction | target, each row scaled to its target's 1st-99th
    percentile; masked patches grey (MASK_GREY), the gaps white. clu's `write_images` takes it as it is."""
    n, c, h, w = target.shape
    out = np.full((n, c * h + (c - 1) * gap, 3 * w + 2 * gap, 1), 255, np.uint8)
    for i in range(n):
        for ch in range(c):
            lo, hi = np.percentile(target[i, ch], [1, 99])
            scale = 1.0 / max(hi - lo, 1e-6)
            top = ch * (h + gap)
            for col, panel in enumerate((masked, reconstruction, target)):
                x = panel[i, ch]
                v = np.round(np.clip((x - lo) * scale, 0.0, 1.0) * 255)
                left = col * (w + gap)
                out[i, top:top + h, left:left + w, 0] = np.where(np.isnan(x), MASK_GREY, v).astype(np.uint8)
    return out


def dataset_crops(dataset, normalize: str, crop_size: int, num: int = PICTURE_CROPS) -> np.ndarray:
    """`num` crops spread evenly over an opened dataset, normalised as in training (`data.normalize`) and
    centre-cropped to `crop_size`: (num, C, crop_size, crop_size) float32."""
    from maejax import preprocess
    ids = np.unique(np.linspace(0, len(dataset) - 1, min(num, len(dataset))).round().astype(int))
    moments = (preprocess.plate_moments(dataset.metadata.iloc[ids], preprocess.plate_statistics(dataset))
               if normalize == "plate" else None)
    images = np.asarray(preprocess.normalize(dataset.reader.read_many(ids), normalize, moments), np.float32)
    h, w = images.shape[2:]
    s = min(crop_size, h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return images[:, :, top:top + s, left:left + s]


def reconstruction_picture(model, dataset, normalize: str, crop_size: int, seed: int = 0,
                           num: int = PICTURE_CROPS, channels: Sequence[int] | None = None,
                           channel_ids: Sequence[int] | None = None) -> np.ndarray | None:
    """The picture (`picture`) of `model` on `num` crops of `dataset` with the masks of `seed`; None for a
    model that does not reconstruct. `channels` / `channel_ids`: as eval.embed.Embedder's."""
    crops = dataset_crops(dataset, normalize, crop_size, num)
    if channels is not None:
        crops = crops[:, list(channels)]
    views = masked_views(model, crops, jax.random.key(seed), channel_ids)
    return None if views is None else picture(*views)
