"""Evaluating a whole screen's embeddings block by block: where does the biology live in the network?

Input: per-crop features for every block, (N, K, D), with the crops' metadata. For each block:
  crops -> wells (mean) -> EFAAR map (PCA, correction on each experiment's controls, mean per perturbation)
  -> recall of known relationships (two-sided, per annotation source),
and a linear probe of perturbation identity on crops, trained on some wells and scored by balanced
accuracy on held-out wells (crop features standardised on each experiment's controls first). The block
reported as "best" is chosen by probe accuracy on validation wells, never on test wells or on recall.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import pandas as pd

from eval import efaar, probe, recall

WELL_KEYS = ["experiment", "plate", "well"]


def well_profiles(features: np.ndarray, meta: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Mean of crop features per well. features (N, ..., D) -> (W, ..., D); one metadata row per well."""
    missing = [c for c in WELL_KEYS + ["perturbation", "is_control"] if c not in meta.columns]
    if missing:
        raise ValueError(f"crop metadata lacks column(s) {missing}")
    codes, uniques = pd.factorize(pd.MultiIndex.from_frame(meta[WELL_KEYS]))
    order = np.argsort(codes, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(codes[order])) + 1]
    counts = np.diff(np.r_[starts, len(codes)])
    sums = np.add.reduceat(np.asarray(features, np.float64)[order], starts, axis=0)
    wells = (sums / counts.reshape((-1,) + (1,) * (features.ndim - 1))).astype(np.float32)
    first = meta.iloc[order[starts]]
    well_meta = first[WELL_KEYS + ["perturbation", "is_control"]].reset_index(drop=True)
    well_meta["num_crops"] = counts
    return wells, well_meta


def stratified_well_split(meta: pd.DataFrame, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/val/test crop masks holding out whole wells: for every perturbation one well goes to test, one
    to validation and the rest to train (perturbations with fewer than 3 wells stay in train only)."""
    wells = meta[WELL_KEYS + ["perturbation"]].drop_duplicates(WELL_KEYS)
    rng = np.random.default_rng(seed)
    split_of: dict[tuple, int] = {}
    for _, group in wells.groupby("perturbation", sort=True):
        keys = [tuple(r) for r in group[WELL_KEYS].itertuples(index=False)]
        rng.shuffle(keys)
        for i, k in enumerate(keys):
            split_of[k] = (2 if i == 0 else 1 if i == 1 else 0) if len(keys) >= 3 else 0
    split = np.array([split_of[tuple(r)] for r in meta[WELL_KEYS].itertuples(index=False)])
    return split == 0, split == 1, split == 2


def recall_by_block(well_features: np.ndarray, well_meta: pd.DataFrame, annotations: str, *, control: str,
                    pca_components: int, correction: str, thresholds: Sequence) -> list[list[dict]]:
    """EFAAR map + known-relationship recall for each block of (W, K, D) well features."""
    out = []
    for k in range(well_features.shape[1]):
        x = well_features[:, k]
        n_comp = min(pca_components, x.shape[1], x.shape[0] - 1)
        m = efaar.build_map(x, well_meta["perturbation"].to_numpy(), control,
                            batches=well_meta["experiment"].to_numpy(), pca_components=n_comp,
                            correction=correction)
        out.append(recall.known_relationship_benchmark(m.features, m.labels, annotations, thresholds=thresholds))
    return out


def probe_blocks(features: np.ndarray, meta: pd.DataFrame, *, seed: int = 0) -> probe.ProbeReport:
    """Perturbation-identity probes on crop features of all blocks, (N, K, D), controls excluded."""
    keep = ~meta["is_control"].to_numpy(bool)
    x = np.stack([efaar.centerscale_on_controls(features[:, k], meta["is_control"].to_numpy(bool),
                                                meta["experiment"].to_numpy())[keep]
                  for k in range(features.shape[1])])
    kept = meta[keep].reset_index(drop=True)
    labels, _ = pd.factorize(kept["perturbation"], sort=True)
    train, val, test = stratified_well_split(kept, seed)
    return probe.ridge_probes(x, labels.astype(np.int32), train, val, test)


def evaluate_blocks(features: np.ndarray, meta: pd.DataFrame, annotations: str, *, control: str,
                    pca_components: int = 64, correction: str = "centerscale",
                    thresholds: Sequence = ((0.05, 0.95),), run_probe: bool = True, seed: int = 0) -> dict[str, Any]:
    """The per-block report: recall per source and threshold, probe accuracy, and the chosen block."""
    if features.ndim == 2:
        features = features[:, None]
    wells, well_meta = well_profiles(features, meta)
    recalls = recall_by_block(wells, well_meta, annotations, control=control, pca_components=pca_components,
                              correction=correction, thresholds=thresholds)
    probes = probe_blocks(features, meta, seed=seed) if run_probe else None
    blocks = []
    for k, rec in enumerate(recalls):
        row: dict[str, Any] = {"block": k + 1, "recall": rec, "recall_mean": _mean_recall(rec)}
        if probes is not None:
            row["probe_val"] = float(probes.val[k])
            row["probe_test"] = float(probes.test[k])
        blocks.append(row)
    best = probes.best_block if probes is not None else len(blocks) - 1
    return {"num_crops": int(len(meta)), "num_wells": int(len(well_meta)), "correction": correction,
            "pca_components": pca_components, "blocks": blocks, "best_block": best + 1,
            "best": blocks[best], "last": blocks[-1], "probe": probes.to_dict() if probes is not None else None,
            "_well_features": wells[:, best], "_well_meta": well_meta}


def _mean_recall(records: list[dict]) -> dict[str, float]:
    keys = sorted({k for r in records for k in r if k.startswith("recall_")})
    return {k: float(np.mean([r[k] for r in records])) for k in keys}


def write_outputs(report: dict[str, Any], out_dir: str, title: str = "") -> dict[str, str]:
    """report.json, the chosen block's well embeddings as parquet (`feature_*` columns), and a PNG plot."""
    os.makedirs(out_dir, exist_ok=True)
    wells, well_meta = report["_well_features"], report["_well_meta"]
    table = pd.concat([well_meta.reset_index(drop=True),
                       pd.DataFrame(wells, columns=[f"feature_{i}" for i in range(wells.shape[1])])], axis=1)
    paths = {"report": os.path.join(out_dir, "report.json"),
             "embeddings": os.path.join(out_dir, "embeddings.parquet"),
             "plot": os.path.join(out_dir, "blocks.png")}
    table.to_parquet(paths["embeddings"], index=False)
    with open(paths["report"], "w") as f:
        json.dump(public(report), f, indent=1)
    plot_blocks(report, paths["plot"], title)
    return paths


def public(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its in-memory arrays (keys starting with '_')."""
    return {k: v for k, v in report.items() if not k.startswith("_")}


def plot_blocks(report: dict[str, Any], path: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = report["blocks"]
    x = [b["block"] for b in blocks]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for key in sorted(blocks[0]["recall_mean"]):
        ax.plot(x, [b["recall_mean"][key] for b in blocks], "o-", label=f"mean {key}")
    if "probe_test" in blocks[0]:
        ax.plot(x, [b["probe_test"] for b in blocks], "s--", label="probe balanced acc. (test wells)")
    ax.axvline(report["best_block"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("transformer block")
    ax.set_ylabel("score")
    ax.set_title(title or "recall and probe accuracy per block")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
