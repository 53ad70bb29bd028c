"""Self-standardisation: the input normalisation of the MAE papers and of OpenPhenom.

uint8 -> /255 -> per image, per channel zero mean and unit (biased) variance with eps 1e-5, i.e.
torch `InstanceNorm2d(affine=False)`. Used by the input pipeline (numpy, in data workers) and by every
embedding path (jax), so train and eval see identical inputs.
"""
from __future__ import annotations

import numpy as np

EPS = 1e-5


def self_standardize(images, eps: float = EPS, xp=np):
    """images: (..., C, H, W) uint8 or float in [0, 255]. Returns float32 of the same shape."""
    x = xp.asarray(images).astype(xp.float32) / 255.0
    mean = x.mean(axis=(-2, -1), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(-2, -1), keepdims=True)
    return (x - mean) / xp.sqrt(var + eps)
