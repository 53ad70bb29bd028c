"""RxRx3-core (Recursion, Hugging Face `recursionpharma/rxrx3-core`): parquet shards of JPEG-2000 images.

`data/train-000NN-of-00035.parquet` rows are `{__key__, jp2}`, one 512x512 channel image each, keyed
`{experiment_name}/Plate{plate}/{address}_s1_{channel}` (channels 1..6, one site per well);
`metadata_rxrx3_core.csv` has one row per well (`experiment_name, plate, address, gene, treatment,
SMILES, concentration, perturbation_type, ...`). Perturbation: the first non-empty of `gene`, `treatment`
(`--perturbation_col`); controls: `EMPTY_control` (`--control_labels`).

    python -m data.sources.rxrx3_core --source_dir /data/rxrx3-core --out /data/crops/rxrx3_core --workers 8
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from data.crop_builder import Source
from data.sites import ChannelRef, Site
from data.sources import cli, tables
from data.sources.rxrx1 import RXRX_STAINS

KEY = re.compile(r"^(?P<experiment>[^/]+)/Plate(?P<plate>[^/]+)/(?P<address>[A-Za-z]+\d+)"
                 r"_s(?P<site>\d+)_(?P<channel>\d+)$")
COLUMNS = ("experiment_name", "plate", "address")
EXTRA_COLUMNS = ("well_id", "gene", "treatment", "SMILES", "perturbation_type", "cell_type", "well_type_label")


class RxRx3Core(Source):
    kind = "rxrx3_core"
    module = "data.sources.rxrx3_core"
    image_size = (512, 512)

    def __init__(self, source_dir: str | Path, *, shards: str = "data/*.parquet",
                 metadata: str = "metadata_rxrx3_core.csv", key_column: str = "__key__", image_column: str = "jp2",
                 perturbation_columns: tuple[str, ...] = ("gene", "treatment"),
                 control_labels: tuple[str, ...] = ("EMPTY_control",), channel_names: list[str] | None = None):
        self.source_dir = Path(source_dir)
        self.shards, self.metadata = shards, self.source_dir / metadata
        self.key_column, self.image_column = key_column, image_column
        self.perturbation_columns, self.control_labels = tuple(perturbation_columns), tuple(control_labels)
        self.channels = list(channel_names or RXRX_STAINS)

    def sites(self) -> list[Site]:
        images = self._index_images()
        table = tables.read_table(self.metadata)
        tables.require_columns(table, COLUMNS + self.perturbation_columns, self.metadata)
        wells: dict[tuple[str, str, str], tuple[int, Any]] = {}
        for row_number, row in table.iterrows():
            where = (self.metadata, row_number + 2)
            key = tuple(tables.required_text(row[c], *where, c) for c in COLUMNS)
            if key in wells:
                raise tables.TableError(f"{self.metadata}: lines {wells[key][0]} and {row_number + 2} are both "
                                        f"well {key}")
            wells[key] = (row_number + 2, row)
        # Storage order (the first image of each well), then metadata wells that have no image at all.
        order = list(images) + sorted(set(wells) - set(images))
        return [self._site(well, images.get(well, {}), wells.get(well)) for well in order]

    def _index_images(self) -> dict[tuple[str, str, str], dict[int, ChannelRef]]:
        import pyarrow.parquet as pq

        files = sorted(self.source_dir.glob(self.shards))
        if not files:
            raise tables.TableError(f"{self.source_dir}: no parquet shards match {self.shards!r}")
        images: dict[tuple[str, str, str], dict[int, ChannelRef]] = {}
        for path in files:
            try:
                keys = pq.read_table(path, columns=[self.key_column]).column(0).to_pylist()
            except Exception as e:
                raise tables.TableError(f"{path}: cannot read column {self.key_column!r} ({type(e).__name__}: {e})")
            for row, key in enumerate(keys):
                match = KEY.match(key or "")
                if not match or match["site"] != "1":
                    raise tables.TableError(f"{path}[row {row}]: key {key!r} is not "
                                            f"'<experiment>/Plate<plate>/<address>_s1_<channel>'")
                well = (match["experiment"], match["plate"], match["address"])
                channel = int(match["channel"])
                if channel in images.setdefault(well, {}):
                    raise tables.TableError(f"{path}[row {row}]: key {key!r} also at "
                                            f"{images[well][channel].where()}")
                images[well][channel] = ChannelRef(str(path), row=row, column=self.image_column)
        return images

    def _site(self, well: tuple[str, str, str], refs: dict[int, ChannelRef], annotation) -> Site:
        experiment, plate, address = well
        prefix = f"{experiment}/Plate{plate}/{address}_s1_"
        problems = [(str(self.source_dir / self.shards), f"no image keyed {prefix}{c}")
                    for c in range(1, len(self.channels) + 1) if c not in refs]
        extra = sorted(set(refs) - set(range(1, len(self.channels) + 1)))
        if extra:
            problems.append((refs[extra[0]].where(), f"channel {extra[0]} beyond the {len(self.channels)} named"))
        meta: dict[str, Any] = {"experiment": experiment, "plate": f"Plate{plate}", "well": address, "site": 1,
                                "perturbation": "", "is_control": False}
        if annotation is None:
            problems.append((str(self.metadata), f"no row for experiment_name={experiment} plate={plate} "
                                                 f"address={address}"))
        else:
            line, row = annotation
            values = [tables.scalar(row[c]) for c in self.perturbation_columns]
            perturbation = next((str(v) for v in values if str(v).strip()), "")
            if not perturbation:
                raise tables.TableError(f"{self.metadata}: row {line} has none of {list(self.perturbation_columns)}")
            meta.update(perturbation=perturbation,
                        is_control=any(str(v) in self.control_labels for v in values),
                        concentration=tables.number(row.get("concentration", "")),
                        **tables.extras(row, EXTRA_COLUMNS, rename={"SMILES": "smiles"}))
        channels = tuple(refs.get(c) for c in range(1, len(self.channels) + 1))
        return Site(f"{experiment}/Plate{plate}/{address}/s1", meta, channels, tuple(problems))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "source_dir": str(self.source_dir), "shards": self.shards,
                "metadata": str(self.metadata), "key_column": self.key_column, "image_column": self.image_column,
                "perturbation_columns": list(self.perturbation_columns), "control_labels": list(self.control_labels)}


def add_arguments(p) -> None:
    p.add_argument("--source_dir", deprecated="--source-dir", required=True,
                   help="the dataset folder (holding data/ and the metadata CSV)")
    p.add_argument("--shards", default="data/*.parquet", help="glob of the image shards, relative to --source_dir")
    p.add_argument("--metadata", default="metadata_rxrx3_core.csv", help="relative to --source_dir")
    p.add_argument("--key_col", deprecated="--key-column", default="__key__")
    p.add_argument("--image_col", deprecated="--image-column", default="jp2")
    p.add_argument("--perturbation_col", deprecated="--perturbation-columns", default="gene,treatment",
                   help="comma-separated columns; the first non-empty one is the perturbation")
    p.add_argument("--control_labels", deprecated="--control-labels", default="EMPTY_control")
    p.add_argument("--channel_names", deprecated="--channel-names",
                   help=f"comma-separated names of channels 1..6 (default {','.join(RXRX_STAINS)})")


def from_args(args) -> RxRx3Core:
    return RxRx3Core(args.source_dir, shards=args.shards, metadata=args.metadata, key_column=args.key_col,
                     image_column=args.image_col, perturbation_columns=tuple(cli.names(args.perturbation_col)),
                     control_labels=tuple(cli.names(args.control_labels)), channel_names=cli.names(args.channel_names))


def main(argv: list[str] | None = None) -> int:
    return cli.main(__doc__, add_arguments, from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
