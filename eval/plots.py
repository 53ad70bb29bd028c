"""PNG figures for the eval reports: similarity distributions with the known pairs marked."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from eval.recall import RECALL_THRESHOLDS, RelationshipSimilarities, compute_recall  # noqa: E402


def _density(sorted_values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Histogram density of already sorted values: two binary searches per edge, no pass over
    the (up to 2e8-value) null."""
    counts = np.diff(np.searchsorted(sorted_values, edges, side="left"))
    counts[-1] += np.count_nonzero(sorted_values == edges[-1])  # last bin is closed, like np.histogram
    return counts / max(len(sorted_values), 1) / np.diff(edges)


def _sorted_quantile(sorted_values: np.ndarray, q: float) -> float:
    """np.quantile (linear) of already sorted values, without np.quantile's partitioned copy."""
    pos = q * (len(sorted_values) - 1)
    i = int(np.floor(pos))
    j = min(i + 1, len(sorted_values) - 1)
    return float(sorted_values[i] + (sorted_values[j] - sorted_values[i]) * (pos - i))


def plot_similarity_distribution(sims: RelationshipSimilarities, path: str | os.PathLike,
                                 thresholds=RECALL_THRESHOLDS[:1], bins: int = 100,
                                 title: str = "") -> str:
    """One panel per source: the null cosine distribution, the known pairs' cosines and the
    null percentiles of the first threshold pair; recall in each panel title. Returns the path."""
    if not sims.queries:
        raise ValueError("no source has known pairs in this map; nothing to plot")
    null = sims.sorted_null
    lo, hi = float(min(thresholds[0])), float(max(thresholds[0]))
    cut_lo, cut_hi = _sorted_quantile(null, lo), _sorted_quantile(null, hi)
    edges = np.linspace(null[0], null[-1], bins + 1) if null[-1] > null[0] else \
        np.linspace(null[0] - 0.5, null[0] + 0.5, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    null_density = _density(null, edges)
    n = len(sims.queries)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, query) in zip(axes.ravel(), sims.queries.items()):
        recall = compute_recall(null, query, [(lo, hi)], null_is_sorted=True)[f"recall_{lo}_{hi}"]
        ax.fill_between(centers, null_density, step="mid", color="0.75", label=f"all pairs (n={len(null):,})")
        ax.step(centers, _density(np.sort(query), edges), where="mid", color="C3",
                label=f"known pairs (n={len(query):,})")
        ax.plot(query, np.zeros_like(query), "|", color="C3", alpha=0.3, markersize=8)
        for cut in (cut_lo, cut_hi):
            ax.axvline(cut, color="k", linestyle="--", linewidth=0.8)
        ax.set_title(f"{name}: recall {lo}/{hi} = {recall:.3f}", fontsize=10)
        ax.set_xlabel("cosine similarity")
        ax.set_ylabel("density")
        ax.legend(fontsize=7, loc="upper right")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)

