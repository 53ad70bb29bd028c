"""Embeddings as parquet: `feature_*` columns beside the crops' or wells' metadata, one table per block.

The tables are what `eval.map_benchmark --features` reads (feature columns are those named `feature_*`,
every other column is metadata; the RxRx3-core embedding format) and what pycytominer takes as a
profiles table (`pycytominer.cyto_utils.load_profiles(path)`, then e.g. `normalize(profiles,
features=[c for c in profiles if c.startswith("feature_")], meta_features=[...])`). Features are float32,
named feature_0 ... feature_{D-1}.

Crop rows carry the dataset's metadata (record_id, experiment, plate, well, site, tile, perturbation,
is_control, label and the builder's extra columns; the record's storage place `shard`/`index` is left
out) plus `well_id` = `<experiment>_<plate>_<well>` (RxRx3's well_id, map_benchmark's default
`--join_on`). Well rows hold the columns that are constant within a well, plus `n_crops`.

Every file is written under a temporary name in its folder (`.<name>.tmp-<pid>`, which parquet dataset
readers skip) and renamed when complete, so a reader never sees half a file and a killed writer leaves
nothing that counts as done.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

FEATURE_PREFIX = "feature_"        # the same as eval.map_benchmark.FEATURE_PREFIX
WELL_KEYS = ("experiment", "plate", "well")
STORAGE_COLUMNS = ("shard", "index")  # where a record lives in the ArrayRecord shards: not crop metadata


def feature_names(dim: int) -> list[str]:
    return [f"{FEATURE_PREFIX}{i}" for i in range(dim)]


def block_name(block: int) -> str:
    """1-based block number -> `block_03` (the file or folder name of that block's table)."""
    return f"block_{block:02d}"


def crop_metadata(meta: pd.DataFrame) -> pd.DataFrame:
    """The dataset's metadata rows as written beside crop features: storage columns dropped, `well_id` added."""
    out = meta.drop(columns=[c for c in STORAGE_COLUMNS if c in meta.columns]).reset_index(drop=True)
    if "well_id" not in out.columns and all(k in out.columns for k in WELL_KEYS):
        out["well_id"] = (out["experiment"].astype(str) + "_" + out["plate"].astype(str) + "_"
                          + out["well"].astype(str))
    return out


def features_table(features: np.ndarray, meta: pd.DataFrame | None = None) -> pa.Table:
    """(n, D) features + n metadata rows -> one arrow table: the metadata columns, then feature_0..D-1 (float32)."""
    features = np.asarray(features, np.float32)
    if features.ndim != 2:
        raise ValueError(f"features must be (rows, dims), got {features.shape}")
    columns = np.ascontiguousarray(features.T)   # one contiguous row per feature column
    arrays, names = [], []
    if meta is not None:
        if len(meta) != len(features):
            raise ValueError(f"{len(meta)} metadata rows for {len(features)} feature rows")
        bad = [c for c in meta.columns if str(c).startswith(FEATURE_PREFIX)]
        if bad:
            raise ValueError(f"metadata columns {bad[:5]} start with {FEATURE_PREFIX!r}: they would read as features")
        meta_table = pa.Table.from_pandas(meta.reset_index(drop=True), preserve_index=False)
        arrays, names = list(meta_table.columns), list(meta_table.column_names)
    arrays += [pa.array(c) for c in columns]
    names += feature_names(features.shape[1])
    return pa.Table.from_arrays(arrays, names=names)


def temporary_path(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}")


def write_table(table: pa.Table, path: str, *, publish: bool = True) -> str:
    """Writes `table` to a temporary name beside `path` (flushed to disk) and renames it to `path` when
    `publish`; otherwise returns the temporary name, for `publish_files` (several files made visible
    together)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if publish:
        os.replace(tmp, path)
    return tmp


def publish_files(pairs: Sequence[tuple[str, str]]) -> None:
    """Renames each (temporary, final) pair: the final names appear only after every file was written."""
    for tmp, final in pairs:
        os.replace(tmp, final)


def remove_temporaries(folder: str) -> int:
    """Deletes leftover `.<name>.tmp-<pid>` files of killed writers in `folder`; returns how many."""
    if not os.path.isdir(folder):
        return 0
    stale = [n for n in os.listdir(folder) if n.startswith(".") and ".tmp-" in n]
    for n in stale:
        try:
            os.remove(os.path.join(folder, n))
        except FileNotFoundError:   # another process of the job removed it first
            pass
    return len(stale)


def read_features(path: str, columns: Sequence[str] | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """A parquet file or a folder of parquet parts -> (float32 features (rows, D), metadata rows).
    Crop tables come back in record_id order."""
    table = pq.read_table(path, columns=list(columns) if columns else None)
    df = table.to_pandas()
    if "record_id" in df.columns:
        df = df.sort_values("record_id", kind="stable").reset_index(drop=True)
    feats = [c for c in df.columns if str(c).startswith(FEATURE_PREFIX)]
    return df[feats].to_numpy(np.float32), df.drop(columns=feats)


# ------------------------------------------------------------------------------------------------------
# Well means, built from per-shard partial means (so the last step reads wells, never all crops again)
# ------------------------------------------------------------------------------------------------------

def wells(meta: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """(well code of every record, one metadata row per well in order of first record). A well's row
    keeps the columns constant within every well (perturbation, is_control, label, well_id, ...)."""
    missing = [k for k in WELL_KEYS if k not in meta.columns]
    if missing:
        raise ValueError(f"the dataset's metadata lacks {missing}, needed to average crops per well")
    meta = crop_metadata(meta)
    grouped = meta.groupby(list(WELL_KEYS), sort=False, dropna=False)
    codes = grouped.ngroup().to_numpy(np.int64)          # numbered in order of first appearance
    others = [c for c in meta.columns if c not in WELL_KEYS and c != "record_id"]
    constant = [c for c in others if (grouped[c].nunique(dropna=False) <= 1).all()]
    table = (grouped[constant].first() if constant else grouped.size().to_frame("n")).reset_index()
    return codes, table[list(WELL_KEYS) + constant]


def partial_means(features: np.ndarray, codes: np.ndarray) -> pa.Table:
    """The wells met in one shard: `well_code`, `n_crops` and the mean features of those crops."""
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    uniq, starts, counts = np.unique(sorted_codes, return_index=True, return_counts=True)
    sums = np.add.reduceat(np.asarray(features, np.float64)[order], starts, axis=0)
    means = (sums / counts[:, None]).astype(np.float32)
    meta = pd.DataFrame({"well_code": uniq.astype(np.int64), "n_crops": counts.astype(np.int64)})
    return features_table(means, meta)


def combine_partials(paths: Sequence[str], num_wells: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Partial means of all shards (in shard order) -> (crops per well, float32 well means (wells, D))."""
    sums = np.zeros((num_wells, dim), np.float64)
    counts = np.zeros(num_wells, np.int64)
    names = feature_names(dim)
    for path in paths:
        t = pq.read_table(path)
        code = t.column("well_code").to_numpy()
        n = t.column("n_crops").to_numpy()
        means = np.stack([t.column(c).to_numpy() for c in names], axis=1).astype(np.float64)
        np.add.at(counts, code, n)
        np.add.at(sums, code, means * n[:, None])
    seen = counts > 0
    out = np.zeros((num_wells, dim), np.float32)
    out[seen] = (sums[seen] / counts[seen, None]).astype(np.float32)
    return counts, out
