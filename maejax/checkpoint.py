"""Orbax checkpoints: model, optimiser and data-iterator state plus a JSON `meta` (step, config).

Items are separate so that an eval job restores the model alone. Saves are asynchronous; orbax writes into
a temporary directory and renames it when complete, so a save cut off half-way is never taken as a checkpoint.
Restores always pass an abstract target with the *current* shardings, which is what lets a checkpoint
written on one mesh be read on another (orbax #648).
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

ITEMS = ("model", "optimizer", "data_iter", "meta")


class Checkpoints:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
            item_names=ITEMS,
            item_handlers={"data_iter": grain.checkpoint.CheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, *, model_state, optimizer_state, meta: dict[str, Any], data_iter=None,
             force: bool = False) -> bool:
        args = dict(model=ocp.args.StandardSave(model_state), optimizer=ocp.args.StandardSave(optimizer_state),
                    meta=ocp.args.JsonSave(meta))
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, *, model_state, optimizer_state=None, data_iter=None) -> dict[str, Any]:
        """Restores onto the shardings of the given abstract states. Returns a dict of the restored items."""
        args = dict(model=ocp.args.StandardRestore(model_state), meta=ocp.args.JsonRestore())
        if optimizer_state is not None:
            args["optimizer"] = ocp.args.StandardRestore(optimizer_state)
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
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


def abstract_like(state):
    """ShapeDtypeStructs carrying the shardings of `state` (a pytree of arrays or of ShapeDtypeStructs)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
