"""The crop builder as an Apache Beam pipeline, for screens of tens of millions of images.

    python -m data.beam_pipeline rxrx1 --source_dir /data/rxrx1 --out /data/crops/rxrx1 \\
        --runner DirectRunner --direct_num_workers 2 --direct_running_mode multi_processing

The first argument names the source (rxrx1, rxrx3_core, jump_cp, generic); the source's and the
builder's options are those of `python -m data.sources.<source>` (--workers and --quiet aside: the
runner decides parallelism); every other argument goes to Beam (`--runner DataflowRunner --project ...
--region ... --temp_location gs://...`, `--runner SparkRunner` / `FlinkRunner`, see docs/real_data.md).

It runs the same code as the local driver (data/crop_builder.py), so the output is byte-identical:

    launcher   lists the sites, probes the format, writes the plan (one pickle per shard and per
               plate, under <out>/_plan/) and build.json, so workers never get the site list inline
    levels     one element per plate -> `plate_levels` -> conversion.json (16-bit sources only)
    shards     one element per unfinished shard -> `build_shard` in a local temporary folder ->
               copied to <out> in the order of `crop_builder.shard_files` (its list of bad sites, the
               ArrayRecord file, its size and SHA-256, then `_shards/<shard>.parquet`, the marker)
    finish     metadata table and manifest (written last, with every shard's size and SHA-256), plan
               and markers removed: the local driver's `crop_builder.finish`, on this Store

`--out` may be any Beam filesystem path (local, gs://, s3://, hdfs://); source tables are read by the
launcher and images by the workers, so both need the source on a shared mount (or image paths that
are URLs Beam can open, see data/sites.py). Resuming works as locally: re-run the same command and
finished shards are skipped. apache-beam is optional: `pip install apache-beam` (see docs for the pin).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from data import conversion, crop_builder
from data.crop_builder import PLAN_DIR, SHARD_DIR, SPEC_FILE, BuildError, BuildOptions, Plan, Source
from data.sources import cli
from maejax.records import LAYOUT

SOURCES = ("rxrx1", "rxrx3_core", "jump_cp", "generic")
_RAW = CompressionTypes.UNCOMPRESSED  # never guess compression from a file name (.gz tables, ...)


class Store:
    """Files under one root on any Beam filesystem (the methods of crop_builder.LocalFiles, and `put`)."""

    def __init__(self, root: str):
        self.root = str(root).rstrip("/")

    def path(self, rel: str) -> str:
        return FileSystems.join(self.root, *rel.split("/"))

    def exists(self, rel: str) -> bool:
        return FileSystems.exists(self.path(rel))

    def read(self, rel: str) -> bytes:
        with FileSystems.open(self.path(rel), compression_type=_RAW) as f:
            return f.read()

    def write(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        if "://" not in path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with FileSystems.create(path, compression_type=_RAW) as f:
            f.write(data)

    def put(self, local: Path, rel: str) -> None:
        path = self.path(rel)
        if "://" not in path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(local, "rb") as src, FileSystems.create(path, compression_type=_RAW) as dst:
            while chunk := src.read(64 << 20):
                dst.write(chunk)

    def digest(self, rel: str) -> dict[str, Any]:
        """maejax.records.shard_digest of a stored file, streamed."""
        digest, size = hashlib.sha256(), 0
        with FileSystems.open(self.path(rel), compression_type=_RAW) as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
                size += len(chunk)
        return {"bytes": size, "sha256": digest.hexdigest()}

    def delete(self, *rels: str) -> None:
        present = [self.path(r) for r in rels if self.exists(r)]
        if present:
            FileSystems.delete(present)


def prepare(source: Source, out: str, options: BuildOptions) -> Plan:
    """The launcher's part: plan, refuse to clobber, check or start build.json, write the plan files."""
    store = Store(out)
    if store.exists(LAYOUT.manifest):
        if not options.overwrite:
            raise BuildError(f"{out} holds a dataset; pass --overwrite to replace it")
        store.delete(LAYOUT.manifest)  # no longer a dataset, even if the rest fails to go
        FileSystems.delete([store.root + "/" if "://" in store.root else store.root])
    elif "://" not in out and Path(out).is_dir() and any(Path(out).iterdir()) and not store.exists(SPEC_FILE):
        raise BuildError(f"{out} is not empty and holds neither a dataset nor a build; refusing to write into it")
    plan = crop_builder.plan_build(source, options)
    if options.restart:
        store.delete(SPEC_FILE, SHARD_DIR, PLAN_DIR, conversion.LEVELS_FILE)
    if store.exists(SPEC_FILE):
        crop_builder.check_same_build(json.loads(store.read(SPEC_FILE)), plan.spec, out)
    else:
        store.write(SPEC_FILE, (json.dumps(plan.spec, indent=1) + "\n").encode())
    for s in range(plan.num_shards):
        store.write(f"{PLAN_DIR}/shard-{s:05d}.pkl", pickle.dumps(plan.shard_sites(s)))
    if plan.converted:
        for k, task in enumerate(crop_builder.plate_tasks(plan, options)):
            store.write(f"{PLAN_DIR}/plate-{k:05d}.pkl", pickle.dumps(task))
    return plan


def _light(plan: Plan) -> Plan:
    """The plan without its site list (workers read their sites from the plan files)."""
    return dataclasses.replace(plan, sites=[], blocks=[])


class _PlateLevels(beam.DoFn):
    def __init__(self, out: str):
        self.out = out

    def process(self, k: int):
        sites, *rest = pickle.loads(Store(self.out).read(f"{PLAN_DIR}/plate-{k:05d}.pkl"))
        value = crop_builder.plate_levels(sites, *rest)
        if value is not None:
            yield sites[0].plate_key, value


class _BuildShard(beam.DoFn):
    def __init__(self, out: str, plan: Plan, options: BuildOptions):
        self.out, self.plan, self.options = out, plan, options

    def process(self, shard: int, levels: dict):
        store = Store(self.out)
        name = self.plan.shard_names[shard]
        sites = pickle.loads(store.read(f"{PLAN_DIR}/shard-{shard:05d}.pkl"))
        with tempfile.TemporaryDirectory() as tmp:
            task = crop_builder.shard_task(self.plan, shard, sites, levels, self.options, tmp)
            result = crop_builder.build_shard(task)
            for rel in crop_builder.shard_files(name, result.kept):   # in order: the marker last
                store.put(Path(tmp) / rel, rel)
        yield result


def _write_levels(levels: dict, out: str, plan: Plan, options: BuildOptions) -> dict:
    Store(out).write(conversion.LEVELS_FILE, crop_builder.levels_file(plan, options, levels))
    return levels


def build_pipeline(pipeline: beam.Pipeline, source: Source, out: str, options: BuildOptions):
    """Adds the build to `pipeline`; returns the PCollection holding the number of records written."""
    plan = prepare(source, out, options)
    store = Store(out)
    light = _light(plan)
    if not plan.converted:
        levels = pipeline | "NoLevels" >> beam.Create([{}])
    elif store.exists(conversion.LEVELS_FILE):  # resumed: reuse the levels the finished shards used
        levels = pipeline | "StoredLevels" >> beam.Create([json.loads(store.read(conversion.LEVELS_FILE))["plates"]])
    else:
        num_plates = len(crop_builder.plate_tasks(plan, options))
        levels = (pipeline
                  | "Plates" >> beam.Create(range(num_plates))
                  | "SpreadPlates" >> beam.Reshuffle()
                  | "PlateLevels" >> beam.ParDo(_PlateLevels(out))
                  | "LevelsDict" >> beam.combiners.ToDict()
                  | "WriteLevels" >> beam.Map(_write_levels, out, light, options))
    todo = [s for s, name in enumerate(plan.shard_names) if not store.exists(f"{SHARD_DIR}/{name}.parquet")]
    done = [s for s in range(plan.num_shards) if s not in todo]
    return (pipeline
            | "Shards" >> beam.Create(todo)
            | "SpreadShards" >> beam.Reshuffle()
            | "BuildShard" >> beam.ParDo(_BuildShard(out, light, options), levels=beam.pvalue.AsSingleton(levels))
            | "AllShards" >> beam.combiners.ToList()
            | "Finish" >> beam.Map(lambda results: crop_builder.finish(
                Store(out), light, options, results + [crop_builder.ShardResult(s, True, -1, []) for s in done])[0]))


def run(source: Source, out: str, options: BuildOptions, pipeline_args: list[str] | None = None) -> None:
    with beam.Pipeline(options=PipelineOptions(pipeline_args or [])) as pipeline:
        build_pipeline(pipeline, source, out, options)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SOURCES:
        print(f"usage: python -m data.beam_pipeline {{{','.join(SOURCES)}}} [source and build options] "
              f"[Beam pipeline options]", file=sys.stderr)
        return 2
    module = importlib.import_module(f"data.sources.{argv[0]}")
    parser = cli.parser(f"{module.__doc__.splitlines()[0]} (Apache Beam)")
    module.add_arguments(parser)
    args, pipeline_args = parser.parse_known_args(argv[1:])
    try:
        run(module.from_args(args), args.out, dataclasses.replace(cli.options(args), progress=False), pipeline_args)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    manifest: dict[str, Any] = json.loads(Store(args.out).read(LAYOUT.manifest))
    print(f"wrote {manifest['num_records']} crops from {manifest['num_sites']} sites to {args.out}"
          + (f", {manifest['num_sites_skipped']} bad sites skipped" if manifest["num_sites_skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
