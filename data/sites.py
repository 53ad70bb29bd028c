"""Sites of a real screen and how their channel images are read, checked and decoded.

A site (one field of view) is one 2-D image per channel. Sources (data/sources/*) list sites; the crop
builder reads them here. Every way a file can be bad (missing, truncated or undecodable, colour instead
of single-channel, wrong size or bit depth, an illumination function that does not fit) becomes a
`FileProblem` naming the file, so the builder can report it instead of losing the site silently.

Images are decoded with Pillow: 8-bit and 16-bit PNG and TIFF, and JPEG-2000 (Pillow's OpenJPEG
plugin; `PIL.features.check("jpg_2000")`). RxRx3-core keeps its JPEG-2000 files inside parquet shards:
those channels are `ChannelRef(path=<shard>, row=<row>)` and are read a row group at a time.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Pillow modes of single-channel images and the dtype they decode to.
_MODES = {"L": np.uint8, "I;16": np.uint16, "I;16L": np.uint16, "I;16B": np.uint16, "I;16N": np.uint16,
          "I": np.int32, "F": np.float32}


@dataclasses.dataclass(frozen=True)
class ChannelRef:
    """Where one channel image of a site lives."""
    path: str                   # image file, or parquet shard when `row` is set
    row: int | None = None      # row of the image inside the parquet shard
    column: str = "jp2"         # parquet column holding the encoded image (bytes, or HF {bytes, path})
    illum: str | None = None    # illumination-correction function (.npy, same size) to divide by

    def where(self) -> str:
        return self.path if self.row is None else f"{self.path}[row {self.row}]"


@dataclasses.dataclass(frozen=True)
class Site:
    """One field of view: metadata plus one reference per channel, in the dataset's channel order.

    meta holds `records.REQUIRED_FIELDS` except `tile` and `channels`, plus scalar extras.
    A channel the source does not list is None, and `problems` says why (with the place it looked).
    """
    key: str
    meta: Mapping[str, Any]
    channels: tuple[ChannelRef | None, ...]
    problems: tuple[tuple[str, str], ...] = ()  # (path, reason) found while listing the source

    @property
    def plate_key(self) -> str:
        """The unit 16-bit conversion statistics are computed per (plate names repeat across experiments)."""
        return f"{self.meta['experiment']}/{self.meta['plate']}"


class FileProblem(Exception):
    """A file that cannot give a good channel image."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclasses.dataclass(frozen=True)
class SiteFormat:
    """What every site must look like: image size (None: any, as long as a site's channels agree) and
    each channel's decoded dtype (e.g. uint8 for 8-bit PNG, uint16 for 16-bit TIFF)."""
    size: tuple[int, int] | None
    dtypes: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"size": list(self.size) if self.size else None, "dtypes": list(self.dtypes)}


def read_channel(ref: ChannelRef) -> np.ndarray:
    """The decoded 2-D image (illumination-corrected, float32, when `ref.illum` is set)."""
    data = _parquet_cell(ref) if ref.row is not None else None
    image = decode_image(data if data is not None else ref.path, ref.where())
    if ref.illum is None:
        return image
    illum = _illumination(ref.illum)
    if illum.shape != image.shape:
        raise FileProblem(ref.illum, f"illumination function is {illum.shape[0]}x{illum.shape[1]}, "
                                     f"the image {ref.where()} is {image.shape[0]}x{image.shape[1]}")
    return image.astype(np.float32) / illum


def decode_image(source: str | bytes, where: str) -> np.ndarray:
    """Decodes one single-channel image file (path or bytes) to a 2-D array; FileProblem names `where`."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()  # decodes now: truncation shows up here
            mode, bands = image.mode, image.getbands()
            array = np.asarray(image)
    except FileNotFoundError:
        raise FileProblem(where, "missing file") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for damaged files
        raise FileProblem(where, f"undecodable ({type(e).__name__}: {e})") from None
    if len(bands) != 1 or mode not in _MODES:
        raise FileProblem(where, f"has {len(bands)} channels (Pillow mode {mode}); expected one grey channel")
    if mode == "I":  # 16-bit files some Pillow versions decode as 32-bit
        if array.min(initial=0) < 0 or array.max(initial=0) > 65535:
            raise FileProblem(where, "32-bit integer image with values outside 0..65535")
        array = array.astype(np.uint16)
    return array


def read_site(site: Site, fmt: SiteFormat | None = None) -> tuple[list[np.ndarray] | None, list[tuple[str, str]]]:
    """Reads every channel of `site`. Returns (images, []) or (None, [(path, reason), ...]).

    With `fmt`, each channel must have its size and dtype; without, the channels must agree in size.
    All channels are read even after a problem, so one pass reports every bad file of the site.
    """
    problems = list(site.problems)
    images = []
    for c, ref in enumerate(site.channels):
        if ref is None:
            continue  # the source listed why, in site.problems
        try:
            image = read_channel(ref)
        except FileProblem as e:
            problems.append((e.path, e.reason))
            continue
        if image.ndim != 2:
            problems.append((ref.where(), f"decodes to shape {image.shape}; expected a 2-D image"))
            continue
        if fmt is not None and fmt.dtypes[c] != image.dtype.name:
            problems.append((ref.where(), f"is {image.dtype.name}, the dataset's channel {c} is {fmt.dtypes[c]}"))
            continue
        expected = fmt.size if fmt is not None and fmt.size else (images[0].shape if images else None)
        if expected is not None and image.shape != tuple(expected):
            problems.append((ref.where(), f"is {image.shape[0]}x{image.shape[1]}, expected "
                                          f"{expected[0]}x{expected[1]}"))
            continue
        images.append(image)
    return (None if problems else images), problems


@functools.lru_cache(maxsize=16)
def _illumination(path: str) -> np.ndarray:
    """Illumination functions are per plate and channel: cache the few a worker is using."""
    try:
        illum = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileProblem(path, "missing illumination function") from None
    except Exception as e:
        raise FileProblem(path, f"unreadable illumination function ({type(e).__name__}: {e})") from None
    if illum.ndim != 2 or not np.issubdtype(illum.dtype, np.number):
        raise FileProblem(path, f"illumination function has shape {illum.shape} and dtype {illum.dtype}; "
                                f"expected a 2-D numeric array")
    illum = illum.astype(np.float32)
    if not np.all(np.isfinite(illum)) or illum.min() <= 0:
        raise FileProblem(path, "illumination function has values <= 0 or non-finite ones; cannot divide by it")
    return illum


def _parquet_cell(ref: ChannelRef) -> bytes:
    """The encoded image in `ref.column` at `ref.row` of a parquet shard."""
    try:
        offsets = _row_group_offsets(ref.path)
    except FileNotFoundError:
        raise FileProblem(ref.path, "missing parquet shard") from None
    except Exception as e:
        raise FileProblem(ref.path, f"unreadable parquet shard ({type(e).__name__}: {e})") from None
    group = int(np.searchsorted(offsets, ref.row, side="right")) - 1
    try:
        column = _row_group_column(ref.path, group, ref.column)
    except Exception as e:
        raise FileProblem(ref.where(), f"unreadable row group {group} ({type(e).__name__}: {e})") from None
    cell = column[ref.row - offsets[group]]
    if isinstance(cell, dict):  # Hugging Face `datasets` Image feature: {"bytes": ..., "path": ...}
        cell = cell.get("bytes")
    if not isinstance(cell, bytes) or not cell:
        raise FileProblem(ref.where(), f"column {ref.column!r} holds no image bytes")
    return cell


@functools.lru_cache(maxsize=64)
def _row_group_offsets(path: str) -> np.ndarray:
    import pyarrow.parquet as pq  # only RxRx3-core needs it
    meta = pq.ParquetFile(path).metadata
    return np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])


@functools.lru_cache(maxsize=2)
def _row_group_column(path: str, group: int, column: str) -> list:
    """Sites of a shard are read in storage order, so the last row group or two serve most reads."""
    import pyarrow.parquet as pq
    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0).to_pylist()


def keyed_rng(seed: int, key: str, stream: int = 0) -> np.random.Generator:
    """A generator for one site or plate: its draws do not depend on which worker or shard handles it."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest, stream])


def relative_to(base: Path, path: str) -> str:
    """`path` as written in a table, resolved against the table's folder unless absolute."""
    p = Path(path)
    return str(p if p.is_absolute() else base / p)
