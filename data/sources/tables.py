"""Metadata tables of real screens (CSV, CSV.gz, parquet): reading them and turning rows into record metadata."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# Record metadata the builders set themselves; a source column of these names would clash.
RESERVED = ("record_id", "shard", "index", "label", "tile", "crop_y", "crop_x", "channels")


class TableError(ValueError):
    """A metadata table that is missing, unreadable or lacks what the layout needs; names the file."""


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{path}: metadata table not found")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        # Wells, plates and ids stay text ("01" is not 1); numeric columns are converted per use.
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:
        raise TableError(f"{path}: cannot read table ({type(e).__name__}: {e})") from e


def require_columns(table: pd.DataFrame, columns: Iterable[str], path: str | Path) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise TableError(f"{path}: lacks columns {missing} (has {list(table.columns)})")


def required_text(value: Any, path: str | Path, row: int, column: str) -> str:
    text = "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()
    if not text:
        raise TableError(f"{path}: row {row} has no {column}")
    return text


def as_int(value: Any, path: str | Path, row: int, column: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise TableError(f"{path}: row {row}: {column}={value!r} is not an integer") from None


def as_bool(value: Any, path: str | Path, row: int, column: str) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "t"):
        return True
    if text in ("false", "0", "no", "f", ""):
        return False
    raise TableError(f"{path}: row {row}: {column}={value!r} is not a boolean")


def scalar(value: Any) -> str | int | float | bool:
    """A cell as a plain scalar for record metadata: text stays text, numbers stay numbers, NA is ''."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, np.generic):
        return value.item()
    return value if isinstance(value, (str, int, float, bool)) else str(value)


def number(value: Any) -> float:
    """A numeric cell (e.g. a concentration) as float, NaN when empty."""
    text = str(value).strip()
    return float(text) if text else float("nan")


def extras(row: pd.Series, columns: Sequence[str], rename: dict[str, str] | None = None) -> dict[str, Any]:
    """Extra metadata from `columns` of a row (those present), renamed by `rename`."""
    rename = rename or {}
    return {rename.get(c, c): scalar(row[c]) for c in columns if c in row.index}


def check_not_reserved(columns: Iterable[str], path: str | Path) -> None:
    clash = [c for c in columns if c in RESERVED]
    if clash:
        raise TableError(f"{path}: columns {clash} clash with record metadata the builder sets; rename them")
