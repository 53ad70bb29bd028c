"""Embedding crops with a model: one jitted forward pass per batch gives every block's mean-pooled features.

Batches are padded to a fixed size (one compile), split over all local devices (data parallel), and
normalised on device exactly as the training input pipeline does on the host (maejax.preprocess: per crop,
or by each crop's plate statistics, which then come from the crops' metadata).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx
from jax.sharding import Mesh

from maejax import sharding as shd
from maejax import preprocess


class Embedder:
    """Wraps `model.embed` in a jitted, data-parallel function over uint8 (B, C, H, W) batches."""

    def __init__(self, model: nnx.Module, mesh: Mesh, batch_size: int, rules=shd.DEFAULT_RULES,
                 keys: tuple[str, ...] = ("blocks", "pooled"), normalize: str = "crop",
                 plate_stats: dict | None = None):
        self.normalize = preprocess.check_normalization(normalize)
        if normalize == "plate" and not plate_stats:
            raise ValueError("normalize='plate' needs plate_stats (maejax.preprocess.plate_statistics)")
        self.plate_stats = plate_stats
        dp = shd.data_parallel_size(mesh)
        self.batch_size = -(-batch_size // dp) * dp      # round up to a multiple of the data-parallel size
        self.mesh, self.rules, self.keys = mesh, rules, keys
        graphdef, state = nnx.split(model)
        in_sh = shd.batch_sharding(mesh, 4)

        def forward(state, images, moments):
            out = nnx.merge(graphdef, state).embed(preprocess.normalize(images, normalize, moments, xp=jnp))
            return {k: out[k] for k in keys}

        with shd.activate(mesh, rules):
            self._forward = jax.jit(forward, in_shardings=(None, in_sh, None))
        self._state = state

    def __call__(self, images: np.ndarray, meta: pd.DataFrame | None = None) -> dict[str, np.ndarray]:
        """uint8 (n, C, H, W) -> features; `meta` (experiment, plate per row) is needed for plate normalisation."""
        n = images.shape[0]
        if n > self.batch_size:
            raise ValueError(f"batch of {n} images is larger than the embedder's batch size {self.batch_size}")
        padded = np.zeros((self.batch_size,) + images.shape[1:], images.dtype)
        padded[:n] = images
        moments = np.ones((self.batch_size, 2, images.shape[1]), np.float32)
        if self.normalize == "plate":
            if meta is None:
                raise ValueError("plate normalisation needs each crop's metadata (experiment, plate)")
            moments[:n] = preprocess.plate_moments(meta, self.plate_stats)
        with shd.activate(self.mesh, self.rules):
            out = self._forward(self._state, padded, moments)
        return {k: np.asarray(v)[:n] for k, v in out.items()}

    def embed_batches(self, batches: Iterable[tuple[np.ndarray, pd.DataFrame]]
                      ) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
        """Embeds (images, metadata rows) batches; returns stacked features and concatenated metadata."""
        feats: dict[str, list[np.ndarray]] = {k: [] for k in self.keys}
        metas = []
        for images, meta in _chunks(batches, self.batch_size):
            for k, v in self(images, meta).items():
                feats[k].append(v)
            metas.append(meta)
        if not metas:
            raise ValueError("nothing to embed: the dataset is empty")
        return ({k: np.concatenate(v) for k, v in feats.items()},
                pd.concat(metas, ignore_index=True))


def _chunks(batches, size: int) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """Re-chunks batches so none exceeds `size` (the reader's and the embedder's sizes may differ)."""
    for images, meta in batches:
        for i in range(0, len(images), size):
            yield images[i:i + size], meta.iloc[i:i + size]
