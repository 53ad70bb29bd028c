"""Command-line options every source shares (crops, conversion, sharding, workers, bad sites) and the run."""
from __future__ import annotations

import argparse
import sys

from data.conversion import ConversionRule
from data.crop_builder import BuildOptions, Source, build_dataset
from data.cropping import CropSpec
from maejax import flags


def parser(description: str) -> argparse.ArgumentParser:
    p = flags.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="dataset directory to create")
    p.add_argument("--name", help="dataset name in the manifest (default: the source kind)")
    g = p.add_argument_group("crops")
    g.add_argument("--crop_size", deprecated="--crop-size", type=int, default=256)
    g.add_argument("--crop_mode", deprecated="--crop-mode", choices=("tile", "random"), default="tile",
                   help="tile: non-overlapping grid, row-major; random: --crops_per_site seeded positions")
    g.add_argument("--crops_per_site", deprecated="--crops-per-site", type=int, default=4,
                   help="random mode only")
    g.add_argument("--image_size", deprecated="--image-size", type=parse_size, default="auto",
                   help="site size HxW every channel must have; 'auto': the layout's, else the first readable "
                        "site's; 'any': channels of a site need only agree")
    g = p.add_argument_group("16-bit conversion (channels that do not decode to uint8)")
    g.add_argument("--conversion", choices=("percentile", "fixed"), default="percentile",
                   help="percentile: per plate and channel levels from sampled sites; fixed: --low/--high values")
    g.add_argument("--low", type=float, help="percentile (default 0.1) or value (default 0) mapped to 0")
    g.add_argument("--high", type=float, help="percentile (default 99.9) or value (default 65535) mapped to 255")
    g.add_argument("--sample_sites", deprecated="--sample-sites", type=int, default=16,
                   help="sites per plate the percentiles come from")
    g.add_argument("--sample_pixels", deprecated="--sample-pixels", type=int, default=65536,
                   help="pixels per sampled site and channel")
    g = p.add_argument_group("build")
    g.add_argument("--seed", type=int, default=0, help="random crops and conversion samples")
    g.add_argument("--num_shards", deprecated="--num-shards", type=int,
                   help="default: expected crops / --records_per_shard")
    g.add_argument("--records_per_shard", deprecated="--records-per-shard", type=int, default=2048)
    g.add_argument("--workers", type=int, default=1, help="processes (the output does not depend on it)")
    g.add_argument("--skip_bad_sites", deprecated="--skip-bad-sites", action="store_true",
                   help="leave out sites with bad files (listed in the manifest) instead of failing")
    g.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    g.add_argument("--restart", action="store_true", help="discard an unfinished build of --out instead of resuming")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def options(args: argparse.Namespace) -> BuildOptions:
    fixed = args.conversion == "fixed"
    low = args.low if args.low is not None else (0.0 if fixed else 0.1)
    high = args.high if args.high is not None else (65535.0 if fixed else 99.9)
    return BuildOptions(
        crop=CropSpec(size=args.crop_size, mode=args.crop_mode, random_per_site=args.crops_per_site),
        conversion=ConversionRule(kind=args.conversion, low=low, high=high, sample_sites=args.sample_sites,
                                  sample_pixels=args.sample_pixels),
        seed=args.seed, num_shards=args.num_shards, records_per_shard=args.records_per_shard,
        image_size=args.image_size, workers=args.workers, skip_bad_sites=args.skip_bad_sites,
        overwrite=args.overwrite, restart=args.restart, progress=not args.quiet, name=args.name)


def parse_size(text: str) -> str | tuple[int, int]:
    if text in ("auto", "any"):
        return text
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image_size must be HxW, 'auto' or 'any', got {text!r}") from None
    return height, width


def names(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def main(doc: str, add_arguments, from_args, argv: list[str] | None = None) -> int:
    """A source's command: shared options + `add_arguments(parser)`; `from_args(args)` makes the Source."""
    p = parser(doc.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run(lambda: from_args(args), args)


def run(make_source, args: argparse.Namespace) -> int:
    """Builds; prints a summary, or the error (bad files and all) and exits non-zero."""
    try:
        source: Source = make_source()
        report = build_dataset(source, args.out, options(args))
    except ValueError as e:   # BuildError, TableError, a refused --out, bad option values
        print(f"error: {e}", file=sys.stderr)
        return 1
    skipped = (f", {len(report.skipped_sites)} bad sites skipped (listed in the manifest)"
               if report.skipped_sites else "")
    reused = f", {report.shards_reused} shards reused" if report.shards_reused else ""
    print(f"wrote {report.num_records} crops from {report.num_sites} sites to {report.path} in {report.seconds:.1f} s"
          f"{skipped}{reused}")
    return 0
