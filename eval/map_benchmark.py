"""Benchmark any embeddings as an EFAAR map: PCA -> batch correction -> aggregate -> recall.

  python -m eval.map_benchmark --embeddings F.parquet --perturbation_col gene --batch_col batch \\
      --control non-targeting --pca_components 128 --correction tvn --aggregate mean \\
      --annotations ../shared/reference/efaar_annotations --out DIR [--plot recall.png]

Feature columns are those named `feature_*` (the RxRx3-core embedding format); the other columns
are metadata. Metadata may come from a separate table (`--metadata`, joined on `--join_on`), rows
may be averaged per well first (`--average_by`) and filtered (`--where col=value`), which is what
OpenPhenom's RxRx3-core parquet needs. `<out>/report.json` holds the `recall` records (EFAAR's
known_relationship_benchmark columns), the replicate `consistency` summary, and what was run.
`evaluate_map` is the same benchmark as a function over arrays (e.g. for every block of a model).

The defaults are eval.job's, from `maejax.config.base().eval`: PCA 128 components at most (fewer when the
table has fewer features, or rows - 1), TVN, thresholds (0.05, 0.95) and (0.1, 0.9), `--batch_col
experiment`, and the EFAAR 1.0 relationship tables of the installed efaar_benchmarking package
(eval/annotations.py).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence

FEATURE_PREFIX = "feature_"
_WORKSPACE = []   # the column-major feature matrix allocated before the imports (_early_workspace), if any


def _early_workspace(argv: Sequence[str]) -> None:
    """For the command line: allocates the (rows, features) workspace that `efaar.ColumnPCA` will fill, from
    the parquet footer alone, and has a thread fault its pages in (madvise MADV_POPULATE_WRITE, outside the
    GIL) while this process imports pandas and scipy on one core. A fresh GiB costs 1-2 s of kernel time on
    the VMs we measured; this moves it off the critical path. Only for a plain parquet run whose features
    are all float32 or all float64; anything else (or an old kernel) is left to the normal allocation."""
    opts = {}
    for flag, value in zip(argv, list(argv[1:]) + [""]):
        if flag.startswith("--"):
            name, eq, inline = flag[2:].partition("=")
            opts[name.replace("-", "_")] = inline if eq else value
    path = opts.get("embeddings") or opts.get("features")
    if (not path or not path.endswith(".parquet") or opts.get("pca_components") == "0"
            or {"metadata", "where", "average_by"} & set(opts)):
        return
    try:
        import ctypes

        import numpy as np
        import pyarrow.parquet as pq
        footer = pq.ParquetFile(path)                       # the footer only: one read
        schema = footer.schema_arrow
        types = {str(schema.field(c).type) for c in schema.names if c.startswith(FEATURE_PREFIX)}
        dtype = {"float": "float32", "double": "float64"}.get(types.pop()) if len(types) == 1 else None
        if dtype is None or opts.get("dtype", dtype) != dtype:
            return
        rows = footer.metadata.num_rows
        width = sum(c.startswith(FEATURE_PREFIX) for c in schema.names)
        workspace = np.empty((width, rows), dtype).T
        libc = ctypes.CDLL(None)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        start, end = workspace.ctypes.data & ~(mmap.PAGESIZE - 1), workspace.ctypes.data + workspace.nbytes
        populate = getattr(mmap, "MADV_POPULATE_WRITE", 23)

        def prefault(step: int = 32 << 20) -> None:
            # 32 MiB per call: one call for the whole GiB holds the process's mmap lock throughout, and the
            # imports' own allocations waited on it (pandas' import took 2.0 s instead of 0.6)
            for at in range(start, end, step):
                if libc.madvise(at, min(step, end - at), populate) != 0:
                    return   # e.g. a kernel before 5.14: the pages fault in as they are written
        threading.Thread(target=prefault, daemon=True, name="prefault").start()
        _WORKSPACE.append(workspace)
    except Exception:   # any problem here is the normal path's to report
        return


if __name__ == "__main__":
    # OpenBLAS's idle threads spin for 2^28 cycles after each call before they sleep. Here the PCA's GEMMs
    # run beside the parquet decoding and Python work, and on a 2-core machine the spinning took a core
    # from them (perf: 6% of the process's CPU). Set before numpy loads OpenBLAS; the user's value wins.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    gc.disable()   # for the imports too (main() says why)
    _early_workspace(sys.argv[1:])

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from eval import consistency, efaar, recall  # noqa: E402
from eval.annotations import find_annotations  # noqa: E402
from maejax import flags  # noqa: E402

REPORT = "report.json"   # the file written into --out
READ_BYTES = 16 << 20  # features decoded per pyarrow call: the reader's memory on top of the matrix


def _is_text_table(path: str) -> bool:
    return path.endswith((".csv", ".csv.gz", ".tsv"))


def _read_table(path: str) -> pd.DataFrame:
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist")
    if _is_text_table(path):
        return pd.read_csv(path, sep="\t" if path.endswith(".tsv") else ",")
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a non-parquet file
        raise ValueError(f"{path}: cannot read as parquet ({type(e).__name__}: {e})") from e


def _features_dtype(types: Sequence) -> np.dtype:
    """The dtype pandas' `df[feature_cols].to_numpy()` gives these arrow columns, made floating as
    load_embeddings does (ints -> float64; a boolean column makes pandas' common type object -> float64)."""
    import pyarrow as pa
    if any(pa.types.is_boolean(t) for t in types):
        return np.dtype(np.float64)
    dt = np.result_type(*[t.to_pandas_dtype() for t in types])
    return dt if np.issubdtype(dt, np.floating) else np.dtype(np.float64)


class _ParquetFeatures:
    """An open parquet file: its metadata columns as a DataFrame (pandas' own reader, so they are what
    `pd.read_parquet` gives), its `feature_*` column names and the float dtype they are read as, and
    `groups()`, the features decoded READ_BYTES at a time (a group of columns over all row groups).

    The file is read through our own read-only memory map: plain-encoded pages are decoded from the OS
    cache without a copy into pyarrow's buffers (measured ~1.5x faster on the 1.5 GB case of
    docs/eval.md), and its pages are dropped from the process after each group of columns, so the file
    never counts in the peak RSS."""

    def __init__(self, path: str, dtype: str | None):
        import pyarrow as pa
        import pyarrow.parquet as pq
        self.path, self._mapped = path, _map_file(path)
        try:
            self._pf = pq.ParquetFile(pa.BufferReader(pa.py_buffer(self._mapped))
                                      if self._mapped is not None else path)
        except Exception as e:  # pyarrow raises several types for a non-parquet file
            raise ValueError(f"{path}: cannot read as parquet ({type(e).__name__}: {e})") from e
        schema = self._pf.schema_arrow
        index_cols = {c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)}
        names = [c for c in schema.names if c not in index_cols]
        self.columns = [c for c in names if c.startswith(FEATURE_PREFIX)]
        self.meta = pd.read_parquet(path, columns=[c for c in names if c not in self.columns]).reset_index(drop=True)
        if not self.columns:
            raise ValueError(f"{path}: no '{FEATURE_PREFIX}*' columns (columns: {names[:20]})")
        types = [schema.field(c).type for c in self.columns]
        bad = [c for c, t in zip(self.columns, types)
               if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t))]
        if bad:
            raise ValueError(f"{path}: feature columns are not numeric: {bad[:10]}")
        self.dtype = np.dtype(dtype) if dtype else _features_dtype(types)
        self.rows = self._pf.metadata.num_rows

    def groups(self):
        """Yields (first column index, [the column's 1-D numpy chunks in row order, per column])."""
        import pyarrow as pa
        step = max(1, min(len(self.columns), READ_BYTES // max(1, self.rows * self.dtype.itemsize)))
        for first in range(0, len(self.columns), step):
            table = self._pf.read(columns=self.columns[first:first + step], use_threads=True,
                                  use_pandas_metadata=False)
            group = []
            for column in table.itercolumns():
                pieces = []
                for chunk in column.chunks:
                    if chunk.null_count and not pa.types.is_floating(chunk.type):
                        chunk = chunk.cast(pa.float64())        # nulls -> NaN, reported as pandas would
                    pieces.append(chunk.to_numpy(zero_copy_only=False))
                group.append(pieces)
            yield first, group
            table = column = chunk = pieces = group = None   # no arrow buffer holds the map's pages any more
            if self._mapped is not None:
                self._mapped.madvise(mmap.MADV_DONTNEED)     # clean file pages: they stay in the OS cache


def _read_parquet_features(path: str, dtype: str | None) -> tuple[np.ndarray, pd.DataFrame, list[str], bool]:
    """A parquet file's `feature_*` columns straight into one column-major (rows, d) array, metadata as a
    DataFrame, and whether every feature is finite (each column checked right after its copy, while in
    cache). Reading adds one group of columns to the matrix itself: no pandas frame of the features, no
    float64 upcast of a float32 file."""
    source = _ParquetFeatures(path, dtype)
    features = np.empty((len(source.columns), source.rows), source.dtype).T
    finite = True
    for first, group in source.groups():
        for j, pieces in enumerate(group, first):
            start = 0
            for piece in pieces:
                features[start:start + len(piece), j] = piece
                start += len(piece)
            finite = finite and bool(np.isfinite(features[:, j]).all())
    return features, source.meta, source.columns, finite


def _streamed_pca(source: _ParquetFeatures, batches, n_components: int,
                  meanwhile: Callable[[], None] | None = None) -> np.ndarray | None:
    """`efaar.embed_by_pca` of the file's features, decoded straight into `efaar.ColumnPCA`, which
    standardises each column as it arrives and computes the Gram matrix of finished columns on a worker
    thread while the next ones are decoded. `meanwhile` runs on this thread once the features are in, while
    the worker goes on with the queued blocks (an exception from it stops the worker and propagates). None
    when a feature is not finite (the caller reads the file again to say where)."""
    codes, nb = efaar._codes(batches, source.rows, "batches")
    storage = _WORKSPACE.pop() if _WORKSPACE else None
    if storage is not None and (storage.shape != (source.rows, len(source.columns)) or storage.dtype != source.dtype):
        storage = None
    pca = efaar.ColumnPCA(codes, nb, len(source.columns), source.dtype, storage=storage)
    try:
        for first, group in source.groups():
            for j, pieces in enumerate(group, first):
                if not pca.put(j, pieces):
                    pca.close()
                    return None
            pca.ready(first + len(group))
        if meanwhile is not None:
            meanwhile()
    except BaseException:
        pca.close()
        raise
    pca.complete()   # the Gram matrix, on all cores
    return pca.finish(n_components)


def _map_file(path: str) -> mmap.mmap | None:
    """A read-only memory map of the file, or None where it cannot be mapped (empty file, no mmap)."""
    try:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None


def _check_finite(features: np.ndarray, path: str, feature_cols: Sequence[str]) -> None:
    """Every feature finite; the quick test is one float64 column sum (NaN/inf propagate), the rows and
    columns are found only when it fails."""
    if np.isfinite(np.add.reduce(features, axis=0, dtype=np.float64)).all():
        return
    nan_rows = ~np.isfinite(features).all(axis=1)
    if nan_rows.any():
        cols = [c for c, bad in zip(feature_cols, ~np.isfinite(features).all(axis=0)) if bad]
        raise ValueError(f"{path}: {int(nan_rows.sum())} rows have NaN/inf features "
                         f"(columns {cols[:10]}); drop or impute them first")


def load_embeddings(path: str, metadata_path: str | None = None, join_on: str = "well_id",
                    where: Sequence[str] = (), average_by: str | None = None,
                    dtype: str | None = None) -> tuple[np.ndarray, pd.DataFrame, list[str]]:
    """Reads a `feature_*` table (+ optional metadata join, filters, per-key averaging).

    Returns (features (rows, d), metadata (rows, ...), feature column names). A parquet file's features
    are read column by column into one array (`_read_parquet_features`), which is then column-major
    (Fortran order); the metadata join and the filters act on the metadata and select rows of it once.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist")
    if _is_text_table(path):
        df = _read_table(path)
        feature_cols = [c for c in df.columns if str(c).startswith(FEATURE_PREFIX)]
        if not feature_cols:
            raise ValueError(f"{path}: no '{FEATURE_PREFIX}*' columns (columns: {list(df.columns)[:20]})")
        bad = [c for c in feature_cols if not pd.api.types.is_numeric_dtype(df[c])]
        if bad:
            raise ValueError(f"{path}: feature columns are not numeric: {bad[:10]}")
        features, meta = df[feature_cols].to_numpy(), df.drop(columns=feature_cols).reset_index(drop=True)
        del df
        finite = False   # not checked yet
    else:
        features, meta, feature_cols, finite = _read_parquet_features(path, dtype)
    rows = None   # the rows kept, in order (None: all, as read)
    if metadata_path:
        other = _read_table(metadata_path)
        for name, table in ((path, meta), (metadata_path, other)):
            if join_on not in table.columns:
                raise ValueError(f"{name}: no join column {join_on!r}")
        taken = set(meta.columns) | set(feature_cols)
        other = other.drop(columns=[c for c in other.columns if c in taken and c != join_on])
        row_col = "__row__"   # each joined row's row in the file
        while row_col in meta.columns or row_col in other.columns:
            row_col += "_"
        meta = meta.assign(**{row_col: np.arange(len(meta))}).merge(other, on=join_on, how="inner")
        if meta.empty:
            raise ValueError(f"no {join_on!r} value of {path} occurs in {metadata_path}")
        rows = meta.pop(row_col).to_numpy()
    for cond in where:
        col, sep, value = cond.partition("=")
        if not sep or (col not in meta.columns and col not in feature_cols):
            raise ValueError(f"--where {cond!r}: expected COLUMN=VALUE with a column of {path}")
        values = meta[col] if col in meta.columns else pd.Series(
            features[:, feature_cols.index(col)] if rows is None else features[rows, feature_cols.index(col)])
        keep = (values.astype(str) == value).to_numpy()
        meta = meta[keep].reset_index(drop=True)
        rows = np.flatnonzero(keep) if rows is None else rows[keep]
        if meta.empty:
            raise ValueError(f"--where {cond!r} leaves no rows")
    if rows is not None and not np.array_equal(rows, np.arange(len(features))):
        features = features[rows]
    if average_by:
        if average_by not in meta.columns:
            raise ValueError(f"{path}: no column {average_by!r} to average by")
        key = meta[average_by].reset_index(drop=True)
        features = pd.DataFrame(features, columns=feature_cols).groupby(key, sort=False).mean().to_numpy()
        meta = meta.reset_index(drop=True).drop(columns=[average_by]).groupby(key, sort=False).first().reset_index()
        finite = False
    if dtype:
        features = features.astype(dtype, copy=False)
    elif not np.issubdtype(features.dtype, np.floating):
        features = features.astype(np.float64)
    if not finite:   # (a selection of rows of finite parquet features, already in the asked dtype, is finite)
        _check_finite(features, path, feature_cols)
    return features, meta.reset_index(drop=True), feature_cols


def _check_column(meta: pd.DataFrame, col: str, flag: str, path: str) -> np.ndarray:
    if col not in meta.columns:
        raise ValueError(f"{path}: no column {col!r} ({flag}); columns are {list(meta.columns)}")
    values = meta[col]
    if values.isna().any():
        raise ValueError(f"{path}: column {col!r} has {int(values.isna().sum())} missing values")
    return values.to_numpy()


def _parse_thresholds(items: Sequence[str]) -> list[tuple[float, float]]:
    pairs = []
    for item in items:
        try:
            lo, hi = (float(v) for v in item.split(","))
        except ValueError:
            raise ValueError(f"--thresholds {item!r}: expected LO,HI such as 0.05,0.95") from None
        pairs.append((lo, hi))
    return pairs


def _negative_controls(arg: str | None) -> list[str] | None:
    if not arg:
        return None
    if os.path.isfile(arg):
        with open(arg) as f:
            return [line.strip() for line in f if line.strip()]
    return [v for v in arg.split(",") if v]


def evaluate_map(features: np.ndarray, perturbations, control, batches, annotations, *,
                 pca_components=128, pca_batches=None, correction: str = "tvn", method: str = "mean",
                 drop: Sequence = (), sources=None, thresholds=recall.RECALL_THRESHOLDS,
                 negative_controls: Sequence | None = None, seed: int = 0, replicates=None,
                 mean_average_precision: bool = True, null_cache_dir: str | None = None):
    """Map + benchmarks for one set of embeddings (e.g. one transformer block).

    Returns ({"recall": [...], "consistency": {...}, "mean_average_precision": {...}}, the
    PerturbationMap, the similarities used for recall, e.g. to plot). The consistency null is
    `negative_controls` when given (EFAAR), otherwise random groups of rows; replicate consistency uses
    `replicates` (default: the batches) as replicate units. `mean_average_precision` (default on) adds
    copairs' phenotypic activity (rows against the control rows of their batch) and consistency (per
    relationship table) with their BH-corrected p-values: eval/mean_average_precision.py:map_report;
    `null_cache_dir` shares copairs' null distributions between calls (default: fresh per call). The
    relationship tables are checked against the map's perturbations first, so a bad table fails
    before any computing.
    """
    _check_tables(perturbations, control, drop, annotations, sources)
    pmap = efaar.build_map(features, np.asarray(perturbations), control, batches, pca_components=pca_components,
                           pca_batches=pca_batches, correction=correction, method=method, drop=drop)
    return benchmark_map(pmap, perturbations, control, batches, annotations, drop=drop, sources=sources,
                         thresholds=thresholds, negative_controls=negative_controls, seed=seed,
                         replicates=replicates, mean_average_precision=mean_average_precision,
                         null_cache_dir=null_cache_dir)


def _check_tables(perturbations, control, drop: Sequence, annotations, sources) -> None:
    """The relationship tables checked against the map's perturbations, so a bad table fails before the
    map's work (eval.recall.known_pair_positions); on a parquet file's streamed path, once the features are
    decoded (`run`)."""
    perts = np.asarray(perturbations)
    kept = perts[~pd.Index(perts).isin([control, *drop])]
    recall.known_pair_positions(np.unique(kept.astype(str)), annotations, sources)


def benchmark_map(pmap: efaar.PerturbationMap, perturbations, control, batches, annotations, *,
                  drop: Sequence = (), sources=None, thresholds=recall.RECALL_THRESHOLDS,
                  negative_controls: Sequence | None = None, seed: int = 0, replicates=None,
                  mean_average_precision: bool = True, null_cache_dir: str | None = None):
    """The benchmarks of `evaluate_map` on a map already built (its second half); same arguments and returns.
    They work on (rows x components) matrices only, so the caller may free the map's input features first."""
    perts = np.asarray(perturbations)
    dropped = [control, *drop]
    # The recall (a matmul and a sort of the P(P-1)/2 null, both outside the GIL) runs in a thread
    # beside the consistency benchmarks: on a 2-core machine the two overlap.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="recall") as pool:
        recall_job = pool.submit(_recall, pmap, annotations, sources, thresholds)
        summary = _consistency(pmap, perts, batches, dropped, negative_controls, seed, replicates)
        sims, recall_records = recall_job.result()
    report = {"recall": recall_records, "consistency": summary}
    if mean_average_precision:
        from eval import mean_average_precision as map_lib   # copairs: imported only when asked for
        report["mean_average_precision"] = map_lib.map_report(
            pmap.embeddings, perts, control, batches, pmap.features, pmap.labels, annotations, list(sims.queries),
            drop=drop, seed=seed, cache_dir=null_cache_dir)
    return report, pmap, sims


def _recall(pmap: efaar.PerturbationMap, annotations, sources, thresholds):
    sims = recall.relationship_similarities(pmap.features, pmap.labels, annotations, sources)
    return sims, recall.recall_table(sims, thresholds)


def _consistency(pmap: efaar.PerturbationMap, perts: np.ndarray, batches, dropped: list, negative_controls,
                 seed: int, replicates) -> dict:
    if negative_controls:
        table = consistency.perturbation_consistency(pmap.embeddings, perts, negative_controls,
                                                     drop=dropped)
    else:
        table = consistency.perturbation_consistency_vs_random(pmap.embeddings, perts, drop=dropped,
                                                               seed=seed)
    return {
        "perturbation_consistency": {"null": "negative_controls" if negative_controls else "random_groups",
                                     **consistency.consistency_summary(table)},
        "replicate_consistency": consistency.replicate_consistency(
            pmap.embeddings, perts, batches if replicates is None else replicates, drop=dropped, seed=seed),
    }


def _check_replicates(meta: pd.DataFrame, perts: np.ndarray, replicates: np.ndarray, dropped: Sequence[str],
                      column: str, args: argparse.Namespace) -> None:
    """Replicate consistency compares a perturbation's profiles across values of the replicate column
    (default --batch_col). When every perturbation has a single value there (e.g. a one-batch screen)
    nothing can be compared: say so before any work, with the columns that would do."""
    keep = ~pd.Index(perts).isin(list(dropped))
    per_pert = pd.Series(replicates[keep]).groupby(perts[keep]).nunique()
    if len(per_pert) == 0 or per_pert.max() >= 2:
        return
    rows = int(pd.Series(perts[keep]).value_counts().max())
    values = pd.unique(replicates)
    usable = [c for c in meta.columns if c not in (args.perturbation_col, column)
              and meta.loc[keep, c].groupby(perts[keep]).nunique().max() >= 2][:4]
    hint = (f"columns that vary within a perturbation here: {usable}" if usable
            else "add a column that does (e.g. plate, or a row id to treat every row as a replicate)")
    flag = "--replicate_col" if args.replicate_col else "--replicate_col (default: --batch_col)"
    raise ValueError(f"{args.embeddings}: replicate consistency compares each perturbation's profiles across "
                     f"values of {flag} {column!r}, but every perturbation has one value there ({len(values)} in "
                     f"the data: {values[:5].tolist()}), although perturbations have up to {rows} rows; pass "
                     f"--replicate_col COLUMN; {hint}")


def run(args: argparse.Namespace) -> dict:
    """The whole CLI benchmark; returns the report, also written to `<args.out>/report.json` (args.out becomes
    that file's path)."""
    args.out = str(flags.output_file(args.out, REPORT))
    t = time.perf_counter()
    source = features = None
    if (args.pca_components and not (args.metadata or args.where or args.average_by)
            and os.path.isfile(args.embeddings) and not _is_text_table(args.embeddings)
            and not efaar._use_jax("auto")):
        # A parquet file as it is: its features go straight into the PCA as they are decoded (the
        # metadata columns are read and checked first, the replicate unit and the tables once the features are
        # decoded); `load` then times the metadata alone.
        source = _ParquetFeatures(args.embeddings, args.dtype)
        meta = source.meta
    else:
        _WORKSPACE.clear()   # an early workspace this path does not use is not kept beside its matrix
        features, meta, _ = load_embeddings(args.embeddings, args.metadata, args.join_on, args.where,
                                            args.average_by, args.dtype)
    perts = _check_column(meta, args.perturbation_col, "--perturbation_col", args.embeddings).astype(str)
    batches = _check_column(meta, args.batch_col, "--batch_col", args.embeddings)
    pca_batches = (_check_column(meta, args.pca_batch_col, "--pca_batch_col", args.embeddings)
                   if args.pca_batch_col else None)
    if not (perts == args.control).any():
        examples = pd.unique(perts)[:10].tolist()
        raise ValueError(f"{args.embeddings}: control {args.control!r} does not occur in column "
                         f"{args.perturbation_col!r} (values include {examples})")
    replicate_col = args.replicate_col or args.batch_col
    replicates = _check_column(meta, replicate_col, "--replicate_col", args.embeddings)
    thresholds = _parse_thresholds(args.thresholds)

    def checks() -> None:   # the replicate unit and the relationship tables against the map's perturbations
        _check_replicates(meta, perts, replicates, [args.control, *args.drop], replicate_col, args)
        _check_tables(perts, args.control, args.drop, args.annotations, args.sources)
    if source is None:
        checks()
    load_s = time.perf_counter() - t

    t = time.perf_counter()
    rows, dims = (source.rows, len(source.columns)) if source else features.shape
    components = pca_components_for(args.pca_components, rows, dims)
    if source is not None:
        # checked once the features are decoded, on this thread while the worker goes on with the queued
        # Gram blocks: a bad replicate column or table still stops the command before the rest of the PCA
        features = _streamed_pca(source, batches if pca_batches is None else pca_batches, components,
                                 meanwhile=checks)
        if features is None:   # a NaN or an infinity: the plain read says which rows and columns
            load_embeddings(args.embeddings, dtype=args.dtype)
            raise ValueError(f"{args.embeddings}: features hold NaN/inf values")
        components = 0
    pmap = efaar.build_map(features, perts, args.control, batches, pca_components=components,
                           pca_batches=pca_batches, correction=args.correction, method=args.aggregate,
                           drop=args.drop, overwrite_features=True)
    del features   # the benchmarks need only the map: the peak memory is the read matrix + the PCA's
    report, pmap, sims = benchmark_map(
        pmap, perts, args.control, batches, args.annotations, drop=args.drop, sources=args.sources,
        thresholds=thresholds, negative_controls=_negative_controls(args.negative_controls), seed=args.seed,
        replicates=replicates, mean_average_precision=args.mean_average_precision)
    report["consistency"]["replicate_consistency"]["replicates"] = replicate_col
    report["map"] = {"rows": int(rows), "features": int(dims),
                     "dims": int(pmap.features.shape[1]), "perturbations": int(len(pmap.labels)),
                     "control_rows": int((perts == args.control).sum()),
                     "batches": int(len(pd.unique(batches)))}
    report["config"] = dict(vars(args))
    report["timings_s"] = {"load": round(load_s, 3), "benchmark": round(time.perf_counter() - t, 3)}
    if args.plot:
        from eval import plots   # matplotlib: imported only when a plot is asked for
        plots.plot_similarity_distribution(sims, args.plot, thresholds[:1],
                                           title=os.path.basename(args.embeddings))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return report


def pca_components_for(requested: int, rows: int, features: int) -> int:
    """PCA components of a map: `requested` (0 = no PCA) where the data allow, else as many as they do
    (features, rows - 1). eval.job's per-block maps use the same rule."""
    return min(int(requested), features, rows - 1) if requested else 0


def parser() -> argparse.ArgumentParser:
    # Defaults shared with eval.job: maejax.config.base().eval (EFAAR's PCA 128, TVN, two threshold pairs).
    from maejax.config import base
    defaults = base().eval
    p = flags.ArgumentParser(prog="python -m eval.map_benchmark", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", deprecated="--features", required=True, metavar="FILE",
                   help="parquet/CSV with feature_* columns")
    p.add_argument("--perturbation_col", required=True)
    p.add_argument("--batch_col", default=defaults.batch_col,
                   help=f"batch for the correction (and PCA scaling); default {defaults.batch_col}")
    p.add_argument("--control", required=True, help="control label in --perturbation_col")
    p.add_argument("--pca_components", type=int, default=defaults.pca_components,
                   help=f"at most this many (default {defaults.pca_components}; fewer when there are fewer "
                        f"features, or rows - 1); 0 skips PCA")
    p.add_argument("--correction", choices=efaar.CORRECTIONS, default=defaults.correction)
    p.add_argument("--aggregate", choices=("mean", "median"), default="mean")
    p.add_argument("--annotations", default=defaults.annotations,
                   help="folder of <Source>.txt relationship tables (default: the EFAAR 1.0 tables of the "
                        "installed efaar_benchmarking package)")
    p.add_argument("--out", required=True, metavar="DIR", help=f"output directory: writes DIR/{REPORT}")
    p.add_argument("--thresholds", nargs="+", default=[f"{lo},{hi}" for lo, hi in defaults.thresholds],
                   metavar="LO,HI")
    p.add_argument("--sources", nargs="+", default=None, help="default: every table in --annotations")
    p.add_argument("--plot", default=None, help="PNG of the similarity distributions")
    p.add_argument("--pca_batch_col", default=defaults.pca_batch_col or None,
                   help="batch for the pre-PCA scaling (default --batch_col)")
    p.add_argument("--replicate_col", default=None,
                   help="replicate unit of the replicate consistency (default --batch_col); a perturbation's "
                        "profiles are compared across its values, so it must vary within a perturbation")
    p.add_argument("--drop", nargs="+", default=[], help="more perturbation labels to leave out of the map")
    p.add_argument("--negative_controls", default=None,
                   help="comma list or file of perturbations forming the consistency null "
                        "(default: random groups of rows)")
    p.add_argument("--metadata", default=None, help="table joined to --embeddings on --join_on")
    p.add_argument("--join_on", default="well_id")
    p.add_argument("--where", nargs="+", default=[], metavar="COL=VALUE", help="keep matching rows")
    p.add_argument("--average_by", default=None, help="average rows per value of this column first")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="compute dtype (default: the features' dtype, as EFAAR/sklearn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_mean_average_precision", dest="mean_average_precision", action="store_false",
                   default=defaults.mean_average_precision,
                   help="leave copairs' mAP (phenotypic activity and consistency) out of the report")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    gc.disable()   # a short process of large arrays: the collector's passes over pandas' objects cost ~2% of its CPU
    try:
        args.annotations = find_annotations(args.annotations)
        report = run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        gc.enable()
    for rec in report["recall"]:
        print(json.dumps(rec))
    print(json.dumps(report["consistency"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The report is written and closed; skip the interpreter's teardown of pandas, pyarrow and scipy
    # (0.35 s of the 7-8 s command measured here). An exception still exits through Python.
    os._exit(code)
