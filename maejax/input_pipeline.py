"""Reads dataset directories (see data/arrayrecord_writer.py): the training stream and the ordered eval reader.

Training: grain over the ArrayRecord shards,

    range(N) -> this process's slice -> seeded shuffle (new order each epoch) -> repeat
      -> read + decode + random crop / flips / rot90 + self-standardisation  (grain random_map)
      -> batch (drop remainder) -> optional worker processes

The element that flows through the index stages is the record_id, so labels come from the metadata
table and every batch says which records it holds. Augmentation draws its randomness from grain's
per-position RNG, so a given (seed, position in the stream) always yields the same crop, and an
iterator restored from `get_state()` reproduces the original stream exactly.

A mixture of datasets (`data.mixture`: several dataset directories with sampling weights, each with its own
channel list) runs the same stages per dataset (own slice, own seeded shuffle, repeat), mixes them with
grain's `MapDataset.mix` by weight, then reads and augments each example from its dataset. Its batches
also carry `channel_ids` and `channel_mask`, padded to the largest channel count (see `Source`), and
`dataset`; the state, exact resume and per-process streams work as for one dataset.

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

from maejax import channels as channels_lib
from maejax import preprocess
from maejax import records
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


def parse_mixture(mixture: str, data_dir: str) -> list[tuple[str, float]]:
    """`data.mixture` ("DIR=WEIGHT,DIR=WEIGHT"; a DIR without =WEIGHT weighs 1) -> [(dir, weight)];
    "" -> [(data.dir, 1.0)]. Setting both is an error: every dataset of a mixture is listed in it."""
    mixture = (mixture or "").strip()
    if not mixture:
        if not data_dir:
            raise channels_lib.MixtureError(
                "no training data: set data.dir=DATASET (or data.mixture=DIR=WEIGHT,DIR=WEIGHT)")
        return [(data_dir, 1.0)]
    if data_dir:
        raise channels_lib.MixtureError(
            f"data.dir={data_dir!r} and data.mixture={mixture!r} are both set: list every dataset in data.mixture "
            f"(DIR=WEIGHT,...) and leave data.dir empty")
    out = []
    for item in mixture.split(","):
        path, eq, weight = item.strip().rpartition("=")
        if not eq:
            path, weight = weight, "1"
        try:
            w = float(weight)
        except ValueError:
            raise channels_lib.MixtureError(
                f"data.mixture item {item.strip()!r}: the weight {weight!r} is not a number (DIR=WEIGHT)") from None
        if not path or not w > 0:
            raise channels_lib.MixtureError(
                f"data.mixture item {item.strip()!r}: give DIR=WEIGHT with a positive weight")
        out.append((path, w))
    if len({p for p, _ in out}) != len(out):
        raise channels_lib.MixtureError(f"data.mixture={mixture!r} lists a dataset twice")
    return out


@dataclasses.dataclass(frozen=True)
class TrainData:
    """The training datasets of a config (`open_train_data`) and their channels."""
    sources: list["Source"]
    vocabulary: channels_lib.Vocabulary
    channel_slots: int          # channels of every batch image (the largest dataset's; padding is masked)
    with_channels: bool         # batches carry channel_ids / channel_mask (a channel-agnostic model)

    @property
    def datasets(self) -> list[Dataset]:
        return [s.dataset for s in self.sources]


def open_train_data(data: Any, model: Any) -> TrainData:
    """Opens `data.dir` or every dataset of `data.mixture`, maps each one's channels to the vocabulary of
    `data.channels` (maejax.channels; an unknown name is an error naming the dataset and the channel) and
    checks that the model (the config's model section) takes them: a channel-agnostic model (ca_mae) up to
    `max_channels` per crop and one decoder per vocabulary id (`in_channels`), any other model exactly
    `in_channels` channels, the same list in the same order in every dataset."""
    entries = parse_mixture(data.mixture, data.dir)
    datasets = [open_dataset(path) for path, _ in entries]
    vocabulary = channels_lib.parse(data.channels, [ds.channels for ds in datasets])
    sources = [Source(ds, w, tuple(vocabulary.ids(ds.channels, str(ds.path))))
               for ds, (_, w) in zip(datasets, entries)]
    slots = max(ds.crop_shape[0] for ds in datasets)
    name, in_channels = model.name, int(model.in_channels)
    if name == "ca_mae":
        limit = int(model.max_channels or in_channels)
        widest = max(datasets, key=lambda ds: ds.crop_shape[0])
        if slots > limit:
            raise channels_lib.ChannelError(
                f"{widest.path} has {slots} channels; the channel-agnostic model takes at most {limit} per crop "
                f"(model.max_channels, 0 = model.in_channels): raise model.max_channels")
        top = max(max(s.channel_ids) for s in sources)
        if top >= in_channels:
            source = next(s for s in sources if top in s.channel_ids)
            channel = source.dataset.channels[source.channel_ids.index(top)]
            raise channels_lib.ChannelError(
                f"{source.dataset.path}: channel {channel!r} is channel {top} of the vocabulary "
                f"[{vocabulary.spec()}], but the CA-MAE has model.in_channels={in_channels} decoders (one per "
                f"vocabulary channel): set model.in_channels={len(vocabulary)}")
    else:
        first = sources[0]
        for other in sources[1:]:
            if other.channel_ids != first.channel_ids:
                raise channels_lib.ChannelError(
                    f"the {name} model takes one fixed list of channels, but {first.dataset.path} has "
                    f"{first.dataset.channels} and {other.dataset.path} has {other.dataset.channels}: mix "
                    f"datasets of the same channels in the same order, or use model.name=ca_mae")
        if slots != in_channels:
            raise channels_lib.ChannelError(
                f"{first.dataset.path} has {slots} channels ({', '.join(first.dataset.channels)}); the {name} "
                f"model takes exactly model.in_channels={in_channels}")
        if name == "supervised" and len(sources) > 1:
            raise channels_lib.MixtureError(
                f"data.mixture: the supervised model's labels index one dataset's perturbations; {len(sources)} "
                f"datasets have {len(sources)} label sets: train it on one (data.dir)")
        # What a fixed-channel model's checkpoint records: its channels, in their order (eval finds them
        # by name in any dataset); its step reads no channel ids.
        vocabulary = channels_lib.Vocabulary(tuple(vocabulary.identities[i] for i in first.channel_ids))
        sources = [dataclasses.replace(s, channel_ids=tuple(range(slots))) for s in sources]
    return TrainData(sources, vocabulary, slots, with_channels=name == "ca_mae")


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


@dataclasses.dataclass(frozen=True)
class Source:
    """One dataset of a training mixture: its sampling weight and the vocabulary id of each of its record
    channels (maejax.channels)."""
    dataset: Dataset
    weight: float
    channel_ids: tuple[int, ...]


class _Offset(grain.transforms.Map):
    """A dataset's record_id -> the mixture's element id (record_id + the dataset's offset)."""

    def __init__(self, offset: int):
        self.offset = offset

    def map(self, record_id):
        return self.offset + int(record_id)


class _MixtureExample(grain.transforms.RandomMap):
    """Mixture element id -> its dataset's training example, channels padded to `slots` (zeros), with
    channel_ids (padding: 0), channel_mask (False for padding) and `dataset` (the source's index)."""

    def __init__(self, parts: list[_TrainExample], offsets: list[int], channel_ids: list[tuple[int, ...]],
                 slots: int):
        self.parts, self.offsets, self.slots = parts, np.asarray(offsets), slots
        self.channel_ids = [np.pad(np.asarray(ids, np.int32), (0, slots - len(ids))) for ids in channel_ids]
        self.channel_mask = [np.arange(slots) < len(ids) for ids in channel_ids]

    def random_map(self, element, rng: np.random.Generator) -> dict[str, np.ndarray]:
        k = int(np.searchsorted(self.offsets, int(element), side="right")) - 1
        out = self.parts[k].random_map(int(element) - int(self.offsets[k]), rng)
        image = out["image"]
        if image.shape[0] < self.slots:
            image = np.concatenate([image, np.zeros((self.slots - image.shape[0], *image.shape[1:]), image.dtype)])
        out.update(image=image, channel_ids=self.channel_ids[k], channel_mask=self.channel_mask[k],
                   dataset=np.int32(k))
        return out


def make_train_iterator(
    dataset: str | os.PathLike | Dataset | list[Source],
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
    plate_stats: dict | list | None = None,
    channel_slots: int | None = None,
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

    `dataset` a list of `Source`s (a mixture; `open_train_data` builds it from a config): each dataset is
    split over the processes, shuffled (its own seed, derived from `seed`) and repeated on its own, then they
    are mixed by weight; `num_channels` does not apply (`open_train_data` checks the channels) and
    the batches gain channel_ids int32 and channel_mask bool (B, channel_slots; default the largest channel
    count) and dataset int32 (the source's index); `record_id` is within the record's dataset.
    """
    if isinstance(dataset, (list, tuple)):
        return _mixture_iterator(
            list(dataset), batch_size=batch_size, crop_size=crop_size, seed=seed, num_workers=num_workers,
            flip=flip, rot90=rot90, process_index=process_index, process_count=process_count,
            num_epochs=num_epochs, read_threads=read_threads, normalize=normalize,
            plate_stats=plate_stats, channel_slots=channel_slots)
    ds = _as_dataset(dataset)
    if num_channels is not None and num_channels != ds.crop_shape[0]:
        raise ValueError(f"asked for {num_channels} channels; {ds.path / LAYOUT.manifest} says records have "
                         f"{ds.crop_shape[0]}")
    example = _train_example(ds, crop_size, flip, rot90, normalize, plate_stats)
    process_index, process_count, local_batch = _local_batch(batch_size, process_index, process_count)
    per_process = len(ds) // process_count
    if per_process < local_batch:
        raise ValueError(f"{ds.path}: {per_process} records per process, fewer than one batch of {local_batch}")
    record_ids = grain.MapDataset.range(len(ds))[process_index::process_count][:per_process]
    examples = record_ids.seed(seed).shuffle().repeat(num_epochs).random_map(example)
    return _batched(examples, local_batch, read_threads, num_workers)


def _batched(examples: grain.MapDataset, local_batch: int, read_threads: int, num_workers: int):
    batches = examples.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * local_batch)
    ).batch(local_batch, drop_remainder=True)
    if num_workers > 0:
        _allow_grain_workers()
        batches = batches.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=4))
    return iter(batches)


def _train_example(ds: Dataset, crop_size: int, flip: bool, rot90: bool, normalize: str,
                   plate_stats: dict | None) -> _TrainExample:
    channels, height, width = ds.crop_shape
    if not 0 < crop_size <= min(height, width):
        raise ValueError(f"crop_size {crop_size} does not fit records of {height}x{width} "
                         f"({ds.path / LAYOUT.manifest})")
    preprocess.check_normalization(normalize)
    moments = None
    if normalize == "plate":
        moments = preprocess.plate_moments(ds.metadata, plate_stats or preprocess.plate_statistics(ds))
    return _TrainExample(
        ds.reader, labels=ds.metadata["label"].to_numpy(np.int32),
        is_control=ds.metadata["is_control"].to_numpy(bool),
        crop_size=crop_size, flip=flip, rot90=rot90, normalize=normalize, moments=moments)


def _mixture_iterator(sources: list[Source], *, batch_size: int, crop_size: int, seed: int, num_workers: int,
                      flip: bool, rot90: bool, process_index: int | None, process_count: int | None,
                      num_epochs: int | None, read_threads: int, normalize: str,
                      plate_stats: list | None, channel_slots: int | None) -> grain.DatasetIterator:
    if not sources:
        raise ValueError("a mixture needs at least one dataset")
    weights = [float(s.weight) for s in sources]
    if any(not w > 0 for w in weights):
        raise ValueError(f"mixture weights must be positive, got {weights}")
    process_index, process_count, local_batch = _local_batch(batch_size, process_index, process_count)
    slots = max(len(s.channel_ids) for s in sources) if channel_slots is None else channel_slots
    parts, offsets, components, total = [], [], [], 0
    for k, source in enumerate(sources):
        ds = source.dataset
        if len(source.channel_ids) != ds.crop_shape[0]:
            raise ValueError(f"{ds.path}: {ds.crop_shape[0]} channels but {len(source.channel_ids)} channel ids")
        if len(source.channel_ids) > slots:
            raise ValueError(f"{ds.path}: {len(source.channel_ids)} channels, more than the batch's {slots} slots")
        per_process = len(ds) // process_count
        if per_process < 1:
            raise ValueError(f"{ds.path}: {len(ds)} records, fewer than one per process ({process_count})")
        parts.append(_train_example(ds, crop_size, flip, rot90, normalize,
                                    plate_stats[k] if plate_stats else None))
        offsets.append(total)
        # the first dataset's shuffle is the plain pipeline's (one dataset gives its stream); the others' own
        own_seed = seed if k == 0 else int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
        ids = grain.MapDataset.range(len(ds))[process_index::process_count][:per_process]
        stream = ids.seed(own_seed).shuffle().repeat(num_epochs)
        components.append(stream.map(_Offset(total)) if total else stream)
        total += len(ds)
    # One dataset: its stream as the plain pipeline has it (any stage before random_map changes its draws).
    mixed = components[0] if len(components) == 1 else grain.MapDataset.mix(components, weights).seed(seed)
    example = _MixtureExample(parts, offsets, [s.channel_ids for s in sources], slots)
    return _batched(mixed.random_map(example), local_batch, read_threads, num_workers)


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


def _local_batch(batch_size: int, process_index: int | None, process_count: int | None) -> tuple[int, int, int]:
    """(process_index, process_count, this process's share of the global batch_size)."""
    process_index, process_count = _process_slot(process_index, process_count)
    if batch_size % process_count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by process_count {process_count}")
    return process_index, process_count, batch_size // process_count


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
