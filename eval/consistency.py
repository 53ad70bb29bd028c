"""Replicate consistency of perturbation embeddings.

Two views:
- `perturbation_consistency`: EFAAR 1.0 `pert_signal_consistency_benchmark`. A perturbation's
  metric is the mean pairwise cosine among its replicate rows; its p-value is its rank against the
  same metric for negative-control perturbations (e.g. unexpressed genes); the summary is the
  fraction of perturbations with p <= 0.05.
- `replicate_consistency`: the KS and Cramer-von Mises statistics of "ViTally Consistent"
  (Kenyon-Dean et al. 2025), which compare the distribution of cosines between replicates of the
  same perturbation with a null of cosines between profiles of different perturbations. This is
  not in EFAAR; it is reimplemented from the paper's description (see docs/eval.md).

Everything is vectorised per replicate count: the rows of all perturbations with r replicates are
stacked into (G, r, d) and their r x r cosine matrices come from one batched matmul.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from eval.efaar import group_means
from eval.recall import normalize_rows

P_VALUE_THRESHOLD = 0.05


def _groups(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unique labels in order of first appearance, row order grouping them, group sizes)."""
    codes, uniques = pd.factorize(labels)
    order = np.argsort(codes, kind="stable")
    return np.asarray(uniques), order, np.bincount(codes, minlength=len(uniques))


def mean_replicate_cosines(features: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray]:
    """EFAAR `pert_signal_consistency_metric` for every label: mean of the lower-triangle cosines
    (each clipped to [-1, 1]) among the label's rows; NaN for labels with a single row.

    Returns (labels in order of first appearance, metric per label).
    """
    x = np.asarray(features)
    uniques, order, sizes = _groups(np.asarray(labels))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    grouped = x[order]
    out = np.full(len(uniques), np.nan)
    for size in np.unique(sizes[sizes >= 2]):
        groups = np.flatnonzero(sizes == size)
        unit = normalize_rows(grouped[starts[groups][:, None] + np.arange(size)])   # (G, r, d)
        cos = np.clip(unit @ unit.transpose(0, 2, 1), -1, 1)
        low_r, low_c = np.tril_indices(size, k=-1)
        out[groups] = cos[:, low_r, low_c].mean(axis=1)
    return uniques, out


def perturbation_consistency(features: np.ndarray, perturbations, negative_controls: Sequence,
                             drop: Sequence = ()) -> pd.DataFrame:
    """EFAAR `pert_signal_consistency_benchmark`.

    features: (rows, d) replicate-level embeddings (e.g. corrected well embeddings);
    perturbations: (rows,) labels; negative_controls: labels whose metric forms the null;
    drop: labels removed first (e.g. the control label).
    Returns DataFrame[pert, avgcossim, pval], one row per non-negative-control perturbation in
    order of first appearance. p = 1 - searchsorted(sorted null, metric, 'left') / len(null).
    """
    labels = np.asarray(perturbations)
    keep = ~pd.Index(labels).isin(list(drop))
    uniques, metric = mean_replicate_cosines(np.asarray(features)[keep], labels[keep])
    is_null = pd.Index(uniques).isin(list(negative_controls))
    if not is_null.any():
        raise ValueError("none of the negative-control perturbations occurs in the data")
    null = np.sort(metric[is_null])
    query = metric[~is_null]
    return pd.DataFrame({"pert": uniques[~is_null], "avgcossim": query, "pval": _p_values(null, query)})


def _p_values(null: np.ndarray, query: np.ndarray) -> np.ndarray:
    """EFAAR's p-value: the share of the (sorted) null at or above each query; NaN for a perturbation
    with fewer than 2 replicates (no metric), as EFAAR returns, so it never counts as consistent."""
    pval = 1 - np.searchsorted(null, query, side="left") / len(null)
    return np.where(np.isnan(query), np.nan, pval)


def consistency_summary(table: pd.DataFrame, threshold: float = P_VALUE_THRESHOLD) -> dict:
    """Fraction of perturbations whose replicate consistency beats the null at p <= threshold."""
    valid = table["pval"].notna()
    return {"num_perturbations": int(valid.sum()),
            "fraction_consistent": float((table.loc[valid, "pval"] <= threshold).mean())
            if valid.any() else float("nan"),
            "p_value_threshold": threshold,
            "median_avgcossim": float(table["avgcossim"].median())}


def random_group_null(features: np.ndarray, perturbations, num_groups: int = 1000,
                      drop: Sequence = (), seed: int = 0) -> np.ndarray:
    """Null for `perturbation_consistency` when no negative-control perturbations are known: the
    same metric for random groups of rows (sizes drawn from the real replicate counts)."""
    labels = np.asarray(perturbations)
    keep = np.flatnonzero(~pd.Index(labels).isin(list(drop)))
    _, _, sizes = _groups(labels[keep])
    sizes = sizes[sizes >= 2]
    if len(sizes) == 0 or len(keep) < 2:
        raise ValueError("no perturbation has 2 or more replicates")
    rng = np.random.default_rng(seed)
    draws = rng.choice(sizes, num_groups)
    rows = np.concatenate([rng.choice(keep, s, replace=False) for s in draws])
    fake = np.repeat(np.arange(num_groups), draws)
    return mean_replicate_cosines(np.asarray(features)[rows], fake)[1]


def perturbation_consistency_vs_random(features: np.ndarray, perturbations, drop: Sequence = (),
                                       num_groups: int = 1000, seed: int = 0) -> pd.DataFrame:
    """`perturbation_consistency` with the random-group null instead of negative controls."""
    labels = np.asarray(perturbations)
    keep = ~pd.Index(labels).isin(list(drop))
    uniques, metric = mean_replicate_cosines(np.asarray(features)[keep], labels[keep])
    null = np.sort(random_group_null(features, labels, num_groups, drop, seed))
    return pd.DataFrame({"pert": uniques, "avgcossim": metric, "pval": _p_values(null, metric)})


# --- ViTally Consistent: KS and Cramer-von Mises ------------------------------------------------

def _profiles(features: np.ndarray, perturbations: np.ndarray, replicates) -> tuple[np.ndarray, ...]:
    """Mean profile per (perturbation, replicate) when replicate labels are given, in order of first
    appearance of the pair (the pairs are factorised as integer codes of each label, not as a MultiIndex)."""
    if replicates is None:
        return features, perturbations, np.arange(len(features))
    pert_codes, pert_uniques = pd.factorize(perturbations, use_na_sentinel=False)
    rep_codes, rep_uniques = pd.factorize(np.asarray(replicates), use_na_sentinel=False)
    codes, pairs = pd.factorize(pert_codes.astype(np.int64) * len(rep_uniques) + rep_codes)
    means, _ = group_means(features, codes, len(pairs))
    return (means, np.asarray(pert_uniques)[pairs // len(rep_uniques)],
            np.asarray(rep_uniques)[pairs % len(rep_uniques)])


def replicate_pair_cosines(features: np.ndarray, perturbations, replicates=None) -> np.ndarray:
    """Cosines of all pairs of profiles of the same perturbation (from different replicates when
    `replicates` is given: rows are first averaged per (perturbation, replicate))."""
    return _replicate_pair_cosines(*_profiles(np.asarray(features), np.asarray(perturbations), replicates))


def _replicate_pair_cosines(x: np.ndarray, perts: np.ndarray, reps: np.ndarray) -> np.ndarray:
    _, order, sizes = _groups(perts)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out = []
    for size in np.unique(sizes[sizes >= 2]):
        groups = np.flatnonzero(sizes == size)
        rows = order[starts[groups][:, None] + np.arange(size)]
        unit = normalize_rows(x[rows])
        cos = unit @ unit.transpose(0, 2, 1)
        low_r, low_c = np.tril_indices(size, k=-1)
        differ = reps[rows][:, low_r] != reps[rows][:, low_c]
        out.append(cos[:, low_r, low_c][differ])
    return np.concatenate(out) if out else np.empty(0, x.dtype)


def non_replicate_pair_cosines(features: np.ndarray, perturbations, num_pairs: int,
                               replicates=None, seed: int = 0) -> np.ndarray:
    """Cosines of `num_pairs` random profile pairs from different perturbations (and different
    replicates when given), drawn with a fixed seed."""
    x, perts, reps = _profiles(np.asarray(features), np.asarray(perturbations), replicates)
    return _non_replicate_pair_cosines(x, perts, reps if replicates is not None else None, num_pairs, seed)


def _non_replicate_pair_cosines(x: np.ndarray, perts: np.ndarray, reps: np.ndarray | None, num_pairs: int,
                                seed: int) -> np.ndarray:
    unit = normalize_rows(x)
    codes = pd.factorize(perts)[0]
    rng = np.random.default_rng(seed)
    found, total = [], 0
    for _ in range(100):  # rejection sampling; almost every draw qualifies in a real screen
        i = rng.integers(0, len(x), 2 * num_pairs)
        j = rng.integers(0, len(x), 2 * num_pairs)
        ok = codes[i] != codes[j]
        if reps is not None:
            ok &= reps[i] != reps[j]
        i, j = i[ok], j[ok]
        found.append(np.einsum("nd,nd->n", unit[i], unit[j]))
        total += len(i)
        if total >= num_pairs:
            break
    if total == 0:
        raise ValueError("no pair of profiles from different perturbations (and replicates)")
    return np.concatenate(found)[:num_pairs]


def no_replicate_pairs(perturbations: np.ndarray, replicates: np.ndarray | None) -> str:
    """What is wrong when no perturbation has two profiles to compare (the message says which case)."""
    perts = np.asarray(perturbations)
    if len(perts) == 0:
        return "replicate consistency: no rows left after dropping the controls"
    rows = int(pd.Series(perts).value_counts().max())
    if replicates is None or rows < 2:
        return f"replicate consistency: no perturbation has two or more rows (at most {rows})"
    units = pd.unique(np.asarray(replicates))
    return (f"replicate consistency compares each perturbation's profiles across replicate units, but every "
            f"perturbation occurs in only one unit ({len(units)} unit(s) in the data: {units[:5].tolist()}; "
            f"perturbations have up to {rows} rows each); use a replicate unit that varies within a "
            f"perturbation (e.g. plates or experiments, or one unit per row)")


def replicate_consistency(features: np.ndarray, perturbations, replicates=None, drop: Sequence = (),
                          null_pairs: int | None = None, seed: int = 0) -> dict:
    """KS and Cramer-von Mises statistics of replicate-pair cosines vs non-replicate-pair cosines.

    features: (rows, d) embeddings; perturbations: (rows,) labels; replicates: optional (rows,)
    replicate unit (e.g. experiment/batch): rows are averaged per (perturbation, replicate) and
    only cross-replicate pairs count, so the statistic measures consistency across batches.
    drop: labels removed first (controls). null_pairs: size of the null sample (default: as many
    as replicate pairs, at least 10,000). Larger statistics mean more consistent replicates.
    """
    labels = np.asarray(perturbations)
    keep = ~pd.Index(labels).isin(list(drop))
    x = np.asarray(features)[keep]
    reps = None if replicates is None else np.asarray(replicates)[keep]
    profiles = _profiles(x, labels[keep], reps)   # averaged once for both samples
    rep = _replicate_pair_cosines(*profiles)
    if len(rep) == 0:
        raise ValueError(no_replicate_pairs(labels[keep], reps))
    null = _non_replicate_pair_cosines(profiles[0], profiles[1], None if reps is None else profiles[2],
                                       null_pairs or max(len(rep), 10_000), seed)
    # in float64: scipy computes the CvM statistic in the samples' dtype, and from float32 cosines it keeps
    # three digits (0.484375 against 0.4846936 for 60,000 values) and a p-value no smaller than ~1e-7
    return {**two_sample_tests(rep.astype(np.float64), null.astype(np.float64)),
            "num_replicate_pairs": int(len(rep)), "num_null_pairs": int(len(null)),
            "median_replicate_cosine": float(np.median(rep)), "median_null_cosine": float(np.median(null))}


# ---------------------------------------------------------------------------------------------------------
# The two-sample tests: scipy.stats' own numbers without importing scipy.stats where we can
# ---------------------------------------------------------------------------------------------------------
# Written for speed: `import scipy.stats` costs 0.7-0.9 s of CPU (its distributions' docstrings are parsed at
# import), as much as the whole recall of a 10,000-gene map. For the sample sizes of a screen (both samples
# above scipy's MAX_AUTO_N = 10,000 for KS, above 20 for CvM) scipy computes both p-values by closed forms of
# scipy.special; those are reproduced here step by step from scipy 1.17's source (stats._stats_py.ks_2samp,
# stats._ksstats._kolmogn, stats._hypotests.cramervonmises_2samp and _cdf_cvm_inf), and
# tests/test_consistency.py checks them bit for bit against scipy.stats. Every other case (small samples,
# NaN, the KS branches that need scipy's matrix algorithms) is scipy.stats' own call.

def two_sample_tests(x: np.ndarray, y: np.ndarray) -> dict:
    """`scipy.stats.ks_2samp(x, y)` and `scipy.stats.cramervonmises_2samp(x, y)` (defaults: two-sided,
    method 'auto'): their statistics and p-values as floats."""
    x, y = np.asarray(x), np.asarray(y)
    fast = (x.ndim == y.ndim == 1 and min(len(x), len(y)) > 1 and max(len(x), len(y)) > 10_000
            and np.isfinite(x).all() and np.isfinite(y).all())
    sorted_x, sorted_y = (np.sort(x), np.sort(y)) if fast else (None, None)
    ks = _ks_2samp_asymptotic(sorted_x, sorted_y) if fast else None
    if ks is None:
        from scipy import stats   # the general case
        ks_res, cvm_res = stats.ks_2samp(x, y), stats.cramervonmises_2samp(x, y)
        ks, cvm = (ks_res.statistic, ks_res.pvalue), (cvm_res.statistic, cvm_res.pvalue)
    else:
        cvm = _cramervonmises_2samp_asymptotic(sorted_x, sorted_y)
    return {"ks_statistic": float(ks[0]), "ks_pvalue": float(ks[1]),
            "cvm_statistic": float(cvm[0]), "cvm_pvalue": float(cvm[1])}


def _ks_2samp_asymptotic(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """ks_2samp's statistic and its 'asymp' two-sided p-value, kstwo.sf(d, round(n1 n2 / (n1 + n2))), for
    sorted samples; None where _kolmogn would need the Durbin matrix or Pelz-Good (then scipy computes)."""
    from scipy import special
    both = np.concatenate([x, y])
    diffs = np.searchsorted(x, both, side="right") / len(x) - np.searchsorted(y, both, side="right") / len(y)
    min_s, max_s = np.clip(-diffs[np.argmin(diffs)], 0, 1), diffs[np.argmax(diffs)]
    d = min_s if min_s > max_s else max_s
    m, n = sorted([float(len(x)), float(len(y))], reverse=True)
    n = int(np.round(m * n / (m + n)))   # an int, as scipy's kolmogn hands it to _kolmogn and smirnov
    if n <= 140:
        return None
    t = n * d
    if d >= 1.0:
        prob = 0.0
    elif d <= 0.0 or t <= 0.5:
        prob = 1.0
    elif t <= 1.0:
        return None
    elif t >= n - 1:
        prob = 2 * (1.0 - d) ** n
    elif d >= 0.5 or t * d >= 2.2:
        prob = 0.0 if d < 0.5 and t * d >= 370.0 else 2 * special.smirnov(n, d)
    else:
        return None
    return d, float(np.clip(prob, 0.0, 1.0))


def _cramervonmises_2samp_asymptotic(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """cramervonmises_2samp's T and its asymptotic p-value (method 'auto' for more than 20 values) for sorted
    samples. The mid-ranks of the pooled sample come from two binary searches per value (exact halves, as
    scipy.stats.rankdata's)."""
    from scipy import special
    nx, ny = len(x), len(y)
    dtype = np.result_type(x, y)
    dtype = dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)

    def midranks(v):
        below = np.searchsorted(x, v, "left") + np.searchsorted(y, v, "left")
        ties = np.searchsorted(x, v, "right") + np.searchsorted(y, v, "right") - below
        return (below + 0.5 * (ties + 1)).astype(dtype, copy=False)
    u = (nx * np.sum((midranks(x) - np.arange(1, nx + 1, dtype=dtype)) ** 2)
         + ny * np.sum((midranks(y) - np.arange(1, ny + 1, dtype=dtype)) ** 2))
    k, big_n = nx * ny, nx + ny
    t = u / (k * big_n) - (4 * k - 1) / (6 * big_n)
    et = (1 + 1 / big_n) / 6
    vt = (big_n + 1) * (4 * k * big_n - 3 * (nx ** 2 + ny ** 2) - 2 * k)
    vt = vt / (45 * big_n ** 2 * 4 * k)
    tn = np.asarray(1 / 6 + (t - et) / math.sqrt(45 * vt))
    if not tn >= 0.003:   # scipy: the cdf is below 1.28e-18 there, p = 1
        return t, 1.0
    total, j = np.zeros_like(tn), 0
    while True:   # _cdf_cvm_inf's series, term by term until one is below 1e-7
        scale = math.exp(special.gammaln(j + 0.5) - special.gammaln(j + 1)) / (np.pi ** 1.5 * np.sqrt(tn))
        q = (4 * j + 1) ** 2 / (16 * tn)
        term = scale * math.sqrt(4 * j + 1) * np.exp(-q) * np.asarray(special.kv(0.25, q), dtype=scale.dtype)
        total = total + term
        j += 1
        if not abs(term) >= 1e-7:
            return t, np.clip(1.0 - total, 0.0, None)
