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
from etils import epath

from maejax.streams import StreamedBatches, StreamStateHandler, StreamStateRestore, StreamStateSave

ITEMS = ("model", "optimizer", "data_iter", "meta")


class NoCheckpointError(FileNotFoundError):
    """A run or checkpoint directory that holds no checkpoint to restore or evaluate."""

    def __init__(self, where: str):
        super().__init__(f"no checkpoint in {where} (train first: python -m maejax.train ..., or convert one: "
                         f"python -m maejax.convert ...)")


class CheckpointMismatchError(ValueError):
    """A checkpoint's arrays do not fit the state they are restored into (another architecture or
    optimiser): the one-line message names the checkpoint, the step and the first differing array."""


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

    def step(self, step: int | None = None) -> int:
        """`step`, or the latest when None; NoCheckpointError when the directory holds none."""
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise NoCheckpointError(self.directory)
        return step

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
                data_iter: StreamedBatches | None = None, model_name: str = "this model",
                advice: str = "") -> dict[str, Any]:
        """Restores onto the shardings of the given abstract states (and sets `data_iter`'s position).
        Returns a dict of the restored items. Arrays that do not fit the targets' paths and shapes are a
        CheckpointMismatchError naming `model_name` and ending with `advice` (checked before orbax reads
        anything: its own error is a tree diff of every parameter, or a shape error naming none)."""
        self.check_fits(step, "model", model_state, model_name, advice)
        if optimizer_state is not None:
            self.check_fits(step, "optimizer", optimizer_state, model_name, advice)
        args = dict(model=ocp.args.StandardRestore(model_state), meta=ocp.args.JsonRestore())
        if optimizer_state is not None:
            args["optimizer"] = ocp.args.StandardRestore(optimizer_state)
        if data_iter is not None:
            args["data_iter"] = StreamStateRestore(data_iter.streams, data_iter.num_streams)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        if data_iter is not None:
            data_iter.set_state(restored["data_iter"])
        return {k: restored[k] for k in args}

    def check_fits(self, step: int, item: str, target, model_name: str = "this model", advice: str = "") -> None:
        """Compares the shapes of checkpoint item `item` (from its metadata: nothing is read) with the
        abstract `target`; raises CheckpointMismatchError on the first differing path."""
        try:
            saved_tree = ocp.StandardCheckpointHandler().metadata(
                epath.Path(self.directory) / str(step) / item).tree
        except Exception:  # noqa: BLE001 - no readable metadata: leave the check to orbax's restore
            return
        saved, expected = _shapes(saved_tree), _shapes(target)
        problem = describe_mismatch(saved, expected)
        if problem:
            what = "optimiser state" if item == "optimizer" else "parameter"
            raise CheckpointMismatchError(
                f"checkpoint {self.directory} step {step} does not fit {model_name}: {what} {problem}"
                + (f"; {advice}" if advice else ""))

    def meta(self, step: int | None = None) -> dict[str, Any]:
        return self.manager.restore(self.step(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """{"encoder/blocks/attn/qkv": shape} of a state tree or of a checkpoint's metadata tree (the same
    names for both: dict keys, sequence indices and attributes joined by "/", nnx's trailing "value" dropped)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        if names and names[-1] == "value":
            names = names[:-1]
        out["/".join(names)] = tuple(getattr(leaf, "shape", None) or ())
    return out


def describe_mismatch(saved: dict[str, tuple], expected: dict[str, tuple]) -> str | None:
    """None when `saved` and `expected` ({path: shape}) agree, else a one-line account: the first
    differing path (in path order) with both shapes, how many differ, and the top-level groups when
    those differ (which tells one kind of model from another)."""
    only_saved, only_expected = saved.keys() - expected.keys(), expected.keys() - saved.keys()
    reshaped = {k for k in saved.keys() & expected.keys() if saved[k] != expected[k]}
    bad = sorted(only_saved | only_expected | reshaped)
    if not bad:
        return None
    first = bad[0]
    shape = lambda d: str(d[first]) if first in d else "absent"  # noqa: E731
    text = (f"{first} is {shape(saved)} in the checkpoint but {shape(expected)} here (first of {len(bad)} "
            f"differing arrays: {len(reshaped)} reshaped, {len(only_saved)} only in the checkpoint, "
            f"{len(only_expected)} only here; {len(saved)} saved, {len(expected)} expected)")
    groups = lambda d: sorted({k.split("/")[0] for k in d})  # noqa: E731
    if groups(saved) != groups(expected):
        text += f"; top-level groups: checkpoint {groups(saved)}, here {groups(expected)}"
    return text
