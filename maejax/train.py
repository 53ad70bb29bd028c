"""Trainer: one functional loop for every model, on any mesh, one process or many.

  python -m maejax.train --config configs/mae_synthetic.py:preset=demo --workdir runs/demo \
      [--config.data.dir=DATASET] [--config.total_steps=2000] [--config.mesh.fsdp=8]

Multi-process jobs are joined from the environment (maejax.distributed; see docs/training.md). Resumes from
the latest checkpoint in `<workdir>/checkpoints` (same data order, same RNG). SIGTERM (preemption) saves a
checkpoint at the next step boundary and stops cleanly.

A resume compares the config with the one the checkpoint was written with. Keys of RESUME_SAFE (logging,
checkpoint cadence, parallelism, eval settings) may change; any other change (model, optimiser, schedule,
data, seed) is refused, naming every differing key, unless `--accept_config_change`. After any change
`config.json` holds the new config, `config.<step>.json` the one the run had up to that step, and the
checkpoints' meta a `config_history` entry per change. metrics.jsonl and TensorBoard hold each step once
after any number of resumes (maejax.metrics). Refusals exit with status 2 and one line on stderr; a NaN
stop with status 1 and one line naming the last good checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from maejax import config as config_lib, metrics as metrics_lib, mfu, preprocess, resume, step as step_lib
from maejax.channels import ChannelError, MixtureError
from maejax.checkpoint import CheckpointMismatchError, Checkpoints, run_checkpoint_dir
from maejax.records import RecordError
from maejax.resume import ConfigChangeError
from maejax.distributed import PreemptionNotice
from maejax.streams import StreamedBatches


# Exit status after a preemption notice (EX_TEMPFAIL: try again later), so a job script can requeue itself.
PREEMPTED_EXIT_CODE = 75


class NonFiniteError(FloatingPointError):
    """The loss or the gradient became NaN/Inf; the last good checkpoint (if any) is left in place."""



def _open_checkpoints(ckpt_dir: str, keep: int) -> Checkpoints | None:
    """The run's checkpoint manager, or None where its local directory does not exist yet (nothing is
    created before the checks pass)."""
    if "://" in ckpt_dir or os.path.isdir(ckpt_dir):
        return Checkpoints(ckpt_dir, keep=keep)
    return None


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None,
          accept_config_change: bool = False) -> dict[str, Any]:
    """Trains `config` in `workdir`; returns the last logged metrics (plus `preempted_at` after a SIGTERM).

    `stop_after` ends the run after that many steps in total (a checkpoint is saved there) while keeping
    the schedule of `total_steps`: a long run done in chunks, each resuming from the last.
    `accept_config_change` resumes even where the config differs from the checkpoint's outside RESUME_SAFE
    (otherwise a ConfigChangeError); both configs are kept (`maejax.resume.record_config`).
    """
    # ----------------------------------------------------------------------------------------------------
    # Checks that need no compute (config keys, mesh, batch split, parameter shardings) and the step's set-up
    # ----------------------------------------------------------------------------------------------------
    metrics_lib.writer_names(config.log.writers)   # an unknown writer, or wandb missing: a WriterError here
    train_setup = step_lib.setup(config)
    mesh, layout = train_setup.mesh, train_setup.layout
    total, batch = int(config.total_steps), int(config.data.batch_size)
    ckpt_dir = run_checkpoint_dir(workdir, config.ckpt_dir)
    ckpts = _open_checkpoints(ckpt_dir, int(config.keep_ckpts))   # None for a new run: nothing created yet
    notice = writer = None
    try:
        # A resume with another model, optimiser, schedule or data is refused here, before anything is
        # read, computed or written.
        start = (ckpts.latest_step() or 0) if ckpts is not None else 0
        saved, changes, refused, history = resume.check_resume(config, workdir, ckpts, start, accept_config_change)
        from maejax import input_pipeline  # deferred: grain is heavy to import and eval jobs do not need it
        # The datasets (data.dir or data.mixture), their channels mapped to the vocabulary (data.channels) and
        # checked against the model: opened once, for the checks and every stream.
        train_data = input_pipeline.open_train_data(config.data, config.model)
        train_setup = dataclasses.replace(train_setup, channel_slots=train_data.channel_slots)
        _check_num_classes(config, train_data.datasets[0])
        os.makedirs(workdir, exist_ok=True)
        if ckpts is None:
            ckpts = Checkpoints(ckpt_dir, keep=int(config.keep_ckpts))

        # ------------------------------------------------------------------------------------------------
        # Input pipeline: this process's streams of the global batch
        # ------------------------------------------------------------------------------------------------
        # Per-plate normalisation statistics: read once per dataset, shared by every stream.
        plate_stats = ([preprocess.plate_statistics(ds) for ds in train_data.datasets]
                       if preprocess.check_normalization(config.data.normalize) == "plate" else None)
        # One dataset for a fixed-channel model: the plain pipeline; a mixture, or a channel-agnostic model,
        # the mixture pipeline (batches with channel_ids / channel_mask; one dataset gives the same crops).
        mixed = len(train_data.sources) > 1 or train_data.with_channels

        def make_stream(index: int, count: int):
            return input_pipeline.make_train_iterator(
                train_data.sources if mixed else train_data.datasets[0], batch_size=batch,
                crop_size=config.data.crop_size, seed=config.seed,
                num_workers=config.data.workers, flip=config.data.flip, rot90=config.data.rot90,
                normalize=config.data.normalize, plate_stats=plate_stats if mixed else plate_stats and plate_stats[0],
                process_index=index, process_count=count)

        data_iter = StreamedBatches(make_stream, int(config.data.streams) or jax.process_count(), batch,
                                    jax.process_index(), jax.process_count())

        # From here on a SIGTERM stops the run at the next step boundary, after saving a checkpoint.
        notice = PreemptionNotice()

        # ------------------------------------------------------------------------------------------------
        # Model and optimiser state: restored or initialised in place on the mesh
        # ------------------------------------------------------------------------------------------------
        # An accepted change of the data settings starts the input streams afresh: a position saved for
        # another dataset, batch, stream count or worker count means nothing (or cannot be restored).
        fresh_streams = any(k.startswith("data.") for k in refused)
        if start:
            restored = ckpts.restore(
                start, model_state=layout.model_abstract, optimizer_state=layout.opt_abstract,
                data_iter=None if fresh_streams else data_iter,
                model_name=f"the {config.model.name} {config.model.variant} model and {config.optim.name} "
                           f"optimiser of this config",
                advice="resume with the model and optim settings it was written with (its config.json), "
                       "or start a new --workdir")
            model_state, opt_state = restored["model"], restored["optimizer"]
            logging.info(f"Resumed from {ckpts.directory} at step {start}"
                         + (" (input streams start afresh: the data settings changed)" if fresh_streams else ""))
        else:
            model_state, opt_state = train_setup.initialize()
        resume.record_config(config, workdir, start, saved, changes, refused, history)
        # Rows and TensorBoard events of steps after `start` (a killed run's) are dropped: each step once.
        writer = metrics_lib.create_writer(config.log.writers, workdir, resume_step=start, total_steps=total,
                                           run_config=config.to_dict())
        logging.info(f"{config.model.name} {config.model.variant}: {train_setup.num_params / 1e6:.2f}M "
                     f"parameters on mesh {dict(mesh.shape)} ({jax.device_count()} {jax.devices()[0].platform} "
                     f"devices, {jax.process_count()} processes, {data_iter.num_streams} input streams)")
        abstract_model = layout.abstract_model()
        params = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
        table = metrics_lib.write_parameter_overview(workdir, params)
        if table:
            logging.info(f"Parameter table: {table}")
        end = total if stop_after is None else min(total, stop_after)
        if start >= end:
            logging.info(f"Nothing to train: the checkpoint of step {start} is at or past the end step {end}")
            return {}

        # ------------------------------------------------------------------------------------------------
        # Train step: compiled once, ahead of the loop, so its memory is known before step 1
        # ------------------------------------------------------------------------------------------------
        t0 = time.time()
        compiled = train_setup.compile()
        logging.info(f"Compiled the train step in {time.time() - t0:.1f} s; per-device memory: "
                     f"{step_lib.format_memory(step_lib.describe_memory(compiled))}")
        flops_per_example = train_setup.flops_per_example
        peak = mfu.device_peak(config.peak_tflops)
        batch_sh = train_setup.batch_shardings

        def to_global(b):
            return {k: jax.make_array_from_process_local_data(sh, np.asarray(b[k])) for k, sh in batch_sh.items()}

        # ------------------------------------------------------------------------------------------------
        # Train loop
        # ------------------------------------------------------------------------------------------------
        pending: list[dict[str, jax.Array]] = []
        last: dict[str, Any] = {}
        last_saved = start or None    # the step of the last good checkpoint, for the NaN message
        t_log, steps_since_log = time.time(), 0
        meta_config = json.loads(config.to_json())

        def flush(done: int) -> dict[str, Any]:
            """Fetches the pending steps' metrics, stops on a non-finite one, writes their mean."""
            nonlocal pending, t_log, steps_since_log
            rows = jax.device_get(pending)
            pending = []
            _check_finite(rows, done - len(rows), last_saved, ckpts.directory, config, end)
            dt = time.time() - t_log
            out = metrics_lib.summarize_steps(rows)
            out["step_time_s"] = dt / steps_since_log
            out.update(mfu.throughput(flops_per_example, batch * steps_since_log, dt, jax.device_count(), peak))
            writer.write_scalars(done, out)   # every writer of config.log.writers (maejax.metrics)
            t_log, steps_since_log = time.time(), 0
            return out

        with train_setup.activate():
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
                    meta = {"step": done, "config": meta_config, "channels": train_data.vocabulary.spec()}
                    if history:
                        meta["config_history"] = history
                    ckpts.save(done, model_state=model_state, optimizer_state=opt_state, data_iter=data_iter,
                               meta=meta, force=True)
                    last_saved = done
                if preempted:
                    # a warning: every process says it (INFO is process 0's alone)
                    logging.warning(f"Preemption notice: saved the checkpoint of step {done} and stopped")
                    last["preempted_at"] = done
                    break
        return last
    finally:
        if notice is not None:
            notice.close()
        if ckpts is not None:
            ckpts.close()  # waits for an asynchronous save in flight, also when the run stops on an error
        if writer is not None:
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


def _check_finite(rows: list[dict[str, np.ndarray]], first_step: int, last_saved: int | None,
                  ckpt_dir: str, config: ml_collections.ConfigDict, end: int) -> None:
    """Raises NonFiniteError at the first non-finite row, saying what there is to resume from."""
    for i, r in enumerate(rows):
        if not r["finite"]:
            knobs = (f"a lower optim.lr (now {config.optim.lr:g}) or longer optim.warmup_steps (now "
                     f"{config.optim.warmup_steps})")
            if last_saved is None:
                then = (f"no checkpoint was written yet (the first was due at step "
                        f"{min(int(config.ckpt_every), end)}), so there is nothing to resume: start again with {knobs}")
            else:
                then = (f"the last good checkpoint is step {last_saved} in {ckpt_dir}: resume from it with {knobs} "
                        f"and --accept_config_change (the same config repeats the same steps)")
            raise NonFiniteError(
                f"non-finite loss or gradient at step {first_step + i + 1} (loss={float(r['loss'])}, "
                f"grad_norm={float(r['grad_norm'])}); stopped without saving; {then}")


# Errors the CLI reports as one line on stderr (no traceback), with their exit status: bad input 2 (what
# was refused and what to do), a NaN stop 1.
ONE_LINE_ERRORS = ((ConfigChangeError, 2), (CheckpointMismatchError, 2), (RecordError, 2),
                   (metrics_lib.WriterError, 2), (ChannelError, 2), (MixtureError, 2), (NonFiniteError, 1))


def run(config: ml_collections.ConfigDict, workdir: str, *, accept_config_change: bool = False) -> int:
    """train() as the CLI runs it; returns the exit status: 0 done, PREEMPTED_EXIT_CODE after a SIGTERM,
    or that of ONE_LINE_ERRORS after printing `ErrorName: message` (one line) to stderr."""
    try:
        out = train(config, workdir, accept_config_change=accept_config_change)
    except tuple(e for e, _ in ONE_LINE_ERRORS) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return next(code for cls, code in ONE_LINE_ERRORS if isinstance(e, cls))
    return PREEMPTED_EXIT_CODE if "preempted_at" in out else 0


def main(argv) -> None:
    del argv
    from maejax import log
    log.setup()   # absl logging: INFO from process 0, warnings from every process, no orbax INFO per save
    from maejax.platform_check import warn_if_accelerator_unused
    warn_if_accelerator_unused()   # a GPU or TPU on this machine but jax on the CPU: says so loudly
    config = config_lib.load(_CONFIG.value, _OVERRIDES)
    sys.exit(run(config, _WORKDIR.value, accept_config_change=_ACCEPT_CONFIG_CHANGE.value))


if __name__ == "__main__":
    from absl import app, flags

    from maejax import distributed

    _ARGV, _OVERRIDES = config_lib.parse_override_flags(sys.argv)   # an unknown key stops here, first
    distributed.initialize()  # before anything touches the devices
    _CONFIG = flags.DEFINE_string("config", None, "Config file (FILE.py[:ARG]); override its keys with "
                                                  "--config.SECTION.KEY=VALUE.")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.")
    _ACCEPT_CONFIG_CHANGE = flags.DEFINE_bool(
        "accept_config_change", False, "Resume even though the config changes the model, optimiser, schedule or "
        "data the checkpoint was trained with (see RESUME_SAFE); config.json gets the new config, "
        "config.<step>.json keeps the old one.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, argv=_ARGV)
