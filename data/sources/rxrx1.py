"""RxRx1 (Recursion): `metadata.csv` + `images/{experiment}/Plate{plate}/{well}_s{site}_w{channel}.png`.

Six 8-bit 512x512 PNGs per site (w1..w6); 51 experiments x 4 plates x 308 wells x 2 sites. Perturbation
is the siRNA (`sirna`; negative controls are `EMPTY`), controls are `well_type == negative_control`.

    python -m data.sources.rxrx1 --source_dir /data/rxrx1 --out /data/crops/rxrx1 --workers 8
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from data.crop_builder import Source
from data.sites import ChannelRef, Site
from data.sources import cli, tables

# w1..w6, from the RxRx1 paper (the README lists only the channel numbers).
RXRX_STAINS = ["Hoechst", "ConA", "Phalloidin", "Syto14", "MitoTracker", "WGA"]
COLUMNS = ("experiment", "plate", "well", "site", "well_type", "sirna")
EXTRA_COLUMNS = ("site_id", "well_id", "cell_type", "dataset", "well_type")


class RxRx1(Source):
    kind = "rxrx1"
    module = "data.sources.rxrx1"
    image_size = (512, 512)

    def __init__(self, source_dir: str | Path, *, metadata: str = "metadata.csv", images: str = "images",
                 channel_names: list[str] | None = None, experiments: list[str] | None = None):
        self.source_dir = Path(source_dir)
        self.metadata = self.source_dir / metadata
        self.images = self.source_dir / images
        self.channels = list(channel_names or RXRX_STAINS)
        if len(self.channels) != 6:
            raise tables.TableError(f"RxRx1 has 6 channels (w1..w6); got names {self.channels}")
        self.experiments = experiments

    def sites(self) -> list[Site]:
        table = tables.read_table(self.metadata)
        tables.require_columns(table, COLUMNS, self.metadata)
        if self.experiments:
            unknown = sorted(set(self.experiments) - set(table["experiment"]))
            if unknown:
                raise tables.TableError(f"{self.metadata}: no experiments {unknown}")
            table = table[table["experiment"].isin(self.experiments)]
        sites = []
        for row_number, row in table.iterrows():
            where = (self.metadata, row_number + 2)  # 1-based line number, after the header
            experiment = tables.required_text(row["experiment"], *where, "experiment")
            plate = tables.as_int(row["plate"], *where, "plate")
            well = tables.required_text(row["well"], *where, "well")
            site = tables.as_int(row["site"], *where, "site")
            folder = self.images / experiment / f"Plate{plate}"
            meta: dict[str, Any] = {
                "experiment": experiment, "plate": f"Plate{plate}", "well": well, "site": site,
                "perturbation": tables.required_text(row["sirna"], *where, "sirna"),
                "is_control": row["well_type"] == "negative_control",
                **tables.extras(row, EXTRA_COLUMNS),
            }
            if "sirna_id" in row.index:
                meta["sirna_id"] = tables.as_int(row["sirna_id"], *where, "sirna_id")
            refs = tuple(ChannelRef(str(folder / f"{well}_s{site}_w{c}.png")) for c in range(1, 7))
            sites.append(Site(f"{experiment}/Plate{plate}/{well}/s{site}", meta, refs))
        sites.sort(key=lambda s: (s.meta["experiment"], int(s.meta["plate"][5:]), s.meta["well"], s.meta["site"]))
        return sites

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "source_dir": str(self.source_dir), "metadata": str(self.metadata),
                "images": str(self.images), "experiments": self.experiments,
                "channel_files": "{well}_s{site}_w{1..6}.png"}


def add_arguments(p) -> None:
    p.add_argument("--source_dir", deprecated="--source-dir", required=True,
                   help="folder holding metadata.csv and images/")
    p.add_argument("--metadata", default="metadata.csv", help="relative to --source_dir")
    p.add_argument("--images", default="images", help="relative to --source_dir")
    p.add_argument("--channel_names", deprecated="--channel-names",
                   help=f"comma-separated names of w1..w6 (default {','.join(RXRX_STAINS)})")
    p.add_argument("--experiments", help="comma-separated experiments to build (default all)")


def from_args(args) -> RxRx1:
    return RxRx1(args.source_dir, metadata=args.metadata, images=args.images,
                 channel_names=cli.names(args.channel_names), experiments=cli.names(args.experiments))


def main(argv: list[str] | None = None) -> int:
    return cli.main(__doc__, add_arguments, from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
