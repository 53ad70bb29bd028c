"""Hand-crafted per-image features: the CellProfiler-style baseline for the map benchmarks.

From a uint8 (N, C, H, W) batch:
- intensity, per channel: mean, std and the 5/25/50/75/95th percentiles (exact `np.percentile`
  linear interpolation);
- texture, per channel: grey-level co-occurrence contrast and correlation at pixel offsets 1, 2, 4
  (horizontal and vertical pairs pooled, raw intensities), and gradient energy at scales 2, 4, 8
  (horizontal + vertical mean squared finite difference of s x s block means);
- shape, from an Otsu-threshold segmentation of channel 0 (DNA / nuclei): object count,
  foreground fraction, mean and std of object area, mean eccentricity (from second moments) and
  mean extent (area / bounding-box area, a solidity proxy). Objects under `min_area` pixels are
  ignored as noise.
Intensities are scaled to [0, 1]. Empty or constant images give zeros, never NaN.
All images are processed together: a radix sort of every image for the percentiles, one einsum
product-sum per offset for the co-occurrence statistics, and one `ndimage.label` call on the whole
stack with a structuring element that never connects two images.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

PERCENTILES = (5, 25, 50, 75, 95)
OFFSETS = (1, 2, 4)
SCALES = (2, 4, 8)
CHUNK_IMAGES = 256   # images per vectorised pass: keeps the float32 working set in cache (~2x faster
                     # per crop than 4,000 at once for 6 x 64 x 64)
SHAPE_FEATURES = ("object_count", "foreground_fraction", "area_mean", "area_std",
                  "eccentricity_mean", "extent_mean")


def feature_names(channels: Sequence[str]) -> list[str]:
    """Names of the columns returned by `handcrafted_features`, in order."""
    names = []
    for c in channels:
        names += [f"{c}_intensity_mean", f"{c}_intensity_std"]
        names += [f"{c}_intensity_p{q}" for q in PERCENTILES]
        names += [f"{c}_contrast_d{d}" for d in OFFSETS]
        names += [f"{c}_correlation_d{d}" for d in OFFSETS]
        names += [f"{c}_gradient_energy_s{s}" for s in SCALES]
    return names + [f"{channels[0]}_{name}" for name in SHAPE_FEATURES]


def _percentiles(sorted_rows: np.ndarray) -> np.ndarray:
    """np.percentile(..., method='linear') of each sorted row, scaled to [0, 1]: (M, len(PERCENTILES))."""
    n = sorted_rows.shape[1]
    pos = np.asarray(PERCENTILES) / 100 * (n - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    v_lo, v_hi = sorted_rows[:, lo].astype(np.float32), sorted_rows[:, hi].astype(np.float32)
    return (v_lo + (v_hi - v_lo) * (pos - lo).astype(np.float32)) / 255.0


def _cooccurrence(z: np.ndarray, offsets: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Co-occurrence contrast E[(a-b)^2] and Pearson correlation of the pixel pairs (a, b) at each
    offset, horizontal and vertical pairs pooled, for (M, H, W) images centred on their mean:
    two (M, len(offsets)) arrays. Correlation is 0 where a side of the pairs is constant.

    Per offset and direction one fused product-sum (einsum); the window sums and sums of squares
    come from row/column sums computed once, so no shifted copy of the stack is made.
    """
    contrast = np.zeros((len(z), len(offsets)))
    corr = np.zeros((len(z), len(offsets)))
    for axis in (1, 2):
        line = z.sum(axis=3 - axis)                                        # (M, H or W)
        line_sq = np.einsum("mij,mij->mj" if axis == 2 else "mij,mij->mi", z, z)
        across = z.shape[3 - axis]
        for i, d in enumerate(offsets):
            a = z[:, :, :-d] if axis == 2 else z[:, :-d, :]
            b = z[:, :, d:] if axis == 2 else z[:, d:, :]
            n = across * (z.shape[axis] - d)
            sa, sb = line[:, :-d].sum(1), line[:, d:].sum(1)
            qa, qb = line_sq[:, :-d].sum(1), line_sq[:, d:].sum(1)
            sab = np.einsum("mij,mij->m", a, b)
            contrast[:, i] += (qa + qb - 2 * sab) / n / 2
            va, vb = qa / n - (sa / n) ** 2, qb / n - (sb / n) ** 2
            denom = np.sqrt(np.maximum(va * vb, 0.0))
            ok = denom > 1e-10
            corr[:, i] += np.where(ok, (sab / n - sa * sb / n ** 2) / np.where(ok, denom, 1.0), 0.0) / 2
    return contrast, corr


def _halve(z: np.ndarray) -> np.ndarray:
    """2 x 2 block means of (M, H, W) images (an odd trailing row/column is dropped)."""
    h, w = z.shape[1] // 2 * 2, z.shape[2] // 2 * 2
    return (z[:, 0:h:2, 0:w:2] + z[:, 1:h:2, 0:w:2] + z[:, 0:h:2, 1:w:2] + z[:, 1:h:2, 1:w:2]) / 4


def _intensity_texture(images: np.ndarray) -> np.ndarray:
    """(M, H, W) uint8 -> (M, 2 + 3 * 3): mean, std, contrast and correlation at OFFSETS and
    gradient energy (lag-1 contrast of block means) at SCALES."""
    x = images.astype(np.float32) / 255.0
    mean = x.mean(axis=(1, 2))
    z = x - mean[:, None, None]
    std = np.sqrt(np.einsum("mij,mij->m", z, z) / (z.shape[1] * z.shape[2]))
    contrast, corr = _cooccurrence(z, OFFSETS)
    energy, y, scale = [], z, 1
    for s in SCALES:              # powers of two: each scale halves the previous one
        while scale < s:
            y, scale = _halve(y), scale * 2
        energy.append(2 * _cooccurrence(y, (1,))[0][:, 0])
    cols = [mean, std, *contrast.T, *corr.T, *energy]
    return np.stack(cols, axis=1).astype(np.float32)


def _histograms(rows: np.ndarray) -> np.ndarray:
    """(M, P) uint8 -> (M, 256) grey-level counts."""
    offsets = (np.arange(len(rows), dtype=np.int64) * 256)[:, None]
    return np.bincount((rows + offsets).ravel(), minlength=256 * len(rows)).reshape(len(rows), 256)


def _otsu_thresholds(hist: np.ndarray) -> np.ndarray:
    """Otsu threshold per histogram row: pixels > threshold are foreground."""
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist, axis=1).astype(np.float64)
    total = w0[:, -1:]
    m0 = np.cumsum(hist * levels, axis=1)
    w1 = total - w0
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[:, -1:] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    # a single grey level has no split: threshold at the top so nothing is foreground
    return np.where(between.max(axis=1) > 0, between.argmax(axis=1), 255)


def _shape(dna: np.ndarray, hist: np.ndarray, min_area: int) -> np.ndarray:
    """(N, H, W) uint8 nuclear channel -> (N, len(SHAPE_FEATURES))."""
    n, h, w = dna.shape
    mask = dna > _otsu_thresholds(hist)[:, None, None]
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)   # 4-connectivity, never across images
    labels, count = ndimage.label(mask, structure)
    out = np.zeros((n, len(SHAPE_FEATURES)), np.float32)
    out[:, 1] = mask.mean(axis=(1, 2))
    if count == 0:
        return out
    img, row, col = np.nonzero(labels)
    lab = labels[img, row, col]
    area = np.bincount(lab, minlength=count + 1)[1:].astype(np.float64)
    image_of = np.zeros(count + 1, np.int64)
    image_of[lab] = img
    image_of = image_of[1:]
    s = lambda v: np.bincount(lab, weights=v, minlength=count + 1)[1:]
    mr, mc = s(row) / area, s(col) / area
    vr = s(row.astype(np.float64) ** 2) / area - mr ** 2
    vc = s(col.astype(np.float64) ** 2) / area - mc ** 2
    cov = s(row.astype(np.float64) * col) / area - mr * mc
    half_trace, det_term = (vr + vc) / 2, np.sqrt(((vr - vc) / 2) ** 2 + cov ** 2)
    major, minor = half_trace + det_term, np.maximum(half_trace - det_term, 0.0)
    ecc = np.where(major > 1e-12, np.sqrt(np.clip(1 - minor / np.maximum(major, 1e-12), 0, 1)), 0.0)
    order = np.argsort(lab, kind="stable")
    starts = np.concatenate([[0], np.cumsum(area.astype(np.int64))[:-1]])
    span = lambda v: np.maximum.reduceat(v[order], starts) - np.minimum.reduceat(v[order], starts) + 1
    extent = area / (span(row) * span(col))
    keep = area >= min_area
    per_image = lambda v: np.bincount(image_of[keep], weights=v[keep], minlength=n)
    num = per_image(np.ones(count))
    safe = np.maximum(num, 1)
    area_frac = area / (h * w)
    mean_area = per_image(area_frac) / safe
    out[:, 0] = num
    out[:, 2] = mean_area
    out[:, 3] = np.sqrt(np.maximum(per_image(area_frac ** 2) / safe - mean_area ** 2, 0.0))
    out[:, 4] = per_image(ecc) / safe
    out[:, 5] = per_image(extent) / safe
    return out


def handcrafted_features(images: np.ndarray, channels: Sequence[str] | None = None,
                         min_area: int = 4) -> tuple[np.ndarray, list[str]]:
    """(N, C, H, W) uint8 -> (features (N, F) float32, names (F,)); channel 0 is segmented."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
    n, c, h, w = images.shape
    if min(h, w) < 2 * max(OFFSETS + SCALES):
        raise ValueError(f"images must be at least {2 * max(OFFSETS + SCALES)} pixels on a side, "
                         f"got {h}x{w}")
    channels = list(channels) if channels is not None else [f"ch{i}" for i in range(c)]
    if len(channels) != c:
        raise ValueError(f"{len(channels)} channel names for {c} channels")
    names = feature_names(channels)
    feats = np.empty((n, len(names)), np.float32)
    for start in range(0, n, CHUNK_IMAGES):
        part = images[start:start + CHUNK_IMAGES]
        m = len(part)
        pct = _percentiles(np.sort(part.reshape(m * c, h * w), axis=1, kind="stable"))  # radix sort
        moments = _intensity_texture(part.reshape(m * c, h, w)).reshape(m, c, -1)
        per_channel = np.concatenate([moments[..., :2], pct.reshape(m, c, -1), moments[..., 2:]], axis=-1)
        shape = _shape(part[:, 0], _histograms(part[:, 0].reshape(m, h * w)), min_area)
        feats[start:start + m] = np.concatenate([per_channel.reshape(m, -1), shape], axis=1)
    return feats, names
