"""Screen-scale embedding: every crop of a dataset through a trained (or converted) model, on every device of
every process, written as parquet shards as it goes; a killed or preempted job resumes where it stopped.

  python -m eval.embed_job --workdir runs/demo --dataset DIR --out DIR [--blocks all|1,5,12]
      [--batch_size N] [--shard_size 8192] [--write crops,wells] [--step N] [--read_threads 4]
      [--config.eval.channels=DNA,RNA,Mito]   (the channels the model gets: eval.job's key, maejax.channels)

`--workdir` is a training run directory (its checkpoints in `<workdir>/checkpoints` or the run's
`ckpt_dir`; also what `python -m maejax.convert openphenom --workdir DIR` writes) or a checkpoint directory
itself. Crops are
the dataset's whole records, normalised as the model was trained (`data.normalize`: per crop, or by the
plate statistics of this dataset), as `eval.job` embeds them.

Multi-process jobs are joined from the environment exactly like training (maejax/distributed.py:
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, SLURM, TPU pods). Each process runs the
model data-parallel over its own devices (no cross-process traffic per batch) on its share of the work.

Work split. Records are cut into output shards of `--shard_size` consecutive record ids (shard s holds
records [s * S, (s + 1) * S)); the shards not yet finished are dealt round-robin to the processes (process
p of P takes the p-th, (p + P)-th, ... of them). Shards are independent of the process count, so the
rows are the same for any number of processes, and a resume may use another number.

Output (`<out>`):

  embed.json                               what is embedded (checkpoint, step, dataset fingerprint,
                                           shard size, blocks); a resume with another is refused
  crops/block_03/part-00012.parquet        crop rows of shard 12 for block 3: metadata + feature_*
  partial/block_03/part-00012.parquet      that shard's per-well means and crop counts (input of wells/)
  wells/block_03.parquet                   one row per well (experiment, plate, well): the mean of its
                                           crops, written when every shard is done

`--write crops,wells` (default) writes both; `--write wells` leaves the crop rows out (at JUMP-CP scale
all blocks of all crops are terabytes), `--write crops` the well means. `crops/block_03/` is a parquet
dataset (`pandas.read_parquet(dir)`, pyarrow, duckdb); `wells/block_03.parquet` is one file, what
`python -m eval.map_benchmark --features` and pycytominer read as is (eval/embeddings.py).

Resume. Every file is written under a temporary name and renamed when the whole shard is written; a
shard counts as done when all of its files exist, and a rerun of the same command skips done shards, so
no row is computed twice or written twice. SIGTERM (preemption): every process finishes the shard in
hand at the same round (jax's preemption sync across processes, as the trainer), the job stops and
exits with status 75 (maejax.train.PREEMPTED_EXIT_CODE); rerun it to continue. Progress with an ETA
goes to stderr (data/progress.py), one line per process.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Any

import numpy as np

FORMAT = "maejax-embeddings/1"
OUTPUTS = ("crops", "wells")
DEFAULT_SHARD_SIZE = 8192
SPEC = "embed.json"
# embed.json keys a resume must match: they decide every row. `blocks` and `write` may change between
# runs (a shard is done when the files of the blocks and outputs asked for now exist).
SAME_ON_RESUME = ("checkpoint", "step", "dataset_fingerprint", "num_records", "crop_shape", "shard_size",
                  "normalize")


class EmbedJobError(ValueError):
    """A bad request or an output folder written for another job: one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Output shards: contiguous record ranges of `shard_size` (the last may be shorter)."""
    num_records: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_records // self.shard_size)

    def records(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_records)

    def part(self, shard: int) -> str:
        return f"part-{shard:0{max(5, len(str(self.num_shards - 1)))}d}.parquet"


def checkpoint_dir(workdir: str) -> str:
    """The checkpoints of a run directory, or the directory itself when it holds them (a converted run)."""
    from maejax.checkpoint import NoCheckpointError, run_checkpoint_dir
    ckpt = run_checkpoint_dir(workdir)
    if "://" in ckpt or os.path.isdir(ckpt):
        return ckpt
    if os.path.isdir(workdir) and any(n.isdigit() for n in os.listdir(workdir)):
        return workdir
    raise NoCheckpointError(f"{ckpt} or {workdir}")


def checkpoint_config(ckpt_dir: str, step: int | None = None):
    """(step, the config it was trained with, its channel vocabulary or None) from the checkpoint's meta; no
    array is read."""
    from maejax.checkpoint import Checkpoints
    from maejax.config import complete
    ckpts = Checkpoints(ckpt_dir)
    try:
        step = ckpts.step(step)
        meta = ckpts.meta(step)
        return step, complete(meta["config"]), meta.get("channels")
    finally:
        ckpts.close()


def parse_blocks(spec: str | Sequence[int] | None, depth: int) -> list[int]:
    """`all` / None -> 1..depth; "1,5,12" or [1, 5, 12] -> those (1-based, as eval.job's reports count)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(1, depth + 1))
    try:
        blocks = [int(b) for b in spec.split(",") if b.strip()] if isinstance(spec, str) else [int(b) for b in spec]
    except ValueError:
        raise EmbedJobError(f"--blocks {spec!r}: expected `all` or block numbers such as 1,5,12") from None
    bad = [b for b in blocks if not 1 <= b <= depth]
    if not blocks or bad:
        raise EmbedJobError(f"--blocks {spec!r}: the model has blocks 1..{depth}" + (f"; not {bad}" if bad else ""))
    return sorted(set(blocks))


def parse_write(spec: str | Sequence[str]) -> tuple[str, ...]:
    items = [w.strip() for w in spec.split(",")] if isinstance(spec, str) else list(spec)
    bad = [w for w in items if w not in OUTPUTS]
    if not items or bad:
        raise EmbedJobError(f"--write {spec!r}: choose from {','.join(OUTPUTS)}")
    return tuple(w for w in OUTPUTS if w in items)


def dataset_fingerprint(dataset) -> str:
    """SHA-256 over the manifest's shard list (names, counts, checksums) and the metadata table's bytes."""
    from maejax.records import LAYOUT
    h = hashlib.sha256(json.dumps([dataset.manifest.get("shards"), dataset.manifest.get("num_records"),
                                   dataset.manifest.get("crop_shape")], sort_keys=True).encode())
    with open(dataset.path / LAYOUT.metadata, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_spec(out_dir: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The stored embed.json, after checking that it describes the same rows as `spec`."""
    path = os.path.join(out_dir, SPEC)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        stored = json.load(f)
    diff = [f"{k} {stored.get(k)!r} there, {spec[k]!r} now" for k in SAME_ON_RESUME if stored.get(k) != spec[k]]
    if stored.get("format") != FORMAT or diff:
        raise EmbedJobError(f"{path} was written by another embedding job ({'; '.join(diff) or stored.get('format')}); "
                            f"resume it with its own checkpoint, dataset and --shard_size, or choose another --out")
    return stored


def write_json(path: str, obj: dict[str, Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class Layout:
    """File names of one job's outputs."""

    def __init__(self, out_dir: str, plan: Plan, blocks: Sequence[int], write: Sequence[str]):
        from eval.embeddings import block_name
        self.out, self.plan, self.blocks, self.write = out_dir, plan, list(blocks), tuple(write)
        self.block_name = block_name

    def folders(self) -> list[str]:
        kinds = (["crops"] if "crops" in self.write else []) + (["partial"] if "wells" in self.write else [])
        return [os.path.join(self.out, k, self.block_name(b)) for k in kinds for b in self.blocks]

    def crops(self, block: int, shard: int) -> str:
        return os.path.join(self.out, "crops", self.block_name(block), self.plan.part(shard))

    def partial(self, block: int, shard: int) -> str:
        return os.path.join(self.out, "partial", self.block_name(block), self.plan.part(shard))

    def wells(self, block: int) -> str:
        return os.path.join(self.out, "wells", f"{self.block_name(block)}.parquet")

    def done_shards(self) -> np.ndarray:
        """Bool per shard: every file of every block asked for exists (one listing per folder)."""
        done = np.ones(self.plan.num_shards, bool)
        for folder in self.folders():
            names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
            done &= np.array([self.plan.part(s) in names for s in range(self.plan.num_shards)], bool)
        return done


def _read_batches(dataset, ranges: Sequence[tuple[int, int]], batch_size: int, threads: int
                  ) -> Iterator[tuple[np.ndarray, Any]]:
    """(uint8 images, metadata rows) of consecutive batches over the record ranges, in order; up to
    2 x `threads` batches are read ahead by a thread pool while the devices compute."""
    spans = ((b, min(b + batch_size, stop)) for start, stop in ranges for b in range(start, stop, batch_size))
    pool = futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="embed-read")
    window: collections.deque = collections.deque()

    def read(a: int, b: int):
        return dataset.reader.read_many(np.arange(a, b)), dataset.metadata.iloc[a:b]

    try:
        for a, b in spans:
            window.append(pool.submit(read, a, b))
            if len(window) > 2 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:   # also when the consumer stops early (a preemption)
        for f in window:
            f.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


def _embed_shard(embedder, batches: Iterator, num_batches: int) -> np.ndarray:
    """(n, blocks, D) for one shard, one batch in flight while the next is read and dispatched."""
    out, previous = [], None
    for _ in range(num_batches):
        images, meta = next(batches)
        handle = embedder.dispatch(images, meta)
        if previous is not None:
            out.append(embedder.fetch(previous)["blocks"])
        previous = handle
    out.append(embedder.fetch(previous)["blocks"])
    return np.concatenate(out)


def _write_shard(layout: Layout, shard: int, feats: np.ndarray, meta, codes: np.ndarray) -> None:
    """Every block's files of one shard under temporary names, then all renamed (the shard is done)."""
    from eval import embeddings
    rows = embeddings.crop_metadata(meta) if "crops" in layout.write else None
    pairs = []
    try:
        for j, block in enumerate(layout.blocks):
            if "crops" in layout.write:
                path = layout.crops(block, shard)
                pairs.append((embeddings.write_table(embeddings.features_table(feats[:, j], rows), path,
                                                     publish=False), path))
            if "wells" in layout.write:
                path = layout.partial(block, shard)
                pairs.append((embeddings.write_table(embeddings.partial_means(feats[:, j], codes), path,
                                                     publish=False), path))
    except BaseException:
        for tmp, _ in pairs:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    embeddings.publish_files(pairs)


def _write_wells(layout: Layout, metadata, dim: int) -> list[str]:
    """wells/block_XX.parquet for every block from the shards' partial means."""
    from eval import embeddings
    codes, table = embeddings.wells(metadata)
    expected = np.bincount(codes, minlength=len(table))
    paths = []
    for block in layout.blocks:
        parts = [layout.partial(block, s) for s in range(layout.plan.num_shards)]
        counts, means = embeddings.combine_partials(parts, len(table), dim)
        if not np.array_equal(counts, expected):
            raise RuntimeError(f"{os.path.dirname(parts[0])}: the partial means cover {int(counts.sum())} crops, "
                               f"the dataset has {int(expected.sum())}; delete the folder and rerun")
        rows = table.assign(n_crops=counts)
        paths.append(layout.wells(block))
        embeddings.write_table(embeddings.features_table(means, rows), paths[-1])
    return paths


def _sync(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _pending(layout: Layout) -> list[int]:
    """Shards still to do, as process 0 sees them (sent to all, so every process deals the same list)."""
    import jax
    from eval.embeddings import remove_temporaries
    done = np.zeros(layout.plan.num_shards, bool)
    if jax.process_index() == 0:
        for folder in layout.folders() + [os.path.join(layout.out, "wells")]:
            remove_temporaries(folder)   # a killed writer's files (no process of this job writes yet)
        done = layout.done_shards()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        done = np.asarray(multihost_utils.broadcast_one_to_all(done.astype(np.int32))).astype(bool)
    return [int(s) for s in np.flatnonzero(~done)]


def embed_dataset(workdir: str, dataset_dir: str | None, out_dir: str, *, blocks: str | Sequence[int] | None = "all",
                  batch_size: int | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                  write: str | Sequence[str] = OUTPUTS, step: int | None = None, devices=None,
                  read_threads: int = 4, progress: bool = True, channels: str | None = None) -> dict[str, Any]:
    """Embeds every crop of the dataset into `out_dir` (module doc); returns a summary with `preempted`
    True when a SIGTERM stopped it before the end. `devices`: this process's devices (default all local).
    `channels`: eval.channels (names, in order; default the run's config's), the channels the model gets."""
    import jax
    from data.progress import Progress
    from eval.embed import Embedder, output_shapes
    from maejax import preprocess, sharding as shd, state as state_lib, step as step_lib
    from maejax.distributed import PreemptionNotice
    from maejax.input_pipeline import open_dataset

    t0 = time.time()
    write = parse_write(write)
    if shard_size < 1:
        raise EmbedJobError(f"--shard_size must be >= 1, got {shard_size}")
    pi, pc = jax.process_index(), jax.process_count()
    devices = list(devices) if devices is not None else jax.local_devices()
    ckpt_dir = checkpoint_dir(workdir)
    step, config, vocabulary = checkpoint_config(ckpt_dir, step)   # its meta only: arrays are read after the checks
    if channels is not None:
        config.eval.channels = channels
    rules = shd.rules_from_config(config.sharding_rules)
    mesh = shd.batch_mesh(rules, devices)
    dataset_dir = dataset_dir or config.data.dir
    dataset = open_dataset(dataset_dir)
    from eval.job import EvalSetupError, check_channels
    try:   # the channels the model gets (eval.channels; a fixed-channel model: its own, by name)
        index, ids = check_channels(config.model, vocabulary, dataset.channels, config.eval.channels, dataset_dir,
                                    workdir)
    except EvalSetupError as e:
        raise EmbedJobError(str(e)) from None
    normalize = preprocess.check_normalization(config.data.normalize)
    plan = Plan(len(dataset), int(shard_size))
    spec = {"format": FORMAT, "checkpoint": os.path.abspath(ckpt_dir) if "://" not in ckpt_dir else ckpt_dir,
            "step": int(step), "model": f"{config.model.name} {config.model.variant}",
            "dataset": os.path.abspath(dataset_dir), "dataset_fingerprint": dataset_fingerprint(dataset),
            "num_records": len(dataset), "crop_shape": list(dataset.crop_shape), "normalize": normalize,
            "channels": [dataset.channels[i] for i in index],
            "shard_size": plan.shard_size, "num_shards": plan.num_shards}
    check_spec(out_dir, spec)                     # every process: all refuse alike
    model, config, step = state_lib.load_model(ckpt_dir, step=step, mesh=mesh, rules=rules)
    try:
        shape = output_shapes(model, (len(index), *dataset.crop_shape[1:]))["blocks"]
    except Exception as e:   # noqa: BLE001 - e.g. 4-channel crops into a 6-channel ViT
        raise EmbedJobError(f"{dataset_dir}: crops of shape (C, H, W) = {dataset.crop_shape} do not fit the "
                            f"{config.model.name} {config.model.variant} model of {ckpt_dir} "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    depth, dim = int(shape[1]), int(shape[2])
    chosen = parse_blocks(blocks, depth)
    layout = Layout(out_dir, plan, chosen, write)
    spec.update(depth=depth, dim=dim, blocks=chosen, write=list(write), complete=False)
    pending = _pending(layout)
    if pi == 0:
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, SPEC), spec)
        for folder in layout.folders():
            os.makedirs(folder, exist_ok=True)
    _sync("eval.embed_job: output folders")
    mine = pending[pi::pc]
    rounds = -(-len(pending) // pc)
    ranges = [plan.records(s) for s in mine]
    todo = sum(b - a for a, b in ranges)
    # From here a SIGTERM stops the job after the shard in hand (every process at the same round).
    notice = PreemptionNotice()
    writer = futures.ThreadPoolExecutor(1, thread_name_prefix="embed-write")
    writes: collections.deque = collections.deque()
    bar = None
    preempted_at = None
    try:
        if pi == 0:
            print(f"embed_job: {config.model.name} {config.model.variant} step {step} ({depth} blocks x {dim}; "
                  f"blocks {_runs(chosen)}), {len(dataset):,} crops of {dataset_dir} in {plan.num_shards} shards "
                  f"of {plan.shard_size}: {plan.num_shards - len(pending)} done, {len(pending)} to do on {pc} "
                  f"process(es) x {len(devices)} {devices[0].platform} devices; writing {'+'.join(write)} to "
                  f"{out_dir}", flush=True)
        stats = preprocess.plate_statistics(dataset) if normalize == "plate" and todo else None
        codes = None
        if "wells" in write:
            from eval.embeddings import wells
            codes = wells(dataset.metadata)[0]
        t_loop = time.time()
        bar = Progress(todo, f"embed process {pi}/{pc}", "crops", enabled=progress and todo > 0)
        embedder = batches = None
        if mine:   # a process with nothing left to do (a finished job, a resume) still keeps the rounds
            embedder = Embedder(model, mesh, batch_size or int(config.eval.batch_size), rules, keys=("blocks",),
                                normalize=normalize, plate_stats=stats, blocks=tuple(b - 1 for b in chosen),
                                compiler_options=step_lib.compiler_options(config),   # as the trainer compiles
                                channels=tuple(index), channel_ids=tuple(ids))
            batches = _read_batches(dataset, ranges, embedder.batch_size, read_threads)
        for r in range(rounds):
            if r < len(mine):
                shard = mine[r]
                a, b = plan.records(shard)
                feats = _embed_shard(embedder, batches, -(-(b - a) // embedder.batch_size))
                writes.append(writer.submit(_write_shard, layout, shard, feats, dataset.metadata.iloc[a:b],
                                            None if codes is None else codes[a:b]))
                while len(writes) > 1 and (writes[0].done() or len(writes) > 2):
                    writes.popleft().result()      # raises a write error here; at most 2 shards in memory
                bar.update(b - a)
            if notice.reached(r + 1) and r + 1 < rounds:
                preempted_at = r + 1
                break
        if batches is not None:
            batches.close()
        while writes:
            writes.popleft().result()
        t_end = time.time()
    finally:
        writer.shutdown(wait=True)
        notice.close()
        if bar is not None:
            bar.close()
    summary = {"out": out_dir, "shards": plan.num_shards, "skipped": plan.num_shards - len(pending),
               "embedded_here": len(mine) if preempted_at is None else min(len(mine), preempted_at),
               "crops_per_s_here": todo / (t_end - t_loop) if preempted_at is None and todo else None,
               "preempted": preempted_at is not None, "outputs": {}}
    if preempted_at is not None:
        _sync("eval.embed_job: stopped")   # every process stopped at the same round, its shard written
        if pi == 0:
            done = int(layout.done_shards().sum())
            print(f"Preemption notice: stopped after round {preempted_at} of {rounds}; {done} of "
                  f"{plan.num_shards} shards are done; rerun the same command to continue", flush=True)
        return summary
    _sync("eval.embed_job: every shard written")
    if pi == 0:
        if "crops" in write:
            summary["outputs"]["crops"] = [os.path.dirname(layout.crops(b, 0)) for b in chosen]
        if "wells" in write:
            summary["outputs"]["wells"] = _write_wells(layout, dataset.metadata, dim)
        write_json(os.path.join(out_dir, SPEC), dict(spec, complete=True, outputs=summary["outputs"]))
        rate = f", {summary['crops_per_s_here']:.1f} crops/s on process 0" if summary["crops_per_s_here"] else ""
        print(f"embed_job: {plan.num_shards} shards done ({summary['skipped']} were already) in "
              f"{time.time() - t0:.1f} s{rate}; outputs in {out_dir}", flush=True)
    _sync("eval.embed_job: outputs written")
    return summary


def _runs(blocks: Sequence[int]) -> str:
    """[1, 2, 3, 7] -> '1-3,7'."""
    out, start = [], None
    for i, b in enumerate(blocks):
        start = b if start is None else start
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            out.append(f"{start}-{b}" if b > start else f"{b}")
            start = None
    return ",".join(out)


def parser() -> argparse.ArgumentParser:
    from maejax import flags
    p = flags.ArgumentParser(prog="python -m eval.embed_job", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, metavar="DIR",
                   help="training run directory, or a checkpoint directory")
    p.add_argument("--dataset", default=None, metavar="DIR",
                   help="dataset directory (default: the one the run trained on)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (a rerun resumes it)")
    p.add_argument("--blocks", default="all", help="`all` or 1-based block numbers, e.g. 1,5,12")
    p.add_argument("--batch_size", type=int, default=None,
                   help="crops per forward pass per process (rounded up to a multiple of its devices; "
                        "default: the run's eval.batch_size)")
    p.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE,
                   help="crops per output shard: the unit of work, of resume and of the part files")
    p.add_argument("--write", default=",".join(OUTPUTS), help="crops,wells (default), crops or wells")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--read_threads", type=int, default=4, help="threads reading records ahead of the devices")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from maejax import distributed
    from maejax.checkpoint import CheckpointMismatchError
    from maejax.records import RecordError
    from maejax import config as config_lib
    argv, overrides = config_lib.parse_override_flags(sys.argv[1:] if argv is None else argv, only="eval")
    if set(overrides) - {"eval.channels"}:
        raise SystemExit(f"--config.{sorted(set(overrides) - {'eval.channels'})[0]}: this command takes "
                         f"--config.eval.channels=NAMES only (its other settings are flags)")
    args = parser().parse_args(argv)
    distributed.initialize()    # before anything touches the devices
    try:
        summary = embed_dataset(args.workdir, args.dataset, args.out, blocks=args.blocks, batch_size=args.batch_size,
                                shard_size=args.shard_size, write=args.write, step=args.step,
                                read_threads=args.read_threads, channels=overrides.get("eval.channels"))
    except (EmbedJobError, CheckpointMismatchError, RecordError, FileNotFoundError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 2
    if summary["preempted"]:
        from maejax.train import PREEMPTED_EXIT_CODE   # the trainer's status, so one requeue rule serves both
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
