"""Reads dataset directories (see data/arrayrecord_writer.py): the training stream and the ordered eval reader.

Training: grain over the ArrayRecord shards,

    range(N) -> this process's slice -> seeded shuffle (new order each epoch) -> repeat
      -> read + decode + random crop / flips / rot90 + self-standardisation  (grain random_map)
      -> batch (drop remainder) -> optional worker processes

The element that flows through the index stages is the record_id, so labels come from the metadata
table and every batch says which records it holds. Augmentation draws its randomness from grain's
per-position RNG, so a given (seed, position in the stream) always yields the same crop, and an
iterator restored from `get_state()` reproduces the original stream exactly.

Eval: `iterate_records` walks the records in record_id order, once each, as uint8 batches.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np
import pandas as pd

from maejax import records
from maejax import preprocess
from maejax.records import LAYOUT

@dataclasses.dataclass(frozen=True)
class RecordReader:
    """Reads one record's image by record_id and checks its shape; small and picklable for grain workers."""
    source: grain.sources.ArrayRecordDataSource
    shard_files: tuple[str, ...]
    shard_offsets: tuple[int, ...]  # record_id of each shard's first record
    shape: tuple[int, int, int]     # (C, H, W) every record must have

    def where(self, record_id: int) -> str:
        """Names a record for error messages: `<shard path>[<index within the shard>]`."""
        shard = int(np.searchsorted(self.shard_offsets, record_id, side="right")) - 1
        return f"{self.shard_files[shard]}[{record_id - self.shard_offsets[shard]}]"

    def decode(self, data: bytes, record_id: int) -> np.ndarray:
        try:
            image = records.decode(data)["image"]
        except records.RecordError:   # name the record only when it is bad: `where` costs a search
            records.decode(data, where=self.where(record_id))
            raise
        if image.shape != self.shape:
            raise records.RecordError(
                f"{self.where(record_id)}: image shape (C, H, W) = {image.shape}, the dataset's manifest "
                f"says {self.shape}")
        return image

    def unreadable(self, record_id: int, error: Exception) -> records.RecordError:
        """The one-line error for a record the shard does not give back (Riegeli's chunk hash failed,
        or the file changed under the reader): names the shard file and the record's index in it."""
        dataset = os.path.dirname(self.where(record_id))
        return records.RecordError(
            f"{self.where(record_id)}: unreadable record ({records.one_line(error)}); the shard is damaged: "
            f"check the dataset with `python -m maejax.records verify --dataset {dataset}`, then {records.FIX}")

    def read(self, record_id: int) -> np.ndarray:
        try:
            data = self.source[record_id]
        except Exception as e:
            raise self.unreadable(record_id, e) from e
        return self.decode(data, record_id)

    def read_many(self, record_ids) -> np.ndarray:
        """uint8 (B, C, H, W) for the given record_ids (one batched ArrayRecord read)."""
        ids = [int(i) for i in record_ids]
        try:
            data = self.source.__getitems__(ids)
        except Exception as e:
            for i in ids:   # find the record: a batched read does not say which one failed
                try:
                    self.source[i]
                except Exception as single:
                    raise self.unreadable(i, single) from e
            raise self.unreadable(ids[0], e) from e
        return np.stack([self.decode(d, i) for d, i in zip(data, ids)])


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An opened dataset directory."""
    path: Path
    manifest: dict[str, Any]
    metadata: pd.DataFrame  # one row per record, row i is record_id i
    reader: RecordReader    # or anything with its `shape` and `read` (benchmarks/input_pipeline.py reads PNGs)

    @property
    def channels(self) -> list[str]:
        return list(self.manifest["channels"])

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        return self.reader.shape

    @property
    def perturbations(self) -> list[str]:
        """Label i is perturbations[i]; controls are included."""
        return list(self.manifest["perturbations"])

    def __len__(self) -> int:
        return len(self.metadata)


def open_dataset(dataset_dir: str | os.PathLike, verify: bool = False) -> Dataset:
    """Opens and checks a dataset directory: manifest, metadata table, and every shard's size, Riegeli
    signature and record count (cheap; maejax/records.py says why). `verify=True` also checks every
    shard's SHA-256 against the manifest (a full read: `python -m maejax.records verify` does the same)."""
    path = Path(dataset_dir)
    manifest, manifest_path = records.read_manifest(path)
    if verify:
        result = records.verify_dataset(path)
        if result.problems:
            raise records.RecordError(result.problems[0] + (
                f" (and {len(result.problems) - 1} more damaged shards)" if len(result.problems) > 1 else ""))
    elif not records.has_checksums(manifest):
        _say_unverified_once(manifest_path)

    shard_files, offsets, total = [], [], 0
    for shard in manifest["shards"]:
        shard_path = path / shard["file"]
        found = records.check_shard(shard_path, shard, manifest_path)
        shard_files.append(str(shard_path))
        offsets.append(total)
        total += found
    if total != manifest["num_records"]:
        raise ValueError(f"{manifest_path}: shards hold {total} records, num_records says {manifest['num_records']}")

    metadata_path = path / LAYOUT.metadata
    if not metadata_path.is_file():
        raise FileNotFoundError(f"{metadata_path}: metadata table is missing")
    metadata = pd.read_parquet(metadata_path)
    if not np.array_equal(metadata["record_id"].to_numpy(), np.arange(total)):
        raise ValueError(f"{metadata_path}: expected one row per record, record_id 0..{total - 1} in order")

    source = grain.sources.ArrayRecordDataSource(shard_files)
    reader = RecordReader(source, tuple(shard_files), tuple(offsets), tuple(manifest["crop_shape"]))
    return Dataset(path=path, manifest=manifest, metadata=metadata, reader=reader)


_UNVERIFIED: set[str] = set()


def _say_unverified_once(manifest_path: Path) -> None:
    key = str(manifest_path.resolve())
    if key in _UNVERIFIED:
        return
    _UNVERIFIED.add(key)
    logging.getLogger(__name__).warning(
        "%s: no shard sizes and checksums (written before builders recorded them): the shards are unverified; "
        "`python -m maejax.records verify --dataset %s` reads every record, rebuilding adds checksums",
        manifest_path, manifest_path.parent)


def _as_dataset(dataset: str | os.PathLike | Dataset) -> Dataset:
    return dataset if isinstance(dataset, Dataset) else open_dataset(dataset)


class _TrainExample(grain.transforms.RandomMap):
    """record_id -> augmented, self-standardised training example."""

    def __init__(self, reader: RecordReader, labels: np.ndarray, is_control: np.ndarray, *,
                 crop_size: int, flip: bool, rot90: bool, normalize: str = "crop",
                 moments: np.ndarray | None = None):
        self.reader, self.labels, self.is_control = reader, labels, is_control
        self.crop_size, self.flip, self.rot90 = crop_size, flip, rot90
        self.normalize, self.moments = normalize, moments   # moments: (N, 2, C) per record, mode "plate"

    def random_map(self, record_id, rng: np.random.Generator) -> dict[str, np.ndarray]:
        record_id = int(record_id)
        image = self.reader.read(record_id)
        _, height, width = image.shape
        c = self.crop_size
        # Draw every random number whatever the switches, so turning one augmentation off leaves
        # the others' draws (e.g. the crop positions) unchanged.
        y, x = rng.integers(height - c + 1), rng.integers(width - c + 1)
        flip_v, flip_h, quarter_turns = rng.random() < 0.5, rng.random() < 0.5, rng.integers(4)
        image = image[:, y:y + c, x:x + c]
        if self.flip:
            image = image[:, ::-1] if flip_v else image
            image = image[:, :, ::-1] if flip_h else image
        if self.rot90:
            image = np.rot90(image, quarter_turns, axes=(1, 2))
        return {
            "image": preprocess.normalize(
                image, self.normalize, None if self.moments is None else self.moments[record_id]),
            "label": self.labels[record_id],
            "is_control": self.is_control[record_id],
            "record_id": np.int64(record_id),
        }


def make_train_iterator(
    dataset: str | os.PathLike | Dataset,
    *,
    batch_size: int,
    crop_size: int,
    seed: int,
    num_workers: int = 0,
    flip: bool = True,
    rot90: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    num_channels: int | None = None,
    read_threads: int = 8,
    normalize: str = "crop",
    plate_stats: dict | None = None,
) -> grain.DatasetIterator:
    """Returns an iterator over this process's training batches.

    batch_size: the GLOBAL batch size; each of the `process_count` processes yields
      batch_size // process_count examples per batch (feed them to
      `jax.make_array_from_process_local_data`).
    Each batch is a dict: `image` float32 (B, C, crop_size, crop_size) normalised as `normalize` says
    (maejax.preprocess: crop = self-standardised, plate = by its plate's statistics, `plate_stats` when
    given, else computed here), `label` int32
    (index into the manifest's `perturbations`), `is_control` bool, `record_id` int64.
    Augmentation: a random square crop of `crop_size` (a no-op when it equals the record size), then
    random vertical and horizontal flips (`flip`) and a random number of quarter turns (`rot90`).
    Records are split across processes by record_id (process p takes p, p + P, ...; every process gets
    N // P of them so all yield the same number of batches), then shuffled with `seed`, in a new order
    each epoch; `num_epochs=None` repeats forever, otherwise the stream ends after that many epochs
    (remainder dropped). num_workers > 0 moves reading and augmentation to that many processes
    (`mp_prefetch`); batches are the same for 0 and 1 worker, and a saved state must be restored with
    the same num_workers. read_threads: grain read threads per process. The returned iterator supports
    `get_state()` / `set_state()` and `grain.checkpoint.CheckpointSave` / `CheckpointRestore`.
    """
    ds = _as_dataset(dataset)
    channels, height, width = ds.crop_shape
    manifest_path = ds.path / LAYOUT.manifest
    if num_channels is not None and num_channels != channels:
        raise ValueError(f"asked for {num_channels} channels; {manifest_path} says records have {channels}")
    if not 0 < crop_size <= min(height, width):
        raise ValueError(f"crop_size {crop_size} does not fit records of {height}x{width} ({manifest_path})")
    process_index, process_count = _process_slot(process_index, process_count)
    if batch_size % process_count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by process_count {process_count}")
    local_batch = batch_size // process_count
    per_process = len(ds) // process_count
    if per_process < local_batch:
        raise ValueError(f"{ds.path}: {per_process} records per process, fewer than one batch of {local_batch}")

    preprocess.check_normalization(normalize)
    moments = None
    if normalize == "plate":
        moments = preprocess.plate_moments(ds.metadata, plate_stats or preprocess.plate_statistics(ds))
    example = _TrainExample(
        ds.reader,
        labels=ds.metadata["label"].to_numpy(np.int32),
        is_control=ds.metadata["is_control"].to_numpy(bool),
        crop_size=crop_size, flip=flip, rot90=rot90, normalize=normalize, moments=moments)
    record_ids = grain.MapDataset.range(len(ds))[process_index::process_count][:per_process]
    examples = record_ids.seed(seed).shuffle().repeat(num_epochs).random_map(example)
    batches = examples.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * local_batch)
    ).batch(local_batch, drop_remainder=True)
    if num_workers > 0:
        _allow_grain_workers()
        batches = batches.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=4))
    return iter(batches)


def iterate_records(
    dataset: str | os.PathLike | Dataset,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """Yields (uint8 images (B, C, H, W), metadata rows) in record_id order, each record exactly once.

    With process_count > 1 only this process's contiguous block of record_ids is read; the blocks
    of all processes cover the dataset. The last batch may be smaller.
    """
    ds = _as_dataset(dataset)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    block = np.array_split(np.arange(len(ds)), process_count)[process_index]
    for start in range(0, len(block), batch_size):
        ids = block[start:start + batch_size]
        yield ds.reader.read_many(ids), ds.metadata.iloc[ids[0]:ids[-1] + 1]


def _process_slot(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when asked: the eval reader and data tools do not need jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def _allow_grain_workers() -> None:
    """grain workers read absl flags, which fail unless parsed (grain#1355, stack.md P3)."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
