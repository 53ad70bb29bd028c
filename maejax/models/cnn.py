"""Convolutional encoder and U-Net decoder (GroupNorm residual blocks), for MU-Net and the CNN classifier.

Activations are NHWC inside (XLA's preferred convolution layout); models take NCHW images like the ViTs.
GroupNorm, not BatchNorm, so training and inference compute the same function and no batch statistics
travel with the parameters (as in BiT / big_vision CNNs). Variants by string: "M/8" = stage widths of
"M", masking patch 8 (MU-Net; classifiers ignore the patch).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maejax.models import flops
from maejax.models.layers import param

# name: (stage widths, residual blocks per stage). Resolution halves between stages.
CNN_VARIANTS: dict[str, tuple[tuple[int, ...], int]] = {
    "mu": ((32, 64), 1),
    "S": ((32, 64, 128, 256), 2),
    "M": ((64, 128, 256, 512), 2),
    "L": ((128, 256, 512, 1024), 2),
}

he = nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
zeros = nnx.initializers.zeros_init()


def decode_cnn_variant(variant: str, default_patch: int = 8) -> dict:
    """"M/8" -> dict(widths=(64, 128, 256, 512), blocks=2, patch=8); "M" takes `default_patch`."""
    name, _, patch = variant.partition("/")
    if name not in CNN_VARIANTS or (patch and not patch.isdigit()):
        raise ValueError(f"unknown CNN variant {variant!r}: use NAME or NAME/PATCH with NAME in "
                         f"{sorted(CNN_VARIANTS)}, e.g. 'M/8'")
    widths, blocks = CNN_VARIANTS[name]
    return dict(widths=widths, blocks=blocks, patch=int(patch) if patch else default_patch)


class Conv(nnx.Module):
    """k x k convolution, NHWC, SAME padding; kernel (k, k, in, out) with logical names."""

    def __init__(self, d_in: int, d_out: int, k: int, *, rngs: nnx.Rngs, stride: int = 1,
                 names=(None, None, None, "embed")):
        self.kernel = param(rngs, he, (k, k, d_in, d_out), names, jnp.float32)
        self.bias = param(rngs, zeros, (d_out,), ("norm",), jnp.float32)
        self.stride = stride

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(x, self.kernel[...], (self.stride, self.stride), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...]

    def flops(self, h_out: int, w_out: int) -> float:
        k, _, d_in, d_out = self.kernel.shape
        return flops.conv(h_out, w_out, k, d_in, d_out)


def group_norm(width: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    return nnx.GroupNorm(width, num_groups=min(32, width), epsilon=1e-6, rngs=rngs,
                         scale_metadata={"out_sharding": ("norm",)}, bias_metadata={"out_sharding": ("norm",)})


class ResBlock(nnx.Module):
    """x + conv(gelu(GN(conv(gelu(GN(x)))))) (pre-activation residual block)."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.norm1, self.conv1 = group_norm(width, rngs), Conv(width, width, 3, rngs=rngs)
        self.norm2, self.conv2 = group_norm(width, rngs), Conv(width, width, 3, rngs=rngs)

    def __call__(self, x):
        y = self.conv1(jax.nn.gelu(self.norm1(x), approximate=False))
        return x + self.conv2(jax.nn.gelu(self.norm2(y), approximate=False))

    def flops(self, h: int, w: int) -> float:
        return self.conv1.flops(h, w) + self.conv2.flops(h, w)


class ConvEncoder(nnx.Module):
    """Stem 3x3 conv, then per stage `blocks` residual blocks, a 2x2 stride-2 conv between stages."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], blocks: int, *, rngs: nnx.Rngs):
        self.stem = Conv(in_channels, widths[0], 3, rngs=rngs)
        self.stages = nnx.List([nnx.List([ResBlock(w, rngs=rngs) for _ in range(blocks)]) for w in widths])
        self.downs = nnx.List([Conv(a, b, 2, stride=2, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.widths = tuple(widths)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """x (B, H, W, C) -> every stage's output, (B, H / 2^i, W / 2^i, widths[i])."""
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            if i:
                x = self.downs[i - 1](x)
            for block in stage:
                x = block(x)
            outs.append(x)
        return outs

    def flops(self, h: int, w: int) -> float:
        total = self.stem.flops(h, w)
        for i, stage in enumerate(self.stages):
            if i:
                h, w = h // 2, w // 2
                total += self.downs[i - 1].flops(h, w)
            total += sum(block.flops(h, w) for block in stage)
        return total


class ConvDecoder(nnx.Module):
    """U-Net decoder: per stage (deepest first) a 2x upsampling (1x1 conv to 4x width + pixel shuffle,
    i.e. a 2x2 stride-2 transposed conv), concatenation with the encoder's skip, 1x1 conv, residual blocks;
    then GN, GELU and a 1x1 conv to the image channels."""

    def __init__(self, widths: tuple[int, ...], blocks: int, out_channels: int, *, rngs: nnx.Rngs):
        pairs = list(zip(widths[1:], widths[:-1]))[::-1]      # (deeper, shallower)
        self.ups = nnx.List([Conv(a, 4 * b, 1, rngs=rngs) for a, b in pairs])
        self.merges = nnx.List([Conv(2 * b, b, 1, rngs=rngs) for _, b in pairs])
        self.stages = nnx.List([nnx.List([ResBlock(b, rngs=rngs) for _ in range(blocks)]) for _, b in pairs])
        self.norm = group_norm(widths[0], rngs)
        self.head = Conv(widths[0], out_channels, 1, rngs=rngs, names=(None, None, "embed", None))

    def __call__(self, features: list[jax.Array]) -> jax.Array:
        x = features[-1]
        for up, merge, stage, skip in zip(self.ups, self.merges, self.stages, features[-2::-1]):
            x = pixel_shuffle(up(x))
            x = merge(jnp.concatenate([x, skip], axis=-1))
            for block in stage:
                x = block(x)
        return self.head(jax.nn.gelu(self.norm(x), approximate=False))

    def flops(self, h: int, w: int, depth: int) -> float:
        """`h`, `w`: the full resolution; `depth`: number of encoder stages."""
        total = 0.0
        for i, (up, merge, stage) in enumerate(zip(self.ups, self.merges, self.stages)):
            s = depth - 2 - i                       # output resolution level of this stage
            hs, ws = h >> s, w >> s
            total += up.flops(hs // 2, ws // 2) + merge.flops(hs, ws) + sum(b.flops(hs, ws) for b in stage)
        return total + self.head.flops(h, w)


def pixel_shuffle(x: jax.Array) -> jax.Array:
    """(B, H, W, 4C) -> (B, 2H, 2W, C)."""
    b, h, w, c4 = x.shape
    c = c4 // 4
    return x.reshape(b, h, w, 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c)


def stage_features(features: list[jax.Array], full: bool = False) -> dict[str, jax.Array]:
    """Embedding of a conv encoder's stages, in the shape the evaluation expects from every model.

    blocks: (B, stages, max width) global-average-pooled stage outputs, zero-padded to the widest stage
    (zero columns change no cosine similarity and no linear probe); predict / pooled: the last stage's.
    full=True adds `feature_maps`, the stage outputs as NCHW arrays.
    """
    pooled = [f.astype(jnp.float32).mean(axis=(1, 2)) for f in features]
    width = max(p.shape[-1] for p in pooled)
    blocks = jnp.stack([jnp.pad(p, ((0, 0), (0, width - p.shape[-1]))) for p in pooled], axis=1)
    out = {"blocks": blocks, "predict": pooled[-1], "pooled": pooled[-1]}
    if full:
        out["feature_maps"] = tuple(jnp.transpose(f, (0, 3, 1, 2)) for f in features)
    return out
