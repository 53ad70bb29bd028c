"""Import released weights as maejax checkpoints.

  python -m maejax.convert openphenom --weights SNAPSHOT_DIR_OR_FILE --workdir runs/openphenom
  python -m eval.job --workdir runs/openphenom --dataset DATASET      # every block of the model

`--weights` is the Hugging Face snapshot folder (`model.safetensors` + `config.json`) or the weights file
itself. A file that cannot be read (empty, truncated, random bytes, a damaged header, a tensor missing) is a
one-line error that names it and says what is wrong, with exit status 2 and nothing written.

OpenPhenom / maes_microscopy (CA-MAE, timm `ParallelScalingBlock`) -> a `ca_mae` model with parallel
blocks, written as a run directory like the trainer's: `<workdir>/config.json` and the checkpoint (orbax,
step 0, its config also in `meta`) in `<workdir>/checkpoints`, where `eval.job` looks for it;
`maejax.state.load_model(<workdir>/checkpoints)` restores it and `eval.embed_arrays --workdir <workdir>`
embeds arrays with it. (`--out DIR`, deprecated, writes the checkpoint directory
itself with its config.json, as earlier versions did.)

The snapshot's `config.json` (maes_microscopy's `MAEConfig`, `model_type` "MAE"), where present, gives the
decoder's head count (`decoder.num_heads`) and the mask ratio; it is recorded in the checkpoint's meta.
Everything else comes from the tensors: Hugging Face's `MAEModel` builds its architecture in code, not
from config.json (whose decoder sizes may disagree with the weights), so the tensors are what is true.
A config.json beside a weights *file* is read only when it is such a config.

The file format is decided from the first bytes, never the name (maes_microscopy's `save_pretrained`
writes a torch zip pickle into `model.safetensors`): `PK\\x03\\x04` is a torch zip pickle holding
`{"state_dict": ...}` (read with `torch.load(weights_only=True)` where PyTorch is installed, else with
`maejax.torch_pickle`, which accepts the same objects and needs no torch); an 8-byte
little-endian length followed by `{` is safetensors. Keys may carry the full-model prefix `encoder.` or
not. Width, depth, heads (from the q_norm size = head dim), MLP width, patch size, the maximum channel count
and the tokens per channel (from the period of the stored sin-cos table) are read off the tensors, so the
real ViT-S/16 and smaller models of the same layout convert alike. When the file also holds the
CAMAEDecoder (`decoder.*`, `encoder_decoder_proj.*`, `decoder_pred.*`), it is converted too; its head
counts and LayerNorm eps cannot be read off the tensors and are options (defaults: OpenPhenom's).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from maejax import config as config_lib, flags, torch_pickle
from maejax.checkpoint import Checkpoints
from maejax.models import flops
from maejax.models.layers import sincos_2d
from maejax.models.vit import VARIANTS

TORCH_ZIP_MAGIC = b"PK\x03\x04"
HF_WEIGHTS_NAME = "model.safetensors"        # the file in a Hugging Face snapshot folder
HF_CONFIG_NAME = "config.json"               # its MAEConfig
HF_MODEL_TYPE = "MAE"
OPENPHENOM_DECODER_HEADS = 16                # HF MAEModel's CAMAEDecoder(num_heads=16)
REDOWNLOAD = "download or copy it again"
ENCODER_PREFIXES = ("encoder.vit_backbone.", "vit_backbone.")
DECODER_PREFIXES = ("decoder.", "encoder_decoder_proj.", "decoder_pred.")
OPENPHENOM_LAYERSCALE_INIT = 1e-4    # timm init_values of the OpenPhenom encoder (only an initial value)


class ConversionError(ValueError):
    """A weights file that is not the expected layout; the message names the file and the tensor."""


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------

def weights_file(path: str) -> str:
    """The weights file `--weights` names: the file itself, or `model.safetensors` in a snapshot folder."""
    if os.path.isdir(path):
        inside = os.path.join(path, HF_WEIGHTS_NAME)
        if not os.path.isfile(inside):
            names = sorted(os.listdir(path))
            listing = f"it holds {names[:6]}{' ...' if len(names) > 6 else ''}" if names else "it is empty"
            raise ConversionError(f"{path}: a directory without {HF_WEIGHTS_NAME} ({listing}); pass the weights "
                                  f"file itself, or the Hugging Face snapshot folder that holds {HF_WEIGHTS_NAME}")
        return inside
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} does not exist")
    return path


def snapshot_config(weights: str) -> tuple[dict[str, Any], str | None]:
    """(the snapshot's MAEConfig as a dict, its path), or ({}, None) when there is none: `config.json` in the
    snapshot folder `weights` names, or beside the weights file when its model_type is "MAE" (a file beside
    another program's config.json, e.g. a maejax run's, is not a snapshot)."""
    folder = weights if os.path.isdir(weights) else os.path.dirname(os.path.abspath(weights))
    path = os.path.join(folder, HF_CONFIG_NAME)
    if not os.path.isfile(path):
        return {}, None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        if not os.path.isdir(weights):
            return {}, None
        raise ConversionError(f"{path}: the snapshot's config is not JSON ({' '.join(str(e).split())[:100]}); "
                              f"{REDOWNLOAD}, or delete it to convert from the tensors alone") from None
    model_type = config.get("model_type") if isinstance(config, dict) else type(config).__name__
    if not os.path.isdir(weights):
        return (config, path) if model_type == HF_MODEL_TYPE else ({}, None)
    if not isinstance(config, dict) or model_type not in (None, HF_MODEL_TYPE):
        raise ConversionError(f"{path}: model_type {model_type!r}, not maes_microscopy's {HF_MODEL_TYPE!r}: not an "
                              f"OpenPhenom snapshot folder; pass the OpenPhenom snapshot or its weights file")
    return config, path


def snapshot_settings(config: dict[str, Any]) -> dict[str, Any]:
    """What the converter takes from a snapshot config: decoder_heads, mask_ratio (those present and valid)."""
    out: dict[str, Any] = {}
    decoder = config.get("decoder")
    heads = decoder.get("num_heads") if isinstance(decoder, dict) else None
    if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0:
        out["decoder_heads"] = heads
    ratio = config.get("mask_ratio")
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio < 1:
        out["mask_ratio"] = float(ratio)
    return out


def sniff_format(path: str) -> str:
    """"torch" or "safetensors", from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise ConversionError(f"{path}: empty file (0 bytes), not model weights; {REDOWNLOAD}")
    if head[:4] == TORCH_ZIP_MAGIC:
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    raise ConversionError(f"{path}: neither a torch zip pickle (starts with PK\\x03\\x04) nor safetensors "
                          f"(8-byte header length, then '{{'); it starts with {head!r}")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """All tensors of a torch zip pickle (optionally wrapped in {"state_dict": ...}) or safetensors file."""
    path = weights_file(path)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        return read_safetensors(path)
    try:
        import torch
    except ImportError:
        # No PyTorch: the built-in reader (same restriction as weights_only=True; tested equal to torch.load).
        obj = torch_pickle.load(path)
    else:
        # An open file, not the path: torch.load dispatches `*.safetensors` paths to safetensors by name.
        with open(path, "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        obj = _numpy_tensors(obj, torch)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a state dict (or {{'state_dict': ...}}), got {type(obj).__name__}")
    return {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) or v.dtype.kind == "V"
                else v) for k, v in obj.items() if isinstance(v, np.ndarray)}


def check_safetensors(path: str) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking that the file holds everything it lists
    (safetensors' own errors, e.g. `incomplete metadata`, never name the file)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path}: {size} bytes, too short for safetensors (an 8-byte header length "
                                  f"comes first); {REDOWNLOAD}")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ConversionError(f"{path}: truncated or not safetensors: its first 8 bytes announce a "
                                  f"{length}-byte header, the file has {size - 8} bytes after them; {REDOWNLOAD}")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError(f"a JSON {type(header).__name__}, not an object")
        ends = {k: int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"}
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ConversionError(f"{path}: damaged safetensors header ({' '.join(str(e).split())[:120]}); "
                              f"{REDOWNLOAD}") from None
    data = size - 8 - length
    if ends and max(ends.values()) > data:
        name = max(ends, key=ends.get)
        raise ConversionError(f"{path}: truncated safetensors file: {size} bytes, its header lists tensors "
                              f"up to byte {8 + length + ends[name]} (tensor {name!r} ends past the end of the "
                              f"file); {REDOWNLOAD}")
    return header


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    check_safetensors(path)
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return dict(load_file(path))
    except SafetensorError as e:   # what the header check above does not see
        raise ConversionError(f"{path}: unreadable safetensors file ({' '.join(str(e).split())}); "
                              f"{REDOWNLOAD}") from None


def _numpy_tensors(obj, torch):
    """torch.load's result with every tensor as a numpy array (floating tensors as float32 first, since
    numpy has no bfloat16 for torch to hand over)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return (t.float() if t.is_floating_point() else t).numpy()
    if isinstance(obj, dict):
        return type(obj)((k, _numpy_tensors(v, torch)) for k, v in obj.items())
    return obj


def split_state_dict(sd: dict[str, np.ndarray], where: str) -> tuple[dict, dict]:
    """-> (encoder tensors without prefix, decoder tensors with their full-model names)."""
    encoder, decoder, other = {}, {}, []
    for key, value in sd.items():
        enc = next((p for p in ENCODER_PREFIXES if key.startswith(p)), None)
        if enc is not None:
            encoder[key[len(enc):]] = value
        elif key.startswith(DECODER_PREFIXES):
            decoder[key] = value
        else:
            other.append(key)
    if other:
        raise ConversionError(f"{where}: tensors outside an OpenPhenom MAE layout: {sorted(other)[:8]}")
    if not encoder:
        raise ConversionError(f"{where}: no encoder tensors (keys starting with {ENCODER_PREFIXES})")
    return encoder, decoder


# --------------------------------------------------------------------------------------------------------
# Layout inference
# --------------------------------------------------------------------------------------------------------

def _take(sd: dict[str, np.ndarray], key: str, where: str, shape: tuple | None = None) -> np.ndarray:
    if key not in sd:
        raise ConversionError(f"{where}: tensor {key!r} is missing (an incomplete file, or not an OpenPhenom "
                              f"CA-MAE); {REDOWNLOAD} or pass the full model file")
    value = np.asarray(sd[key], np.float32)
    if shape is not None and value.shape != tuple(shape):
        raise ConversionError(f"{where}: tensor {key!r} has shape {value.shape}, expected {tuple(shape)}")
    return value


def _indices(sd: dict, pattern: str, where: str) -> list[int]:
    found = sorted({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})
    if found != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise ConversionError(f"{where}: tensors {pattern!r} have indices {found[:12]}, {missing[:6]} missing")
    return found


def tokens_per_channel(pos: np.ndarray, width: int, where: str) -> tuple[int, int]:
    """(grid side g, max channels) of a `pos_embed` (1, 1 + C * g*g, D) holding one sin-cos table per channel."""
    table = pos[0]
    if np.abs(table[0]).max() > 1e-6:
        raise ConversionError(f"{where}: pos_embed's class-token row is not zero; not OpenPhenom's layout")
    rest = table[1:]
    for g in range(1, int(np.sqrt(len(rest))) + 1):
        n = g * g
        if len(rest) % n:
            continue
        tiles = rest.reshape(len(rest) // n, n, width)
        if np.allclose(tiles, sincos_2d(g, g, width)[None], atol=1e-5):
            return g, len(rest) // n
    raise ConversionError(f"{where}: pos_embed {pos.shape} is not a 2-D sin-cos table repeated per channel "
                          "(learned position embeddings are not supported)")


def encoder_dims(enc: dict[str, np.ndarray], where: str) -> dict[str, int]:
    d = _take(enc, "cls_token", where).shape[-1]
    depth = len(_indices(enc, r"blocks\.(\d+)\.in_proj\.weight$", where))
    if depth == 0:
        raise ConversionError(f"{where}: no `blocks.N.in_proj.weight`: not a ParallelScalingBlock encoder")
    head_dim = _take(enc, "blocks.0.q_norm.weight", where).shape[0]
    if d % head_dim:
        raise ConversionError(f"{where}: width {d} is not a multiple of the q_norm size {head_dim}")
    proj = _take(enc, "patch_embed.proj.weight", where)
    if proj.ndim != 4 or proj.shape[1] != 1 or proj.shape[2] != proj.shape[3]:
        raise ConversionError(f"{where}: patch_embed.proj.weight {proj.shape} is not a shared single-channel "
                              "square patch projection (D, 1, p, p): not a channel-agnostic encoder")
    grid, max_channels = tokens_per_channel(_take(enc, "pos_embed", where), d, where)
    return dict(width=d, depth=depth, num_heads=d // head_dim, mlp_dim=_take(enc, "blocks.0.mlp_bias", where).shape[0],
                patch=proj.shape[2], grid=grid, max_channels=max_channels)


# --------------------------------------------------------------------------------------------------------
# Tensor mapping (torch Linear weight is (out, in): our kernels are its transpose)
# --------------------------------------------------------------------------------------------------------

def encoder_params(enc: dict[str, np.ndarray], dims: dict[str, int], where: str) -> dict[tuple, np.ndarray]:
    d, h, mlp, p = dims["width"], dims["num_heads"], dims["mlp_dim"], dims["patch"]
    hd = d // h
    known = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "fc_norm.weight",
             "fc_norm.bias"}
    out = {
        ("cls",): _take(enc, "cls_token", where, (1, 1, d)),
        ("patch_embed", "proj", "kernel"): _take(enc, "patch_embed.proj.weight", where).reshape(d, p * p).T,
        ("patch_embed", "proj", "bias"): _take(enc, "patch_embed.proj.bias", where, (d,)),
        ("norm", "scale"): _take(enc, "fc_norm.weight", where, (d,)),
        ("norm", "bias"): _take(enc, "fc_norm.bias", where, (d,)),
    }
    blocks: dict[tuple, list[np.ndarray]] = {}
    for i in range(dims["depth"]):
        def t(name, shape):
            known.add(f"blocks.{i}.{name}")
            return _take(enc, f"blocks.{i}.{name}", where, shape)

        w = t("in_proj.weight", (mlp + 3 * d, d)).T                      # columns: [mlp | q | k | v]
        # timm builds the in_proj bias as concat(qkv_bias = zeros(3D), mlp_bias), which does not line up
        # with that column order: the first 3D MLP units get no bias, the rest of mlp_bias spills into q, k, v.
        bias = np.concatenate([np.zeros(3 * d, np.float32), t("mlp_bias", (mlp,))])
        qkv, qkv_bias = w[:, mlp:], bias[mlp:]
        layer = {
            ("in_norm", "scale"): t("in_norm.weight", (d,)), ("in_norm", "bias"): t("in_norm.bias", (d,)),
            ("mlp_in", "kernel"): w[:, :mlp], ("mlp_in", "bias"): bias[:mlp],
            ("attn", "qkv"): qkv.reshape(d, 3, h, hd), ("attn", "qkv_bias"): qkv_bias.reshape(3, h, hd),
            ("attn", "q_norm", "scale"): t("q_norm.weight", (hd,)), ("attn", "q_norm", "bias"): t("q_norm.bias", (hd,)),
            ("attn", "k_norm", "scale"): t("k_norm.weight", (hd,)), ("attn", "k_norm", "bias"): t("k_norm.bias", (hd,)),
            ("attn", "out"): t("attn_out_proj.weight", (d, d)).T.reshape(h, hd, d),
            ("attn", "out_bias"): t("attn_out_proj.bias", (d,)),
            ("mlp_out", "kernel"): t("mlp_out_proj.weight", (d, mlp)).T,
            ("mlp_out", "bias"): t("mlp_out_proj.bias", (d,)),
            ("ls", "gamma"): t("ls.gamma", (d,)),
        }
        for k, v in layer.items():
            blocks.setdefault(k, []).append(v)
    unknown = sorted(set(enc) - known)
    if unknown:
        raise ConversionError(f"{where}: encoder tensors this converter does not know: {unknown[:8]} "
                              "(e.g. a final `norm`, i.e. not global_pool='avg')")
    out.update({("transformer", "blocks") + k: np.stack(v) for k, v in blocks.items()})
    return {("encoder",) + k: v for k, v in out.items()}


def decoder_dims(dec: dict[str, np.ndarray], where: str) -> dict[str, int]:
    return dict(width=_take(dec, "decoder.mask_token", where).shape[-1],
                channels=len(_indices(dec, r"decoder\.modality_tokens\.(\d+)$", where)),
                depth=len(_indices(dec, r"decoder\.decoders\.0\.(\d+)\.norm1\.weight$", where)))


def decoder_params(dec: dict[str, np.ndarray], dims: dict[str, int], enc_width: int, patch: int, grid: int,
                   heads: int, cross_heads: int, where: str) -> dict[tuple, np.ndarray]:
    w, m = dims["width"], dims["channels"]
    known = {"decoder.placeholder", "decoder.pos_embeddings"}

    def t(name, shape):
        known.add(name)
        return _take(dec, name, where, shape)

    pos = t("decoder.pos_embeddings", (1, 1 + m * grid * grid, w))[0]
    expected = np.concatenate([np.zeros((1, w), np.float32), np.tile(sincos_2d(grid, grid, w), (m, 1))])
    if not np.allclose(pos, expected, atol=1e-5):
        raise ConversionError(f"{where}: decoder.pos_embeddings is not the per-channel 2-D sin-cos table")
    if np.abs(t("decoder.placeholder", (1, 1, w))).max() > 0:
        raise ConversionError(f"{where}: decoder.placeholder is not zero")

    def linear(prefix, d_in, d_out, bias=True):
        kernel = t(f"{prefix}.weight", (d_out, d_in)).T
        return (kernel, t(f"{prefix}.bias", (d_out,))) if bias else (kernel, None)

    def norm(prefix):
        return {"scale": t(f"{prefix}.weight", (w,)), "bias": t(f"{prefix}.bias", (w,))}

    chd = w // cross_heads
    out: dict[tuple, np.ndarray] = {}
    out[("embed", "kernel")], out[("embed", "bias")] = linear("encoder_decoder_proj", enc_width, w)
    out[("mask_token",)] = t("decoder.mask_token", (1, 1, w))
    out[("channel_tokens",)] = np.stack([t(f"decoder.modality_tokens.{i}", (1, 1, w))[0, 0] for i in range(m)])
    for name in ("query_norm", "context_norm", "out_norm"):
        for k, v in norm(f"decoder.{name}").items():
            out[(name, k)] = v
    q, _ = linear("decoder.cross_attention.q", w, w, bias=False)
    kv, _ = linear("decoder.cross_attention.kv", w, 2 * w, bias=False)
    out[("cross_attention", "q")] = q.reshape(w, cross_heads, chd)
    out[("cross_attention", "kv")] = kv.reshape(w, 2, cross_heads, chd)
    proj, out[("cross_attention", "out_bias")] = linear("decoder.cross_attention.proj", w, w)
    out[("cross_attention", "out")] = proj.reshape(cross_heads, chd, w)
    for fc, (a, b) in (("fc1", (w, 4 * w)), ("fc2", (4 * w, w))):
        out[("mlp", fc, "kernel")], out[("mlp", fc, "bias")] = linear(f"decoder.mlp.{fc}", a, b)
    out[("pred", "kernel")], out[("pred", "bias")] = linear("decoder_pred", w, patch * patch)

    hd = w // heads
    stacked: dict[tuple, list] = {}
    for ch in range(m):
        layers: dict[tuple, list] = {}
        for i in range(dims["depth"]):
            pre = f"decoder.decoders.{ch}.{i}"
            qkv, qkv_bias = linear(f"{pre}.attn.qkv", w, 3 * w)
            proj, proj_bias = linear(f"{pre}.attn.proj", w, w)
            fc1, fc1_b = linear(f"{pre}.mlp.fc1", w, 4 * w)
            fc2, fc2_b = linear(f"{pre}.mlp.fc2", 4 * w, w)
            layer = {("attn", "qkv"): qkv.reshape(w, 3, heads, hd),
                     ("attn", "qkv_bias"): qkv_bias.reshape(3, heads, hd),
                     ("attn", "out"): proj.reshape(heads, hd, w), ("attn", "out_bias"): proj_bias,
                     ("mlp", "fc1", "kernel"): fc1, ("mlp", "fc1", "bias"): fc1_b,
                     ("mlp", "fc2", "kernel"): fc2, ("mlp", "fc2", "bias"): fc2_b}
            for n in ("norm1", "norm2"):
                for k, v in norm(f"{pre}.{n}").items():
                    layer[(n, k)] = v
            for k, v in layer.items():
                layers.setdefault(k, []).append(v)
        for k, v in layers.items():
            stacked.setdefault(k, []).append(np.stack(v))
    out.update({("channel_decoders", "blocks") + k: np.stack(v) for k, v in stacked.items()})
    unknown = sorted(set(dec) - known)
    if unknown:
        raise ConversionError(f"{where}: decoder tensors this converter does not know: {unknown[:8]}")
    return {("decoder",) + k: v for k, v in out.items()}


# --------------------------------------------------------------------------------------------------------
# OpenPhenom -> maejax
# --------------------------------------------------------------------------------------------------------

def openphenom_config(enc_dims: dict[str, int], dec_dims: dict[str, int] | None, *, in_channels: int,
                      decoder_heads: int, cross_attention_heads: int, decoder_norm_eps: float
                      ) -> ml_collections.ConfigDict:
    c = config_lib.base()
    m = c.model
    dims = (enc_dims["width"], enc_dims["depth"], enc_dims["mlp_dim"], enc_dims["num_heads"])
    name = next((k for k, v in VARIANTS.items() if v == dims), "S")
    m.name = "ca_mae"
    m.variant = f"{name}/{enc_dims['patch']}"
    m.width, m.depth, m.mlp_dim, m.num_heads = dims[0], dims[1], dims[2], dims[3]
    m.block = "parallel"
    m.qkv_bias = True          # holds the part of OpenPhenom's mlp_bias that timm adds to q, k and v
    m.qk_norm = True
    m.layerscale = OPENPHENOM_LAYERSCALE_INIT
    m.norm_eps = 1e-6
    m.cls_token = True
    m.final_norm = "pooled"    # timm global_pool='avg': no norm on tokens, fc_norm after pooling
    m.max_channels = enc_dims["max_channels"]
    if dec_dims is None:
        if not 1 <= in_channels <= enc_dims["max_channels"]:
            raise ConversionError(f"--in_channels {in_channels}: the encoder takes 1 to {enc_dims['max_channels']}")
        m.in_channels = in_channels
        m.decoder_depth = 0
    else:
        m.in_channels = dec_dims["channels"]
        m.decoder_width = dec_dims["width"]
        m.decoder_depth = dec_dims["depth"]
        m.decoder_heads = decoder_heads
        m.cross_attention_heads = cross_attention_heads
        m.decoder_norm_eps = decoder_norm_eps
    c.data.crop_size = enc_dims["patch"] * enc_dims["grid"]
    return c


def convert_openphenom(weights: str, out: str | None = None, *, workdir: str | None = None, in_channels: int = 6,
                       decoder: bool = True, decoder_heads: int | None = None, cross_attention_heads: int = 8,
                       decoder_norm_eps: float = 1e-5) -> ml_collections.ConfigDict:
    """Converts an OpenPhenom / maes_microscopy CA-MAE file or snapshot folder into a maejax run directory
    `workdir` (config.json + checkpoints/, what eval.job reads) or, given `out` instead, into the checkpoint
    directory `out` itself (the older layout).

    `decoder=False` converts the encoder alone even when the file holds a decoder. `decoder_heads` None: the
    snapshot config's `decoder.num_heads`, else OpenPhenom's 16. Returns the config.
    """
    if (out is None) == (workdir is None):
        raise ValueError("give exactly one of workdir (a run directory) and out (a bare checkpoint directory)")
    snapshot, snapshot_path = snapshot_config(weights)
    from_snapshot = snapshot_settings(snapshot)
    if decoder_heads is None:
        decoder_heads = from_snapshot.get("decoder_heads", OPENPHENOM_DECODER_HEADS)
    ckpt_dir = out if out is not None else os.path.join(workdir, "checkpoints")
    config_path = os.path.join(out if out is not None else workdir, "config.json")
    if workdir is not None and os.path.exists(config_path):
        raise FileExistsError(f"--workdir {os.path.abspath(workdir)} already holds a run (config.json); choose a new "
                              f"directory")
    weights = weights_file(weights)
    sd = read_state_dict(weights)
    enc, dec = split_state_dict(sd, weights)
    enc_dims = encoder_dims(enc, weights)
    flat = encoder_params(enc, enc_dims, weights)
    dec_dims = None
    if dec and decoder:
        dec_dims = decoder_dims(dec, weights)
        if dec_dims["width"] % decoder_heads:
            told = snapshot_path if "decoder_heads" in from_snapshot else "--decoder_heads"
            raise ConversionError(f"{weights}: the decoder's width {dec_dims['width']} is not a multiple of "
                                  f"{decoder_heads} heads (from {told}); pass --decoder_heads N")
        flat.update(decoder_params(dec, dec_dims, enc_dims["width"], enc_dims["patch"], enc_dims["grid"],
                                   decoder_heads, cross_attention_heads, weights))
    config = openphenom_config(enc_dims, dec_dims, in_channels=in_channels, decoder_heads=decoder_heads,
                               cross_attention_heads=cross_attention_heads, decoder_norm_eps=decoder_norm_eps)
    if "mask_ratio" in from_snapshot:
        config.model.mask_ratio = from_snapshot["mask_ratio"]
    model = model_from_flat(config.model, flat, weights)
    source = {"format": "openphenom", "file": os.path.abspath(weights), "decoder": dec_dims is not None,
              "snapshot_config": os.path.abspath(snapshot_path) if snapshot_path else None,
              "from_snapshot_config": from_snapshot}
    meta = {"step": 0, "config": json.loads(config.to_json()), "converted_from": source}
    save_converted(ckpt_dir, model, meta, config_path=config_path)
    return config


def model_from_flat(model_cfg: Any, flat: dict[tuple, np.ndarray], where: str) -> nnx.Module:
    """Builds the model abstractly and fills every parameter from `flat` (path -> array); all must match."""
    graphdef, state = nnx.split(flops.abstract_model(model_cfg))
    targets = dict(nnx.to_flat_state(state))
    missing = sorted(set(targets) - set(flat))
    extra = sorted(set(flat) - set(targets))
    if missing or extra:
        raise ConversionError(f"{where}: converted tensors do not match the model: missing {missing[:6]}, "
                              f"unexpected {extra[:6]}")
    pure: dict = {}
    for path, var in targets.items():
        value = flat[path]
        if value.shape != var.shape:
            raise ConversionError(f"{where}: {'.'.join(map(str, path))} converted to shape {value.shape}, "
                                  f"the model needs {var.shape}")
        node = pure
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = jnp.asarray(value, var.dtype)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def save_converted(out: str, model: nnx.Module, meta: dict[str, Any], config_path: str | None = None) -> None:
    """Step-0 checkpoint in `out` with an identity optimiser (the optimiser item must exist and be
    non-empty), and the config at `config_path` (default `<out>/config.json`)."""
    ckpts = Checkpoints(out, keep=1, async_save=False)
    if ckpts.latest_step() is not None:
        ckpts.close()
        raise FileExistsError(f"{os.path.abspath(out)} already holds a checkpoint (step "
                              f"{ckpts.latest_step()}); choose an empty directory")
    optimizer = nnx.Optimizer(model, optax.identity(), wrt=nnx.Param)
    ckpts.save(0, model_state=nnx.state(model), optimizer_state=nnx.state(optimizer), meta=meta, force=True)
    ckpts.close()
    with open(config_path or os.path.join(out, "config.json"), "w") as f:
        json.dump(meta["config"], f, indent=2)


def main(argv: list[str] | None = None) -> int:
    parser = flags.ArgumentParser(prog="python -m maejax.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)
    op = sub.add_parser("openphenom", help="OpenPhenom / maes_microscopy CA-MAE (safetensors or torch pickle)")
    op.add_argument("--weights", required=True,
                    help="Hugging Face snapshot folder (model.safetensors + config.json) or the weights file "
                         "(format detected from its first bytes)")
    where = op.add_mutually_exclusive_group(required=True)
    where.add_argument("--workdir", metavar="DIR", help="new run directory: config.json + checkpoints/, what "
                                         "`python -m eval.job --workdir DIR --dataset DATASET` evaluates")
    where.add_argument("--out", help=argparse.SUPPRESS)   # deprecated: the bare checkpoint directory
    op.add_argument("--in_channels", deprecated="--in-channels", type=int, default=6,
                    help="training channels recorded in the config when the file has no decoder (default 6)")
    op.add_argument("--encoder_only", deprecated="--encoder-only", action="store_true",
                    help="ignore the decoder even if the file has one")
    op.add_argument("--decoder_heads", deprecated="--decoder-heads", type=int, default=None,
                    help="decoder self-attention heads (default: the snapshot config's, else OpenPhenom's 16)")
    op.add_argument("--cross_attention_heads", deprecated="--cross-attention-heads", type=int, default=8,
                    help="decoder cross-attention heads (8)")
    op.add_argument("--decoder_norm_eps", deprecated="--decoder-norm-eps", type=float, default=1e-5,
                    help="decoder LayerNorm eps (OpenPhenom's HF model: torch default 1e-5)")
    args = parser.parse_args(argv)
    try:
        config = convert_openphenom(args.weights, args.out, workdir=args.workdir, in_channels=args.in_channels,
                                    decoder=not args.encoder_only, decoder_heads=args.decoder_heads,
                                    cross_attention_heads=args.cross_attention_heads,
                                    decoder_norm_eps=args.decoder_norm_eps)
    except (ValueError, OSError) as e:   # ConversionError, a missing file, a directory that holds a checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = config.model
    target = os.path.abspath(args.workdir or args.out)
    print(f"{args.weights} -> {target}: ca_mae width {m.width}, depth {m.depth}, "
          f"heads {m.num_heads}, patch {m.variant.split('/')[1]}, up to {m.max_channels} channels, "
          f"decoder: {f'{m.decoder_depth} blocks per channel' if m.decoder_depth else 'none'}")
    if args.workdir:
        print(f"evaluate every block: python -m eval.job --workdir {args.workdir} --dataset DATASET")
    else:   # said after the conversion, so that a failure stays one line
        print(f"note: --out is deprecated: it wrote the bare checkpoint directory {args.out} (eval.embed_arrays "
              f"and eval.embed_job take it as --workdir); --workdir DIR writes a run directory that "
              f"python -m eval.job --workdir DIR evaluates",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
