"""Optimisers of the MAE papers: AdamW or Lion, linear warm-up then cosine decay, global-norm clipping,
weight decay on weight matrices only."""
from __future__ import annotations

from typing import Any

import jax
import optax

# Leaves that get weight decay: weight matrices. Biases, norms, LayerScale, cls/mask tokens do not.
DECAYED_LEAVES = frozenset({"kernel", "qkv", "out"})


def schedule(o: Any, total_steps: int) -> optax.Schedule:
    warmup = int(o.warmup_steps)
    if warmup >= total_steps:
        raise ValueError(f"optim.warmup_steps={warmup} must be smaller than total_steps={total_steps}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(o.lr), warmup_steps=warmup, decay_steps=total_steps,
        end_value=float(o.lr) * float(o.min_lr_ratio))


def decay_mask(params) -> Any:
    """True for the leaves that get weight decay. Works on plain dicts (what optax hands the mask) and on
    nnx.State, whose paths end in the Variable's `value`."""
    def decayed(path, _) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        names = [n for n in names if n != "value"]
        return names[-1] in DECAYED_LEAVES
    return jax.tree_util.tree_map_with_path(decayed, params)


def make(o: Any, total_steps: int) -> optax.GradientTransformation:
    """`o` is the config's `optim` section: name (adamw|lion), lr, min_lr_ratio, warmup_steps, weight_decay,
    b1, b2, clip_norm (0 = off)."""
    lr = schedule(o, total_steps)
    if o.name == "adamw":
        tx = optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask)
    elif o.name == "lion":
        tx = optax.lion(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask)
    else:
        raise ValueError(f"optim.name={o.name!r}: choose 'adamw' or 'lion'")
    if o.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(float(o.clip_norm)), tx)
    return tx
