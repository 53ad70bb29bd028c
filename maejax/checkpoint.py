"""Orbax checkpoints: model, optimiser and input-stream states plus a JSON `meta` (step, config).

Items are separate so that an eval job restores the model alone. Saves are asynchronous (the arrays are
copied off the devices, then written by a background thread while training goes on). Orbax writes a step
into `<step>.orbax-checkpoint-tmp-*` and renames it only when every item and every process is done, so a
save cut off half-way is never listed as a checkpoint; leftover temporary directories are deleted when
the manager opens. Restores always pass an abstract target with the *current* shardings, which is what
lets a checkpoint written on one mesh be read on another (orbax #648).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from maejax.streams import StreamedBatches, StreamStateHandler, StreamStateRestore, StreamStateSave

ITEMS = ("model", "optimizer", "data_iter", "meta")

# Replicated arrays under 1 MiB per replica are written by one replica instead of being sliced across all:
# each slice shape costs an XLA compile on the first save (about 10 s for a small model on 8 devices),
# for no gain on arrays that small. Large arrays still spread their writes over the replicas.
def _register_array_handler() -> None:
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax warns on every override, also this intended one
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=2**20), override=True)
    finally:
        logging.set_verbosity(verbosity)


_register_array_handler()


def run_checkpoint_dir(workdir: str, ckpt_dir: str | None = None) -> str:
    """Where the training run in `workdir` keeps its checkpoints: `ckpt_dir` when set (e.g. gs://...),
    else `<workdir>/checkpoints`. With ckpt_dir None, the run's own `<workdir>/config.json` says."""
    if ckpt_dir is None:
        path = os.path.join(workdir, "config.json")
        if os.path.isfile(path):
            with open(path) as f:
                ckpt_dir = json.load(f).get("ckpt_dir", "")
    return ckpt_dir or os.path.join(workdir, "checkpoints")


class Checkpoints:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True, cleanup_tmp_directories=True),
            item_names=ITEMS,
            item_handlers={"data_iter": StreamStateHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, *, model_state, optimizer_state, meta: dict[str, Any],
             data_iter: StreamedBatches | None = None, force: bool = False) -> bool:
        """Starts an asynchronous save (returns once the arrays are copied off the devices)."""
        args = dict(model=ocp.args.StandardSave(model_state), optimizer=ocp.args.StandardSave(optimizer_state),
                    meta=ocp.args.JsonSave(meta))
        if data_iter is not None:
            args["data_iter"] = StreamStateSave(data_iter.get_state(), data_iter.num_streams)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, *, model_state, optimizer_state=None,
                data_iter: StreamedBatches | None = None) -> dict[str, Any]:
        """Restores onto the shardings of the given abstract states (and sets `data_iter`'s position).
        Returns a dict of the restored items."""
        args = dict(model=ocp.args.StandardRestore(model_state), meta=ocp.args.JsonRestore())
        if optimizer_state is not None:
            args["optimizer"] = ocp.args.StandardRestore(optimizer_state)
        if data_iter is not None:
            args["data_iter"] = StreamStateRestore(data_iter.streams, data_iter.num_streams)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        if data_iter is not None:
            data_iter.set_state(restored["data_iter"])
        return {k: restored[k] for k in args}

    def meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

