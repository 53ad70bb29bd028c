"""Embedding crops with a model: one jitted forward pass per batch gives every block's mean-pooled features.

Batches are padded to a fixed size (one compile), split over the mesh axes the model's run puts a batch on
(its sharding rules: `maejax.sharding.batch_mesh` gives a mesh with every device there), and
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
    """Wraps `model.embed` in a jitted, data-parallel function over uint8 (B, C, H, W) batches.

    `rules`: the run's sharding rules (maejax.sharding.rules_from_config of its config), which place the
    batch as well as the weights; `blocks` (0-based indices) keeps only those blocks of the `blocks` output,
    selected on the device; `compiler_options`: XLA options (maejax.step.compiler_options of the run's
    config). `channels` (indices into the crops' channels) gives the model those channels in that order
    (eval.channels; None = all, as stored); `channel_ids` (each given channel's id in the run's channel
    vocabulary) goes to `model.embed` with them when the model is channel-agnostic (a CA-MAE)."""

    def __init__(self, model: nnx.Module, mesh: Mesh, batch_size: int, rules,
                 keys: tuple[str, ...] = ("blocks", "pooled"), normalize: str = "crop",
                 plate_stats: dict | None = None, blocks: tuple[int, ...] | None = None,
                 compiler_options: dict | None = None, channels: tuple[int, ...] | None = None,
                 channel_ids: tuple[int, ...] | None = None):
        self.normalize = preprocess.check_normalization(normalize)
        if normalize == "plate" and not plate_stats:
            raise ValueError("normalize='plate' needs plate_stats (maejax.preprocess.plate_statistics)")
        self.plate_stats = plate_stats
        dp = shd.data_parallel_size(mesh, rules)
        self.batch_size = -(-batch_size // dp) * dp      # round up to a multiple of the data-parallel size
        self.mesh, self.rules, self.keys = mesh, rules, keys
        graphdef, state = nnx.split(model)
        in_sh = shd.batch_sharding(mesh, rules, 4)

        select = None if blocks is None else jnp.asarray(blocks, jnp.int32)
        self.channels = None if channels is None else np.asarray(channels, np.intp)
        from maejax.models.ca_mae import CAMAE
        ids = None if channel_ids is None or not isinstance(model, CAMAE) else np.asarray(channel_ids, np.int32)

        def forward(state, images, moments):
            kw = {} if ids is None else {"channel_ids": jnp.broadcast_to(jnp.asarray(ids), (images.shape[0], len(ids)))}
            out = nnx.merge(graphdef, state).embed(preprocess.normalize(images, normalize, moments, xp=jnp), **kw)
            out = {k: out[k] for k in keys}
            if select is not None and "blocks" in out:   # only the chosen blocks leave the device
                out["blocks"] = out["blocks"][:, select]
            return out

        with shd.activate(mesh, rules):
            self._forward = jax.jit(forward, in_shardings=(None, in_sh, None), compiler_options=compiler_options)
        self._state = state
        # A mesh of this process's devices (also one process of a multi-process job): inputs are put on it
        # explicitly, as jax refuses numpy inputs with a sharding in multi-process jobs.
        self._put = (in_sh, shd.replicated(mesh)) if in_sh.is_fully_addressable else None

    def __call__(self, images: np.ndarray, meta: pd.DataFrame | None = None) -> dict[str, np.ndarray]:
        """uint8 (n, C, H, W) -> features; `meta` (experiment, plate per row) is needed for plate normalisation."""
        return self.fetch(self.dispatch(images, meta))

    def dispatch(self, images: np.ndarray, meta: pd.DataFrame | None = None) -> tuple[dict[str, jax.Array], int]:
        """Starts the forward pass of one batch and returns at once (jax dispatches asynchronously), so the
        host can read the next batch meanwhile; `fetch` waits for the features."""
        n = images.shape[0]
        if n > self.batch_size:
            raise ValueError(f"batch of {n} images is larger than the embedder's batch size {self.batch_size}")
        if self.channels is not None:
            images = images[:, self.channels]
        padded = np.zeros((self.batch_size,) + images.shape[1:], images.dtype)
        padded[:n] = images
        moments = np.ones((self.batch_size, 2, images.shape[1]), np.float32)
        if self.normalize == "plate":
            if meta is None:
                raise ValueError("plate normalisation needs each crop's metadata (experiment, plate)")
            plate = preprocess.plate_moments(meta, self.plate_stats)
            moments[:n] = plate if self.channels is None else plate[:, :, self.channels]
        if self._put is not None:
            padded, moments = jax.device_put(padded, self._put[0]), jax.device_put(moments, self._put[1])
        with shd.activate(self.mesh, self.rules):
            out = self._forward(self._state, padded, moments)
        return out, n

    @staticmethod
    def fetch(pending: tuple[dict[str, jax.Array], int]) -> dict[str, np.ndarray]:
        """The features of a `dispatch`ed batch as numpy arrays (padding removed)."""
        out, n = pending
        return {k: np.asarray(v)[:n] for k, v in out.items()}

    def embed_batches(self, batches: Iterable[tuple[np.ndarray, pd.DataFrame]]
                      ) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
        """Embeds (images, metadata rows) batches; returns stacked features and concatenated metadata.
        One batch is in flight while the next is read."""
        feats: dict[str, list[np.ndarray]] = {k: [] for k in self.keys}
        metas = []
        previous = None
        for images, meta in _chunks(batches, self.batch_size):
            pending = self.dispatch(images, meta)
            if previous is not None:
                for k, v in self.fetch(previous).items():
                    feats[k].append(v)
            previous = pending
            metas.append(meta)
        if previous is not None:
            for k, v in self.fetch(previous).items():
                feats[k].append(v)
        if not metas:
            raise ValueError("nothing to embed: the dataset is empty")
        return ({k: np.concatenate(v) for k, v in feats.items()},
                pd.concat(metas, ignore_index=True))


def output_shapes(model: nnx.Module, image_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The shape of every output of `model.embed` for one image of `image_shape` (C, H, W); traced, nothing
    computed. A crop the model cannot take (e.g. another channel count) raises here."""
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), np.float32)
    shapes = jax.eval_shape(lambda s, im: nnx.merge(graphdef, s).embed(im), state, x)
    return {k: tuple(v.shape) for k, v in shapes.items()}


def _chunks(batches, size: int) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """Re-chunks batches so none exceeds `size` (the reader's and the embedder's sizes may differ)."""
    for images, meta in batches:
        for i in range(0, len(images), size):
            yield images[i:i + size], meta.iloc[i:i + size]
