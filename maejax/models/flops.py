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


def conv(h_out: int, w_out: int, k: int, d_in: int, d_out: int) -> float:
    """A k x k convolution producing an h_out x w_out map (SAME padding: every tap counted)."""
    return 2.0 * h_out * w_out * k * k * d_in * d_out


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


def abstract_model(model_cfg: Any) -> nnx.Module:
    """The model with ShapeDtypeStructs for parameters: shapes and analytic FLOPs without allocating anything."""
    from maejax import models   # local: models imports this module
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: models.build(model_cfg, nnx.Rngs(0)))


def param_count(module: nnx.Module) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def count_params(model_cfg: Any) -> int:
    """Exact parameter count from an abstract model (nothing is allocated, so ViT-G is instant)."""
    return param_count(abstract_model(model_cfg))


def xla_flops(fn, *args, compiled: bool = False) -> float:
    """FLOPs XLA's cost analysis counts for `fn(*args)`, to check the analytic ones.

    By default the lowered (unoptimised) program is analysed, which needs no compilation; loops (scan) are
    counted once, so check with unrolled layers. XLA also counts elementwise operations (norms,
    activations, softmax), which the analytic model FLOPs leave out.
    """
    lowered = jax.jit(fn).lower(*args)
    cost = lowered.compile().cost_analysis() if compiled else lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])
