"""Input normalisation, chosen by `data.normalize`; the same code serves the input pipeline (numpy, in data
workers) and every embedding path (jax), so train and eval see identical inputs.

  crop   self-standardisation, the MAE papers' and OpenPhenom's: uint8 -> /255 -> per image, per channel
         zero mean and unit (biased) variance with eps 1e-5, i.e. torch `InstanceNorm2d(affine=False)`.
         It removes every crop's per-channel level and contrast from the model's input.
  plate  uint8 -> /255 -> minus the mean and over the std of the crop's plate, per channel, estimated
         on a fixed sample of the plate's crops (`plate_statistics`). Level and contrast differences
         between wells of a plate (e.g. a stain that gets brighter) stay in the input.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

EPS = 1e-5


def self_standardize(images, eps: float = EPS, xp=np):
    """images: (..., C, H, W) uint8 or float in [0, 255]. Returns float32 of the same shape."""
    x = xp.asarray(images).astype(xp.float32) / 255.0
    mean = x.mean(axis=(-2, -1), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(-2, -1), keepdims=True)
    return (x - mean) / xp.sqrt(var + eps)


NORMALIZATIONS = ("crop", "plate")
PLATE_KEYS = ["experiment", "plate"]
PLATE_SAMPLE = 64   # crops per plate read for its statistics


def check_normalization(mode: str) -> str:
    if mode not in NORMALIZATIONS:
        raise ValueError(f"data.normalize={mode!r}: choose one of {NORMALIZATIONS}")
    return mode


def plate_statistics(dataset, sample: int = PLATE_SAMPLE, seed: int = 0) -> dict[tuple[str, str], np.ndarray]:
    """{(experiment, plate): (2, C) float32 [mean, std] of the pixels / 255} from up to `sample` crops
    per plate, drawn with a fixed seed (so train and eval agree). `dataset`: maejax.input_pipeline.Dataset."""
    meta = dataset.metadata
    missing = [c for c in PLATE_KEYS if c not in meta.columns]
    if missing:
        raise ValueError(f"{dataset.path}: metadata lacks {missing}, needed by data.normalize=plate")
    rng = np.random.default_rng(seed)
    out = {}
    for key, rows in meta.groupby(PLATE_KEYS, sort=True):
        ids = np.sort(rng.choice(rows["record_id"].to_numpy(), size=min(sample, len(rows)), replace=False))
        x = dataset.reader.read_many(ids).astype(np.float64) / 255.0
        mean = x.mean(axis=(0, 2, 3))
        std = np.sqrt(((x - mean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3)))
        out[tuple(str(k) for k in key)] = np.stack([mean, np.maximum(std, 1e-3)]).astype(np.float32)
    return out


def plate_moments(meta: pd.DataFrame, stats: dict[tuple[str, str], np.ndarray]) -> np.ndarray:
    """(N, 2, C) [mean, std] of each row's plate; a plate without statistics is an error naming it."""
    keys = list(zip(meta["experiment"].astype(str), meta["plate"].astype(str)))
    try:
        return np.stack([stats[k] for k in keys])
    except KeyError as e:
        raise ValueError(f"no plate statistics for (experiment, plate) {e.args[0]}; known: {sorted(stats)[:4]}...") from e


def normalize(images, mode: str, moments=None, xp=np):
    """uint8 (..., C, H, W) -> float32; `moments` (..., 2, C) [mean, std] per image for mode "plate"."""
    if mode == "crop":
        return self_standardize(images, xp=xp)
    x = xp.asarray(images).astype(xp.float32) / 255.0
    m = xp.asarray(moments, xp.float32)
    return (x - m[..., 0, :, None, None]) / m[..., 1, :, None, None]
