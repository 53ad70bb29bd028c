"""Transformer building blocks with logical axis names on every parameter.

Parameters are float32 (`param_dtype`); matmuls run in the compute `dtype` (bf16 for training at scale),
norms and softmax in float32. Two block types:
- `PreLNBlock`: the standard ViT/MAE block (x + attn(LN(x)); x + mlp(LN(x))), optional LayerScale.
- `ParallelBlock`: ViT-22B / timm `ParallelScalingBlock` as in OpenPhenom: one LN feeding attention (with
  q/k LayerNorm) and the MLP in parallel, x + gamma * (attn + mlp).
`CrossAttention` (queries from one sequence, keys/values from another) serves the CA-MAE decoder.
Attention masks are boolean, broadcastable to (B, heads, T_q, T_kv), True where a key may be attended.
How attention is computed (`BlockConfig.attention`: XLA, cuDNN or the Pallas TPU splash kernel) is
`maejax.models.attention`; each attention module checks at build that the platform runs it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maejax.models import attention as attention_lib
from maejax.sharding import constrain

xavier = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    width: int
    mlp_dim: int
    num_heads: int
    block: str = "pre_ln"            # "pre_ln" | "parallel"
    qkv_bias: bool = True
    qk_norm: bool = False
    layerscale: float | None = None  # initial LayerScale value; None = no LayerScale
    drop_path: float = 0.0
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32         # compute dtype
    param_dtype: Any = jnp.float32
    attention: str | None = None     # maejax.models.attention: None (= "xla") | "cudnn" | "splash"

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


def param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(names))


def layer_norm(dim: int, eps: float, rngs: nnx.Rngs, param_dtype=jnp.float32) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs,
                         scale_metadata={"out_sharding": ("norm",)},
                         bias_metadata={"out_sharding": ("norm",)})


class Dense(nnx.Module):
    """y = x @ W + b with named axes; `in_names`/`out_names` are the logical names of W's two axes."""

    def __init__(self, d_in: int, d_out: int, names: tuple[str, str], *, rngs: nnx.Rngs, use_bias=True,
                 dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=xavier):
        self.kernel = param(rngs, kernel_init, (d_in, d_out), names, param_dtype)
        self.bias = param(rngs, zeros, (d_out,), names[1:], param_dtype) if use_bias else None
        self.dtype = dtype

    def __call__(self, x):
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def drop_path(x: jax.Array, rate: float | jax.Array, key: jax.Array | None) -> jax.Array:
    """Stochastic depth: zero the whole residual branch of a random subset of samples.

    `rate` may be traced (a per-layer rate scanned over the stacked blocks).
    """
    if key is None or (isinstance(rate, (int, float)) and rate == 0.0):
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection laid out (embed, 3, heads, kv).

    The (3, heads, kv) layout keeps each head's q, k and v on the same tensor-parallel shard.
    """

    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
        d, h, hd = cfg.width, cfg.num_heads, cfg.head_dim
        if d % h:
            raise ValueError(f"width {d} is not divisible by num_heads {h}")
        attention_lib.check(cfg.attention, head_dim=hd, dtype=cfg.dtype)
        pd = cfg.param_dtype
        self.qkv = param(rngs, _fan_in_out(xavier, d, 3 * d), (d, 3, h, hd), ("embed", None, "heads", "kv"), pd)
        self.qkv_bias = param(rngs, zeros, (3, h, hd), (None, "heads", "kv"), pd) if cfg.qkv_bias else None
        self.out = param(rngs, _fan_in_out(xavier, d, d), (h, hd, d), ("heads", "kv", "embed"), pd)
        self.out_bias = param(rngs, zeros, (d,), ("norm",), pd)
        self.q_norm = layer_norm(hd, cfg.norm_eps, rngs, pd) if cfg.qk_norm else None
        self.k_norm = layer_norm(hd, cfg.norm_eps, rngs, pd) if cfg.qk_norm else None
        self.cfg = cfg

    def project_qkv(self, y: jax.Array) -> jax.Array:
        dt = self.cfg.dtype
        qkv = jnp.einsum("btd,dshk->btshk", y.astype(dt), self.qkv[...].astype(dt))
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias[...].astype(dt)
        return qkv

    def attend(self, qkv: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """qkv: (B, T, 3, H, hd) -> attention output projected back to (B, T, D)."""
        return attend_heads(self, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask)

    def __call__(self, y: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return self.attend(self.project_qkv(y), mask)


def attend_heads(attn: nnx.Module, q, k, v, mask) -> jax.Array:
    """q (B, T, H, hd), k/v (B, S, H, hd) -> softmax attention, then the output projection of `attn`
    (its `out` (H, hd, D) and `out_bias`, optional `q_norm`/`k_norm`) -> (B, T, D)."""
    dt = attn.cfg.dtype
    if attn.q_norm is not None:
        q = attn.q_norm(q).astype(dt)
        k = attn.k_norm(k).astype(dt)
    q = constrain(q, "act_batch", "act_seq", "act_heads", None)
    a = attention_lib.dot_product_attention(q, k, v, mask, attn.cfg.attention)
    y = jnp.einsum("bthk,hkd->btd", a, attn.out[...].astype(dt))
    return y + attn.out_bias[...].astype(dt)


class CrossAttention(nnx.Module):
    """Queries from `x`, keys and values from `context` (the CA-MAE decoder's channel-to-all attention).

    Separate q (embed, heads, kv) and fused kv (embed, 2, heads, kv) projections, as in maes_microscopy's
    `CrossAttention` (q and kv without bias, output projection with bias).
    """

    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
        d, h, hd = cfg.width, cfg.num_heads, cfg.head_dim
        if d % h:
            raise ValueError(f"width {d} is not divisible by num_heads {h}")
        attention_lib.check(cfg.attention, head_dim=hd, dtype=cfg.dtype)
        pd = cfg.param_dtype
        self.q = param(rngs, _fan_in_out(xavier, d, d), (d, h, hd), ("embed", "heads", "kv"), pd)
        self.kv = param(rngs, _fan_in_out(xavier, d, 2 * d), (d, 2, h, hd), ("embed", None, "heads", "kv"), pd)
        self.q_bias = param(rngs, zeros, (h, hd), ("heads", "kv"), pd) if cfg.qkv_bias else None
        self.kv_bias = param(rngs, zeros, (2, h, hd), (None, "heads", "kv"), pd) if cfg.qkv_bias else None
        self.out = param(rngs, _fan_in_out(xavier, d, d), (h, hd, d), ("heads", "kv", "embed"), pd)
        self.out_bias = param(rngs, zeros, (d,), ("norm",), pd)
        self.q_norm = self.k_norm = None
        self.cfg = cfg

    def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        dt = self.cfg.dtype
        q = jnp.einsum("btd,dhk->bthk", x.astype(dt), self.q[...].astype(dt))
        kv = jnp.einsum("bsd,dehk->bsehk", context.astype(dt), self.kv[...].astype(dt))
        if self.q_bias is not None:
            q = q + self.q_bias[...].astype(dt)
            kv = kv + self.kv_bias[...].astype(dt)
        return attend_heads(self, q, kv[:, :, 0], kv[:, :, 1], mask)


def _fan_in_out(init, fan_in: int, fan_out: int):
    """Initialise a multi-axis kernel as if it were a (fan_in, fan_out) matrix (xavier on the 2-D view)."""
    def f(key, shape, dtype):
        return init(key, (fan_in, fan_out), dtype).reshape(shape)
    return f


class Mlp(nnx.Module):
    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.fc1 = Dense(cfg.width, cfg.mlp_dim, ("embed", "mlp"), **kw)
        self.fc2 = Dense(cfg.mlp_dim, cfg.width, ("mlp", "embed"), **kw)

    def __call__(self, x):
        h = jax.nn.gelu(self.fc1(x), approximate=False)
        h = constrain(h, "act_batch", "act_seq", "act_mlp")
        return self.fc2(h)


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init_value: float, param_dtype=jnp.float32):
        self.gamma = nnx.Param(jnp.full((dim,), init_value, param_dtype), out_sharding=("norm",))

    def __call__(self, x):
        return x * self.gamma[...].astype(x.dtype)


class PreLNBlock(nnx.Module):
    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
        self.norm1 = layer_norm(cfg.width, cfg.norm_eps, rngs, cfg.param_dtype)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = layer_norm(cfg.width, cfg.norm_eps, rngs, cfg.param_dtype)
        self.mlp = Mlp(cfg, rngs=rngs)
        ls = cfg.layerscale
        self.ls1 = LayerScale(cfg.width, ls, cfg.param_dtype) if ls is not None else None
        self.ls2 = LayerScale(cfg.width, ls, cfg.param_dtype) if ls is not None else None
        self.cfg = cfg

    def __call__(self, x, key=None, mask=None, rate=None):
        """`rate`: this layer's stochastic-depth rate (default `cfg.drop_path`); used only with a `key`."""
        rate = self.cfg.drop_path if rate is None else rate
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        a = self.attn(self.norm1(x), mask)
        a = self.ls1(a) if self.ls1 is not None else a
        x = x + drop_path(a, rate, k1).astype(x.dtype)
        m = self.mlp(self.norm2(x))
        m = self.ls2(m) if self.ls2 is not None else m
        x = x + drop_path(m, rate, k2).astype(x.dtype)
        return constrain(x, "act_batch", "act_seq", "act_embed")


class ParallelBlock(nnx.Module):
    """x + gamma * (attn(LN(x)) + mlp(LN(x))), q/k LayerNorm: the OpenPhenom / ViT-22B block."""

    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.in_norm = layer_norm(cfg.width, cfg.norm_eps, rngs, cfg.param_dtype)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_in = Dense(cfg.width, cfg.mlp_dim, ("embed", "mlp"), **kw)
        self.mlp_out = Dense(cfg.mlp_dim, cfg.width, ("mlp", "embed"), **kw)
        self.ls = LayerScale(cfg.width, cfg.layerscale if cfg.layerscale is not None else 1.0, cfg.param_dtype)
        self.cfg = cfg

    def __call__(self, x, key=None, mask=None, rate=None):
        rate = self.cfg.drop_path if rate is None else rate
        y = self.in_norm(x)
        a = self.attn(y, mask)
        m = self.mlp_out(constrain(jax.nn.gelu(self.mlp_in(y), approximate=False), "act_batch", "act_seq", "act_mlp"))
        x = x + drop_path(self.ls(a + m), rate, key).astype(x.dtype)
        return constrain(x, "act_batch", "act_seq", "act_embed")


BLOCKS = {"pre_ln": PreLNBlock, "parallel": ParallelBlock}


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos position table (grid_h*grid_w, dim), raster order, as in MAE and OpenPhenom.

    dim/4 frequencies each for [sin(row), cos(row), sin(col), cos(col)], omega_k = 10000^(-k/(dim/4)).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    f = dim // 4
    omega = 1.0 / 10000 ** (np.arange(f, dtype=np.float64) / f)
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    r = rows.reshape(-1, 1) * omega
    c = cols.reshape(-1, 1) * omega
    return np.concatenate([np.sin(r), np.cos(r), np.sin(c), np.cos(c)], axis=1).astype(np.float32)
