"""How softmax(q k^T / sqrt(d)) v is computed: `config.model.attention`, one key for every attention site.

| value | kernel | platform | sites |
|---|---|---|---|
| `xla` (default; `None` is the same) | `jax.nn.dot_product_attention`, XLA | any | all |
| `cudnn` | cuDNN fused attention via `jax.nn.dot_product_attention` | GPU (bf16/fp16, head dim 8k <= 256) | all |
| `splash` | Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) | TPU | all |

"All sites" are the ViT encoder's and the MAE / CA-MAE decoders' self-attention and the CA-MAE decoder's
cross-attention (queries from the channel layout, keys over all present channels). Every mask these sites
make is a key mask (B, 1, 1, S): padding tokens, the kept-but-hidden slots of a CA-MAE sample with fewer
channels, absent channels in the cross-attention context. The splash kernel takes exactly that as
segment ids (a key whose id differs from the queries' is never attended to), so it serves all three sites;
a mask of any other shape is refused (the model makes none).

The splash kernel needs sequence lengths that are multiples of its 128-token blocks: queries and keys are
zero-padded up to one (the ViT-L/8 decoder's 1,025 tokens run as 1,152), the padded keys masked out and the
padded query rows dropped. Blocks are the largest of 512, 256 and 128 tokens that divide the padded
length (not tuned on a TPU). Under a mesh the kernel runs per shard in `jax.shard_map` (batch over the
mesh axes of "act_batch", heads over those of "act_heads", sequences whole), the one place attention
leaves XLA's automatic partitioning; an axis that does not divide its dimension stays unsplit there.

`check` runs when an attention module is built (model build, `step.setup`, AOT: before anything is traced)
and refuses a kernel the platform cannot run with one line naming the option and the platform. The
platform is that of the active mesh's devices (an AOT compile for a TPU topology on a CPU host is TPU),
else jax's default backend. `tpu_interpret()` runs the splash kernel in Pallas's TPU interpret mode
(`interpret=True`, plain XLA ops) on any platform: the tests compare it with the XLA path on the CPU.
"""
from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("xla", "cudnn", "splash")
DESCRIPTION = {"xla": "XLA dot-product attention", "cudnn": "cuDNN fused attention",
               "splash": "the Pallas TPU splash attention kernel"}
PLATFORMS = {"xla": None, "cudnn": ("gpu",), "splash": ("tpu",)}
HINT = {"cpu": "model.attention=xla", "gpu": "model.attention=cudnn or xla", "tpu": "model.attention=splash or xla"}

_interpret = False


@contextlib.contextmanager
def tpu_interpret():
    """Within: the splash kernel is accepted on any platform and runs in Pallas's TPU interpret mode
    (build and trace the model inside it)."""
    global _interpret
    previous, _interpret = _interpret, True
    try:
        yield
    finally:
        _interpret = previous


def resolve(name: str | None) -> str:
    """The config value -> one of IMPLEMENTATIONS (None and "None" are "xla", today's default)."""
    if name is None or name == "None":
        return "xla"
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={name!r} is not an attention implementation: choose xla (the default; "
                         f"None means the same), cudnn (GPUs) or splash (TPUs)")
    return name


def platform() -> str:
    """The platform programs are built for: the active mesh's devices, else jax's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    name = device.platform if device is not None else jax.default_backend()
    return "gpu" if name in ("cuda", "rocm") else name


def runs_on(name: str | None, where: str | None = None) -> bool:
    """Whether `where` (default: `platform()`) runs the kernel `name` (`state.load_model` falls back to xla,
    the same maths, where it does not)."""
    name = resolve(name)
    where = platform() if where is None else where
    if name == "splash" and _interpret:
        return True
    return PLATFORMS[name] is None or where in PLATFORMS[name]


def check(name: str | None, *, head_dim: int | None = None, dtype: Any = None, where: str | None = None) -> str:
    """The resolved name, or a one-line ValueError naming the option and what it cannot do here."""
    name = resolve(name)
    where = platform() if where is None else where
    if not runs_on(name, where):
        raise ValueError(f"model.attention={name!r} ({DESCRIPTION[name]}) runs on {PLATFORMS[name][0].upper()} "
                         f"only, but this program is built for {where.upper()}: use "
                         f"{HINT.get(where, 'model.attention=xla')}")
    if name == "cudnn":
        if dtype is not None and jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"model.attention='cudnn' needs model.dtype=bfloat16 or float16 (cuDNN fused attention "
                             f"has no {jnp.dtype(dtype).name} kernel); or use model.attention=xla")
        if head_dim is not None and (head_dim % 8 or head_dim > 256):
            raise ValueError(f"model.attention='cudnn' needs a head dim that is a multiple of 8 and at most 256 "
                             f"(cuDNN flash attention), got {head_dim}; or use model.attention=xla")
    return name


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                          implementation: str | None) -> jax.Array:
    """q (B, T, H, D), k and v (B, S, H, D), `mask` boolean broadcastable to (B, H, T, S) (True = may
    attend) -> (B, T, H, D), with `implementation` one of IMPLEMENTATIONS (or None)."""
    name = resolve(implementation)
    if name != "splash":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=name)
    valid = None
    if mask is not None:
        b, s = q.shape[0], k.shape[1]
        if mask.ndim != 4 or mask.shape[1:3] != (1, 1) or mask.shape[3] != s or mask.shape[0] not in (1, b):
            raise ValueError(f"model.attention='splash' takes key masks of shape (B, 1, 1, {s}) only, got a mask of "
                             f"shape {mask.shape}")
        valid = jnp.broadcast_to(mask[:, 0, 0, :].astype(bool), (b, s))
    return _sharded(_splash, q, k, v, valid)


def _sharded(fn, q, k, v, valid):
    """`fn(q, k, v, valid)` per shard of the active mesh: batch over the mesh axes of "act_batch", heads over
    those of "act_heads" (where they divide), sequence and head dim whole. Outside a mesh: `fn` itself."""
    from flax.core import spmd

    from maejax.sharding import logical_spec

    mesh = jax.sharding.get_abstract_mesh()
    rules = spmd.get_logical_axis_rules()
    if mesh.empty or not rules or mesh.size == 1:
        return fn(q, k, v, valid)
    batch_axes, head_axes = logical_spec(("act_batch", "act_heads"))

    def dividing(axes, size):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        names = tuple(a for a in names if a in mesh.axis_names)
        n = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        return (names if len(names) > 1 else names[0]) if names and size % n == 0 else None

    bx, hx = dividing(batch_axes, q.shape[0]), dividing(head_axes, q.shape[2])
    if bx is None and hx is None:
        return fn(q, k, v, valid)
    spec = jax.P(bx, None, hx, None)
    args, specs = (q, k, v), (spec, spec, spec)
    if valid is not None:
        args, specs = args + (valid,), specs + (jax.P(bx, None),)
    return jax.shard_map(lambda *a: fn(*a[:3], a[3] if len(a) > 3 else None), mesh=mesh, in_specs=specs,
                         out_specs=spec, check_vma=False)(*args)


LANES = 128


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _block(n: int) -> int:
    return next(b for b in (512, 256, 128) if n % b == 0)


def _splash_kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    bq, bkv = _block(q_len), _block(kv_len)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    mask = sa.MultiHeadMask([sa.FullMask((q_len, kv_len))] * heads)
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, valid):
    """The splash kernel on (B, T, H, D) q and (B, S, H, D) k, v, keys masked where `valid` (B, S) is False."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, h, d = q.shape
    s = k.shape[1]
    tp, sp = _round_up(t, LANES), _round_up(s, LANES)
    # The kernel has no softmax scale: scale q in float32 (XLA scales the float32 logits).
    q = (q.astype(jnp.float32) * (1.0 / np.sqrt(d))).astype(q.dtype)

    def heads_major(x, n):
        return jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    q, k, v = heads_major(q, tp), heads_major(k, sp), heads_major(v, sp)
    kernel = _splash_kernel(h, tp, sp, _interpret)
    if valid is None and sp == s:
        out = jax.vmap(kernel)(q, k, v)
    else:
        # Segment ids: every query (padded rows too, so no row is fully masked) is 1; keys are 1 where
        # valid, 0 where masked or padded.
        kv_ids = jnp.ones((b, s), jnp.int32) if valid is None else valid.astype(jnp.int32)
        kv_ids = jnp.pad(kv_ids, ((0, 0), (0, sp - s)))
        q_ids = jnp.ones((b, tp), jnp.int32)
        out = jax.vmap(lambda q, k, v, qi, ki: kernel(q, k, v, segment_ids=sa.SegmentIds(qi, ki)))(
            q, k, v, q_ids, kv_ids)
    return out.transpose(0, 2, 1, 3)[:, :t]
