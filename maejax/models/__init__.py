"""Model registry: `config.model.name` -> class. Every model exposes
`loss(batch, key) -> (loss, metrics)` for training, `embed(images, full=False) -> dict` (with `blocks`,
(B, depth, D), `predict` and `pooled`) for evaluation, and `flops_per_crop(height, width) -> {"train",
"infer"}` for MFU and the model report."""
from __future__ import annotations

from typing import Any

from flax import nnx

from maejax.config import complete
from maejax.models.ca_mae import CAMAE
from maejax.models.mae import MAE
from maejax.models.munet import MUNet
from maejax.models.supervised import Supervised

MODELS: dict[str, type] = {"mae": MAE, "ca_mae": CAMAE, "munet": MUNet, "supervised": Supervised}


def build(model_cfg: Any, rngs: nnx.Rngs) -> nnx.Module:
    """The model of a `model` config section; keys it does not give take base().model's defaults (the
    only place they are written), so the models index every key."""
    m = complete(model_cfg, "model")
    if m.name not in MODELS:
        raise ValueError(f"model.name={m.name!r} is not a model; choose one of {sorted(MODELS)}")
    return MODELS[m.name](m, rngs=rngs)
