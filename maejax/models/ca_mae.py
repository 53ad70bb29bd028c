"""Channel-agnostic MAE (CA-MAE: Kraus et al., CVPR'24; the architecture of OpenPhenom), with the
ChannelViT and ChAda-ViT options.

Encoder: one p x p x 1 patch projection shared by every channel, tokens laid out
[cls, ch0 (N patches, raster order), ch1, ...], the same 2-D sin-cos table added to every channel's patches
(cls gets none). It therefore takes any number (1..max_channels) and order of channels and, without channel
embeddings, is equivariant to channel permutations. Masking is random over all C x N tokens jointly.

Decoder (`CAMAEDecoder`, maes_microscopy): tokens + sin-cos + a learned token per channel; every channel's
tokens cross-attend to the tokens of all channels (no residual), then + MLP, then pass through that
channel's own transformer stack; one linear head shared by all channels predicts each token's p x p pixels.

Options (model config): `channel_embed` adds a learned embedding per channel identity (ChannelViT);
`channel_sampling="hierarchical"` draws, per sample, k ~ U{1..C} and then k of its channels, the rest
being dropped (ChannelViT's HCS); a batch may also pad channels (ChAda-ViT). Dropped and padded channels
are handled the same way: shapes stay static, and those tokens are left out of attention, pooling and loss.

Batch keys (`loss`):
  image         (B, C, H, W) float32, self-standardised; padded channels hold any finite value (e.g. 0)
  channel_mask  (B, C) bool, optional: True for real channels (default: all)
  channel_ids   (B, C) int32, optional: identity of each channel slot, an index into the training channel
                list (default 0..C-1); picks the channel embedding and the per-channel decoder. Distinct
                within a sample.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from maejax.models import flops, losses
from maejax.models.layers import BlockConfig, CrossAttention, Dense, Mlp, layer_norm, param, sincos_2d
from maejax.models.mae import decoder_block_config, gather_tokens
from maejax.models.vit import Transformer, ViT, ViTConfig, patchify, unpatchify, vit_config

CHANNEL_SAMPLING = ("none", "hierarchical")


def channel_patches(images: jax.Array, p: int) -> jax.Array:
    """(B, C, H, W) -> (B, C * N, p * p): every channel patchified on its own, channel-major."""
    b, c, h, w = images.shape
    x = patchify(images.reshape(b * c, 1, h, w), p)
    return x.reshape(b, c * x.shape[1], p * p)


def channel_images(patches: jax.Array, p: int, channels: int, grid: tuple[int, int]) -> jax.Array:
    """Inverse of `channel_patches`: (B, C * N, p * p) -> (B, C, H, W)."""
    b = patches.shape[0]
    x = unpatchify(patches.reshape(b * channels, -1, p * p), p, 1, grid)
    return x.reshape(b, channels, *x.shape[2:])


class ChannelPatchEmbed(nnx.Module):
    """Shared single-channel patch projection + per-channel copy of the sin-cos table (+ channel embedding)."""

    def __init__(self, cfg: ViTConfig, max_channels: int, channel_embed: bool, *, rngs: nnx.Rngs):
        b = cfg.block
        self.proj = Dense(cfg.patch * cfg.patch, cfg.width, ("patch", "embed"), rngs=rngs, dtype=b.dtype,
                          param_dtype=b.param_dtype)
        self.channel_embed = (param(rngs, nnx.initializers.normal(0.02), (max_channels, cfg.width),
                                    (None, "embed"), b.param_dtype) if channel_embed else None)
        self.patch, self.max_channels = cfg.patch, max_channels

    def __call__(self, images: jax.Array, channel_ids: jax.Array | None = None) -> jax.Array:
        """images (B, C, H, W), 1 <= C <= max_channels -> tokens (B, C * N, D) with positions."""
        b, c, h, w = images.shape
        if not 1 <= c <= self.max_channels:
            raise ValueError(f"this channel-agnostic encoder takes 1 to {self.max_channels} channels, got images "
                             f"of shape {images.shape}")
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
        x = self.proj(channel_patches(images, p)).reshape(b, c, (h // p) * (w // p), -1)
        x = x + jnp.asarray(sincos_2d(h // p, w // p, x.shape[-1]), x.dtype)
        if self.channel_embed is not None:
            ids = default_channel_ids(b, c) if channel_ids is None else channel_ids
            x = x + self.channel_embed[...].astype(x.dtype)[ids][:, :, None, :]
        return x.reshape(b, -1, x.shape[-1])


def default_channel_ids(batch: int, channels: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(channels, dtype=jnp.int32), (batch, channels))


def padded_random_masking(key: jax.Array, valid: jax.Array, ratio: float):
    """MAE masking over the real tokens of each sample when some are padding.

    valid (B, N) bool. Every sample keeps the same static number K = int(N * (1 - ratio)) of token slots
    (padding sorts last), but only the first floor(n_valid * (1 - ratio)) of them are `visible`; the other
    kept slots are attention-masked in the encoder and replaced by mask tokens in the decoder. Returns
    keep (B, K) indices, visible (B, K) bool, mask (B, N) float (1 = real token to reconstruct) and restore
    (B, N). With no padding this is exactly `mae.random_masking`.
    """
    b, n = valid.shape
    num_keep = max(1, int(n * (1 - ratio)))
    noise = jnp.where(valid, jax.random.uniform(key, (b, n)), 2.0)
    shuffle = jnp.argsort(noise, axis=1)
    restore = jnp.argsort(shuffle, axis=1)
    n_visible = jnp.floor(valid.sum(1) * (1 - ratio) + 1e-6).astype(jnp.int32)
    n_visible = jnp.clip(n_visible, 1, num_keep)[:, None]
    visible = jnp.arange(num_keep)[None] < n_visible
    mask = ((restore >= n_visible) & valid).astype(jnp.float32)
    return shuffle[:, :num_keep], visible, mask, restore


def hierarchical_channel_sampling(key: jax.Array, channel_mask: jax.Array) -> jax.Array:
    """ChannelViT's HCS, per sample: k ~ U{1..available}, then k of the available channels uniformly."""
    b, c = channel_mask.shape
    k_count, k_pick = jax.random.split(key)
    available = channel_mask.sum(1)
    k = 1 + jnp.floor(jax.random.uniform(k_count, (b,)) * available).astype(jnp.int32)
    noise = jnp.where(channel_mask, jax.random.uniform(k_pick, (b, c)), 2.0)
    rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
    return rank < k[:, None]


class CAMAEDecoder(nnx.Module):
    """maes_microscopy's `CAMAEDecoder`, plus the encoder->decoder projection and the pixel head.

    Channel slots are scattered to a fixed layout indexed by channel identity (one slot per decoder), so
    a batch mixing channel subsets runs every decoder once as a single batched stack (their parameters
    stacked on a leading axis); absent channels are masked out of the cross-attention context.
    """

    def __init__(self, enc_width: int, block: BlockConfig, depth: int, num_channels: int, cross_heads: int,
                 patch: int, *, rngs: nnx.Rngs, scan_layers: bool = True, remat: str = "none"):
        w, pd = block.width, block.param_dtype
        kw = dict(rngs=rngs, dtype=block.dtype, param_dtype=pd)
        self.embed = Dense(enc_width, w, ("embed", None), **kw)
        self.mask_token = param(rngs, nnx.initializers.normal(0.02), (1, 1, w), (None, None, "norm"), pd)
        self.channel_tokens = param(rngs, nnx.initializers.normal(0.02), (num_channels, w), (None, "norm"), pd)
        self.query_norm = layer_norm(w, block.norm_eps, rngs, pd)
        self.context_norm = layer_norm(w, block.norm_eps, rngs, pd)
        self.out_norm = layer_norm(w, block.norm_eps, rngs, pd)
        self.cross_attention = CrossAttention(dataclasses.replace(block, num_heads=cross_heads, qkv_bias=False,
                                                                  qk_norm=False), rngs=rngs)
        self.mlp = Mlp(block, rngs=rngs)

        @nnx.split_rngs(splits=num_channels)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs):
            return Transformer(block, depth, rngs=rngs, scan_layers=scan_layers, remat=remat)

        self.channel_decoders = make(rngs)
        self.pred = Dense(w, patch * patch, (None, "patch"), **kw)
        self.num_channels, self.depth, self.patch = num_channels, depth, patch

    def __call__(self, x: jax.Array, visible: jax.Array, restore: jax.Array, channel_ids: jax.Array,
                 channel_mask: jax.Array, grid: tuple[int, int], num_prefix: int) -> jax.Array:
        """Encoded kept tokens (B, n0 + K, D_enc) -> predicted pixels (B, C * N, p * p) for every token.

        The class token plays no part (as in the reference, it is kept out of the cross-attention context).
        """
        m = self.num_channels
        b, c = channel_ids.shape
        if c > m:
            raise ValueError(f"the CA-MAE decoder reconstructs at most {m} channels (model.in_channels); "
                             f"got a batch with {c}")
        x = self.embed(x[:, num_prefix:])
        w = x.shape[-1]
        mask_token = self.mask_token[...].astype(x.dtype)
        x = jnp.where(visible[..., None], x, mask_token)
        n = restore.shape[1]
        tokens = gather_tokens(jnp.concatenate([x, jnp.broadcast_to(mask_token, (b, n - x.shape[1], w))], 1),
                               restore)
        per = n // c
        # Slot -> the layout of decoders (index = channel id); padded slots are dropped by the scatter.
        ids = jnp.where(channel_mask, channel_ids, m)
        layout = jax.vmap(lambda z, i: jnp.zeros((m, per, w), z.dtype).at[i].set(z, mode="drop"))(
            tokens.reshape(b, c, per, w), ids)
        present = jax.vmap(lambda v, i: jnp.zeros((m,), bool).at[i].set(v, mode="drop"))(channel_mask, ids)
        layout = (layout + jnp.asarray(sincos_2d(*grid, w), x.dtype)
                  + self.channel_tokens[...].astype(x.dtype)[None, :, None, :])
        layout = layout.reshape(b, m * per, w)
        context_mask = jnp.repeat(present, per, axis=1)[:, None, None, :]
        y = self.cross_attention(self.query_norm(layout), self.context_norm(layout), context_mask)
        y = y + self.mlp(self.out_norm(y))
        y = jnp.swapaxes(y.reshape(b, m, per, w), 0, 1)
        y = nnx.vmap(lambda dec, z: dec(z)[0], in_axes=(0, 0), out_axes=0)(self.channel_decoders, y)
        pixels = self.pred(jnp.swapaxes(y, 0, 1))            # (B, M, N, p*p)
        slots = jnp.clip(channel_ids, 0, m - 1)[:, :, None, None]
        return jnp.take_along_axis(pixels, slots, axis=1).reshape(b, c * per, -1)


class CAMAE(nnx.Module):
    """config keys (model section): the encoder keys of `vit_config`; in_channels (channels reconstructed:
    one decoder each), max_channels (encoder limit, 0 = in_channels), channel_embed, channel_sampling,
    mask_ratio, decoder_width/depth/heads, decoder_norm_eps, cross_attention_heads, fourier_weight,
    norm_pix_loss. decoder_depth=0 builds the encoder alone (inference only, e.g. an imported encoder)."""

    def __init__(self, m: Any, *, rngs: nnx.Rngs):
        self.num_channels = int(m["in_channels"])
        self.max_channels = int(m["max_channels"] or self.num_channels)
        if self.max_channels < self.num_channels:
            raise ValueError(f"model.max_channels={self.max_channels} is below model.in_channels={self.num_channels}")
        self.channel_sampling = m["channel_sampling"]
        if self.channel_sampling not in CHANNEL_SAMPLING:
            raise ValueError(f"model.channel_sampling={self.channel_sampling!r}: choose one of {CHANNEL_SAMPLING}")
        self.enc_cfg = vit_config(m, self.max_channels)
        embed = ChannelPatchEmbed(self.enc_cfg, self.max_channels, bool(m["channel_embed"]), rngs=rngs)
        self.encoder = ViT(self.enc_cfg, rngs=rngs, patch_embed=embed)
        depth = int(m["decoder_depth"])
        self.decoder = CAMAEDecoder(
            self.enc_cfg.width, decoder_block_config(m, self.enc_cfg.block), depth, self.num_channels,
            int(m["cross_attention_heads"]), self.enc_cfg.patch, rngs=rngs,
            scan_layers=self.enc_cfg.scan_layers, remat=self.enc_cfg.remat) if depth else None
        self.mask_ratio = float(m["mask_ratio"])
        self.fourier_weight = float(m["fourier_weight"])
        self.norm_pix_loss = bool(m["norm_pix_loss"])

    def __call__(self, images: jax.Array, key: jax.Array, channel_mask: jax.Array | None = None,
                 channel_ids: jax.Array | None = None):
        """Returns (pred (B, C*N, p*p), target (B, C*N, p*p), mask (B, C*N), channel_mask used (B, C))."""
        if self.decoder is None:
            raise ValueError("this CA-MAE has no decoder (model.decoder_depth=0, e.g. an imported encoder): "
                             "it can embed images but not be trained as an autoencoder")
        b, c, h, w = images.shape
        p = self.enc_cfg.patch
        grid = (h // p, w // p)
        channel_mask = jnp.ones((b, c), bool) if channel_mask is None else channel_mask.astype(bool)
        channel_ids = default_channel_ids(b, c) if channel_ids is None else channel_ids
        k_mask, k_drop, k_channels = jax.random.split(key, 3)
        if self.channel_sampling == "hierarchical":
            channel_mask = hierarchical_channel_sampling(k_channels, channel_mask)
        tokens = self.encoder.patch_embed(images, channel_ids)
        valid = jnp.repeat(channel_mask, grid[0] * grid[1], axis=1)
        keep, visible, mask, restore = padded_random_masking(k_mask, valid, self.mask_ratio)
        x, _ = self.encoder.encode(gather_tokens(tokens, keep), key=k_drop, valid=visible)
        pred = self.decoder(self.encoder.head_input(x), visible, restore, channel_ids, channel_mask, grid,
                            self.encoder.num_prefix)
        target = channel_patches(images, p)
        if self.norm_pix_loss:
            target = losses.normalize_patches(target)
        return pred, target, mask, channel_mask

    def loss(self, batch: dict[str, jax.Array], key: jax.Array):
        images = batch["image"]
        pred, target, mask, channel_mask = self(images, key, batch.get("channel_mask"), batch.get("channel_ids"))
        p, c = self.enc_cfg.patch, images.shape[1]
        grid = (images.shape[2] // p, images.shape[3] // p)
        loss, metrics = losses.reconstruction_loss(pred, target, mask, lambda x: channel_images(x, p, c, grid),
                                                   self.fourier_weight, plane_weights=channel_mask)
        metrics["channels"] = channel_mask.sum(1).mean()
        return loss, metrics

    def embed(self, images: jax.Array, *, channel_mask: jax.Array | None = None,
              channel_ids: jax.Array | None = None, full: bool = False) -> dict[str, jax.Array]:
        """`ViT.embed`'s features (padded channels excluded) plus `channelwise` (B, C * D): the mean of each
        channel's patch tokens after the last block, [ch0 | ch1 | ...] (zeros for padded channels)."""
        b, c = images.shape[:2]
        tokens = self.encoder.patch_embed(images, channel_ids)
        per = tokens.shape[1] // c
        valid = None if channel_mask is None else jnp.repeat(channel_mask.astype(bool), per, axis=1)
        out, x = self.encoder.embed_tokens(tokens, token_weights=valid, valid=valid, full=full)
        channelwise = x[:, self.encoder.num_prefix:].astype(jnp.float32).reshape(b, c, per, -1).mean(2)
        if channel_mask is not None:
            channelwise = channelwise * channel_mask[..., None]
        out["channelwise"] = channelwise.reshape(b, -1)
        return out

    def flops_per_crop(self, height: int, width: int, channels: int | None = None) -> dict[str, float]:
        """Per crop of `channels` (default in_channels) channels. Training: shared patch embedding, encoder
        on the kept C*N*(1-ratio) tokens, decoder (cross-attention over all C*N tokens, MLP, one stack of
        N tokens per channel), x3 for backward. Inference: encoder on all C*N tokens."""
        e, p = self.enc_cfg, self.enc_cfg.patch
        c = self.num_channels if channels is None else channels
        n = (height // p) * (width // p)
        keep = max(1, int(c * n * (1 - self.mask_ratio)))
        embed = flops.dense(c * n, p * p, e.width)
        infer = embed + self.encoder.forward_flops(c * n)
        if self.decoder is None:
            return {"train": float("nan"), "infer": infer}
        d = self.decoder
        dw = d.embed.kernel.shape[1]
        dec_mlp = d.mlp.fc1.kernel.shape[1]
        m = d.num_channels          # every decoder runs, whatever subset of channels a sample has
        decoder = (flops.dense(keep, e.width, dw)
                   + flops.dense(m * n, dw, 3 * dw) + flops.attention(m * n, dw) + flops.dense(m * n, dw, dw)
                   + 2 * flops.dense(m * n, dw, dec_mlp)
                   + m * flops.transformer(n, dw, dec_mlp, d.depth)
                   + flops.dense(m * n, dw, p * p))
        return {"train": 3 * (embed + self.encoder.forward_flops(keep) + decoder), "infer": infer}

