"""Writes a dataset directory of crop records: the one output format of every dataset builder.

A builder (synthetic screen, RxRx1, JUMP, ...) hands `write_dataset` an iterator of
(uint8 image (C, H, W), metadata dict) and gets a directory laid out as `maejax.records.LAYOUT`:

    crops-00000-of-00008.array_record ...  ArrayRecord shards (group_size:1: random access is one read)
    metadata.parquet                        one row per record, in record_id order
    manifest.json                           what a reader needs: channels, shape, shards (with each
                                            file's size and SHA-256), labels, counts
    annotations/<Source>.txt                ground-truth gene pairs, EFAAR's `entity1,entity2` CSV

Records are dealt round-robin over the shards (record k of the iterator goes to shard k % num_shards),
so shards are balanced and a builder can stream without knowing the total count. `record_id` is the
position in the concatenation of the shards in order, i.e. the index into an ArrayRecordDataSource
opened over the shard list; it is assigned when the directory is finalised.

The directory is assembled under a temporary name and renamed at the end, so a reader never sees a
half-written dataset.

Builders that write shards in parallel or resume (data/crop_builder.py, data/beam_pipeline.py) use the
two halves separately: `write_shard` fills one shard file and returns its metadata rows, and
`dataset_files` turns the rows of all shards into the metadata table, manifest and side files.
"""
from __future__ import annotations

import importlib.metadata
import io
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from array_record.python.array_record_module import ArrayRecordWriter

from maejax import records
from maejax.records import LAYOUT

FORMAT_VERSION = 1
WRITER_OPTIONS = "group_size:1"
_SCALAR_TYPES = (str, int, float, bool, np.generic)
_RESERVED_COLUMNS = ("record_id", "shard", "index", "label")


def shard_file_names(num_shards: int) -> list[str]:
    return [LAYOUT.shard_pattern.format(index=i, count=num_shards) for i in range(num_shards)]


def write_dataset(
    out_dir: str | os.PathLike,
    examples: Iterable[tuple[np.ndarray, Mapping[str, Any]]],
    *,
    name: str,
    source: str,
    channels: list[str],
    num_shards: int = 8,
    annotations: Mapping[str, Iterable[tuple[str, str]]] | None = None,
    params: Mapping[str, Any] | None = None,
    manifest_extra: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes `examples` as a dataset directory at `out_dir` and returns its path.

    examples: (image uint8 (C, H, W), meta) pairs; meta holds `records.REQUIRED_FIELDS` (`channels`
      may be left out: it is filled from `channels`) plus optional scalar extras, which become
      metadata columns. All images must share one shape.
    name, source: recorded in the manifest (e.g. "synthetic-demo", "data.synthetic_screen").
    annotations: {source name: (gene, gene) pairs}, written as `annotations/<source name>.txt`.
    params: the builder's generation parameters (seed included), recorded in the manifest.
    manifest_extra: more manifest keys a reader needs (e.g. the site tiling).
    extra_files: {relative path: content} side files written into the directory.
    overwrite: replace an existing dataset at `out_dir`.
    """
    out_dir = Path(out_dir)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    check_writable(out_dir, overwrite)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    try:
        shard_names = shard_file_names(num_shards)
        rows, shape = _write_shards([tmp_dir / f for f in shard_names], range(num_shards), examples,
                                    list(channels))
        if not rows:
            raise ValueError("no examples to write")
        digests = {f: records.shard_digest(tmp_dir / f) for f in shard_names}
        files = dataset_files(rows, shard_names, shape, name=name, source=source, channels=channels,
                              annotations=annotations, params=params, manifest_extra=manifest_extra,
                              extra_files=extra_files, shard_digests=digests)
        for rel_path, content in files.items():  # manifest last
            path = tmp_dir / rel_path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp_dir.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def write_shard(path: str | os.PathLike, shard: int, examples: Iterable[tuple[np.ndarray, Mapping[str, Any]]],
                channels: list[str]) -> tuple[list[dict[str, Any]], tuple[int, ...] | None]:
    """Writes every example into the one ArrayRecord file `path`, which is shard number `shard`.

    Checks examples as `write_dataset` does. Returns the metadata rows (`shard`, `index` and the scalar
    metadata) and the image shape (None for an empty shard), for `dataset_files`.
    """
    return _write_shards([Path(path)], [shard], examples, list(channels))


def dataset_files(
    rows: list[dict[str, Any]] | pd.DataFrame,
    shard_names: list[str],
    crop_shape: tuple[int, ...],
    *,
    name: str,
    source: str,
    channels: list[str],
    annotations: Mapping[str, Iterable[tuple[str, str]]] | None = None,
    params: Mapping[str, Any] | None = None,
    manifest_extra: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
    shard_digests: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, bytes]:
    """Everything of a dataset directory but the shards, as {relative path: bytes}, manifest last.

    rows: the metadata rows of all shards (`shard`, `index`, REQUIRED_FIELDS but `channels`, extras),
      in any order; record_id and label are assigned here.
    shard_digests: {shard file: maejax.records.shard_digest(file)} for every shard: its `bytes` and
      `sha256` go into the manifest, which readers check (maejax/records.py). Required by every builder;
      None writes a manifest without them, as older datasets have (readers then call them unverified).
    """
    metadata = _metadata_table(rows)
    perturbations, controls = _label_vocabulary(metadata)
    metadata["label"] = np.searchsorted(perturbations, metadata["perturbation"]).astype(np.int32)
    buffer = io.BytesIO()
    metadata.to_parquet(buffer, index=False)
    files = {LAYOUT.metadata: buffer.getvalue()}
    annotation_files = _annotation_files(annotations or {})
    files.update(annotation_files)
    for rel_path, content in (extra_files or {}).items():
        files[rel_path] = content if isinstance(content, bytes) else content.encode()
    shard_sizes = np.bincount(metadata["shard"], minlength=len(shard_names))
    if len(shard_sizes) != len(shard_names):
        raise ValueError(f"metadata rows name shard {len(shard_sizes) - 1}; there are {len(shard_names)} shards")
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "source": source,
        "created_by": _version_info(),
        "channels": list(channels),
        "crop_shape": list(crop_shape),
        "num_records": len(metadata),
        "shards": [_shard_entry(f, int(n), shard_digests) for f, n in zip(shard_names, shard_sizes)],
        "perturbations": perturbations,
        "controls": controls,
        "experiments": _experiment_counts(metadata),
        "annotations": list(annotation_files),
        "params": dict(params or {}),
        **dict(manifest_extra or {}),
    }
    files[LAYOUT.manifest] = (json.dumps(manifest, indent=1) + "\n").encode()
    return files


def _shard_entry(name: str, num_records: int, digests: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"file": name, "num_records": num_records}
    if digests is not None:
        if name not in digests:
            raise ValueError(f"no size and checksum for shard {name} (shard_digests names {sorted(digests)[:4]})")
        entry.update(bytes=int(digests[name]["bytes"]), sha256=str(digests[name]["sha256"]))
    return entry


def check_writable(out_dir: Path, overwrite: bool) -> None:
    """Refuses a non-empty `out_dir` unless `overwrite` and it holds a dataset (never wipe other files)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) to replace it")
    if not (out_dir / LAYOUT.manifest).exists():
        # Only ever replace a dataset: a typo in --out must not wipe someone's directory.
        raise ValueError(f"{out_dir} is not empty and holds no {LAYOUT.manifest}; refusing to replace it")


def _write_shards(paths: list[Path], shard_ids, examples, channels: list[str]):
    """Deals `examples` round-robin over one writer per path; rows name the shard by `shard_ids`."""
    shard_ids = list(shard_ids)
    writers = [ArrayRecordWriter(str(p), WRITER_OPTIONS) for p in paths]
    counts = [0] * len(writers)
    rows, shape = [], None
    try:
        for k, (image, meta) in enumerate(examples):
            where = f"example {k} ({_describe(meta)})"
            image = np.asarray(image)
            if shape is None:
                shape = image.shape
            if image.shape != shape:
                raise ValueError(f"{where}: image shape {image.shape} differs from the first image's {shape}")
            meta = dict(meta)
            if list(meta.setdefault("channels", channels)) != channels:
                raise ValueError(f"{where}: channels {list(meta['channels'])} differ from {channels}")
            row = {key: value for key, value in meta.items() if key != "channels"}
            for key, value in row.items():
                if not isinstance(value, _SCALAR_TYPES):
                    raise ValueError(f"{where}: metadata {key!r}={value!r} is not a scalar")
                if key in _RESERVED_COLUMNS:
                    raise ValueError(f"{where}: metadata key {key!r} is reserved for the writer")
            try:
                data = records.encode(image, meta)
            except records.RecordError as e:
                raise records.RecordError(f"{where}: {e}") from e
            slot = k % len(writers)
            writers[slot].write(data)
            rows.append({"shard": shard_ids[slot], "index": counts[slot], **row})
            counts[slot] += 1
    finally:
        for w in writers:
            w.close()
    return rows, shape


def _metadata_table(rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    meta = pd.DataFrame(rows)
    meta = meta.sort_values(["shard", "index"], kind="stable").reset_index(drop=True)
    meta.insert(0, "record_id", np.arange(len(meta), dtype=np.int64))
    for key in ("shard", "index", "site", "tile"):
        meta[key] = meta[key].astype(np.int64)
    meta["is_control"] = meta["is_control"].astype(bool)
    return meta


def _label_vocabulary(metadata: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Sorted perturbation list (labels index into it) and the control labels, checked consistent."""
    flags = metadata.groupby("perturbation")["is_control"].agg(["min", "max"])
    mixed = flags.index[flags["min"] != flags["max"]].tolist()
    if mixed:
        raise ValueError(f"perturbations {mixed} are marked is_control on some records and not on others")
    perturbations = sorted(flags.index.tolist())
    controls = sorted(flags.index[flags["max"]].tolist())
    return perturbations, controls


def _experiment_counts(metadata: pd.DataFrame) -> dict[str, dict[str, int]]:
    counts = {}
    for experiment, group in metadata.groupby("experiment", sort=True):
        counts[str(experiment)] = {
            "records": len(group),
            "plates": group["plate"].nunique(),
            "wells": len(group.groupby(["plate", "well"])),
            "control_records": int(group["is_control"].sum()),
        }
    return counts


def _annotation_files(annotations: Mapping[str, Iterable[tuple[str, str]]]) -> dict[str, bytes]:
    files = {}
    for source_name, pairs in sorted(annotations.items()):
        table = pd.DataFrame(list(pairs), columns=["entity1", "entity2"])
        files[f"{LAYOUT.annotations}/{source_name}.txt"] = table.to_csv(index=False).encode()
    return files


def _version_info() -> dict[str, str | None]:
    info: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("numpy", "array-record", "msgpack", "pandas", "pyarrow", "pillow"):
        info[package] = importlib.metadata.version(package)
    info["maejax_commit"] = _git_commit()
    return info


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _describe(meta: Mapping[str, Any]) -> str:
    keys = ("experiment", "plate", "well", "site", "tile")
    return " ".join(f"{k}={meta[k]}" for k in keys if k in meta)
