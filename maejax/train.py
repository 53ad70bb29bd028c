"""Trainer: one functional loop for every model, on any mesh.

  python -m maejax.train --config configs/mae_synthetic.py:preset=demo --workdir runs/demo \
      [--config.data.dir=DATASET] [--config.total_steps=2000] [--config.mesh.fsdp=8]

Resumes from the latest checkpoint in `<workdir>/checkpoints` (same data order, same RNG).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from maejax import optim, sharding as shd, state as state_lib
from maejax.checkpoint import Checkpoints
from maejax.metrics import MetricWriter


class NonFiniteError(FloatingPointError):
    """The loss or the gradient became NaN/Inf; the last good checkpoint is left in place."""


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict[str, Any]:
    """Trains `config` in `workdir`; returns the last logged metrics.

    `stop_after` ends the run after that many steps in total (a checkpoint is saved there), as if the
    job had been preempted: tests use it to check that resuming gives the same losses.
    """
    from maejax import input_pipeline  # deferred: grain is heavy to import and eval jobs do not need it

    os.makedirs(workdir, exist_ok=True)
    total = int(config.total_steps)

    # ----------------------------------------------------------------------------------------------------
    # Mesh
    # ----------------------------------------------------------------------------------------------------
    mesh = shd.make_mesh(dict(config.mesh))
    rules = shd.rules_from_config(config.sharding_rules)
    dp = shd.data_parallel_size(mesh)
    batch = int(config.data.batch_size)
    if batch % dp:
        raise ValueError(f"data.batch_size={batch} is not divisible by the data-parallel size {dp} "
                         f"(mesh {dict(mesh.shape)})")
    if batch % jax.process_count():
        raise ValueError(f"data.batch_size={batch} is not divisible by the {jax.process_count()} processes")

    # ----------------------------------------------------------------------------------------------------
    # Input pipeline
    # ----------------------------------------------------------------------------------------------------
    data_iter = input_pipeline.make_train_iterator(
        config.data.dir, batch_size=batch, crop_size=config.data.crop_size, seed=config.seed,
        num_workers=config.data.workers, flip=config.data.flip, rot90=config.data.rot90,
        num_channels=config.model.in_channels)
    batch_sh = {"image": shd.batch_sharding(mesh, 4), "label": shd.batch_sharding(mesh, 1)}

    def to_global(b):
        return {k: jax.make_array_from_process_local_data(s, np.asarray(b[k])) for k, s in batch_sh.items()}

    # ----------------------------------------------------------------------------------------------------
    # Model and optimiser
    # ----------------------------------------------------------------------------------------------------
    tx = optim.make(config.optim, total)
    lr_schedule = optim.schedule(config.optim, total)
    sharded = state_lib.abstract(config.model, mesh, rules, seed=config.seed, tx=tx)
    ckpts = Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.keep_ckpts)
    start = ckpts.latest_step() or 0
    if start:
        restored = ckpts.restore(start, model_state=sharded.model_abstract, optimizer_state=sharded.opt_abstract,
                                 data_iter=data_iter)
        model_state, opt_state = restored["model"], restored["optimizer"]
        print(f"Resumed from {ckpts.directory} at step {start}", flush=True)
    else:
        model_state, opt_state = state_lib.initialize(config.model, mesh, rules, sharded, seed=config.seed, tx=tx)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))
    n_params = sum(x.size for x in jax.tree.leaves(sharded.model_abstract))
    print(f"{config.model.name} {config.model.variant}: {n_params / 1e6:.2f}M parameters on mesh "
          f"{dict(mesh.shape)} ({jax.device_count()} {jax.devices()[0].platform} devices)", flush=True)

    # ----------------------------------------------------------------------------------------------------
    # Train step
    # ----------------------------------------------------------------------------------------------------
    base_key = jax.random.key(config.seed)

    def train_step(model_state, opt_state, batch, step):
        model = nnx.merge(sharded.model_def, model_state)
        opt = nnx.merge(sharded.opt_def, opt_state)
        key = jax.random.fold_in(base_key, step)
        (loss, metrics), grads = nnx.value_and_grad(lambda m: m.loss(batch, key), has_aux=True)(model)
        grad_norm = optax.tree.norm(grads)
        opt.update(model, grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step leaves the state untouched; the host stops the run when it sees the flag.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        metrics = dict(metrics, grad_norm=grad_norm, lr=lr_schedule(step), finite=finite.astype(jnp.float32))
        return keep(nnx.state(model), model_state), keep(nnx.state(opt), opt_state), metrics

    with shd.activate(mesh, rules):
        p_step = jax.jit(train_step,
                         in_shardings=(sharded.model_shardings, sharded.opt_shardings, batch_sh, None),
                         out_shardings=(sharded.model_shardings, sharded.opt_shardings, None),
                         donate_argnums=(0, 1))

    # ----------------------------------------------------------------------------------------------------
    # Train loop
    # ----------------------------------------------------------------------------------------------------
    writer = MetricWriter(workdir, total)
    end = total if stop_after is None else min(total, stop_after)
    pending: list[dict[str, jax.Array]] = []
    last: dict[str, Any] = {}
    t_log, steps_since_log = time.time(), 0

    def meta(step):
        return {"step": step, "config": json.loads(config.to_json())}

    with shd.activate(mesh, rules):
        for step in range(start, end):
            b = to_global(next(data_iter))
            model_state, opt_state, metrics = p_step(model_state, opt_state, b, step)
            pending.append(metrics)
            steps_since_log += 1
            done = step + 1
            log_now = done % config.log_every == 0 or done == end
            ckpt_now = done % config.ckpt_every == 0 or done == end
            if log_now or ckpt_now:
                rows = jax.device_get(pending)
                pending = []
                _check_finite(rows, done - len(rows))
                dt = time.time() - t_log
                last = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "finite"}
                last["lr"] = float(rows[-1]["lr"])
                last["step_time_s"] = dt / steps_since_log
                last["examples_per_s"] = batch * steps_since_log / dt
                writer.write(done, last)
                writer.progress(done, last)
                t_log, steps_since_log = time.time(), 0
            if ckpt_now:
                ckpts.save(done, model_state=model_state, optimizer_state=opt_state, data_iter=data_iter,
                           meta=meta(done), force=True)
    ckpts.close()
    writer.close()
    return last


def _check_finite(rows: list[dict[str, np.ndarray]], first_step: int) -> None:
    for i, r in enumerate(rows):
        if not r["finite"]:
            raise NonFiniteError(
                f"non-finite loss or gradient at step {first_step + i + 1} (loss={float(r['loss'])}, "
                f"grad_norm={float(r['grad_norm'])}); stopped without saving, the last good checkpoint is kept")


def main(argv) -> None:
    del argv
    train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (FILE.py[:ARG]).", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
