"""Analytic parameter and FLOP counts (a multiply-add is 2 FLOPs; model FLOPs, so rematerialisation is not
counted; training = forward + backward = 3 x forward). Used for MFU and the scaling-curve x axis.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx


def dense(tokens: int, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def attention(tokens: int, width: int, kv_tokens: int | None = None) -> float:
    """Scores (q.k) and the weighted sum of values, all heads together (non-causal)."""
    kv = tokens if kv_tokens is None else kv_tokens
    return 4.0 * tokens * kv * width


def block(tokens: int, width: int, mlp_dim: int) -> float:
    """One transformer block (pre-LN or parallel: same matmuls): qkv, attention, out-projection, MLP."""
    return (dense(tokens, width, 3 * width) + attention(tokens, width) + dense(tokens, width, width)
            + 2 * dense(tokens, width, mlp_dim))


def transformer(tokens: int, width: int, mlp_dim: int, depth: int) -> float:
    return depth * block(tokens, width, mlp_dim)


def count_params(model_cfg: Any) -> int:
    """Exact parameter count from an abstract model (nothing is allocated, so ViT-G is instant)."""
    from maejax import models   # local: models imports this module
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: models.build(model_cfg, nnx.Rngs(0)))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


def xla_flops(fn, *args) -> float:
    """FLOPs XLA counts for `fn(*args)` (cost analysis of the compiled program), to check the analytic ones."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])
