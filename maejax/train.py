"""Trainer: one functional loop for every model, on any mesh, one process or many.

  python -m maejax.train --config configs/mae_synthetic.py:preset=demo --workdir runs/demo \
      [--config.data.dir=DATASET] [--config.total_steps=2000] [--config.mesh.fsdp=8]

Multi-process jobs are joined from the environment (maejax.distributed; see docs/training.md). Resumes from
the latest checkpoint in `<workdir>/checkpoints` (same data order, same RNG). SIGTERM (preemption) saves a
checkpoint at the next step boundary and stops cleanly.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from maejax import mfu, optim, preprocess, sharding as shd, state as state_lib, step as step_lib
from maejax.checkpoint import Checkpoints, run_checkpoint_dir
from maejax.config import check_known
from maejax.distributed import PreemptionNotice
from maejax.metrics import MetricWriter, summarize_steps
from maejax.streams import StreamedBatches


# Exit status after a preemption notice (EX_TEMPFAIL: try again later), so a job script can requeue itself.
PREEMPTED_EXIT_CODE = 75


class NonFiniteError(FloatingPointError):
    """The loss or the gradient became NaN/Inf; the last good checkpoint is left in place."""


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict[str, Any]:
    """Trains `config` in `workdir`; returns the last logged metrics (plus `preempted_at` after a SIGTERM).

    `stop_after` ends the run after that many steps in total (a checkpoint is saved there) while keeping
    the schedule of `total_steps`: a long run done in chunks, each resuming from the last.
    """
    # ----------------------------------------------------------------------------------------------------
    # Checks that need no compute: config keys, mesh, batch split, parameter shardings
    # ----------------------------------------------------------------------------------------------------
    check_known(config)
    total = int(config.total_steps)
    mesh = shd.make_mesh(dict(config.mesh))
    rules = shd.rules_from_config(config.sharding_rules)
    step_lib.check_batch(config, mesh)
    batch = int(config.data.batch_size)
    tx = optim.make(config.optim, total)
    lr_schedule = optim.schedule(config.optim, total)
    sharded = state_lib.abstract(config.model, mesh, rules, seed=config.seed, tx=tx)
    from maejax import input_pipeline  # deferred: grain is heavy to import and eval jobs do not need it
    dataset = input_pipeline.open_dataset(config.data.dir)   # opened once, for the check and every stream
    _check_num_classes(config, dataset)
    os.makedirs(workdir, exist_ok=True)

    # ----------------------------------------------------------------------------------------------------
    # Input pipeline: this process's streams of the global batch
    # ----------------------------------------------------------------------------------------------------
    # Per-plate normalisation statistics: read once, shared by every stream.
    plate_stats = (preprocess.plate_statistics(dataset) if preprocess.check_normalization(config.data.normalize)
                   == "plate" else None)

    def make_stream(index: int, count: int):
        return input_pipeline.make_train_iterator(
            dataset, batch_size=batch, crop_size=config.data.crop_size, seed=config.seed,
            num_workers=config.data.workers, flip=config.data.flip, rot90=config.data.rot90,
            normalize=config.data.normalize, plate_stats=plate_stats,
            process_index=index, process_count=count, num_channels=config.model.in_channels)

    data_iter = StreamedBatches(make_stream, int(config.data.streams) or jax.process_count(), batch,
                                jax.process_index(), jax.process_count())

    # From here on a SIGTERM stops the run at the next step boundary, after saving a checkpoint.
    notice = PreemptionNotice()
    ckpts = Checkpoints(run_checkpoint_dir(workdir, config.ckpt_dir), keep=config.keep_ckpts)
    writer = MetricWriter(workdir, total)
    try:
        # ------------------------------------------------------------------------------------------------
        # Model and optimiser state: restored or initialised in place on the mesh
        # ------------------------------------------------------------------------------------------------
        start = ckpts.latest_step() or 0
        if start:
            restored = ckpts.restore(start, model_state=sharded.model_abstract,
                                     optimizer_state=sharded.opt_abstract, data_iter=data_iter)
            model_state, opt_state = restored["model"], restored["optimizer"]
            print(f"Resumed from {ckpts.directory} at step {start}", flush=True)
        else:
            model_state, opt_state = state_lib.initialize(
                config.model, mesh, rules, sharded, seed=config.seed, tx=tx,
                compiler_options=step_lib.compiler_options(config))
            if jax.process_index() == 0:
                with open(os.path.join(workdir, "config.json"), "w") as f:
                    f.write(config.to_json(indent=2))
        n_params = sum(x.size for x in jax.tree.leaves(sharded.model_abstract))
        print(f"{config.model.name} {config.model.variant}: {n_params / 1e6:.2f}M parameters on mesh "
              f"{dict(mesh.shape)} ({jax.device_count()} {jax.devices()[0].platform} devices, "
              f"{jax.process_count()} processes, {data_iter.num_streams} input streams)", flush=True)
        abstract_model = sharded.abstract_model()
        table = writer.write_parameter_overview(nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param)))
        if table:
            print(f"Parameter table: {table}", flush=True)

        # ------------------------------------------------------------------------------------------------
        # Train step: compiled once, ahead of the loop, so its memory is known before step 1
        # ------------------------------------------------------------------------------------------------
        t0 = time.time()
        p_step = step_lib.jit_train_step(sharded, config, mesh, rules, lr_schedule)
        compiled = step_lib.compile_train_step(p_step, sharded, config, mesh, rules)
        print(f"Compiled the train step in {time.time() - t0:.1f} s; per-device memory: "
              f"{step_lib.format_memory(step_lib.describe_memory(compiled))}", flush=True)
        batch, crop = int(config.data.batch_size), int(config.data.crop_size)
        flops_per_example = abstract_model.flops_per_crop(crop, crop)["train"]
        peak = mfu.device_peak(config.peak_tflops)
        batch_sh = step_lib.batch_shardings(mesh)

        def to_global(b):
            return {k: jax.make_array_from_process_local_data(sh, np.asarray(b[k])) for k, sh in batch_sh.items()}

        # ------------------------------------------------------------------------------------------------
        # Train loop
        # ------------------------------------------------------------------------------------------------
        end = total if stop_after is None else min(total, stop_after)
        pending: list[dict[str, jax.Array]] = []
        last: dict[str, Any] = {}
        t_log, steps_since_log = time.time(), 0

        def flush(done: int) -> dict[str, Any]:
            """Fetches the pending steps' metrics, stops on a non-finite one, writes their mean."""
            nonlocal pending, t_log, steps_since_log
            rows = jax.device_get(pending)
            pending = []
            _check_finite(rows, done - len(rows))
            dt = time.time() - t_log
            out = summarize_steps(rows)
            out["step_time_s"] = dt / steps_since_log
            out.update(mfu.throughput(flops_per_example, batch * steps_since_log, dt, jax.device_count(), peak))
            writer.write(done, out)
            writer.progress(done, out)
            t_log, steps_since_log = time.time(), 0
            return out

        with shd.activate(mesh, rules):
            for step in range(start, end):
                b = to_global(next(data_iter))
                model_state, opt_state, metrics = compiled(model_state, opt_state, b, step_lib.step_arg(step))
                pending.append(metrics)
                steps_since_log += 1
                done = step + 1
                preempted = notice.reached(done)
                ckpt_now = done % config.ckpt_every == 0 or done == end or preempted
                if ckpt_now or done % config.log_every == 0:
                    last = flush(done)  # raises NonFiniteError before anything after a bad step is saved
                if ckpt_now:
                    ckpts.save(done, model_state=model_state, optimizer_state=opt_state, data_iter=data_iter,
                               meta={"step": done, "config": json.loads(config.to_json())}, force=True)
                if preempted:
                    print(f"Preemption notice: saved the checkpoint of step {done} and stopped", flush=True)
                    last["preempted_at"] = done
                    break
        return last
    finally:
        notice.close()
        ckpts.close()  # waits for an asynchronous save in flight, also when the run stops on an error
        writer.close()


def _check_num_classes(config: ml_collections.ConfigDict, dataset) -> None:
    """A classifier needs a logit for every label of the dataset: a label past the last logit would one-hot
    to zeros and train on a silently wrong loss."""
    if config.model.name != "supervised":
        return
    n = len(dataset.perturbations)
    if int(config.model.num_classes) < n:
        raise ValueError(f"model.num_classes={config.model.num_classes} is below the {n} perturbations (labels) "
                         f"of the dataset {config.data.dir}; set model.num_classes={n}")


def _check_finite(rows: list[dict[str, np.ndarray]], first_step: int) -> None:
    for i, r in enumerate(rows):
        if not r["finite"]:
            raise NonFiniteError(
                f"non-finite loss or gradient at step {first_step + i + 1} (loss={float(r['loss'])}, "
                f"grad_norm={float(r['grad_norm'])}); stopped without saving, the last good checkpoint is kept")


def check_override_flags(argv: list[str]) -> None:
    """`--config.a.b=v` flags must name keys of maejax.config.base(); exits with the key and the keys that
    exist there (config_flags alone fails with a traceback naming only the last part of the key)."""
    import difflib

    from maejax.config import base
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].partition("=")[0]
        node, parts = base(), key.split(".")
        for i, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                known = sorted(node.keys()) if hasattr(node, "keys") else []
                close = difflib.get_close_matches(part, known, n=1)
                hint = f"; did you mean {'.'.join(parts[:i] + close)}?" if close else f"; known: {known}"
                raise SystemExit(f"unknown config key {key!r} in {arg}{hint}")
            node = node[part]


def main(argv) -> None:
    del argv
    from absl import flags, logging
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    if "preempted_at" in train(_CONFIG.value, _WORKDIR.value):
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from maejax import distributed

    check_override_flags(sys.argv)
    distributed.initialize()  # before anything touches the devices
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (FILE.py[:ARG]).", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
