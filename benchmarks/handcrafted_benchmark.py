"""Throughput of the hand-crafted baseline features on synthetic 6-channel crops.

  python -m benchmarks.handcrafted_benchmark [--crops 4000 --crop_size 64 --channels 6 --batch_size 1000]

Crops have 0-12 elliptical nuclei in channel 0 (Otsu segmentation has real objects to label) and
textured noise in every channel. Prints crops/s per batch size; asserts nothing about time.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from eval import handcrafted
from maejax import flags


def synthetic_crops(n: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, (n, channels, size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        for cy, cx, ry, rx in zip(*rng.uniform([4, 4, 2, 2], [size - 4, size - 4, 7, 7],
                                               (rng.integers(0, 13), 4)).T):
            nucleus = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            images[i, 0][nucleus] = 160 + images[i, 0][nucleus] // 2     # bright, textured
    return images


def main(argv=None) -> None:
    p = flags.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crops", type=int, default=4000)
    p.add_argument("--crop_size", deprecated="--size", type=int, default=64)
    p.add_argument("--channels", type=int, default=6)
    p.add_argument("--batch_size", deprecated="--batch", type=int, nargs="+", default=[250, 1000, 4000],
                   help="one measurement per batch size")
    args = p.parse_args(argv)
    images = synthetic_crops(args.crops, args.crop_size, args.channels)
    handcrafted.handcrafted_features(images[:8])                        # warm-up
    for batch in args.batch_size:
        start = time.perf_counter()
        for i in range(0, args.crops, batch):
            feats, names = handcrafted.handcrafted_features(images[i:i + batch])
        dt = time.perf_counter() - start
        print(f"batch {batch:5d}: {args.crops} crops of {args.channels}x{args.crop_size}x{args.crop_size} in "
              f"{dt:.2f} s = {args.crops / dt:,.0f} crops/s ({len(names)} features)")


if __name__ == "__main__":
    main()
