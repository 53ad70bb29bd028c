"""JUMP-CP (cpg0016, Cell Painting Gallery): `load_data.csv` rows per site, 16-bit TIFF per channel.

Each row of `workspace/load_data_csv/{batch}/{plate}/load_data[_with_illum].csv` is one site:
`Metadata_{Source,Batch,Plate,Well,Site}`, `FileName_Orig<Channel>` + `PathName_Orig<Channel>` per
channel (5 fluorescent, up to 3 brightfield) and, in the `_with_illum` tables, `FileName_Illum<Channel>`
+ `PathName_Illum<Channel>` (.npy illumination functions the images are divided by). The channels and
their order come from the `FileName_Orig*` columns of the first table (`--channels` picks and orders
them), never from a built-in list: the mapping differs between sources.

Perturbations come from the `jump-cellpainting/datasets` tables when given: `--wells well.csv.gz`
(plate, well -> Metadata_JCP2022) and `--perturbations crispr.csv.gz [orf.csv.gz ...]` (JCP2022 ->
`--perturbation_col`, default Metadata_Symbol; unmapped ids stay JCP2022 ids). Without them every
site is `unknown` (fine for self-supervised training). Controls: `--control_labels`.

    python -m data.sources.jump_cp --source_dir /data/cpg0016/source_4/workspace/load_data_csv \\
        --path_map s3://cellpainting-gallery/=/data/ --wells well.csv.gz --perturbations crispr.csv.gz \\
        --out /data/crops/jump --workers 16
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from data.crop_builder import Source
from data.sites import ChannelRef, Site, relative_to
from data.sources import cli, tables

ORIG = re.compile(r"^FileName_Orig(?P<channel>\w+)$")
LOAD_DATA_NAMES = ("load_data_with_illum.csv", "load_data.csv")  # per plate folder, the first one found
SITE_COLUMNS = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")
# Negative controls of the JUMP CRISPR (non-targeting, no-guide) and compound (DMSO) plates.
CONTROL_LABELS = ("non-targeting", "no-guide", "JCP2022_033924")
UNKNOWN = "unknown"


class JumpCP(Source):
    kind = "jump_cp"
    module = "data.sources.jump_cp"
    image_size = None  # differs between sources: the first readable site's, unless --image_size

    def __init__(self, load_data: list[str | Path], *, channels: list[str] | None = None, illum: bool = True,
                 path_map: list[tuple[str, str]] | None = None, wells: str | Path | None = None,
                 perturbations: list[str | Path] | None = None, perturbation_column: str = "Metadata_Symbol",
                 control_labels: tuple[str, ...] = CONTROL_LABELS):
        if not load_data:
            raise tables.TableError("no load_data tables given")
        self.load_data = [Path(p) for p in load_data]
        self.illum, self.path_map = illum, list(path_map or [])
        self.wells = Path(wells) if wells else None
        self.perturbations = [Path(p) for p in perturbations or []]
        self.perturbation_column, self.control_labels = perturbation_column, tuple(control_labels)
        first = tables.read_table(self.load_data[0])
        available = [m["channel"] for m in map(ORIG.match, first.columns) if m]
        if not available:
            raise tables.TableError(f"{self.load_data[0]}: no FileName_Orig<Channel> columns")
        unknown = sorted(set(channels or []) - set(available))
        if unknown:
            raise tables.TableError(f"{self.load_data[0]}: no channels {unknown} (has {available})")
        self.channels = list(channels or available)

    @staticmethod
    def find_load_data(source_dir: str | Path) -> list[Path]:
        """Every plate folder's load_data table under `source_dir` (the _with_illum one where both exist)."""
        found = {}
        for name in reversed(LOAD_DATA_NAMES):
            for path in Path(source_dir).rglob(name):
                found[path.parent] = path
        if not found:
            raise tables.TableError(f"{source_dir}: no {' or '.join(LOAD_DATA_NAMES)} below it")
        return [found[folder] for folder in sorted(found)]

    def sites(self) -> list[Site]:
        labels = self._labels()
        sites = []
        for path in self.load_data:
            table = tables.read_table(path)
            tables.require_columns(table, SITE_COLUMNS + tuple(f"FileName_Orig{c}" for c in self.channels), path)
            table = table.assign(_line=range(2, len(table) + 2),
                                 _site=pd.to_numeric(table["Metadata_Site"], errors="coerce"))
            table = table.sort_values(["Metadata_Plate", "Metadata_Well", "_site"], kind="stable")
            sites += [self._site(path, row, labels) for _, row in table.iterrows()]
        return sites

    def _site(self, path: Path, row: pd.Series, labels: dict | None) -> Site:
        where = (path, int(row["_line"]))
        plate = tables.required_text(row["Metadata_Plate"], *where, "Metadata_Plate")
        well = tables.required_text(row["Metadata_Well"], *where, "Metadata_Well")
        site = tables.as_int(row["Metadata_Site"], *where, "Metadata_Site")
        batch = str(row.get("Metadata_Batch", "") or plate)
        refs, problems = [], []
        for channel in self.channels:
            name = str(row[f"FileName_Orig{channel}"]).strip()
            if not name:
                refs.append(None)
                problems.append((str(path), f"line {where[1]}: FileName_Orig{channel} is empty"))
                continue
            illum = None
            if self.illum and f"FileName_Illum{channel}" in row.index and str(row[f"FileName_Illum{channel}"]).strip():
                illum = self._file(path, row, f"Illum{channel}")
            refs.append(ChannelRef(self._file(path, row, f"Orig{channel}"), illum=illum))
        jcp = ""
        if labels is not None:
            jcp = labels["wells"].get((plate, well), "")
            if not jcp:
                raise tables.TableError(f"{self.wells}: no Metadata_JCP2022 for plate {plate} well {well} "
                                        f"(listed in {path} line {where[1]})")
        perturbation = labels["names"].get(jcp, jcp) if labels is not None else UNKNOWN
        meta: dict[str, Any] = {
            "experiment": batch, "plate": plate, "well": well, "site": site, "perturbation": perturbation,
            "is_control": perturbation in self.control_labels or jcp in self.control_labels,
            "metadata_source": str(row.get("Metadata_Source", "")), "jcp2022": jcp,
        }
        return Site(f"{batch}/{plate}/{well}/s{site}", meta, tuple(refs), tuple(problems))

    def _file(self, table_path: Path, row: pd.Series, suffix: str) -> str:
        folder = str(row.get(f"PathName_{suffix}", "")).strip()
        for old, new in self.path_map:
            if folder.startswith(old):
                folder = new + folder[len(old):]
                break
        name = str(row[f"FileName_{suffix}"]).strip()
        return relative_to(table_path.parent, str(Path(folder) / name) if folder else name)

    def _labels(self) -> dict | None:
        if self.wells is None:
            return None
        wells = tables.read_table(self.wells)
        tables.require_columns(wells, ("Metadata_Plate", "Metadata_Well", "Metadata_JCP2022"), self.wells)
        names: dict[str, str] = {}
        for path in self.perturbations:
            table = tables.read_table(path)
            tables.require_columns(table, ("Metadata_JCP2022",), path)
            if self.perturbation_column in table.columns:
                names.update({j: n for j, n in zip(table["Metadata_JCP2022"], table[self.perturbation_column])
                              if isinstance(n, str) and n.strip()})
        return {"wells": dict(zip(zip(wells["Metadata_Plate"], wells["Metadata_Well"]), wells["Metadata_JCP2022"])),
                "names": names}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "load_data": [str(p) for p in self.load_data], "channels": self.channels,
                "illumination_correction": self.illum, "path_map": [list(m) for m in self.path_map],
                "wells": str(self.wells) if self.wells else None, "perturbations": [str(p) for p in self.perturbations],
                "perturbation_column": self.perturbation_column, "control_labels": list(self.control_labels)}


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--source_dir", deprecated="--source-dir",
                     help="searched recursively for per-plate load_data tables")
    src.add_argument("--load_data", deprecated="--load-data", nargs="+", help="load_data tables to read")
    p.add_argument("--channels", help="comma-separated channel names (FileName_Orig<name>) in record order")
    p.add_argument("--no_illum", deprecated="--no-illum", action="store_true",
                   help="ignore FileName_Illum* (no illumination correction)")
    p.add_argument("--path_map", deprecated="--path-map", action="append", default=[], metavar="OLD=NEW",
                   help="rewrite PathName prefixes, e.g. s3://cellpainting-gallery/=/data/ (repeatable)")
    p.add_argument("--wells", help="well.csv(.gz): Metadata_Plate, Metadata_Well -> Metadata_JCP2022")
    p.add_argument("--perturbations", nargs="*", default=[],
                   help="crispr/orf/compound tables: Metadata_JCP2022 -> name")
    p.add_argument("--perturbation_col", deprecated="--perturbation-column", default="Metadata_Symbol")
    p.add_argument("--control_labels", deprecated="--control-labels", default=",".join(CONTROL_LABELS))


def from_args(args) -> JumpCP:
    bad = [item for item in args.path_map if "=" not in item]
    if bad:
        raise tables.TableError(f"--path_map takes OLD=NEW, got {bad}")
    return JumpCP(args.load_data or JumpCP.find_load_data(args.source_dir), channels=cli.names(args.channels),
                  illum=not args.no_illum, path_map=[tuple(item.split("=", 1)) for item in args.path_map],
                  wells=args.wells, perturbations=args.perturbations, perturbation_column=args.perturbation_col,
                  control_labels=tuple(cli.names(args.control_labels)))


def main(argv: list[str] | None = None) -> int:
    return cli.main(__doc__, add_arguments, from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
