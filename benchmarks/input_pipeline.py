"""Crops/s delivered to the trainer from an ArrayRecord crop dataset vs. a PIL loader over per-channel PNGs.

    python -m benchmarks.input_pipeline --cache_dir /tmp/bench_png --repeats 3

Setup (cached in --cache_dir): the synthetic screen renders --sites 512x512 sites, which are written in
the RxRx1 layout (metadata.csv + images/{experiment}/Plate{p}/{well}_s{site}_w{1..6}.png, 8-bit), and
`data.sources.rxrx1` builds the ArrayRecord dataset from those files (256 px tiles, 4 per site).

Both loaders are the trainer's own pipeline, `maejax.input_pipeline.make_train_iterator`, and deliver
the same thing, batch after batch: for a shuffled record, its 6x256x256 tile, a random --crop_size crop,
random flips and quarter turns, self-standardisation, batched. They differ in how a record is read:
- ArrayRecord: the dataset's own reader.
- PIL baseline: `PngTiles` opens the record's site's 6 PNGs with PIL (as a PNG-per-channel loader must:
  PNG cannot decode a window) and cuts the record's tile from them.
Each runs with 0, 1 and 2 worker processes; throughput is steady state (after --warmup batches, for
--seconds), repeated --repeats times in alternation; medians are printed with the ratio.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from benchmarks.measure import iterator_rate
from maejax import flags
from maejax.input_pipeline import make_train_iterator, open_dataset

SITE = 512
TILE = 256


def make_png_screen(root: Path, num_sites: int, seed: int) -> Path:
    """Renders synthetic 512 px sites and writes them in the RxRx1 layout (8-bit PNG per channel)."""
    from data.synthetic_screen import generate_screen

    if (root / "metadata.csv").exists():
        return root
    wells_per_plate = 11  # the tiny preset: 9 genes + 2 control wells
    sites_per_well = max(1, -(-num_sites // (2 * wells_per_plate)))
    rendered = generate_screen(root / "synthetic", preset="tiny", overwrite=True, seed=seed, site_size=SITE,
                               crop_size=SITE, sites_per_well=sites_per_well, num_shards=1)
    ds = open_dataset(rendered)
    rows = []
    for record_id, row in ds.metadata.head(num_sites).iterrows():
        image = ds.reader.read(record_id)
        plate = int(row.plate.removeprefix("Plate"))
        folder = root / "images" / row.experiment / f"Plate{plate}"
        folder.mkdir(parents=True, exist_ok=True)
        for c in range(image.shape[0]):
            Image.fromarray(image[c]).save(folder / f"{row.well}_s{row.site}_w{c + 1}.png")
        control = bool(row.is_control)
        rows.append({"experiment": row.experiment, "plate": plate, "well": row.well, "site": row.site,
                     "well_type": "negative_control" if control else "treatment",
                     "sirna": "EMPTY" if control else row.perturbation})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


def build_arrayrecord(png_root: Path, out: Path) -> tuple[Path, float]:
    from data.crop_builder import BuildOptions, build_dataset
    from data.cropping import CropSpec
    from data.sources.rxrx1 import RxRx1

    if (out / "manifest.json").exists():
        return out, float("nan")
    report = build_dataset(RxRx1(png_root), out, BuildOptions(crop=CropSpec(size=TILE), progress=False,
                                                              records_per_shard=256))
    return out, report.seconds


@dataclasses.dataclass(frozen=True)
class PngTiles:
    """Reads a record's tile from its site's PNGs: stands in for the dataset's RecordReader (its `shape` and
    `read`) in the trainer's pipeline; small and picklable for grain workers."""
    root: str
    sites: np.ndarray                 # per record: experiment, plate, well, site, crop_y, crop_x
    shape: tuple[int, int, int]

    def read(self, record_id: int) -> np.ndarray:
        experiment, plate, well, site, y0, x0 = self.sites[record_id]
        folder = os.path.join(self.root, "images", experiment, plate)
        site_image = np.stack([np.asarray(Image.open(os.path.join(folder, f"{well}_s{site}_w{c}.png")))
                               for c in range(1, 7)])
        _, height, width = self.shape
        return site_image[:, y0:y0 + height, x0:x0 + width]


def png_dataset(png_root: Path, dataset):
    """`dataset` (the ArrayRecord build of the PNG screen) with its records read from the PNGs instead."""
    sites = dataset.metadata[["experiment", "plate", "well", "site", "crop_y", "crop_x"]].to_records(index=False)
    return dataclasses.replace(dataset, reader=PngTiles(str(png_root), sites, dataset.crop_shape))


def main() -> None:
    parser = flags.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache_dir", deprecated="--work-dir", default="/tmp/maejax_input_bench", metavar="DIR",
                        help="cache of the PNG screen and dataset")
    parser.add_argument("--sites", type=int, default=200)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--batch_size", deprecated="--batch-size", type=int, default=32)
    parser.add_argument("--crop_size", deprecated="--crop-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from absl import flags as absl_flags  # grain workers read absl flags (stack.md P3)
    absl_flags.FLAGS.mark_as_parsed()

    work = Path(args.cache_dir)
    start = time.perf_counter()
    png_root = make_png_screen(work / "rxrx1_png", args.sites, args.seed)
    setup = time.perf_counter() - start
    dataset_dir, build_seconds = build_arrayrecord(png_root, work / "rxrx1_arrayrecord")
    dataset = open_dataset(dataset_dir)
    num_sites = len(pd.read_csv(png_root / "metadata.csv"))
    png_bytes = sum(f.stat().st_size for f in (png_root / "images").rglob("*.png"))
    ar_bytes = sum(f.stat().st_size for f in dataset_dir.glob("*.array_record"))
    print(f"PNG screen: {num_sites} sites x 6 PNGs of {SITE}x{SITE}, {png_bytes / 2**20:.0f} MiB "
          f"(mean {png_bytes / num_sites / 6 / 1024:.1f} KiB/PNG; setup {setup:.0f} s)")
    print(f"ArrayRecord: {len(dataset)} records {dataset.crop_shape}, {ar_bytes / 2**20:.0f} MiB, built in "
          f"{build_seconds:.1f} s ({num_sites / build_seconds:.1f} sites/s)" if build_seconds == build_seconds else
          f"ArrayRecord: {len(dataset)} records {dataset.crop_shape}, {ar_bytes / 2**20:.0f} MiB (cached)")
    print(f"batch {args.batch_size}, crop {args.crop_size} + flips + rot90 + self-standardisation; "
          f"{args.seconds:.0f} s per measurement after {args.warmup} warm-up batches; load average "
          f"{os.getloadavg()[0]:.2f} at start")

    workers = [int(w) for w in args.workers.split(",")]
    loaders = {"arrayrecord": dataset, "png": png_dataset(png_root, dataset)}
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for repeat in range(args.repeats):
        for w in workers:
            for loader, source in loaders.items():
                it = make_train_iterator(source, batch_size=args.batch_size, crop_size=args.crop_size,
                                         seed=args.seed, num_workers=w, process_index=0, process_count=1)
                r = iterator_rate(it, args.batch_size, args.warmup, seconds=args.seconds)
                results.setdefault((loader, w), []).append(r)
                print(f"  run {repeat + 1} {loader:>11} workers {w}: {r['crops_per_s']:8.1f} crops/s "
                      f"(first batch {r['first_batch_s']:.2f} s, load {os.getloadavg()[0]:.2f})", flush=True)

    print(f"\nmedians of {args.repeats} runs (crops/s delivered, steady state); load average at end "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'workers':>7} {'ArrayRecord':>12} {'PNG+PIL':>9} {'ratio':>7}")
    best = {}
    for w in workers:
        ar, png = (statistics.median(r["crops_per_s"] for r in results[(k, w)]) for k in ("arrayrecord", "png"))
        best["arrayrecord"], best["png"] = max(best.get("arrayrecord", 0), ar), max(best.get("png", 0), png)
        print(f"{w:>7} {ar:>12.1f} {png:>9.1f} {ar / png:>6.1f}x")
    print(f"{'best':>7} {best['arrayrecord']:>12.1f} {best['png']:>9.1f} {best['arrayrecord'] / best['png']:>6.1f}x")


if __name__ == "__main__":  # grain worker processes are spawned: keep the entry point guarded
    main()
