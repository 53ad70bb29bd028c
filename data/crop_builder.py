"""Builds a crop dataset from a real screen: sites -> uint8 crops -> a sharded ArrayRecord directory.

    plan    the source lists its sites in storage order; shard s gets the s-th contiguous block, so
            a shard reads neighbouring files (and RxRx3-core neighbouring parquet row groups)
    probe   the first readable site fixes the site format: image size and each channel's dtype
    levels  channels that are not uint8: per-plate conversion levels (data/conversion.py)
    shards  one task per shard, across worker processes: read and check every site, convert,
            crop (data/cropping.py), write (data/arrayrecord_writer.write_shard), then the shard's
            size and SHA-256 (`_shards/<shard file>.digest.json`, for the manifest)
    finish  metadata table + manifest (arrayrecord_writer.dataset_files), the build's bookkeeping
            removed (`finish`, which the Beam pipeline runs too); rename into place

The build runs in `.<out name>.build/` next to `out`. A shard is finished once its metadata rows
(`_shards/<shard file>.parquet`) exist, written after its ArrayRecord file: a re-run with the same
options keeps finished shards and builds the rest, so a killed or failed build resumes.

Nothing is lost silently: each missing, truncated or undecodable file, wrong size, bit depth or
channel count is reported with its path. Unless `skip_bad_sites`, a shard with a bad site is not
kept and the build fails with a summary of every bad file; with it, bad sites are left out and
listed in the manifest (`skipped_sites`).

Deterministic from the seed: random crops use a generator keyed by (seed, site), conversion samples
one keyed by (seed, plate), so the shards are byte-identical for any number of workers.

Workers die with the build: each worker process asks the kernel for SIGKILL when its parent dies
(Linux `prctl(PR_SET_PDEATHSIG)`; a thread polling `os.getppid()` elsewhere), so a build whose parent
is killed (even by SIGKILL, which runs no clean-up) leaves no worker writing into the build folder,
and multiprocessing's resource tracker, which exits once no process holds its pipe, goes with them.
"""
from __future__ import annotations

import abc
import collections
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import queue
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data import conversion, workers as workers_lib
from data.arrayrecord_writer import check_writable, dataset_files, shard_file_names, write_shard
from data.conversion import ConversionRule
from data.cropping import CropSpec
from data.progress import Progress
from data.sites import Site, SiteFormat, keyed_rng, read_site
from maejax import records

SPEC_FILE = "build.json"
SHARD_DIR = "_shards"
DIGEST_SUFFIX = ".digest.json"   # _shards/<shard file>.digest.json: {"bytes", "sha256"} of a finished shard
BAD_SITES_FILE = "bad_sites.json"
PLAN_DIR = "_plan"     # the Beam launcher's plan files (data/beam_pipeline.py); a local build has none
PROBE_SITES = 20       # sites tried to find a readable one that fixes the format
SUMMARY_LINES = 40     # bad files printed in a failure summary; all go to BAD_SITES_FILE


class BuildError(ValueError):
    """A build that cannot finish: bad sites (listed) without skip_bad_sites, or an unusable source."""


class Source(abc.ABC):
    """A screen on disk: lists its sites; `describe` goes into the manifest (`sources`)."""
    kind: str                                      # e.g. "rxrx1"
    module: str                                    # the builder, recorded as the manifest's `source`
    channels: list[str]
    image_size: tuple[int, int] | None = None      # the layout's site size, when it has one

    @abc.abstractmethod
    def sites(self) -> list[Site]:
        """Every site, in storage order; keys unique."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able: kind, paths read, options that changed what was read."""


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    crop: CropSpec = CropSpec()
    conversion: ConversionRule = ConversionRule()
    seed: int = 0
    num_shards: int | None = None        # default: ceil(expected crops / records_per_shard)
    records_per_shard: int = 2048
    image_size: str | tuple[int, int] = "auto"  # "auto" (the source's, else the first readable site), "any", (h, w)
    workers: int = 1
    skip_bad_sites: bool = False
    overwrite: bool = False
    restart: bool = False                # discard an unfinished build of `out` instead of resuming it
    progress: bool = True
    name: str | None = None              # manifest name (default: the source kind)

    def validate(self) -> None:
        self.crop.validate()
        self.conversion.validate()
        if self.workers < 1 or self.records_per_shard < 1 or (self.num_shards is not None and self.num_shards < 1):
            raise ValueError("workers, records_per_shard and num_shards must be >= 1")
        if isinstance(self.image_size, str) and self.image_size not in ("auto", "any"):
            raise ValueError(f"image_size must be 'auto', 'any' or (height, width), got {self.image_size!r}")

    def spec(self) -> dict[str, Any]:
        """What decides the output (resuming needs these unchanged); workers etc. do not."""
        return {"crop": self.crop.to_json(), "conversion": dataclasses.asdict(self.conversion), "seed": self.seed,
                "image_size": list(self.image_size) if isinstance(self.image_size, tuple) else self.image_size}


@dataclasses.dataclass(frozen=True)
class BuildReport:
    path: Path
    num_sites: int
    num_records: int
    skipped_sites: list[dict[str, Any]]
    shards_built: int
    shards_reused: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs for one shard (picklable)."""
    work_dir: str
    shard: int
    num_shards: int
    sites: tuple[Site, ...]
    channels: tuple[str, ...]
    fmt: SiteFormat
    crop: CropSpec
    levels: dict[str, list[list[float] | None]]  # plate key -> per channel [low, high] (None: uint8 channel)
    seed: int
    skip_bad_sites: bool


@dataclasses.dataclass(frozen=True)
class ShardResult:
    shard: int
    kept: bool
    num_records: int
    bad_sites: list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a build will do; the local driver and the Beam pipeline share it."""
    sites: list[Site]
    fmt: SiteFormat
    num_shards: int
    shard_names: list[str]
    blocks: list[int]        # shard s holds sites[blocks[s]:blocks[s + 1]]
    converted: list[int]     # channels that go through the conversion rule
    spec: dict[str, Any]     # everything that decides the output; a resumed build must match it

    def shard_sites(self, shard: int) -> list[Site]:
        return self.sites[self.blocks[shard]:self.blocks[shard + 1]]


def plan_build(source: Source, options: BuildOptions) -> Plan:
    """Lists and checks the sites, probes the format and fixes the sharding."""
    options.validate()
    sites = source.sites()
    if not sites:
        raise BuildError(f"{_describe_source(source)}: lists no sites")
    duplicates = [k for k, n in collections.Counter(s.key for s in sites).items() if n > 1]
    if duplicates:
        raise BuildError(f"{_describe_source(source)}: site keys listed more than once: {duplicates[:10]}")
    fmt = probe_format(sites, source, options)
    per_site = options.crop.count(*(fmt.size or (options.crop.size, options.crop.size)))  # an estimate for "any"
    num_shards = options.num_shards or max(1, math.ceil(len(sites) * per_site / options.records_per_shard))
    spec = {"source": source.describe(), "kind": source.kind, "module": source.module,
            "channels": list(source.channels), "options": options.spec(), "num_shards": num_shards,
            "site_format": fmt.to_json(), "num_sites": len(sites), "sites_digest": sites_digest(sites)}
    converted = [c for c, dtype in enumerate(fmt.dtypes) if conversion.needs_conversion(dtype)]
    return Plan(sites, fmt, num_shards, shard_file_names(num_shards), shard_blocks(len(sites), num_shards),
                converted, json.loads(json.dumps(spec)))


def build_dataset(source: Source, out_dir: str | os.PathLike, options: BuildOptions = BuildOptions()) -> BuildReport:
    """Builds (or resumes) the crop dataset of `source` at `out_dir`. Raises BuildError on bad sites."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    check_writable(out_dir, options.overwrite)
    plan = plan_build(source, options)
    work_dir = out_dir.parent / f".{out_dir.name}.build"
    if options.restart and work_dir.exists():
        shutil.rmtree(work_dir)
    _open_work_dir(work_dir, plan.spec)

    with _Workers(options.workers) as workers:
        levels = _conversion_levels(work_dir, plan, options, workers)
        done = {s for s, name in enumerate(plan.shard_names) if (work_dir / SHARD_DIR / f"{name}.parquet").exists()}
        tasks = [shard_task(plan, s, plan.shard_sites(s), levels, options, str(work_dir))
                 for s in range(plan.num_shards) if s not in done]
        if done:
            _say(options, f"resuming {work_dir}: {len(done)} of {plan.num_shards} shards finished, "
                          f"{len(tasks)} to build")
        bar = Progress(sum(len(t.sites) for t in tasks), "crops", "sites", enabled=options.progress)
        results = workers.run(build_shard, tasks, bar)
        bar.close()

    num_records, skipped = finish(LocalFiles(work_dir), plan, options, results)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # check_writable allowed it: overwrite of a dataset, or an empty directory
    work_dir.rename(out_dir)
    return BuildReport(out_dir, len(plan.sites), num_records, skipped, len(tasks), len(done),
                       time.perf_counter() - start)


def shard_task(plan: Plan, shard: int, sites: Sequence[Site], levels: dict, options: BuildOptions,
               work_dir: str) -> ShardTask:
    return ShardTask(work_dir, shard, plan.num_shards, tuple(sites), tuple(plan.spec["channels"]), plan.fmt,
                     options.crop, _levels_for(levels, sites), options.seed, options.skip_bad_sites)


def shard_blocks(num_sites: int, num_shards: int) -> list[int]:
    """Boundaries of `num_shards` contiguous, balanced blocks of sites: shard s is [b[s], b[s+1])."""
    return [num_sites * s // num_shards for s in range(num_shards + 1)]


def sites_digest(sites: Sequence[Site]) -> str:
    """Fingerprint of the site list (keys, files, metadata): a resumed build must see the same sites."""
    h = hashlib.sha256()
    for site in sites:
        h.update(json.dumps([site.key, sorted(site.meta.items()), [dataclasses.astuple(r) if r else None
                                                                    for r in site.channels]],
                            default=str).encode())
    return h.hexdigest()


def probe_format(sites: Sequence[Site], source: Source, options: BuildOptions) -> SiteFormat:
    """The first readable site fixes each channel's dtype and, with image_size="auto", the size."""
    problems = []
    for site in sites[:PROBE_SITES]:
        images, site_problems = read_site(site)
        if images is None:
            problems += site_problems
            continue
        dtypes = tuple(image.dtype.name for image in images)
        if options.image_size == "any":
            size = None
        elif options.image_size == "auto":
            size = source.image_size or images[0].shape
            if tuple(size) != images[0].shape:
                raise BuildError(f"{site.channels[0].where()} is {images[0].shape[0]}x{images[0].shape[1]}, the "
                                 f"{source.kind} layout's sites are {size[0]}x{size[1]}; pass --image_size "
                                 f"{images[0].shape[0]}x{images[0].shape[1]} if that is right for all")
        else:
            size = options.image_size
        if size is not None and min(size) < options.crop.size:
            raise BuildError(f"sites are {size[0]}x{size[1]} ({site.key}), smaller than the crop size "
                             f"{options.crop.size}")
        return SiteFormat(size=tuple(int(v) for v in size) if size is not None else None, dtypes=dtypes)
    listed = "\n".join(f"  {path}: {reason}" for path, reason in problems[:SUMMARY_LINES])
    raise BuildError(f"{_describe_source(source)}: none of the first {min(len(sites), PROBE_SITES)} sites can be "
                     f"read, so the image format is unknown:\n{listed}")


def build_shard(task: ShardTask, report: Callable[..., None] = lambda n, **notes: None) -> ShardResult:
    """Reads, converts, crops and writes one shard; keeps it unless it has bad sites and skipping is off.
    Its files (`shard_files`) are written in their order, the marker last."""
    work_dir = Path(task.work_dir)
    name = shard_file_names(task.num_shards)[task.shard]
    bad_list, shard, digest, marker = (work_dir / rel for rel in shard_files(name))
    bad: list[dict[str, Any]] = []
    tmp_path = work_dir / f"{name}.tmp"
    rows, _ = write_shard(tmp_path, task.shard, _crops(task, bad, report), list(task.channels))
    _write_json(bad_list, bad)
    if bad and not task.skip_bad_sites:
        tmp_path.unlink()
        return ShardResult(task.shard, kept=False, num_records=0, bad_sites=bad)
    os.replace(tmp_path, shard)
    _write_json(digest, records.shard_digest(shard))
    pd.DataFrame(rows).to_parquet(marker.with_suffix(".tmp"), index=False)
    os.replace(marker.with_suffix(".tmp"), marker)  # the shard is finished from here on
    return ShardResult(task.shard, kept=True, num_records=len(rows), bad_sites=bad)


def shard_files(name: str, kept: bool = True) -> list[str]:
    """A shard's files in the build folder, in the order they are written: its list of bad sites, the
    ArrayRecord file, its size and SHA-256, and last its metadata rows, which mark it finished. A shard
    that is not kept (bad sites, no skipping) leaves its list of bad sites alone."""
    files = [f"{SHARD_DIR}/{name}.bad.json", name, f"{SHARD_DIR}/{name}{DIGEST_SUFFIX}", f"{SHARD_DIR}/{name}.parquet"]
    return files if kept else files[:1]


def _crops(task: ShardTask, bad: list, report) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    s = task.crop.size
    for site in task.sites:
        images, problems = read_site(site, task.fmt)
        if images is not None and min(images[0].shape) < s:
            problems = [(site.channels[0].where(), f"is {images[0].shape[0]}x{images[0].shape[1]}, smaller "
                                                   f"than the {s}x{s} crop")]
        plate_levels = task.levels.get(site.plate_key)
        if images is not None and not problems and plate_levels is None and any(
                conversion.needs_conversion(d) for d in task.fmt.dtypes):
            problems = [(site.plate_key, "no conversion levels: no site of the plate could be read for them")]
        report(1, bad=int(bool(problems)))
        if problems:
            bad.append({"site": site.key, "files": [{"path": p, "reason": r} for p, r in problems]})
            continue
        stack = np.stack([image if levels is None else conversion.to_uint8(image, *levels)
                          for image, levels in zip(images, plate_levels or [None] * len(images))])
        height, width = stack.shape[1:]
        for tile, (y, x) in enumerate(task.crop.positions(height, width, keyed_rng(task.seed, site.key))):
            yield (np.ascontiguousarray(stack[:, y:y + s, x:x + s]),
                   {**site.meta, "tile": tile, "crop_y": y, "crop_x": x})


def plate_levels(sites: Sequence[Site], fmt: SiteFormat, converted: Sequence[int], rule: ConversionRule,
                 seed: int) -> list[list[float] | None] | None:
    """Per-channel [low, high] of one plate (None for uint8 channels); None if no site can be read."""
    if rule.kind == "fixed":
        found = [[rule.low, rule.high]] * len(converted)
    else:
        def read(i: int):
            images, _ = read_site(sites[i], fmt)
            return images
        found = conversion.percentile_levels(len(sites), read, converted, rule,
                                             keyed_rng(seed, sites[0].plate_key, stream=1))
        if found is None:
            return None
    per_channel: list[list[float] | None] = [None] * len(fmt.dtypes)
    for c, levels in zip(converted, found):
        per_channel[c] = [float(levels[0]), float(levels[1])]
    return per_channel


def _conversion_levels(work_dir: Path, plan: Plan, options: BuildOptions, workers) -> dict:
    """Per-plate levels, computed once per build (then read back: a resumed build must reuse them)."""
    path = work_dir / conversion.LEVELS_FILE
    if not plan.converted:
        return {}
    if path.exists():
        return json.loads(path.read_text())["plates"]
    tasks = plate_tasks(plan, options)
    bar = Progress(len(tasks), "levels", "plates", enabled=options.progress and options.conversion.kind != "fixed")
    found = workers.run(_plate_levels_task, tasks, bar)
    bar.close()
    levels = {task[0][0].plate_key: value for task, value in zip(tasks, found) if value is not None}
    path.write_bytes(levels_file(plan, options, levels))
    return levels


def plate_tasks(plan: Plan, options: BuildOptions) -> list[tuple]:
    """One `plate_levels` argument tuple per plate, in first-seen order."""
    by_plate: dict[str, list[Site]] = {}
    for site in plan.sites:
        by_plate.setdefault(site.plate_key, []).append(site)
    return [(sites, plan.fmt, plan.converted, options.conversion, options.seed) for sites in by_plate.values()]


def levels_file(plan: Plan, options: BuildOptions, levels: dict) -> bytes:
    channels = plan.spec["channels"]
    return (json.dumps({"rule": options.conversion.to_json(), "channels": channels,
                        "converted_channels": [channels[c] for c in plan.converted],
                        "plates": dict(sorted(levels.items()))},
                       indent=1) + "\n").encode()


def _plate_levels_task(task, report=lambda n, **notes: None):
    value = plate_levels(*task)
    report(1)
    return value


def _levels_for(levels: dict, sites: Sequence[Site]) -> dict:
    return {key: levels[key] for key in {s.plate_key for s in sites} if key in levels}


class LocalFiles:
    """A build folder on the local disk, read and written by `finish` (data/beam_pipeline.py's Store has the
    same methods on any Beam filesystem); paths are relative to the folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, rel: str) -> str:
        return str(self.root / rel)

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def write(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def digest(self, rel: str) -> dict[str, Any]:
        return records.shard_digest(self.root / rel)

    def delete(self, *rels: str) -> None:
        for rel in rels:
            path = self.root / rel
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def finish(files, plan: Plan, options: BuildOptions, results: Sequence[ShardResult]) -> tuple[int, list[dict]]:
    """The last step of a build, local or Beam, once every shard has run (`results`, one per shard; `files`:
    LocalFiles or beam_pipeline.Store over the build folder). A shard that was not kept stops the build:
    every bad site goes to BAD_SITES_FILE and BuildError says what to do. Otherwise the metadata table,
    conversion.json and the manifest (last) are written from the shards' metadata rows, bad-site lists and
    digests, and the build's bookkeeping is removed. Returns (records written, skipped sites)."""
    failed = [r for r in results if not r.kept]
    if failed:
        bad = sorted((b for r in failed for b in r.bad_sites), key=lambda b: b["site"])
        files.write(BAD_SITES_FILE, _json_bytes(bad))
        raise BuildError(failure_summary(bad, files.path(BAD_SITES_FILE), len(failed), plan.num_shards))
    shards = [shard_files(name) for name in plan.shard_names]
    tables = [pd.read_parquet(io.BytesIO(files.read(marker))) for *_, marker in shards]
    skipped = [b for bad_list, *_ in shards for b in json.loads(files.read(bad_list))]
    # an older build being resumed did not record its finished shards' digests: hash them now
    digests = {shard: json.loads(files.read(digest)) if files.exists(digest) else files.digest(shard)
               for _, shard, digest, _ in shards}
    levels = files.read(conversion.LEVELS_FILE) if plan.converted else None
    for rel, content in finished_files(plan, options, tables, skipped, levels, str(files.root), digests).items():
        files.write(rel, content)  # manifest last
    files.delete(SHARD_DIR, PLAN_DIR, SPEC_FILE, BAD_SITES_FILE)
    return int(sum(len(t) for t in tables)), skipped


def finished_files(plan: Plan, options: BuildOptions, tables: list[pd.DataFrame], skipped: list[dict],
                   levels: bytes | None, where: str, digests: dict[str, dict] | None = None) -> dict[str, bytes]:
    """Metadata table, manifest and conversion.json from the shards' metadata rows, bad-site lists and
    sizes and checksums ({shard file: {"bytes", "sha256"}})."""
    filled = [t for t in tables if len(t)]
    if not filled:
        raise BuildError(f"{where}: every site was skipped; no crops to write")
    spec, fmt, channels = plan.spec, plan.fmt, plan.spec["channels"]
    manifest_extra = {
        "sources": [spec["source"]],
        "crops": {**options.crop.to_json(), "tile_order": "row-major", "crops_per_site":
                  options.crop.random_per_site if options.crop.mode == "random"
                  else options.crop.count(*fmt.size) if fmt.size else None},
        "conversion": {**options.conversion.to_json(), "converted_channels": [channels[c] for c in plan.converted],
                       "levels_file": conversion.LEVELS_FILE if plan.converted else None},
        "site_format": fmt.to_json(),
        "num_sites": spec["num_sites"],
        "num_sites_skipped": len(skipped),
        "skipped_sites": sorted(skipped, key=lambda b: b["site"]),
        "shard_assignment": "contiguous blocks of sites in source order",
    }
    params = {"seed": options.seed, "num_shards": plan.num_shards, "records_per_shard": options.records_per_shard,
              "image_size": spec["options"]["image_size"], "skip_bad_sites": options.skip_bad_sites}
    return dataset_files(pd.concat(filled, ignore_index=True), plan.shard_names,
                         (len(channels), options.crop.size, options.crop.size), name=options.name or spec["kind"],
                         source=spec["module"], channels=channels, params=params, manifest_extra=manifest_extra,
                         extra_files={conversion.LEVELS_FILE: levels} if levels is not None else None,
                         shard_digests=digests)


def check_same_build(previous: dict, spec: dict, where: str) -> None:
    """A build directory may only be resumed with the settings it was started with."""
    if previous != spec:
        changed = sorted(k for k in set(spec) | set(previous) if previous.get(k) != spec.get(k))
        raise BuildError(f"{where} holds an unfinished build with other settings (differs in {changed}); "
                         f"re-run with the same options to resume it, or with --restart to start over")


def _open_work_dir(work_dir: Path, spec: dict) -> None:
    spec_path = work_dir / SPEC_FILE
    if spec_path.exists():
        check_same_build(json.loads(spec_path.read_text()), spec, str(work_dir))
        for stale in work_dir.glob("*.tmp"):  # a shard a killed run was writing
            stale.unlink()
        return
    if work_dir.exists():
        raise BuildError(f"{work_dir} exists but holds no {SPEC_FILE}; delete it to start a build")
    (work_dir / SHARD_DIR).mkdir(parents=True)
    _write_json(spec_path, spec)


def failure_summary(bad: list[dict], listing: Path | str, failed_shards: int, num_shards: int) -> str:
    files = [(b["site"], f["path"], f["reason"]) for b in bad for f in b["files"]]
    lines = [f"{len(bad)} bad sites ({len(files)} bad files):"]
    lines += [f"  {site}: {path}: {reason}" for site, path, reason in files[:SUMMARY_LINES]]
    if len(files) > SUMMARY_LINES:
        lines.append(f"  ... and {len(files) - SUMMARY_LINES} more")
    lines.append(f"All are listed in {listing}. The {failed_shards} shards holding them were not "
                 f"kept; the other {num_shards - failed_shards} are finished and will not be rebuilt.")
    lines.append("Fix the files and re-run the same command, or re-run it with --skip_bad_sites to leave these "
                 "sites out (they are then listed in the manifest's skipped_sites).")
    return "\n".join(lines)


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=1) + "\n").encode()


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(_json_bytes(value))
    os.replace(tmp, path)


def _describe_source(source: Source) -> str:
    info = source.describe()
    return f"{source.kind} source {info.get('source_dir') or info.get('csv') or ''}".rstrip()


def _say(options: BuildOptions, message: str) -> None:
    if options.progress:
        print(message, flush=True)


class _Workers:
    """Runs tasks in-process (workers=1) or in spawned processes, reporting progress from either.

    Spawned, not forked: callers may have started jax or threads, which do not survive a fork.
    Workers send (units done, notes) over a queue; the parent drains it into the progress bar.
    Every worker dies with the process that started it (data.workers).
    """

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = self.queue = None

    def __enter__(self):
        if self.workers > 1:
            self.queue = multiprocessing.get_context("spawn").Queue()
            self.pool = workers_lib.spawn_pool(self.workers, _init_worker, (self.queue,))
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        return False

    def run(self, fn, tasks: list, bar: Progress) -> list:
        if self.pool is None:
            return [fn(task, bar.update) for task in tasks]
        pending = {self.pool.submit(_in_worker, fn, task): k for k, task in enumerate(tasks)}
        results: list = [None] * len(tasks)
        while pending:
            done, _ = futures.wait(pending, timeout=0.2, return_when=futures.FIRST_COMPLETED)
            self._drain(bar)
            for future in done:
                results[pending.pop(future)] = future.result()  # a worker's exception stops the build here
        self._drain(bar)
        return results

    def _drain(self, bar: Progress) -> None:
        while True:
            try:
                n, notes = self.queue.get_nowait()
            except queue.Empty:
                return
            bar.update(n, **notes)


_WORKER_QUEUE = None


def _init_worker(q) -> None:
    global _WORKER_QUEUE
    _WORKER_QUEUE = q


def _in_worker(fn, task):
    return fn(task, lambda n, **notes: _WORKER_QUEUE.put((n, notes)))
