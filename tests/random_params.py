"""Tiny models with random parameters drawn by numpy, for tests.

NNX's eager construction compiles every initializer op (seconds per model on a busy 2-core machine); here
the model is built abstractly and its parameters filled on the host, so a test pays only for the
computations it checks.
"""
import jax
import numpy as np
from flax import nnx

from maejax.models import build

UNIT_SCALE = {"scale", "gamma"}     # LayerNorm / GroupNorm scales and LayerScale: around 1


def random_model(model_cfg, seed: int = 0) -> nnx.Module:
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: build(model_cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def draw(path, x):
        noise = rng.standard_normal(x.shape).astype(x.dtype)
        name = str(getattr(path[-1], "key", path[-1]))
        return 1.0 + 0.1 * noise if name in UNIT_SCALE else 0.05 * noise

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))
