"""The train step, jitted once for a mesh: gradients (optionally accumulated over microbatches with
lax.scan), the optimiser update (global-norm clipping, masked weight decay), a guard that leaves the state
untouched when the loss or gradient is not finite, and the step's metrics.

Parameters and optimiser state stay float32 (master weights); the model computes in `model.dtype`.
`setup(config, devices)` sets a config's step up (mesh, rules, batch check, optimiser, abstract state,
shardings, jit) for the trainer, the ahead-of-time compiler (maejax.aot) and the throughput benchmark.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from maejax import optim, sharding as shd, state as state_lib
from maejax.config import check_known
from maejax.state import StateLayout

BATCH_KEYS = {"image": 4, "label": 1}  # what the step reads from a batch, with its rank
# ... and a channel-agnostic model (ca_mae) also: each image channel's vocabulary id, and which are real
CHANNEL_KEYS = {"channel_ids": 2, "channel_mask": 2}


def batch_keys(config: ml_collections.ConfigDict) -> dict[str, int]:
    return {**BATCH_KEYS, **(CHANNEL_KEYS if config.model.name == "ca_mae" else {})}


def batch_shardings(mesh: Mesh, rules, keys: dict[str, int] = BATCH_KEYS) -> dict[str, NamedSharding]:
    return {k: shd.batch_sharding(mesh, rules, ndim) for k, ndim in keys.items()}


def abstract_batch(config: ml_collections.ConfigDict, shardings: dict[str, NamedSharding],
                   channels: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as ShapeDtypeStructs with `shardings` (`batch_shardings`), for ahead-of-time lowering;
    `channels` per image (default model.in_channels)."""
    b, s = int(config.data.batch_size), int(config.data.crop_size)
    c = int(channels or config.model.in_channels)
    shapes = {"image": ((b, c, s, s), jnp.float32), "label": ((b,), jnp.int32),
              "channel_ids": ((b, c), jnp.int32), "channel_mask": ((b, c), jnp.bool_)}
    return {k: jax.ShapeDtypeStruct(*shapes[k], sharding=sh) for k, sh in shardings.items()}


def device_batch(shapes: dict[str, jax.ShapeDtypeStruct], seed: int = 0) -> dict[str, jax.Array]:
    """A batch of `abstract_batch`'s shapes on its shardings, for benchmarks: standard-normal images, label 0,
    every channel real (channel_mask True) with ids 0..C-1."""
    rng = np.random.default_rng(seed)
    b, c = shapes["image"].shape[:2]
    values = {"image": lambda: rng.standard_normal(shapes["image"].shape, np.float32),
              "label": lambda: np.zeros((b,), np.int32),
              "channel_ids": lambda: np.broadcast_to(np.arange(c, dtype=np.int32), (b, c)).copy(),
              "channel_mask": lambda: np.ones((b, c), bool)}
    return {k: jax.device_put(values[k](), sh.sharding) for k, sh in shapes.items()}


def check_batch(config: ml_collections.ConfigDict, mesh) -> None:
    """The global batch (and each microbatch) must split evenly over the data-parallel devices (the mesh
    axes the config's rules put the batch on) and the processes; checked before anything is built."""
    batch, accum = int(config.data.batch_size), int(config.optim.grad_accum_steps)
    rules = shd.rules_from_config(config.sharding_rules)
    dp = shd.data_parallel_size(mesh, rules)
    if accum < 1 or batch % accum:
        raise ValueError(f"data.batch_size={batch} is not divisible by optim.grad_accum_steps={accum}")
    if (batch // accum) % dp:
        what = (f"microbatch {batch // accum} (data.batch_size / optim.grad_accum_steps)" if accum > 1
                else f"data.batch_size={batch}")
        axes = " x ".join(shd.batch_axes(rules)) or "no axis"
        raise ValueError(f"{what} is not divisible by the data-parallel size {dp} = {axes} (the sharding rule "
                         f"of {shd.BATCH}) of the mesh {dict(mesh.shape)}")
    if batch % jax.process_count():
        raise ValueError(f"data.batch_size={batch} is not divisible by the {jax.process_count()} processes")


def split_microbatches(x: jax.Array, steps: int) -> jax.Array:
    """(B, ...) -> (steps, B/steps, ...) with microbatch j = rows j, j+steps, ...: every device keeps its own
    rows (a (B/steps, steps) reshape does not cross shard boundaries), so each microbatch stays spread
    over all data-parallel devices."""
    x = x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)
    return shd.constrain(x, None, shd.BATCH, *([None] * (x.ndim - 2)))


def constrain_like_params(tree):
    """Constrains each nnx.Variable of `tree` (e.g. gradients) to its parameter's logical sharding, so a
    gradient accumulator is sharded like the parameters instead of whatever XLA picks for a scan carry."""
    def constrain(v):
        names = v.get_metadata().get("out_sharding")
        return v.replace(shd.constrain(v.get_value(), *names)) if names else v
    return jax.tree.map(constrain, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def loss_and_grads(model: nnx.Module, batch: dict[str, jax.Array], key: jax.Array, steps: int = 1):
    """Mean loss metrics and gradients w.r.t. the model's nnx.Param over `steps` microbatches.

    Microbatch j draws its randomness from fold_in(key, j); the gradients are summed in float32 (the
    parameters' dtype) inside a lax.scan, so only one microbatch's activations are alive at a time.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p, b, k):
        return nnx.merge(graphdef, p, rest).loss(b, k)

    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    if steps == 1:
        (_, metrics), grads = value_and_grad(params, batch, key)
        return metrics, grads

    micro = {k: split_microbatches(v, steps) for k, v in batch.items()}

    def body(acc, j):
        mb = jax.tree.map(lambda x: x[j], micro)
        (_, metrics), grads = value_and_grad(params, mb, jax.random.fold_in(key, j))
        acc_metrics, acc_grads = jax.tree.map(jnp.add, acc, (metrics, grads))
        return (acc_metrics, constrain_like_params(acc_grads)), None

    (_, metrics), grads = jax.eval_shape(value_and_grad, params, jax.tree.map(lambda x: x[0], micro), key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (metrics, grads))
    zeros = (zeros[0], constrain_like_params(zeros[1]))
    (metrics, grads), _ = jax.lax.scan(body, zeros, jnp.arange(steps))
    return jax.tree.map(lambda x: x / steps, (metrics, grads))


def make_train_step(layout: StateLayout, config: ml_collections.ConfigDict,
                    lr_schedule: optax.Schedule) -> Callable:
    """(model_state, opt_state, batch, step) -> (model_state, opt_state, metrics). The step's key is
    fold_in(seed, step), so a resumed run draws the same masks as an uninterrupted one."""
    seed, accum = int(config.seed), int(config.optim.grad_accum_steps)

    def train_step(model_state, opt_state, batch, step):
        model = nnx.merge(layout.model_def, model_state)
        opt = nnx.merge(layout.opt_def, opt_state)
        key = jax.random.fold_in(jax.random.key(seed), step)  # made while tracing: no eager op on the mesh
        metrics, grads = loss_and_grads(model, batch, key, accum)
        grad_norm = optax.tree.norm(grads)
        opt.update(model, grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        # A non-finite step leaves the state untouched; the host stops the run when it sees the flag.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        metrics = dict(metrics, grad_norm=grad_norm, lr=lr_schedule(step), finite=finite.astype(jnp.float32))
        return keep(nnx.state(model), model_state), keep(nnx.state(opt), opt_state), metrics

    return train_step


STEP_ARG = jax.ShapeDtypeStruct((), jnp.int32)  # the step number, as the compiled step expects it


@dataclasses.dataclass
class TrainSetup:
    """A config's train step on a set of devices, set up without computing anything (`setup`): the mesh and
    rules, the optimiser and its schedule, the abstract model and optimiser state with their shardings,
    the batch's shardings, and the step jitted with explicit in/out shardings (the model and optimiser
    states donated). The trainer, maejax.aot and benchmarks/train_throughput all start here."""
    config: ml_collections.ConfigDict
    mesh: Mesh
    rules: tuple
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    layout: StateLayout
    batch_shardings: dict[str, NamedSharding]
    jitted: Callable      # (model_state, opt_state, batch, step) -> (model_state, opt_state, metrics)
    channel_slots: int    # channels of a batch image (model.in_channels, or a mixture's largest dataset's)

    def activate(self):
        """The mesh and rules context every program of this step is traced and run under."""
        return shd.activate(self.mesh, self.rules)

    @property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.layout.model_abstract))

    @property
    def flops_per_example(self) -> float:
        """Analytic model FLOPs of one training crop (forward and backward), for MFU."""
        crop = int(self.config.data.crop_size)
        extra = {"channels": self.channel_slots} if self.config.model.name == "ca_mae" else {}
        return self.layout.abstract_model().flops_per_crop(crop, crop, **extra)["train"]

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        return abstract_batch(self.config, self.batch_shardings, self.channel_slots)

    def compile(self):
        """Lowers and compiles the step once for the abstract state and batch (no device memory is touched);
        `describe_memory` of the result is its per-device memory."""
        with self.activate():
            return self.jitted.lower(self.layout.model_abstract, self.layout.opt_abstract, self.abstract_batch(),
                                     STEP_ARG).compile(compiler_options=compiler_options(self.config))

    def initialize(self):
        """Fresh (model_state, opt_state), materialised directly in their shards."""
        return state_lib.initialize(self.config.model, self.mesh, self.rules, self.layout, seed=self.config.seed,
                                    tx=self.tx, compiler_options=compiler_options(self.config))


def setup(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None,
          channel_slots: int | None = None) -> TrainSetup:
    """Checks the config (keys, mesh, batch split, parameter shardings: errors that name the setting) and
    sets its train step up on `devices` (default: all) for batches of `channel_slots` channels (default
    model.in_channels; the trainer's `input_pipeline.TrainData.channel_slots`). Nothing is allocated or
    compiled."""
    check_known(config)
    mesh = shd.make_mesh(dict(config.mesh), devices)
    rules = shd.rules_from_config(config.sharding_rules)
    check_batch(config, mesh)
    total = int(config.total_steps)
    tx, lr_schedule = optim.make(config.optim, total), optim.schedule(config.optim, total)
    layout = state_lib.abstract(config.model, mesh, rules, seed=config.seed, tx=tx)
    batch_sh = batch_shardings(mesh, rules, batch_keys(config))
    with shd.activate(mesh, rules):
        jitted = jax.jit(make_train_step(layout, config, lr_schedule),
                         in_shardings=(layout.model_shardings, layout.opt_shardings, batch_sh, None),
                         out_shardings=(layout.model_shardings, layout.opt_shardings, None),
                         donate_argnums=(0, 1))
    return TrainSetup(config, mesh, rules, tx, lr_schedule, layout, batch_sh, jitted,
                      int(channel_slots or config.model.in_channels))


def compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """XLA options the config asks for (`xla_backend_optimization_level`), for every program it compiles."""
    level = int(config.xla_backend_optimization_level)
    return {"xla_backend_optimization_level": level} if level >= 0 else None


def step_arg(step: int) -> np.ndarray:
    return np.asarray(step, np.int32)


def describe_memory(compiled) -> dict[str, Any]:
    """Per-device memory of a compiled program (bytes): arguments, outputs, temporaries, their peak.

    Donated arguments alias outputs, so the peak is arguments + temporaries + outputs not aliased.
    """
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
           "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes,
           "code": m.generated_code_size_in_bytes}
    out["peak"] = out["argument"] + out["temp"] + out["output"] - out["alias"]
    return out


def format_bytes(nbytes: float, scale: float | None = None) -> str:
    """"1.23 GiB" or "45.67 MiB": GiB where `scale` (default `nbytes`) reaches a GiB."""
    return (f"{nbytes / 2**30:.2f} GiB" if (nbytes if scale is None else scale) >= 2**30
            else f"{nbytes / 2**20:.2f} MiB")


def format_memory(mem: dict[str, Any]) -> str:
    if not mem:
        return "not reported by this backend"
    size = lambda k: format_bytes(mem[k], mem["peak"])   # one unit for every part
    return (f"peak {size('peak')} = arguments {size('argument')} + temporaries {size('temp')} + outputs "
            f"{size('output')} - aliased (donated) {size('alias')}")
