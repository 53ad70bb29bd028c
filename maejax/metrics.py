"""Training metrics: per-step values reduced with `clu.metrics` (the mean of every metric over the steps
since the last log, the last learning rate), written to TensorBoard event files (tensorboardX: clu's own
writers need TensorFlow), a JSON-lines file and a console progress line with an ETA; the parameter table
(`clu.parameter_overview`) goes to `<workdir>/parameters.txt`. Only process 0 writes.

Each step is logged once however often a run resumes: a writer opened at `resume_step` (the restored
checkpoint's step; 0 for a fresh start) drops the rows of later steps from metrics.jsonl (a killed run
wrote them after its last checkpoint, and the resumed run writes them again) and starts its TensorBoard
event file with a purge at resume_step + 1 (`SessionLog.START`, tensorboardX's `purge_step`), so
TensorBoard hides the earlier files' events of those steps."""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np
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


class MetricWriter:
    def __init__(self, workdir: str, total_steps: int, *, resume_step: int = 0, enabled: bool | None = None,
                 stream=sys.stdout):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.total_steps = total_steps
        self.workdir = workdir
        self.stream = stream
        self._t0 = time.time()
        self._first_step = None
        self._tb = None
        self._jsonl = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # deferred: a few hundred ms of import
            os.makedirs(workdir, exist_ok=True)
            jsonl = os.path.join(workdir, "metrics.jsonl")
            dropped = truncate_jsonl(jsonl, resume_step)
            if dropped:
                print(f"{jsonl}: dropped {dropped} rows of steps after {resume_step}, the checkpoint this run "
                      f"resumes from (the steps run again)", file=stream, flush=True)
            tb_dir = os.path.join(workdir, "tensorboard")
            earlier = os.path.isdir(tb_dir) and any(n.startswith("events.") for n in os.listdir(tb_dir))
            # A purge event only where earlier event files exist (it hides their events from that step on);
            # a unique file name: tensorboardX names files by the second and would overwrite an earlier one.
            self._tb = SummaryWriter(tb_dir, purge_step=resume_step + 1 if earlier else None,
                                     filename_suffix=_unique_suffix(tb_dir))
            self._jsonl = open(jsonl, "a")

    def write_parameter_overview(self, params) -> str | None:
        """clu's table of every parameter (name, shape, dtype, size; works on abstract shapes) to
        `<workdir>/parameters.txt`; returns the path."""
        if not self.enabled:
            return None
        path = os.path.join(self.workdir, "parameters.txt")
        with open(path, "w") as f:
            f.write(parameter_overview.get_parameter_overview(params, include_stats=False) + "\n")
        return path

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time()}
        for k, v in scalars.items():
            v = float(np.asarray(v))
            row[k] = v
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def progress(self, step: int, scalars: dict[str, Any]) -> None:
        """One console line: step, chosen scalars, throughput and ETA from the steps seen so far."""
        if not self.enabled:
            return
        now = time.time()
        if self._first_step is None:
            self._first_step, self._t0 = step, now
        done = step - self._first_step
        eta = (now - self._t0) / done * (self.total_steps - step) if done > 0 else float("nan")
        parts = [f"step {step}/{self.total_steps}"]
        for k in ("loss", "grad_norm", "lr", "examples_per_s", "step_time_s", "mfu"):
            if k in scalars:
                parts.append(f"{k} {_fmt(float(np.asarray(scalars[k])))}")
        parts.append(f"ETA {_duration(eta)}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


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
