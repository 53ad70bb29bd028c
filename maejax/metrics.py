"""Metrics: per-step values reduced with `clu.metrics` (the mean of every metric over the steps since the
last log, the last learning rate), and the metric writers, all of clu's `MetricWriter` interface
(`clu.metric_writers`), chosen by `config.log.writers` (comma-separated, in base()):

  jsonl        <logdir>/metrics.jsonl, one JSON row per write_scalars ({"step", "time", name: value, ...}),
               and write_images as PNG files in <logdir>/images/
  tensorboard  TensorBoard event files in <logdir>/tensorboard (tensorboardX: clu's own writers need
               TensorFlow); images with add_images
  console      one absl INFO line per write_scalars: step/total, the main scalars and an ETA
  wandb        Weights & Biases (optional: `pip install wandb`; asked for without it, the run stops before
               anything is computed with a line naming log.writers); one W&B run per logdir, resumed by id

`create_writer` gives their clu `MultiWriter`; on every process but 0 it writes nothing. The parameter table
(`clu.parameter_overview`) goes to `<workdir>/parameters.txt` (`write_parameter_overview`).

Each step is logged once however often a run resumes: writers opened at `resume_step` (the restored
checkpoint's step; 0 for a fresh start) drop the rows of later steps from metrics.jsonl (a killed run
wrote them after its last checkpoint, and the resumed run writes them again) in one atomic rewrite, and
start their TensorBoard event file with a purge at resume_step + 1 (`SessionLog.START`, tensorboardX's
`purge_step`), so TensorBoard hides the earlier files' events of those steps. (W&B ignores a step below
the last it has, so it keeps the killed run's values of the re-run steps.) Writers opened with
resume_step=None (eval.job's) append."""
from __future__ import annotations

import difflib
import functools
import json
import os
import sys
import time
import types
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metrics as clu_metrics, parameter_overview

LAST_VALUE = ("lr",)   # metrics whose last value is logged; every other one is averaged over the steps


@functools.cache
def _collection(names: tuple[str, ...]) -> type[clu_metrics.Collection]:
    return clu_metrics.Collection.create(**{
        k: (clu_metrics.LastValue if k in LAST_VALUE else clu_metrics.Average).from_output(k) for k in names})


def summarize_steps(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per-step metric rows (host values) -> one row: clu Average of each metric, LastValue of the lr."""
    names = tuple(k for k in rows[0] if k != "finite")
    collection = _collection(names)
    values = {k: np.stack([np.asarray(r[k], np.float32) for r in rows]) for k in names}
    values = {k: (v[-1] if k in LAST_VALUE else v) for k, v in values.items()}
    return {k: float(v) for k, v in collection.single_from_model_output(**values).compute().items()}


def _clu_metric_writers() -> types.ModuleType:
    """`clu.metric_writers`. Its package __init__ imports clu's TensorFlow summary writer, so without
    TensorFlow (this project needs none) the package is made from its TensorFlow-free modules (the
    interface, MultiWriter, LoggingWriter): the same classes, without the TensorFlow writer."""
    try:
        import clu.metric_writers as mw
        return mw
    except ImportError:
        import clu
        import importlib
        pkg = types.ModuleType("clu.metric_writers")
        pkg.__path__ = [os.path.join(os.path.dirname(clu.__file__), "metric_writers")]
        pkg.__package__ = "clu.metric_writers"
        sys.modules["clu.metric_writers"] = pkg
        clu.metric_writers = pkg
        for name, cls in (("interface", "MetricWriter"), ("multi_writer", "MultiWriter"),
                          ("logging_writer", "LoggingWriter")):
            module = importlib.import_module(f"clu.metric_writers.{name}")
            setattr(pkg, name, module)
            setattr(pkg, cls, getattr(module, cls))
        return pkg


metric_writers = _clu_metric_writers()

WRITERS = ("jsonl", "tensorboard", "console", "wandb")   # the names config.log.writers takes
PROGRESS = ("loss", "grad_norm", "lr", "examples_per_s", "step_time_s", "mfu")   # the console's scalars


class WriterError(ValueError):
    """config.log.writers names a writer that does not exist or cannot run here (one line naming the key)."""


def writer_names(spec: str) -> tuple[str, ...]:
    """"jsonl,tensorboard" -> ("jsonl", "tensorboard"); "" -> () (nothing written). An unknown name, or
    wandb without the wandb package, is a WriterError naming log.writers: checked before anything runs."""
    names = tuple(dict.fromkeys(n.strip() for n in str(spec).split(",") if n.strip()))
    for name in names:
        if name not in WRITERS:
            close = difflib.get_close_matches(name, WRITERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise WriterError(f"log.writers={spec!r}: no writer {name!r}{hint}; choose from "
                              f"{', '.join(WRITERS)} (comma-separated)")
    if "wandb" in names:
        try:
            import wandb  # noqa: F401  (optional: not in the project's dependencies)
        except ImportError:
            raise WriterError(f"log.writers={spec!r} asks for Weights & Biases, but wandb is not installed: "
                              f"pip install wandb, or leave wandb out of log.writers") from None
    return names


def create_writer(spec: str, logdir: str, *, resume_step: int | None = None, total_steps: int | None = None,
                  run_config: Mapping[str, Any] | None = None, enabled: bool | None = None
                  ) -> metric_writers.MultiWriter:
    """The writers of `spec` (config.log.writers) in one clu MultiWriter, writing under `logdir`; one
    writing nothing unless `enabled` (default: on process 0 only). `resume_step`: the step a run resumes
    from (later rows and events dropped, see the module doc); None appends. `total_steps` gives the
    console its ETA; `run_config` goes to W&B as the run's config."""
    names = writer_names(spec)
    if not (jax.process_index() == 0 if enabled is None else enabled):
        return metric_writers.MultiWriter([])
    os.makedirs(logdir, exist_ok=True)
    make = {"jsonl": lambda: JsonlWriter(logdir, resume_step=resume_step),
            "tensorboard": lambda: TensorBoardWriter(os.path.join(logdir, "tensorboard"), resume_step=resume_step),
            "console": lambda: ConsoleWriter(total_steps),
            "wandb": lambda: WandbWriter(logdir, config=run_config)}
    return metric_writers.MultiWriter([make[n]() for n in names])


def write_parameter_overview(workdir: str, params) -> str | None:
    """clu's table of every parameter (name, shape, dtype, size; works on abstract shapes) to
    `<workdir>/parameters.txt` on process 0; returns the path (None elsewhere)."""
    if jax.process_index() != 0:
        return None
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "parameters.txt")
    with open(path, "w") as f:
        f.write(parameter_overview.get_parameter_overview(params, include_stats=False) + "\n")
    return path


class Writer(metric_writers.MetricWriter):
    """clu's MetricWriter with every method a no-op: each writer overrides what it can write."""

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_scalars(self, step, scalars):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        self.flush()


def _floats(scalars: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in scalars.items()}


def _image_batch(image) -> np.ndarray:
    """clu's image ([N,] H, W, C with C 1 or 3) -> uint8 (N, H, W, C); floats are taken to be in [0, 1]."""
    x = np.asarray(image)
    x = x[None] if x.ndim == 3 else x
    if x.dtype != np.uint8:
        x = (np.clip(x.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    return x


class JsonlWriter(Writer):
    """<logdir>/metrics.jsonl: one row per write_scalars, {"step": int, "time": unix seconds, name: float};
    write_images: <logdir>/images/<key>.<step>.png (the key's / as _, a batch of images side by side).
    Opened at `resume_step`, it first drops the rows after that step (`truncate_jsonl`)."""

    def __init__(self, logdir: str, *, resume_step: int | None = None):
        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        self.path = os.path.join(logdir, "metrics.jsonl")
        if resume_step is not None:
            dropped = truncate_jsonl(self.path, resume_step)
            if dropped:
                logging.info("%s: dropped %d rows of steps after %d, the checkpoint this run resumes from (the "
                             "steps run again)", self.path, dropped, resume_step)
        self._file = open(self.path, "a")

    def write_scalars(self, step, scalars):
        row = {"step": int(step), "time": time.time(), **_floats(scalars)}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def write_images(self, step, images):
        from matplotlib import image as mpl_image   # deferred: only runs that write a picture need it
        folder = os.path.join(self.logdir, "images")
        os.makedirs(folder, exist_ok=True)
        for key, value in images.items():
            batch = _image_batch(value)
            gap = np.full((batch.shape[1], 4, batch.shape[3]), 255, np.uint8)
            tiled = np.concatenate([p for x in batch for p in (x, gap)][:-1], axis=1)
            path = os.path.join(folder, f"{key.replace('/', '_')}.{int(step)}.png")
            mpl_image.imsave(path, tiled[..., 0] if tiled.shape[-1] == 1 else tiled, cmap="gray", vmin=0, vmax=255)

    def close(self):
        self._file.close()


class TensorBoardWriter(Writer):
    """Event files in `logdir` (tensorboardX). Opened at `resume_step` where earlier event files exist, its
    file starts with a purge of the steps after resume_step (TensorBoard hides their earlier events)."""

    def __init__(self, logdir: str, *, resume_step: int | None = None):
        from tensorboardX import SummaryWriter  # deferred: a few hundred ms of import
        earlier = os.path.isdir(logdir) and any(n.startswith("events.") for n in os.listdir(logdir))
        # A purge event only where earlier event files exist (it hides their events from that step on);
        # a unique file name: tensorboardX names files by the second and would overwrite an earlier one.
        self._tb = SummaryWriter(logdir, purge_step=resume_step + 1 if earlier and resume_step is not None else None,
                                 filename_suffix=_unique_suffix(logdir))

    def write_scalars(self, step, scalars):
        for k, v in _floats(scalars).items():
            self._tb.add_scalar(k, v, step)

    def write_images(self, step, images):
        for k, v in images.items():
            self._tb.add_images(k, _image_batch(v), step, dataformats="NHWC")

    def write_texts(self, step, texts):
        for k, v in texts.items():
            self._tb.add_text(k, v, step)

    def write_histograms(self, step, arrays, num_buckets=None):
        for k, v in arrays.items():
            self._tb.add_histogram(k, np.asarray(v), step, max_bins=(num_buckets or {}).get(k))

    def write_hparams(self, hparams):
        self._tb.add_text("hparams", json.dumps(dict(hparams), indent=1, default=str), 0)

    def flush(self):
        self._tb.flush()

    def close(self):
        self._tb.close()


class ConsoleWriter(Writer):
    """One absl INFO line per write_scalars: `step S/TOTAL | loss ... | ETA 1h02m` (the PROGRESS scalars
    present, else every scalar; an ETA from the steps seen so far when `total_steps` is known)."""

    def __init__(self, total_steps: int | None = None):
        self.total_steps = total_steps
        self._first_step = None
        self._t0 = time.time()

    def write_scalars(self, step, scalars):
        values = _floats(scalars)
        shown = [k for k in PROGRESS if k in values] or sorted(values)
        parts = [f"step {step}" + (f"/{self.total_steps}" if self.total_steps else "")]
        parts += [f"{k} {_fmt(values[k])}" for k in shown]
        if self.total_steps:
            now = time.time()
            if self._first_step is None:
                self._first_step, self._t0 = step, now
            done = step - self._first_step
            eta = (now - self._t0) / done * (self.total_steps - step) if done > 0 else float("nan")
            parts.append(f"ETA {_duration(eta)}")
        logging.info(" | ".join(parts))

    def write_images(self, step, images):
        logging.info("step %d: %s", step, ", ".join(f"{k} {tuple(np.shape(v))}" for k, v in images.items()))

    def write_texts(self, step, texts):
        for k, v in texts.items():
            logging.info("step %d: %s: %s", step, k, v)


class WandbWriter(Writer):
    """Weights & Biases: one run per `logdir`, its id kept in <logdir>/wandb_run_id so a resumed training
    run (or a later eval of the same checkpoint folder) continues it. Project and entity come from W&B's
    own settings (WANDB_PROJECT, WANDB_ENTITY, `wandb login`); the run is named after the logdir."""

    def __init__(self, logdir: str, *, config: Mapping[str, Any] | None = None):
        import wandb
        self._wandb = wandb
        os.makedirs(logdir, exist_ok=True)
        id_file = os.path.join(logdir, "wandb_run_id")
        if os.path.isfile(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:16]
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
        name = os.path.basename(os.path.normpath(os.path.abspath(logdir)))
        self._run = wandb.init(dir=logdir, id=run_id, name=name, resume="allow",
                               config=dict(config) if config is not None else None)

    def write_scalars(self, step, scalars):
        self._run.log(_floats(scalars), step=int(step))

    def write_images(self, step, images):
        self._run.log({k: [self._wandb.Image(x) for x in _image_batch(v)] for k, v in images.items()},
                      step=int(step))

    def write_texts(self, step, texts):
        self._run.log(dict(texts), step=int(step))

    def write_histograms(self, step, arrays, num_buckets=None):
        self._run.log({k: self._wandb.Histogram(np.asarray(v)) for k, v in arrays.items()}, step=int(step))

    def write_hparams(self, hparams):
        self._run.config.update(dict(hparams), allow_val_change=True)

    def close(self):
        self._run.finish()


def _fmt(v: float) -> str:
    return f"{v:.3e}" if (v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4)) else f"{v:.4g}"


def _duration(s: float) -> str:
    if not np.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def truncate_jsonl(path: str, step: int) -> int:
    """Drops the rows of `path` whose step is past `step`, a last line a kill cut off half-way, and all but
    the last row of a step (files of runs resumed before this existed repeat steps); returns how many rows
    went. The file is replaced atomically (a kill now leaves the old or the new)."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    by_step = {}
    for line in lines:
        try:
            row_step = int(json.loads(line).get("step", 0))
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            continue
        if row_step <= step:
            by_step.pop(row_step, None)   # the last row of a step wins, in the order rows were written
            by_step[row_step] = line if line.endswith("\n") else line + "\n"
    keep = [by_step[s] for s in sorted(by_step)]
    if keep == lines:
        return 0
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
    return len(lines) - len(keep)


def _unique_suffix(logdir: str) -> str:
    """"" unless an event file of this second and host exists already (then ".1", ".2", ...)."""
    import socket
    prefix = f"events.out.tfevents.{str(time.time())[:10]}.{socket.gethostname()}"
    names = set(os.listdir(logdir)) if os.path.isdir(logdir) else set()
    n = 0
    while (prefix + (f".{n}" if n else "")) in names:
        n += 1
    return f".{n}" if n else ""
