"""Weakly supervised baseline (WSL): a ViT or CNN backbone with a linear head trained to classify the
perturbation (`label`, an index in 0..num_classes-1; negative labels are ignored). Its penultimate features,
and every block's or stage's pooled output, are embeddings like any other model's.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from maejax.models import flops
from maejax.models.cnn import ConvEncoder, decode_cnn_variant, stage_features
from maejax.models.layers import Dense, layer_norm
from maejax.models.vit import ViT, vit_config

BACKBONES = ("vit", "cnn")


class Supervised(nnx.Module):
    """config keys (model section): backbone (vit | cnn), variant (ViT "S/16" or CNN "M"), in_channels,
    num_classes, label_smoothing, plus the encoder keys of `vit_config` for a ViT backbone."""

    def __init__(self, m: Any, *, rngs: nnx.Rngs):
        self.num_classes = int(m["num_classes"])
        if self.num_classes < 2:
            raise ValueError(f"model.num_classes={self.num_classes}: set it to the number of perturbation labels")
        self.backbone_kind = m["backbone"]
        if self.backbone_kind not in BACKBONES:
            raise ValueError(f"model.backbone={self.backbone_kind!r}: choose one of {BACKBONES}")
        in_channels = int(m["in_channels"])
        if self.backbone_kind == "vit":
            self.enc_cfg = vit_config(m, in_channels)
            self.backbone = ViT(self.enc_cfg, rngs=rngs)
            width = self.enc_cfg.width
            self.feature_norm = None        # the ViT's own final norm normalises its pooled feature
        else:
            dims = decode_cnn_variant(m["variant"])
            self.backbone = ConvEncoder(in_channels, dims["widths"], dims["blocks"], rngs=rngs)
            width = dims["widths"][-1]
            self.feature_norm = layer_norm(width, 1e-6, rngs)
        self.head = Dense(width, self.num_classes, ("embed", "classes"), rngs=rngs,
                          kernel_init=nnx.initializers.zeros_init())
        self.label_smoothing = float(m["label_smoothing"])

    def embed(self, images: jax.Array, *, full: bool = False, key: jax.Array | None = None
              ) -> dict[str, jax.Array]:
        """Backbone features; `pooled` is the penultimate feature (the classifier's input)."""
        if self.backbone_kind == "vit":
            return self.backbone.embed(images, full=full, key=key)
        out = stage_features(self.backbone(jnp.transpose(images, (0, 2, 3, 1))), full)
        out["pooled"] = self.feature_norm(out["predict"])
        return out

    def loss(self, batch: dict[str, jax.Array], key: jax.Array):
        logits = self.head(self.embed(batch["image"], key=key)["pooled"]).astype(jnp.float32)
        labels = batch["label"]
        valid = (labels >= 0).astype(jnp.float32)
        targets = optax.smooth_labels(jax.nn.one_hot(jnp.maximum(labels, 0), self.num_classes), self.label_smoothing)
        per_example = optax.softmax_cross_entropy(logits, targets)
        count = jnp.maximum(valid.sum(), 1.0)
        loss = (per_example * valid).sum() / count
        accuracy = ((logits.argmax(-1) == labels) * valid).sum() / count
        return loss, {"loss": loss, "accuracy": accuracy}

    def flops_per_crop(self, height: int, width: int) -> dict[str, float]:
        """Backbone on the whole crop plus the head; training = 3 x inference."""
        if self.backbone_kind == "vit":
            e, p = self.enc_cfg, self.enc_cfg.patch
            n = (height // p) * (width // p)
            backbone = flops.dense(n, p * p * e.in_channels, e.width) + self.backbone.forward_flops(n)
        else:
            backbone = self.backbone.flops(height, width)
        infer = backbone + flops.dense(1, self.head.kernel.shape[0], self.num_classes)
        return {"train": 3 * infer, "infer": infer}
