"""Embed a uint8 image array with any maejax checkpoint (trained or converted, e.g. OpenPhenom).

  python -m eval.embed_arrays --checkpoint DIR --images IN.npy --out OUT.npz [--batch-size 64]

IN.npy: uint8 (N, C, H, W). OUT.npz holds float32 arrays named as in OpenPhenom's reference outputs:
  predict            (N, D)         mean of the patch tokens after the last block, no final norm
  channelwise        (N, C * D)     per-channel means of those tokens [ch0 | ch1 | ...] (channel-agnostic models)
  forward_head       (N, D)         the model's normalised pooled feature (OpenPhenom: fc_norm(predict))
  cls                (N, D)         class token after the last block (models with one)
  blockwise_meanpool (N, depth, D)  mean of the patch tokens after every block
Outputs a model does not define (e.g. `channelwise` for a standard ViT) are left out and named on stdout.
Images are self-standardised on device exactly as in training (maejax.preprocess).
"""
from __future__ import annotations

import argparse
import os

import jax
import numpy as np
from flax import nnx

from eval.embed import Embedder
from maejax import sharding as shd
from maejax.preprocess import self_standardize
from maejax.state import load_model

# output name -> key of `model.embed`
OUTPUTS = {"predict": "predict", "channelwise": "channelwise", "forward_head": "pooled", "cls": "cls",
           "blockwise_meanpool": "blocks"}


def load_images(path: str) -> np.ndarray:
    try:
        images = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read a .npy array ({e})") from e
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: expected a uint8 array (N, C, H, W), got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ValueError(f"{path}: no images (shape {images.shape})")
    return images


def embed_arrays(checkpoint: str, images: np.ndarray, *, batch_size: int | None = None
                 ) -> dict[str, np.ndarray]:
    """Every output of OUTPUTS the model defines, for uint8 images (N, C, H, W)."""
    mesh = shd.make_mesh({"data": -1})
    model, config, _ = load_model(checkpoint, mesh=mesh)
    rules = shd.rules_from_config(config.sharding_rules)
    if config.data.get("normalize", "crop") != "crop":
        raise ValueError(f"{checkpoint}: the model was trained with data.normalize={config.data.normalize!r}, which "
                         "needs each crop's plate; embed a dataset directory with `python -m eval.job` instead")
    available = embed_keys(model, images.shape[1:])
    keys = tuple(k for k in OUTPUTS.values() if k in available)
    embedder = Embedder(model, mesh, min(len(images), batch_size or int(config.eval.batch_size)), rules, keys)
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for start in range(0, len(images), embedder.batch_size):
        for k, v in embedder(images[start:start + embedder.batch_size]).items():
            out[k].append(v)
    return {name: np.concatenate(out[k]) for name, k in OUTPUTS.items() if k in out}


def embed_keys(model: nnx.Module, image_shape: tuple[int, ...]) -> set[str]:
    """The keys `model.embed` returns for one image of `image_shape` (traced, nothing computed)."""
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), np.float32)
    shapes = jax.eval_shape(lambda s, im: nnx.merge(graphdef, s).embed(self_standardize(im, xp=jax.numpy)),
                            state, x)
    return set(shapes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.embed_arrays", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="maejax checkpoint directory")
    parser.add_argument("--images", required=True, help="uint8 .npy array (N, C, H, W)")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's eval.batch_size")
    args = parser.parse_args(argv)
    images = load_images(args.images)
    out = embed_arrays(args.checkpoint, images, batch_size=args.batch_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez(args.out, **out)
    missing = sorted(set(OUTPUTS) - set(out))
    print(f"{args.images} {images.shape} -> {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in out.items())
          + (f"; not defined by this model: {', '.join(missing)}" if missing else ""))


if __name__ == "__main__":
    main()
