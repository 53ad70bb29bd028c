"""Preview PNG of a tiled screen dataset: whole sites reassembled from their crops, a few per row.

Each row is one site: an RGB composite (the RxRx1 channel colours) followed by every channel in
grey, all with the raw uint8 values, so batch effects (gain, background, vignetting) stay visible.
The rows are chosen to compare: a control and a same-complex gene pair and a null gene in one
experiment, then a control of each other experiment.

    python -m data.screen_preview --dataset DIR [--out DIR]      (writes <out>/preview.png; default out: the dataset)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from maejax import flags
from maejax.input_pipeline import Dataset, open_dataset

# rxrx1-utils' colours for the matching RxRx1 stains, in our stain order: DNA (Hoechst), ER (ConA),
# RNA (Syto14), AGP (Phalloidin), Mito (MitoTracker), Golgi (WGA).
CHANNEL_RGB = np.array([(19, 0, 249), (42, 255, 31), (45, 255, 252), (255, 0, 25), (250, 0, 253), (254, 255, 40)],
                       np.float32) / 255.0
LABEL_HEIGHT = 14


def site_image(ds: Dataset, experiment: str, plate: str, well: str, site: int) -> np.ndarray:
    """uint8 (C, S, S) site reassembled from its row-major tiles."""
    meta = ds.metadata
    rows = meta[(meta.experiment == experiment) & (meta.plate == plate) & (meta.well == well) & (meta.site == site)]
    rows = rows.sort_values("tile")
    n = ds.manifest["tiling"]["tiles_per_side"]
    if len(rows) != n * n:
        raise ValueError(f"{ds.path}: site {experiment}/{plate}/{well}/s{site} has {len(rows)} tiles, expected {n * n}")
    tiles = ds.reader.read_many(rows.record_id)
    c, h, w = tiles.shape[1:]
    return tiles.reshape(n, n, c, h, w).transpose(2, 0, 3, 1, 4).reshape(c, n * h, n * w)


def composite(image: np.ndarray) -> np.ndarray:
    """(C, H, W) uint8 -> (H, W, 3) uint8 RGB, each channel in its colour, added and clipped."""
    colours = CHANNEL_RGB[np.arange(len(image)) % len(CHANNEL_RGB)]
    rgb = np.einsum("chw,ck->hwk", image.astype(np.float32), colours) / max(1.0, len(image) / 3)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def pick_sites(ds: Dataset) -> list[tuple[str, tuple[str, str, str, int]]]:
    """(caption, site key) rows: see module docstring."""
    meta = ds.metadata[ds.metadata.tile == 0]
    truth = json.loads((ds.path / ds.manifest["ground_truth"]).read_text())
    experiments = sorted(meta.experiment.unique())

    def first(experiment, perturbation):
        row = meta[(meta.experiment == experiment) & (meta.perturbation == perturbation)].iloc[0]
        return row.experiment, row.plate, row.well, int(row.site)

    control = truth["control_label"]
    biggest = max(truth["complexes"].items(), key=lambda kv: len(kv[1]))
    rows = [(f"{experiments[0]} {control}", first(experiments[0], control))]
    rows += [(f"{experiments[0]} {g} ({biggest[0]})", first(experiments[0], g)) for g in biggest[1][:2]]
    if truth["null_genes"]:
        g = truth["null_genes"][0]
        rows.append((f"{experiments[0]} {g} (null)", first(experiments[0], g)))
    rows += [(f"{e} {control}", first(e, control)) for e in experiments[1:]]
    return rows


def write_preview(dataset_dir: str | Path, out_path: str | Path) -> Path:
    ds = open_dataset(dataset_dir)
    panels = []
    for caption, key in pick_sites(ds):
        image = site_image(ds, *key)
        tiles = [composite(image)] + [np.repeat(ch[:, :, None], 3, axis=2) for ch in image]
        gap = np.full((image.shape[1], 4, 3), 255, np.uint8)
        strip = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)
        label = Image.new("RGB", (strip.shape[1], LABEL_HEIGHT), "white")
        header = " | ".join(["composite"] + ds.channels)
        ImageDraw.Draw(label).text((2, 1), f"{caption}    [{header}]", fill="black")
        panels.append(np.concatenate([np.asarray(label), strip], axis=0))
    out_path = Path(out_path)
    Image.fromarray(np.concatenate(panels, axis=0)).save(out_path)
    return out_path


def main(argv: list[str] | None = None) -> None:
    parser = flags.ArgumentParser(description="Preview PNG of a tiled screen dataset.")
    parser.add_argument("--dataset", metavar="DIR", help="dataset directory")
    parser.add_argument("dataset_dir", nargs="?", help=argparse.SUPPRESS)   # deprecated: --dataset DIR
    parser.add_argument("--out", default=None, metavar="DIR", help="writes DIR/preview.png (default: the dataset's)")
    args = parser.parse_args(argv)
    if args.dataset_dir:
        flags.deprecated_flag("the dataset as a positional argument", "--dataset DIR")
    dataset = args.dataset or args.dataset_dir
    if not dataset or (args.dataset and args.dataset_dir):
        parser.error("give the dataset directory once: --dataset DIR")
    print(write_preview(dataset, flags.output_file(args.out or dataset, "preview.png")))


if __name__ == "__main__":
    main()
