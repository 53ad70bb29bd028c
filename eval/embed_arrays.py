"""Embed a uint8 image array with any maejax checkpoint (trained or converted, e.g. OpenPhenom).

  python -m eval.embed_arrays --workdir DIR --images IN.npy --out DIR [--metadata META.csv] [--blocks all|1,5]
  python -m eval.embed_arrays --workdir DIR --images IN.npy --out DIR --format npz [--batch_size 64]

--workdir: a training run directory, or a checkpoint directory itself (as eval.embed_job takes it).
IN.npy: uint8 (N, C, H, W). `--format npz` writes <out>/embeddings.npz, float32 arrays named as in
OpenPhenom's reference outputs (below). The default, `--format parquet`, writes parquet tables into --out in
the embed job's format (eval/embeddings.py, eval/embed_job.py): `block_01.parquet` ... one per block of
`blockwise_meanpool` (those of --blocks), and
`predict.parquet`, `forward_head.parquet`, `channelwise.parquet`, `cls.parquet`; one row per image with
`image_index`, the --metadata table's columns (CSV or parquet, one row per image, in order) and
feature_0 ... feature_{D-1}: what `python -m eval.map_benchmark --embeddings` and pycytominer read. The outputs:
  predict            (N, D)         mean of the patch tokens after the last block, no final norm
  channelwise        (N, C * D)     per-channel means of those tokens [ch0 | ch1 | ...] (channel-agnostic models)
  forward_head       (N, D)         the model's normalised pooled feature (OpenPhenom: fc_norm(predict))
  cls                (N, D)         class token after the last block (models with one)
  blockwise_meanpool (N, depth, D)  mean of the patch tokens after every block
Outputs a model does not define (e.g. `channelwise` for a standard ViT) are left out and named on stdout.
Images are self-standardised on device exactly as in training (maejax.preprocess).
"""
from __future__ import annotations

import os

import jax
import numpy as np
import pandas as pd
from flax import nnx

from eval.embed import Embedder
from maejax import flags, sharding as shd
from maejax.preprocess import self_standardize
from maejax.state import load_model
from maejax.step import compiler_options

NPZ = "embeddings.npz"   # the file --format npz writes into --out
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
    model, config, _ = load_model(checkpoint)
    rules = shd.rules_from_config(config.sharding_rules)
    mesh = shd.batch_mesh(rules)     # the one load_model restored onto
    if config.data.normalize != "crop":
        raise ValueError(f"{checkpoint}: the model was trained with data.normalize={config.data.normalize!r}, which "
                         "needs each crop's plate; embed a dataset directory with `python -m eval.job` instead")
    available = embed_keys(model, images.shape[1:])
    keys = tuple(k for k in OUTPUTS.values() if k in available)
    embedder = Embedder(model, mesh, min(len(images), batch_size or int(config.eval.batch_size)), rules, keys,
                        compiler_options=compiler_options(config))   # as the trainer compiles
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


def load_metadata(path: str, rows: int) -> pd.DataFrame:
    """A CSV/TSV/parquet table with one row per image, in the images' order."""
    try:
        meta = (pd.read_csv(path, sep="\t" if path.endswith(".tsv") else ",")
                if path.endswith((".csv", ".csv.gz", ".tsv")) else pd.read_parquet(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the metadata table ({type(e).__name__}: {e})") from e
    if len(meta) != rows:
        raise ValueError(f"{path}: {len(meta)} rows, the images are {rows}; give one row per image, in order")
    return meta.reset_index(drop=True)


def write_parquet(out_dir: str, outputs: dict[str, np.ndarray], metadata: pd.DataFrame | None = None,
                  blocks: str | None = "all") -> list[str]:
    """The outputs as parquet tables in `out_dir` (module doc); returns the paths written."""
    from eval import embeddings
    from eval.embed_job import parse_blocks
    n = len(next(iter(outputs.values())))
    meta = pd.DataFrame({"image_index": np.arange(n)})
    if metadata is not None:
        meta = pd.concat([meta, metadata.drop(columns=["image_index"], errors="ignore")], axis=1)
    tables = {name: v for name, v in outputs.items() if name != "blockwise_meanpool"}
    if "blockwise_meanpool" in outputs:
        per_block = outputs["blockwise_meanpool"]
        for b in parse_blocks(blocks, per_block.shape[1]):
            tables[embeddings.block_name(b)] = per_block[:, b - 1]
    paths = []
    for name, feats in tables.items():
        paths.append(os.path.join(out_dir, f"{name}.parquet"))
        embeddings.write_table(embeddings.features_table(feats, meta), paths[-1])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = flags.ArgumentParser(prog="python -m eval.embed_arrays", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", deprecated="--checkpoint", required=True, metavar="DIR",
                        help="training run directory, or a checkpoint directory")
    parser.add_argument("--images", required=True, help="uint8 .npy array (N, C, H, W)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help=f"output directory: parquet tables, or {NPZ} with --format npz")
    parser.add_argument("--format", choices=("parquet", "npz"), default="parquet")
    parser.add_argument("--batch_size", deprecated="--batch-size", type=int, default=None,
                        help="default: the config's eval.batch_size")
    parser.add_argument("--metadata", default=None, help="parquet output: CSV/parquet table, one row per image")
    parser.add_argument("--blocks", default="all", help="parquet output: `all` or block numbers, e.g. 1,5,12")
    args = parser.parse_args(argv)
    npz = args.format == "npz" or (args.out.endswith(".npz") and not os.path.isdir(args.out))   # the old OUT.npz
    path = flags.output_file(args.out, NPZ) if npz else None
    images = load_images(args.images)
    metadata = load_metadata(args.metadata, len(images)) if args.metadata else None
    from eval.embed_job import checkpoint_dir
    out = embed_arrays(checkpoint_dir(args.workdir), images, batch_size=args.batch_size)
    missing = sorted(set(OUTPUTS) - set(out))
    note = f"; not defined by this model: {', '.join(missing)}" if missing else ""
    if npz:
        np.savez(path, **out)
        print(f"{args.images} {images.shape} -> {path}: " + ", ".join(f"{k} {v.shape}" for k, v in out.items())
              + note)
        return
    paths = write_parquet(args.out, out, metadata, args.blocks)
    print(f"{args.images} {images.shape} -> {args.out}: {len(paths)} parquet tables "
          f"({', '.join(os.path.basename(p) for p in paths)}){note}")


if __name__ == "__main__":
    main()
