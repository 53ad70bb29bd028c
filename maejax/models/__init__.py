"""Model registry: `config.model.name` -> class. Every model exposes
`loss(batch, key) -> (loss, metrics)` for training and `embed(images) -> dict` (with `blocks`, (B, depth, D))
for evaluation."""
from __future__ import annotations

from typing import Any

from flax import nnx

from maejax.models.mae import MAE

MODELS: dict[str, type] = {"mae": MAE}


def build(model_cfg: Any, rngs: nnx.Rngs) -> nnx.Module:
    name = model_cfg["name"]
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is not a model; choose one of {sorted(MODELS)}")
    return MODELS[name](model_cfg, rngs=rngs)
