"""Any screen listed in a CSV: one row per site, one column per channel naming its image file.

Required columns: `experiment`, `plate`, `well`, `site` and one column per channel (`--channels`, in
record order; the column name is the channel name). Optional: `perturbation` (default `unknown`) and
`is_control` (true/false; default: perturbation in `--control_labels`). Every other column is kept as
text metadata on each record. Files are PNG, TIFF or JPEG-2000, 8- or 16-bit, paths relative to the
CSV's folder unless absolute (or `--source_dir`).

    python -m data.sources.generic --csv sites.csv --channels DNA,ER,RNA,AGP,Mito --out /data/crops/mine
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from data.crop_builder import Source
from data.sites import ChannelRef, Site, relative_to
from data.sources import cli, tables

COLUMNS = ("experiment", "plate", "well", "site")
UNKNOWN = "unknown"


class GenericCSV(Source):
    kind = "generic"
    module = "data.sources.generic"

    def __init__(self, csv: str | Path, channels: list[str], *, source_dir: str | Path | None = None,
                 control_labels: tuple[str, ...] = ()):
        self.csv = Path(csv)
        self.source_dir = Path(source_dir) if source_dir else self.csv.parent
        if not channels:
            raise tables.TableError(f"{self.csv}: name the channel columns (--channels)")
        self.channels = list(channels)
        self.control_labels = tuple(control_labels)

    def sites(self) -> list[Site]:
        table = tables.read_table(self.csv)
        tables.require_columns(table, COLUMNS + tuple(self.channels), self.csv)
        extra_columns = [c for c in table.columns if c not in COLUMNS + tuple(self.channels)
                         + ("perturbation", "is_control")]
        tables.check_not_reserved(extra_columns, self.csv)
        sites = []
        for row_number, row in table.iterrows():
            where = (self.csv, row_number + 2)
            key = [tables.required_text(row[c], *where, c) for c in COLUMNS[:3]]
            site = tables.as_int(row["site"], *where, "site")
            perturbation = str(row["perturbation"]).strip() if "perturbation" in row.index else ""
            perturbation = perturbation or UNKNOWN
            is_control = (tables.as_bool(row["is_control"], *where, "is_control") if "is_control" in row.index
                          else perturbation in self.control_labels)
            refs, problems = [], []
            for channel in self.channels:
                name = str(row[channel]).strip()
                refs.append(ChannelRef(relative_to(self.source_dir, name)) if name else None)
                if not name:
                    problems.append((str(self.csv), f"line {where[1]}: no file for channel {channel}"))
            meta: dict[str, Any] = {"experiment": key[0], "plate": key[1], "well": key[2], "site": site,
                                    "perturbation": perturbation, "is_control": is_control,
                                    **tables.extras(row, extra_columns)}
            sites.append(Site("/".join(key) + f"/s{site}", meta, tuple(refs), tuple(problems)))
        return sites

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "csv": str(self.csv), "source_dir": str(self.source_dir),
                "channel_columns": self.channels, "control_labels": list(self.control_labels)}


def add_arguments(p) -> None:
    p.add_argument("--csv", required=True, help="one row per site")
    p.add_argument("--channels", required=True, help="comma-separated channel columns, in record order")
    p.add_argument("--source_dir", deprecated="--source-dir",
                   help="folder relative file paths start from (default: the CSV's)")
    p.add_argument("--control_labels", deprecated="--control-labels", default="",
                   help="perturbations that are controls (without is_control)")


def from_args(args) -> GenericCSV:
    return GenericCSV(args.csv, cli.names(args.channels), source_dir=args.source_dir,
                      control_labels=tuple(cli.names(args.control_labels) or ()))


def main(argv: list[str] | None = None) -> int:
    return cli.main(__doc__, add_arguments, from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
