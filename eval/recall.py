"""Known-relationship recall of a perturbation map, equal to efaar_benchmarking 1.0.

For an aggregated map (one row per perturbation) the null is every off-diagonal cosine similarity
(upper triangle, N(N-1)/2 values) and the query is the cosine of each known pair from a relationship
table (`<Source>.txt`, CSV `entity1,entity2`; pairs made undirected, self-pairs and duplicates
dropped, only pairs with both entities in the map kept). Recall at (lo, hi) is the fraction of
queries whose percentile rank in the null is <= lo or >= hi (two-sided, so random = lo + 1 - hi).

Speed at whole-genome scale (20k perturbations, a 2e8-value null): the null is written straight
from row blocks of the cosine matrix (no int64 triu_indices), sorted once and shared by every
source, and each table is parsed once per process with vectorised pandas/numpy.
"""
from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

BENCHMARK_SOURCES = ("CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB")
RECALL_THRESHOLDS = ((0.05, 0.95), (0.1, 0.9))
TABLE_HEADER = ("entity1", "entity2")
ROW_BLOCK = 2048  # rows of the cosine matrix computed at once: 2048 x 20k float32 = 160 MB


# --- relationship tables ------------------------------------------------------------------------
#
# Every reader of relationship tables (eval.map_benchmark, eval.job through eval.screen, the bootstrap)
# comes through `discover_sources` / `load_relationships` / `known_pair_positions`, so a bad folder or
# table is the same one-line ValueError everywhere: a missing or empty folder, a folder with no table,
# a table-like file whose header is not entity1,entity2, a table with no pair, a table none of whose
# genes is in the map, and a map in which no table has a known pair (which would report no recall).

ANNOTATIONS_HINT = ("<Source>.txt CSV files whose first line is 'entity1,entity2' "
                    "(as in ../shared/reference/efaar_annotations)")
_HEADER_FIELD = re.compile(r"^[\w.:\-]+$")


def _first_line(path: Path) -> str:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        return f.readline().rstrip("\r\n")


def _header_fields(header: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in header.split(","))


def _looks_like_a_table(header: str) -> bool:
    """A header of delimited column names (so a file meant as a table), unlike a line of prose."""
    fields = [f.strip() for f in re.split(r"[,\t;]", header)]
    return len(fields) >= 2 and all(_HEADER_FIELD.match(f) for f in fields)


def _wrong_header(path: Path, header: str) -> str:
    return (f"{path}: expected the header 'entity1,entity2', found {header[:80]!r}; rename its columns to "
            f"entity1,entity2 (comma-separated) or move the file out of {path.parent}")


def discover_sources(annotation_dir: str | os.PathLike) -> list[str]:
    """Names of the relationship tables in a folder: every `*.txt` whose header is entity1,entity2.

    `*.txt` files of prose (a README) are not tables and are skipped; a `*.txt` with a delimited header
    of other column names is an error (a table that would otherwise be silently left out), and so is a
    folder without any table."""
    folder = Path(annotation_dir)
    if not folder.exists():
        raise ValueError(f"annotation folder {folder} does not exist; pass a folder of {ANNOTATIONS_HINT}")
    if not folder.is_dir():
        raise ValueError(f"annotation folder {folder} is a file, not a folder; pass the folder holding the "
                         f"relationship tables ({ANNOTATIONS_HINT})")
    names = []
    for path in sorted(folder.glob("*.txt")):
        header = _first_line(path)
        if _header_fields(header) == TABLE_HEADER:
            names.append(path.stem)
        elif _looks_like_a_table(header):
            raise ValueError(_wrong_header(path, header))
        # else prose (a README): not a table
    if not names:
        files = sorted(p.name for p in folder.iterdir())
        found = (f"it holds {', '.join(files[:6])}{' ...' if len(files) > 6 else ''}" if files
                 else "it is empty")
        raise ValueError(f"annotation folder {folder} holds no relationship table ({found}); expected "
                         f"{ANNOTATIONS_HINT}")
    return names


@functools.lru_cache(maxsize=64)
def _parse_table(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    del mtime_ns, size  # cache key only: a rewritten file is parsed again
    header = _first_line(Path(path))
    if _header_fields(header) != TABLE_HEADER:
        raise ValueError(_wrong_header(Path(path), header) if header.strip() else
                         f"{path}: empty file; a relationship table starts with the header 'entity1,entity2'")
    # Plain strings (Python str objects): no NA parsing, so a symbol that pandas would read as NaN stays a symbol.
    try:
        df = pd.read_csv(path, dtype=object, keep_default_na=False, na_filter=False, skipinitialspace=True,
                         encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV ({' '.join(str(e).split())})") from e
    df.columns = [str(c).strip() for c in df.columns]
    if tuple(df.columns[:2]) != TABLE_HEADER or df.shape[1] != 2:
        raise ValueError(f"{path}: expected a 2-column CSV with header 'entity1,entity2', "
                         f"got columns {list(df.columns)}")
    if df.empty:
        raise ValueError(f"{path}: no gene pairs, only the header; fill the table or remove it from "
                         f"{Path(path).parent}")
    a = df["entity1"].to_numpy(dtype=object)
    b = df["entity2"].to_numpy(dtype=object)
    # Undirected: order each pair (code-point order, as Python's sorted), drop self-pairs and dups.
    in_order = a <= b
    first, second = np.where(in_order, a, b), np.where(in_order, b, a)
    keep = first != second
    if not keep.any():
        raise ValueError(f"{path}: no gene pairs, every one of its {len(df)} rows pairs a gene with itself")
    first, second = first[keep], second[keep]
    # First occurrence of each pair, in table order (DataFrame.drop_duplicates), on integer codes.
    codes, genes = pd.factorize(np.concatenate([first, second]))
    _, once = np.unique(codes[:len(first)].astype(np.int64) * len(genes) + codes[len(first):], return_index=True)
    once.sort()
    return first[once], second[once]


def load_relationships(annotation_dir: str | os.PathLike, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Canonical undirected pairs (entity1 < entity2, unique, no self-pairs) of one source.

    Parsed once per process and file version (cache keyed by path, mtime and size).
    """
    folder = Path(annotation_dir)
    if not folder.is_dir():
        discover_sources(folder)   # raises the folder's error
    path = folder / f"{source}.txt"
    if not path.is_file():
        present = sorted(p.stem for p in folder.glob("*.txt"))
        raise ValueError(f"relationship table {path} not found (source {source!r}; the folder has "
                         f"{present[:8] or 'no .txt file'})")
    st = path.stat()
    return _parse_table(str(path.resolve()), st.st_mtime_ns, st.st_size)


# --- cosine null and queries --------------------------------------------------------------------

def normalize_rows(x: np.ndarray) -> np.ndarray:
    """sklearn `normalize` over the last axis: vectors divided by their L2 norm; (near-)zero ones are left
    as they are."""
    norms = np.sqrt(np.einsum("...j,...j->...", x, x))
    norms[norms < 10 * np.finfo(x.dtype).eps] = 1.0
    return x / norms[..., None]


def upper_triangle_cosines(features: np.ndarray, row_block: int = ROW_BLOCK) -> np.ndarray:
    """All cosine similarities i < j in row-major order (sklearn `cosine_similarity` values).

    Built from row blocks of the cosine matrix, so neither the N x N matrix nor int64 index arrays
    exist at once; peak extra memory is the null itself plus one block.
    """
    x = normalize_rows(np.asarray(features))
    n = len(x)
    out = np.empty(n * (n - 1) // 2, x.dtype)
    buffer = np.empty((min(row_block, n), n), x.dtype)   # one block's memory, reused: fresh pages cost here
    pos = 0
    for start in range(0, n, row_block):
        stop = min(start + row_block, n)
        block = np.matmul(x[start:stop], x[start:].T, out=buffer[:stop - start, :n - start])  # columns start..
        for r in range(stop - start):
            row = block[r, r + 1:]
            out[pos:pos + len(row)] = row
            pos += len(row)
    return out


def pair_positions(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """Index of pair (min(i,j), max(i,j)) in the row-major upper-triangle vector of an n x n matrix."""
    lo, hi = np.minimum(i, j).astype(np.int64), np.maximum(i, j).astype(np.int64)
    return lo * (2 * n - lo - 1) // 2 + (hi - lo - 1)


class RelationshipSimilarities:
    """The null of a map (every upper-triangle cosine) and, per source, the cosines of its known pairs
    found in the map. `sorted_null` sorts the null in place on first use; `recall_table` needs only a
    few order statistics of it (a partition, several times cheaper than the sort at 5e7 values)."""

    def __init__(self, null: np.ndarray, queries: dict[str, np.ndarray], null_is_sorted: bool = False):
        self.null, self.queries, self._sorted = null, queries, null_is_sorted

    @property
    def sorted_null(self) -> np.ndarray:
        if not self._sorted:
            self.null.sort()
            self._sorted = True
        return self.null

    def order_statistics(self, ranks: Sequence[int]) -> np.ndarray:
        """The null's values at these 0-based ranks of its sorted order (the null is partitioned in place)."""
        if not self._sorted:
            _select(self.null, sorted(set(ranks)))
        return self.null[np.asarray(ranks, np.int64)]


def _select(a: np.ndarray, ranks: list[int]) -> None:
    """Partitions `a` in place so that each of the sorted `ranks` holds its order statistic. numpy's
    partition with several kth runs a scalar introselect (1.0 s for 6 ranks of 5e7 float32 here); one kth
    at a time takes its SIMD path (0.06 s), so split at the rank nearest the middle and recurse into the
    two sides: the tails' ranks then cost about two passes over the null."""
    if not ranks:
        return
    i = min(range(len(ranks)), key=lambda r: abs(ranks[r] - len(a) // 2))
    k = ranks[i]
    a.partition(k)
    _select(a[:k], ranks[:i])
    _select(a[k + 1:], [r - k - 1 for r in ranks[i + 1:]])


def _map_index(labels: Sequence) -> pd.Index:
    index = pd.Index(np.asarray(labels).astype(str))
    if not index.is_unique:
        dups = index[index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"map labels must be unique (one row per perturbation); duplicated: {dups}")
    return index


def relationship_similarities(features: np.ndarray, labels: Sequence, annotation_dir,
                              sources: Iterable[str] | None = None) -> RelationshipSimilarities:
    """The null and the known-pair cosines for each source (sources with no usable pair omitted).

    features: (N, d) aggregated map; labels: (N,) perturbation names (matched to table entities
    as strings). sources=None uses every relationship table in `annotation_dir`.
    """
    features = np.asarray(features)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features {features.shape} and labels ({len(labels)}) do not match")
    if len(features) < 2:
        raise ValueError(f"a map needs at least 2 perturbations, got {len(features)}")
    positions = known_pair_positions(labels, annotation_dir, sources)   # table errors before the null's work
    null = upper_triangle_cosines(features)
    return RelationshipSimilarities(null, {name: null[pos] for name, pos in positions.items()})


def known_pair_positions(labels: Sequence, annotation_dir, sources: Iterable[str] | None = None
                         ) -> dict[str, np.ndarray]:
    """Per source, the positions in the upper-triangle null (`upper_triangle_cosines` order) of its known
    pairs found in a map with these (unique) row labels, in table order. A source with genes in the map
    but no pair of them is left out, as EFAAR drops it; a table none of whose genes is in the map is an
    error (it almost always means other gene identifiers), and so is a map where no table has a pair."""
    index = _map_index(labels)
    names = discover_sources(annotation_dir) if sources is None else list(sources)
    out = {}
    for name in names:
        e1, e2 = load_relationships(annotation_dir, name)
        i, j = index.get_indexer(e1), index.get_indexer(e2)
        if not ((i >= 0).any() or (j >= 0).any()):
            table_genes = pd.unique(np.concatenate([e1[:5], e2[:5]]))[:5].tolist()
            raise ValueError(
                f"{Path(annotation_dir) / f'{name}.txt'}: none of its genes is in the map (map: "
                f"{index[:5].tolist()}{' ...' if len(index) > 5 else ''}; table: {table_genes} ...); use the "
                f"same gene identifiers (symbols, case) in both, or leave this table out")
        found = (i >= 0) & (j >= 0)
        if found.any():
            out[name] = pair_positions(i[found], j[found], len(index))
    if not out and names:
        raise ValueError(f"no known pair of {names[:5]} (in {annotation_dir}) has both genes among the map's "
                         f"{len(index)} perturbations, so there is no recall to report; use tables about "
                         f"this screen's genes")
    return out


# --- recall -------------------------------------------------------------------------------------

def _threshold_pairs(thresholds) -> list[tuple[float, float]]:
    pairs = []
    for pair in thresholds:
        lo, hi = float(min(pair)), float(max(pair))
        if not (0.0 <= lo <= 1.0 and 0.0 <= hi <= 1.0):
            raise ValueError(f"recall thresholds must lie in [0, 1], got {pair}")
        pairs.append((lo, hi))
    return pairs


def compute_recall(null: np.ndarray, query: np.ndarray, thresholds=RECALL_THRESHOLDS,
                   null_is_sorted: bool = False) -> dict:
    """EFAAR `compute_recall`: two-sided recall of `query` against the percentile ranks of `null`.

    Returns {null_distribution_size, query_distribution_size, recall_{lo}_{hi} ...}.
    """
    null = np.asarray(null) if null_is_sorted else np.sort(null)
    query = np.sort(query)   # counts only: sorted keys make numpy's binary searches into a large null local
    if len(null) == 0 or len(query) == 0:
        raise ValueError(f"recall needs a non-empty null and query (got {len(null)}, {len(query)})")
    left = np.searchsorted(null, query, side="left") / len(null)
    right = np.searchsorted(null, query, side="right") / len(null)
    metrics = {"null_distribution_size": int(len(null)), "query_distribution_size": int(len(query))}
    for lo, hi in _threshold_pairs(thresholds):
        metrics[f"recall_{lo}_{hi}"] = float(np.count_nonzero((right <= lo) | (left >= hi)) / len(query))
    return metrics


def _rank_cuts(lo: float, hi: float, n: int) -> tuple[int, int]:
    """(m, c): the largest m with m / n <= lo and the smallest c with c / n >= hi, in float64 as
    `compute_recall` divides. A count r of null values <= q has r / n <= lo iff r <= m, i.e. iff the
    null's value of rank m (0-based, sorted) exceeds q; a count of values < q reaches hi iff it is >= c,
    i.e. iff the value of rank c - 1 is below q."""
    m = int(np.floor(lo * n))
    while m + 1 <= n and (m + 1) / n <= lo:
        m += 1
    while m >= 0 and m / n > lo:
        m -= 1
    c = int(np.ceil(hi * n))
    while c - 1 >= 0 and (c - 1) / n >= hi:
        c -= 1
    while c <= n and c / n < hi:
        c += 1
    return m, c


def recall_table(sims: RelationshipSimilarities, thresholds=RECALL_THRESHOLDS) -> list[dict]:
    """One record per source: {source, null_distribution_size, query_distribution_size, recall_*}.

    `compute_recall`'s counts of the queries' percentile ranks, from the null's order statistics at the
    thresholds' ranks (`_rank_cuts`) instead of a sorted null: the same numbers (tests/test_recall.py)
    for finite queries; a query set with a NaN takes the sorted path."""
    pairs, n = _threshold_pairs(thresholds), len(sims.null)
    queries = sims.queries.values()
    if sims._sorted or n == 0 or not all(len(q) and np.isfinite(q).all() for q in queries):
        return [{"source": name, **compute_recall(sims.sorted_null, q, thresholds, null_is_sorted=True)}
                for name, q in sims.queries.items()]
    cuts = [_rank_cuts(lo, hi, n) for lo, hi in pairs]
    ranks = sorted({r for m, c in cuts for r in (m, c - 1) if 0 <= r < n})
    value = dict(zip(ranks, sims.order_statistics(ranks).tolist()))

    def at(rank: int) -> float:   # the null's value of this rank; -inf before the first, +inf after the last
        return value[rank] if 0 <= rank < n else (-np.inf if rank < 0 else np.inf)
    records = []
    for name, q in sims.queries.items():
        record = {"source": name, "null_distribution_size": n, "query_distribution_size": int(len(q))}
        for (lo, hi), (m, c) in zip(pairs, cuts):
            hits = (q < at(m)) | (q > at(c - 1))   # count(null <= q) <= m, or count(null < q) >= c
            record[f"recall_{lo}_{hi}"] = float(np.count_nonzero(hits) / len(q))
        records.append(record)
    return records


def known_relationship_benchmark(features: np.ndarray, labels: Sequence, annotation_dir,
                                 sources: Iterable[str] | None = None,
                                 thresholds=RECALL_THRESHOLDS) -> list[dict]:
    """EFAAR `known_relationship_benchmark` on an aggregated map (controls already removed)."""
    return recall_table(relationship_similarities(features, labels, annotation_dir, sources), thresholds)
