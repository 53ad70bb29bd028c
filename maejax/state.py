"""Model and optimiser state on a mesh: abstract shapes and shardings first, then a jitted init that
materialises every parameter directly in its shard (nothing is built on the host), or a restore.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from maejax import models, sharding as shd
from maejax.models import attention
from maejax.checkpoint import Checkpoints
from maejax.config import complete


@dataclasses.dataclass
class StateLayout:
    """The layout of the model and optimiser state, with no array in it: graph definitions plus abstract
    states (ShapeDtypeStructs carrying their shardings)."""
    model_def: Any
    model_abstract: Any
    opt_def: Any = None
    opt_abstract: Any = None

    @property
    def model_shardings(self):
        return jax.tree.map(lambda x: x.sharding, self.model_abstract)

    @property
    def opt_shardings(self):
        return jax.tree.map(lambda x: x.sharding, self.opt_abstract)

    def abstract_model(self) -> nnx.Module:
        """The model with shape-only parameters: enough for `flops_per_crop` and other shape queries."""
        return nnx.merge(self.model_def, self.model_abstract)


def _constructor(model_cfg, seed: int, tx: optax.GradientTransformation | None) -> Callable:
    def init():
        model = models.build(model_cfg, nnx.Rngs(seed))
        if tx is None:
            return (model,)
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)
    return init


def abstract(model_cfg, mesh: Mesh, rules, *, seed: int = 0,
             tx: optax.GradientTransformation | None = None) -> StateLayout:
    """Shapes and shardings of the model (and optimiser), without allocating anything."""
    init = _constructor(model_cfg, seed, tx)
    with shd.activate(mesh, rules):
        built = nnx.eval_shape(init)
        defs_states = [nnx.split(x) for x in built]
        with_sh = [(d, _with_shardings(s, mesh)) for d, s in defs_states]
    for (_, s), what in zip(with_sh, ("parameter", "optimizer state")):
        shd.check_divisible(s, mesh, what)
    if tx is None:
        return StateLayout(*with_sh[0])
    return StateLayout(*with_sh[0], *with_sh[1])


def _with_shardings(state, mesh):
    shardings = nnx.get_named_sharding(state, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def initialize(model_cfg, mesh: Mesh, rules, layout: StateLayout, *, seed: int = 0,
               tx: optax.GradientTransformation | None = None, compiler_options: dict[str, Any] | None = None):
    """Materialises fresh parameters (and optimiser state) directly with their shardings."""
    init = _constructor(model_cfg, seed, tx)
    out_sh = (layout.model_shardings,) if tx is None else (layout.model_shardings, layout.opt_shardings)
    with shd.activate(mesh, rules):
        p_init = jax.jit(lambda: tuple(nnx.state(x) for x in init()), out_shardings=out_sh)
        states = p_init.lower().compile(compiler_options=compiler_options)()
    return states if tx is not None else states[0]


def load_model(checkpoint_dir: str, *, step: int | None = None, mesh: Mesh | None = None, rules=None):
    """Restores a trained model for inference onto whatever devices exist (default: all, data-parallel on
    the mesh axes the run's rules put a batch on: `sharding.batch_mesh`).

    Returns (model, config, step). The config is the one the model was trained with (stored in `meta`),
    with base()'s defaults for keys added since (`config.complete`), and `model.attention` set to `xla` where
    these devices cannot run the kernel it was trained with (`models.attention.runs_on`).
    """
    ckpts = Checkpoints(checkpoint_dir)
    try:
        step = ckpts.step(step)
        config = complete(ckpts.meta(step)["config"])
        rules = rules if rules is not None else shd.rules_from_config(config.sharding_rules)
        mesh = mesh if mesh is not None else shd.batch_mesh(rules)
        # An attention kernel these devices lack (splash off a TPU, cuDNN off a GPU): XLA's, the same maths.
        if not attention.runs_on(config.model.attention, mesh.devices.flat[0].platform):
            config.model.attention = "xla"
        layout = abstract(config.model, mesh, rules, seed=config.seed)
        # A checkpoint whose arrays another kind of model wrote (its meta config edited or copied, or model
        # code and config defaults changed since it was trained): one line naming both, not a tree diff.
        restored = ckpts.restore(
            step, model_state=layout.model_abstract,
            model_name=f"the {config.model.name} {config.model.variant} model its stored config describes",
            advice="its arrays were written by another model than its meta config says (model code or config "
                   "defaults changed since it was trained, or the checkpoint or its meta was copied from "
                   "another run); evaluate it with the code and config it was trained with")
    finally:
        ckpts.close()
    with shd.activate(mesh, rules):
        model = nnx.merge(layout.model_def, restored["model"])
    return model, config, step
