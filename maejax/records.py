"""The crop record: the one on-disk unit every dataset builder writes and the input pipeline reads.

A record is a msgpack map holding one crop as raw uint8 bytes in channel-first (C, H, W) order plus
its metadata. Channel names travel with every record so channel-agnostic models know what they see.
msgpack with raw bytes is ~40x faster to decode than np.savez (see shared notes, stack.md section 6).

Shard integrity. Builders record each shard's size in bytes and SHA-256 in the manifest (`shards`:
`file`, `num_records`, `bytes`, `sha256`; `sha256sum` gives the same digest). Two levels of checking:

- on open (`check_shard`, called by `maejax.input_pipeline.open_dataset` for every shard): the file
  exists, has the recorded size, starts with the 64-byte Riegeli file signature, and its footer
  (the record index) reads and gives the recorded count. That is a stat and two small reads per shard,
  so opening stays fast at millions of records (thousands of shards), and it catches the usual damage:
  a missing, truncated, overwritten or partly copied shard, or a damaged start or footer.
- in full (`verify_dataset`, `python -m maejax.records verify --dataset DIR`, or
  `open_dataset(DIR, verify=True)`): every shard's SHA-256 against the manifest, shards hashed in
  parallel threads; a mismatching shard is then read record by record to name the first unreadable
  record. Run it once after copying or building a dataset. Hashing every byte on every open (or
  lazily on the first read of each shard, in each reader process) was not chosen: with shuffled
  reads every shard is touched within the first steps, so it would cost a full extra pass over the
  dataset per process and per run, i.e. minutes of start-up at scale.

Damage inside a shard that neither open-time check sees (a flipped byte in record data) is caught
by Riegeli's chunk hashes when the record is read; the readers (`RecordReader` in
maejax/input_pipeline.py) re-raise it as a one-line `RecordError` naming the shard file and the
record's index in it, pointing to `verify`. Datasets written before the manifest had sizes and
checksums still open; `open_dataset` says once that their shards are unverified, and `verify`
reads every record of such shards instead (Riegeli's chunk hashes are the check then).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Mapping
from concurrent import futures
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from maejax import flags

# Metadata every record carries, with its type. Builders may add more keys (e.g. `cell_type`);
# decoders keep unknown keys as they are.
REQUIRED_FIELDS: dict[str, type] = {
    "experiment": str,    # batch: the unit batch effects are attached to
    "plate": str,
    "well": str,
    "site": int,
    "tile": int,          # index of the crop inside its site (regular tiling) or random-crop draw
    "perturbation": str,  # gene / compound name; controls use their control label
    "is_control": bool,
    "channels": list,     # channel names, in the order of the image's first axis
}


class RecordError(ValueError):
    """A record that cannot be decoded or does not satisfy the format."""


def encode(image: np.ndarray, meta: dict[str, Any]) -> bytes:
    """Serialises one crop. `image` is uint8 (C, H, W); `meta` holds REQUIRED_FIELDS (+ extras)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise RecordError(f"image must be uint8 (C, H, W), got {image.dtype} {image.shape}")
    missing = [k for k in REQUIRED_FIELDS if k not in meta]
    if missing:
        raise RecordError(f"record metadata lacks {missing}")
    if len(meta["channels"]) != image.shape[0]:
        raise RecordError(
            f"{len(meta['channels'])} channel names {list(meta['channels'])} for an image with "
            f"{image.shape[0]} channels")
    payload = {k: _plain(v) for k, v in meta.items()}
    payload["image"] = np.ascontiguousarray(image).tobytes()
    payload["shape"] = list(image.shape)
    return msgpack.packb(payload, use_bin_type=True)


def decode(data: bytes, where: str = "record") -> dict[str, Any]:
    """Inverse of `encode`: returns the metadata dict with `image` as a uint8 (C, H, W) array.

    `where` names the record in errors (e.g. "crops-00003.array_record[17]").
    """
    try:
        rec = msgpack.unpackb(data, raw=False)
        shape = tuple(rec.pop("shape"))
        image = np.frombuffer(rec.pop("image"), dtype=np.uint8)
        rec["image"] = image.reshape(shape)
    except Exception as e:  # corrupt bytes, truncated payload, wrong sizes
        raise RecordError(f"{where}: cannot decode crop record ({type(e).__name__}: {e})") from e
    return rec


def _plain(v: Any) -> Any:
    """numpy scalars/arrays -> plain Python, so msgpack can write them."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, tuple):
        return list(v)
    return v


@dataclasses.dataclass(frozen=True)
class Layout:
    """File names inside a dataset directory (one place, so builders and readers agree)."""
    manifest: str = "manifest.json"
    metadata: str = "metadata.parquet"   # one row per record: shard, index, REQUIRED_FIELDS (+ extras)
    shard_pattern: str = "crops-{index:05d}-of-{count:05d}.array_record"
    annotations: str = "annotations"     # folder of `<Source>.txt` relationship tables (entity1,entity2)


LAYOUT = Layout()


# --- shard integrity (see the module docstring) -----------------------------------------------------

# Every Riegeli file (so every ArrayRecord file) starts with this 64-byte file signature: a block
# header then the signature chunk header (riegeli/records/README: "File signature").
RIEGELI_SIGNATURE = bytes.fromhex(
    "83af70d10d884a3f0000000000000000400000000000000091bac23c9287e1a9"
    "0000000000000000e19f13c0e9b1c37273000000000000000000000000000000")
MANIFEST_KEYS = ("channels", "crop_shape", "num_records", "shards", "perturbations", "controls")
HASH_CHUNK = 8 << 20        # bytes read per hashing step
FIX = "re-copy the dataset or rebuild it"


def one_line(error: BaseException) -> str:
    """`Type: message` of an exception on one line (Riegeli's messages may hold several)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def read_manifest(dataset_dir: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """(manifest, its path) of a dataset directory; errors name the file."""
    path = Path(dataset_dir) / LAYOUT.manifest
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dataset manifest (is {Path(dataset_dir)} a dataset directory?)")
    try:
        manifest = json.loads(path.read_text())
        missing = [k for k in MANIFEST_KEYS if k not in manifest]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise ValueError(f"{path}: corrupt manifest ({e})") from e
    if missing:
        raise ValueError(f"{path}: corrupt manifest, missing keys {missing}")
    return manifest, path


def shard_digest(path: str | os.PathLike) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of one shard file, as builders record it in the manifest."""
    digest, size = hashlib.sha256(), 0
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])   # hashlib releases the GIL: shards hash in parallel threads
            size += n
    return {"bytes": size, "sha256": digest.hexdigest()}


def has_checksums(manifest: Mapping[str, Any]) -> bool:
    return all("bytes" in s and "sha256" in s for s in manifest["shards"])


def count_records(path: str | os.PathLike) -> int:
    """Record count from the shard's footer (the record index); a damaged footer is a RecordError."""
    from array_record.python.array_record_module import ArrayRecordReader
    try:
        reader = ArrayRecordReader(str(path))
        try:
            return reader.num_records()
        finally:
            reader.close()  # raises on a truncated file
    except Exception as e:
        raise RecordError(f"{path}: corrupt ArrayRecord shard ({one_line(e)}); {FIX}") from e


def check_shard(path: Path, entry: Mapping[str, Any], manifest_path: Path) -> int:
    """The cheap open-time checks of one shard (see the module docstring); returns its record count."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard listed in {manifest_path} is missing; {FIX}")
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        what = "truncated" if size < entry["bytes"] else "longer than written"
        raise RecordError(f"{path}: corrupt ArrayRecord shard: {size} bytes, {manifest_path} says "
                          f"{entry['bytes']} ({what}); {FIX}")
    with open(path, "rb") as f:
        head = f.read(len(RIEGELI_SIGNATURE))
    if head != RIEGELI_SIGNATURE:
        raise RecordError(f"{path}: corrupt ArrayRecord shard: its first {len(RIEGELI_SIGNATURE)} bytes are "
                          f"not the Riegeli file signature (damaged or not an ArrayRecord file); {FIX}")
    found = count_records(path)
    if found != entry["num_records"]:
        raise RecordError(f"{path}: holds {found} records, {manifest_path} says {entry['num_records']} "
                          f"(truncated or corrupt shard); {FIX}")
    return found


def first_unreadable_record(path: str | os.PathLike, num_records: int, block: int = 256) -> int | None:
    """Index of the first record of a shard that does not read back (Riegeli checks each chunk's hash)."""
    from array_record.python.array_record_module import ArrayRecordReader
    reader = ArrayRecordReader(str(path))
    try:
        for start in range(0, num_records, block):
            stop = min(start + block, num_records)
            try:
                reader.read(start, stop)
                continue
            except Exception:
                pass
            for i in range(start, stop):
                try:
                    reader.read([i])
                except Exception:
                    return i
        return None
    finally:
        try:
            reader.close()
        except Exception:
            pass


def verify_shard(path: Path, entry: Mapping[str, Any], manifest_path: Path) -> str | None:
    """None when the shard is intact, else a one-line problem naming it (and its first bad record)."""
    try:
        count = check_shard(path, entry, manifest_path)
    except (OSError, ValueError) as e:
        return str(e)
    if "sha256" in entry:
        found = shard_digest(path)["sha256"]
        if found == entry["sha256"]:
            return None
        bad = first_unreadable_record(path, count)
        where = (f"record {bad} is the first that does not read back" if bad is not None
                 else "every record still reads back: the damage is outside the record data")
        return (f"{path}: corrupt ArrayRecord shard: sha256 {found[:16]}... differs from {manifest_path}'s "
                f"{entry['sha256'][:16]}... ({where}); {FIX}")
    bad = first_unreadable_record(path, count)   # no checksum recorded: read every record instead
    if bad is not None:
        return f"{path}[{bad}]: unreadable record (corrupt ArrayRecord shard); {FIX}"
    return None


@dataclasses.dataclass(frozen=True)
class Verification:
    dataset: Path
    num_shards: int
    num_records: int
    num_bytes: int
    checksummed: bool        # False: an older dataset whose manifest has no sizes and checksums
    problems: list[str]      # one line per damaged shard, in shard order


def verify_dataset(dataset_dir: str | os.PathLike, threads: int | None = None) -> Verification:
    """Full check of every shard (see the module docstring). Raises only when there is no manifest."""
    manifest, manifest_path = read_manifest(dataset_dir)
    root = Path(dataset_dir)
    entries = manifest["shards"]
    threads = max(1, threads or min(8, os.cpu_count() or 1))
    with futures.ThreadPoolExecutor(threads) as pool:
        found = list(pool.map(lambda e: verify_shard(root / e["file"], e, manifest_path), entries))
    problems = [p for p in found if p is not None]
    total = sum(int(e["num_records"]) for e in entries)
    if not problems and total != manifest["num_records"]:
        problems.append(f"{manifest_path}: shards hold {total} records, num_records says {manifest['num_records']}")
    num_bytes = sum((root / e["file"]).stat().st_size for e in entries if (root / e["file"]).is_file())
    return Verification(root, len(entries), total, num_bytes, has_checksums(manifest), problems)


def main(argv: list[str] | None = None) -> int:
    parser = flags.ArgumentParser(prog="python -m maejax.records",
                                  description="Checks a dataset directory's shards (module docstring).")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="every shard's size and SHA-256 against the manifest")
    verify.add_argument("--dataset", required=True, metavar="DIR", help="dataset directory (holds manifest.json)")
    verify.add_argument("--threads", type=int, default=None, help="shards hashed at once (default: min(8, CPUs))")
    args = parser.parse_args(argv)
    try:
        result = verify_dataset(args.dataset, args.threads)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for problem in result.problems:   # one line per damaged shard
        print(f"error: {problem}", file=sys.stderr)
    if result.problems:
        return 1
    how = ("sizes and SHA-256 match the manifest" if result.checksummed else
           "no checksums in this older manifest: every record was read back instead")
    print(f"{result.dataset}: {result.num_shards} shards, {result.num_records} records, "
          f"{result.num_bytes} bytes verified ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
