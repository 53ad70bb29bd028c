"""Percentile bootstrap intervals for the per-block eval report: probe balanced accuracy and
known-relationship recall.

What is resampled is the unit that was sampled from a larger population:
- probes: the held-out groups (wells; perturbations when whole perturbations are held out). A drawn
  group brings all its rows along; balanced accuracy (mean per-class recall over the classes present
  in the resample, sklearn's definition) is recomputed on every resample.
- recall (EFAAR, eval/recall.py): the perturbations (genes) of the map. A resample draws genes with
  replacement; gene i drawn c_i times gives every pair (i, j) the weight c_i * c_j, in the null (all
  pairs) and in the query (the known pairs). Recall is the weighted fraction of known pairs whose
  weighted percentile rank in the weighted null is <= lo or >= hi, with the ranks of
  `recall.compute_recall` (fraction of the null <= q, fraction < q). Pairs of a gene with its own copy
  are not added (a resample is a reweighting of the observed pairs).

Both are vectorised with numpy: the resamples are drawn as counts per unit (B, units), and each
statistic is a product of the counts with per-unit (or per-pair) tallies, so no row is copied. With
unit counts of 1 every formula reduces to the plain statistic, which is reported as the value (equal
to `recall.compute_recall`, and to sklearn's balanced accuracy in float64).

Resamples in which a statistic is undefined (a family's known pairs all dropped, no row left of any
class) are left out of the interval; an interval with no defined resample is (nan, nan).

How good the recall interval is depends on how many known partners a gene has. Resampling genes
reproduces the gene-level part of recall's variance (a gene with a strong phenotype lifts all its
pairs), but a pair's own noise enters with Var(c_i c_j) = 3 instead of 1 (the usual bias of
bootstrapping a pair statistic by its units). With many partners per gene (complexes of ~20) the
gene-level part dominates and coverage is nominal (tests: 0.97, width 1.16x the true spread); with
2-5 partners per gene the interval is conservative, 1.3-1.8x too wide (never too narrow).

Cost: balanced accuracy, 1000 resamples of 5,000 rows in 1,250 wells and 400 classes, 6 blocks:
~0.1 s. Recall, 1000 resamples of a 400-gene map (79,800 pairs), every source and family together:
~0.5 s (one pass over the null per resample: O(n_boot x genes^2), so not for genome-wide maps).
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse

from eval import recall as recall_lib

N_BOOT = 1000
LEVEL = 0.95
# Resamples x null pairs handled at once by the recall bootstrap (cumulative weights: 16-32 MB).
CHUNK_ELEMENTS = 1 << 22


# --- shared pieces ------------------------------------------------------------------------------

def resample_counts(num_units: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, num_units) int32: how often each unit is drawn in each resample of `num_units` draws
    with replacement (each row sums to num_units). Deterministic in `seed`."""
    if num_units < 1 or n_boot < 1:
        raise ValueError(f"need at least one unit and one resample, got {num_units} and {n_boot}")
    draws = np.random.default_rng(seed).integers(0, num_units, (n_boot, num_units))
    draws += (np.arange(n_boot) * num_units)[:, None]
    return np.bincount(draws.ravel(), minlength=n_boot * num_units).reshape(n_boot, num_units).astype(np.int32)


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the last axis, ignoring undefined (nan) resamples."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    samples = np.asarray(samples, np.float64)
    tail = 50.0 * (1.0 - level)
    if np.isfinite(samples).all():
        lo, hi = np.percentile(samples, [tail, 100.0 - tail], axis=-1)
        return lo, hi
    defined = np.isfinite(samples).any(axis=-1)
    safe = np.where(defined[..., None], samples, 0.0)
    lo, hi = np.nanpercentile(safe, [tail, 100.0 - tail], axis=-1)
    return np.where(defined, lo, np.nan), np.where(defined, hi, np.nan)


def ci_record(value, lo, hi, **extra) -> dict:
    """{"value": v, "ci95": [lo, hi], ...} as JSON-ready floats (None where undefined)."""
    f = lambda x: None if x is None or not np.isfinite(x) else float(x)
    return {"value": f(value), "ci95": [f(lo), f(hi)], **extra}


def _codes(values) -> tuple[np.ndarray, int]:
    """Dense codes 0..k-1 of any 1-D labels (or of the rows of a DataFrame)."""
    if isinstance(values, pd.DataFrame):
        codes, uniques = pd.factorize(pd.MultiIndex.from_frame(values))
    else:
        codes, uniques = pd.factorize(np.asarray(values))
    if (codes < 0).any():
        raise ValueError("groups must not be missing (NaN)")
    return codes.astype(np.int64), len(uniques)


# --- balanced accuracy over held-out groups -----------------------------------------------------

def balanced_accuracy(labels, predictions) -> float:
    """Mean per-class recall over the classes present in `labels` (sklearn balanced_accuracy_score),
    in float64."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    classes, y = np.unique(labels, return_inverse=True)
    support = np.bincount(y, minlength=len(classes))
    hits = np.bincount(y, weights=(predictions == labels), minlength=len(classes))
    return float(np.mean(hits / support))


def balanced_accuracy_samples(labels, predictions, groups, n_boot: int = N_BOOT, seed: int = 0
                              ) -> tuple[np.ndarray, np.ndarray]:
    """(values (K,), resampled balanced accuracies (K, n_boot)) for (K, n) predictions: resample b draws
    the groups of `resample_counts(num_groups, n_boot, seed)[b]` (groups numbered in order of first
    appearance), every row of a group drawn c times counting c times."""
    labels = np.asarray(labels)
    preds = np.asarray(predictions)
    n = len(labels)
    if labels.ndim != 1 or n == 0 or preds.ndim != 2 or preds.shape[1] != n:
        raise ValueError(f"labels (n,) and predictions (K, n) must match, got {labels.shape} and {preds.shape}")
    g, num_groups = _codes(groups)
    if len(g) != n:
        raise ValueError(f"groups ({len(g)}) and labels ({n}) do not match")
    classes, y = np.unique(labels, return_inverse=True)
    c = len(classes)
    correct = preds == labels[None]                                       # (K, n)
    values = np.array([balanced_accuracy(labels, p) for p in preds])

    # Tallies per (group, class) cell, as sparse (classes x groups) matrices: a resample's per-class
    # support and hits are these times the group counts.
    cell, cell_of_row = np.unique(g * c + y, return_inverse=True)
    shape = (c, num_groups)
    rows_cols = (cell % c, cell // c)
    support = scipy.sparse.csr_matrix((np.bincount(cell_of_row).astype(np.float64), rows_cols), shape=shape)
    counts = resample_counts(num_groups, n_boot, seed).T.astype(np.float64)          # (G, B)
    s = np.asarray(support @ counts)                                                  # (C, B)
    present = s > 0
    n_present = present.sum(axis=0)
    samples = np.empty((len(preds), n_boot))
    for k in range(len(preds)):
        tally = np.bincount(cell_of_row, weights=correct[k], minlength=len(cell))
        hits = np.asarray(scipy.sparse.csr_matrix((tally, rows_cols), shape=shape) @ counts)
        recall = np.divide(hits, s, out=np.zeros_like(hits), where=present)
        samples[k] = recall.sum(axis=0) / n_present       # every resample has rows, so a class
    return values, samples


def balanced_accuracy_ci(labels, predictions, groups, num_classes: int | None = None, n_boot: int = N_BOOT,
                         seed: int = 0, level: float = LEVEL):
    """Balanced accuracy and its percentile bootstrap interval, resampling `groups` with replacement.

    labels: (n,) integer classes; predictions: (n,) or (K, n) (e.g. one row per block; every row is
    scored on the same resamples); groups: (n,) the held-out unit of each row (any hashable values, or
    a DataFrame whose rows are the units). num_classes only validates the labels.
    Returns (value, lo, hi): floats, or (K,) arrays for 2-D predictions. The value uses every row once.
    """
    labels = np.asarray(labels)
    preds = np.asarray(predictions)
    squeeze = preds.ndim == 1
    if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    values, samples = balanced_accuracy_samples(labels, preds[None] if squeeze else preds, groups, n_boot, seed)
    lo, hi = interval(samples, level)
    if squeeze:
        return float(values[0]), float(lo[0]), float(hi[0])
    return values, lo, hi


# --- known-relationship recall over genes -------------------------------------------------------

def triangle_size(num_pairs: int) -> int:
    """n such that n (n - 1) / 2 == num_pairs (the map size of an upper-triangle null)."""
    n = int(round((1 + np.sqrt(1 + 8 * num_pairs)) / 2))
    if n * (n - 1) // 2 != num_pairs:
        raise ValueError(f"{num_pairs} similarities are not the upper triangle of a square matrix; "
                         "pass pair_genes")
    return n


known_pair_positions = recall_lib.known_pair_positions   # the pairs a recall query scores, by position


class PairBootstrap:
    """Gene-resampling bootstrap of recall for one map: the null is sorted and the resamples drawn once,
    then any number of known-pair sets (sources, families) are scored on the same resamples.

    null: (P,) similarity of every pair, unsorted; pair_genes: (i, j) gene indices of each pair,
    default the row-major upper triangle of `recall.upper_triangle_cosines` (i < j).
    """

    def __init__(self, null, pair_genes: tuple[np.ndarray, np.ndarray] | None = None,
                 num_genes: int | None = None, *, n_boot: int = N_BOOT, seed: int = 0,
                 chunk_elements: int = CHUNK_ELEMENTS):
        null = np.asarray(null)
        if null.ndim != 1 or len(null) == 0:
            raise ValueError(f"the null must be a non-empty 1-D array, got shape {null.shape}")
        if pair_genes is None:
            num_genes = triangle_size(len(null)) if num_genes is None else num_genes
            i, j = np.triu_indices(num_genes, 1)
        else:
            i, j = (np.asarray(a, np.int64) for a in pair_genes)
            if i.shape != null.shape or j.shape != null.shape:
                raise ValueError(f"pair_genes must be two arrays of shape {null.shape}")
            num_genes = int(max(i.max(), j.max()) + 1) if num_genes is None else num_genes
        self.null = null
        self.num_genes = int(num_genes)
        self.pair_i, self.pair_j = i.astype(np.int32), j.astype(np.int32)
        self.order = np.argsort(null, kind="stable")
        self.sorted_null = null[self.order]
        self.n_boot = int(n_boot)
        self.counts = resample_counts(self.num_genes, self.n_boot, seed)               # (B, genes)
        self.chunk = max(1, int(chunk_elements) // len(null))
        # A resample's total pair weight is at most genes^2 / 2: int32 sums are exact (and faster) below
        # 65,000 genes. Pair weights c_i c_j fit int16 (half the memory traffic) while counts stay <= 181.
        self._cum_dtype = np.int32 if self.num_genes < 65_000 else np.int64
        self._weights = self.counts.astype(np.int16 if self.counts.max() <= 181 else self._cum_dtype)

    def restrict(self, known, genes=None) -> np.ndarray:
        """Positions of `known` (positions or a (P,) boolean mask) whose two genes are both in `genes`
        (indices or a (num_genes,) boolean mask); all of them when genes is None."""
        known = np.asarray(known)
        pos = np.flatnonzero(known) if known.dtype == bool else known.astype(np.int64)
        if genes is None:
            return pos
        genes = np.asarray(genes)
        member = genes if genes.dtype == bool else np.isin(np.arange(self.num_genes), genes)
        if member.shape != (self.num_genes,):
            raise ValueError(f"a gene mask must have shape ({self.num_genes},), got {member.shape}")
        return pos[member[self.pair_i[pos]] & member[self.pair_j[pos]]]

    def samples(self, queries: Mapping[Hashable, np.ndarray], thresholds=recall_lib.RECALL_THRESHOLDS
                ) -> dict[Hashable, dict[str, tuple[float, np.ndarray]]]:
        """{query: {"recall_{lo}_{hi}": (value, (n_boot,) resampled recalls)}} for every set of known-pair
        positions (empty sets omitted). The value is `recall.compute_recall` of the observed map."""
        pairs = recall_lib._threshold_pairs(thresholds)
        keys = [f"recall_{lo}_{hi}" for lo, hi in pairs]
        queries = {q: np.asarray(p, np.int64) for q, p in queries.items() if len(p)}
        if not queries:
            return {}
        n_null = len(self.sorted_null)
        # Every query set's pairs in one array; set s owns columns starts[s]:starts[s + 1].
        pos = np.concatenate(list(queries.values()))
        starts = np.cumsum([0] + [len(p) for p in queries.values()])[:-1]
        sims = self.null[pos]
        left = np.searchsorted(self.sorted_null, sims, side="left")
        right = np.searchsorted(self.sorted_null, sims, side="right")
        qi, qj = self.pair_i[pos], self.pair_j[pos]
        boots = np.empty((len(pairs), len(queries), self.n_boot))
        # The weighted null is only needed at the queries' ranks: sum the pair weights between
        # consecutive needed ranks (one pass over the null per resample), then cumulate those few sums.
        ranks = np.r_[left, right]
        cuts = np.unique(np.r_[0, ranks[ranks < n_null]])
        slot_left, slot_right = np.searchsorted(cuts, left), np.searchsorted(cuts, right)  # n_null -> total
        si, sj = self.pair_i[self.order], self.pair_j[self.order]
        for start in range(0, self.n_boot, self.chunk):
            c = self._weights[start:start + self.chunk]
            segments = np.add.reduceat(c[:, si] * c[:, sj], cuts, axis=1, dtype=self._cum_dtype)
            cum = np.zeros((len(c), len(cuts) + 1), np.int64)    # cum[:, s]: weight below cuts[s]
            np.cumsum(segments, axis=1, out=cum[:, 1:])
            total = cum[:, -1:].astype(np.float64)
            below = cum[:, slot_left] / total                  # fraction of the null < each query
            at_or_below = cum[:, slot_right] / total           # fraction of the null <= each query
            w = c[:, qi].astype(np.float64) * c[:, qj]         # (b, all query pairs)
            weight = np.add.reduceat(w, starts, axis=1)
            for t, (lo, hi) in enumerate(pairs):
                hits = np.add.reduceat(w * ((at_or_below <= lo) | (below >= hi)), starts, axis=1)
                with np.errstate(invalid="ignore", divide="ignore"):
                    boots[t, :, start:start + len(c)] = (hits / weight).T
        out = {}
        for s, (q, p) in enumerate(queries.items()):
            point = recall_lib.compute_recall(self.sorted_null, self.null[p], pairs, null_is_sorted=True)
            out[q] = {k: (point[k], boots[t, s]) for t, k in enumerate(keys)}
        return out

    def recall(self, queries: Mapping[Hashable, np.ndarray], thresholds=recall_lib.RECALL_THRESHOLDS,
               level: float = LEVEL) -> dict[Hashable, dict[str, tuple[float, float, float]]]:
        """{query: {"recall_{lo}_{hi}": (value, lo, hi)}}."""
        out = {}
        for q, by_key in self.samples(queries, thresholds).items():
            out[q] = {}
            for k, (value, boot) in by_key.items():
                lo, hi = interval(boot, level)
                out[q][k] = (value, float(lo), float(hi))
        return out


def recall_ci(null, known, pair_genes: tuple[np.ndarray, np.ndarray] | None = None, *,
              thresholds=recall_lib.RECALL_THRESHOLDS, genes=None, n_boot: int = N_BOOT, seed: int = 0,
              level: float = LEVEL) -> dict[str, tuple[float, float, float]]:
    """Known-relationship recall with a gene-resampling bootstrap interval.

    null: (P,) cosine similarity of every perturbation pair (the upper triangle in
    `recall.upper_triangle_cosines` order unless pair_genes gives each pair's two gene indices);
    known: the known pairs, as positions into `null` or a (P,) boolean mask; genes: optionally a subset
    of genes (indices or boolean mask): only known pairs with both genes in it are scored, the null
    stays all pairs. Returns {"recall_{lo}_{hi}": (value, lo, hi)}; value equals
    `recall.compute_recall(null, null[known])`. Empty known set: ValueError.
    """
    boot = PairBootstrap(null, pair_genes, n_boot=n_boot, seed=seed)
    pos = boot.restrict(known, genes)
    if len(pos) == 0:
        raise ValueError("no known pair (with both genes in the subset) to score")
    return boot.recall({"q": pos}, thresholds, level)["q"]
