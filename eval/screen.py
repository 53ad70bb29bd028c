"""Evaluating a whole screen's embeddings block by block: where does the biology live in the network?

Input: per-crop features for every block, (N, K, D), with the crops' metadata. For each block:
  crops -> wells (mean) -> EFAAR map (PCA, correction on each experiment's controls, mean per perturbation)
  -> recall of known relationships (two-sided, per annotation source) and replicate consistency
  (EFAAR's per-perturbation consistency vs a null, KS and Cramer-von Mises of "ViTally Consistent");
and the probe tasks chosen by name (eval/tasks.py: perturbation identity, functional group, image QC,
experiment identity), all blocks probed together. The block reported as "best" is chosen on the
validation score of one task (`select_by`, default perturbation identity), never on test scores or
on recall.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from eval import map_benchmark, plots, tasks as tasks_lib
from eval.tasks import WELL_KEYS


def well_profiles(features: np.ndarray, meta: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Mean of crop features per well. features (N, ..., D) -> (W, ..., D); one metadata row per well."""
    missing = [c for c in WELL_KEYS + ["perturbation", "is_control"] if c not in meta.columns]
    if missing:
        raise ValueError(f"crop metadata lacks column(s) {missing}")
    wells, first, counts = tasks_lib.well_means(features, meta)
    well_meta = meta.iloc[first][WELL_KEYS + ["perturbation", "is_control"]].reset_index(drop=True)
    well_meta["num_crops"] = counts
    return wells, well_meta


def map_block(wells: np.ndarray, well_meta: pd.DataFrame, annotations: str, *, control: str,
              pca_components: int, correction: str, thresholds: Sequence,
              negative_controls: Sequence[str] | None, seed: int):
    """EFAAR map of one block's (W, D) well features -> ({"recall", "consistency"}, similarities)."""
    n_comp = min(pca_components, wells.shape[1], wells.shape[0] - 1)
    report, _, sims = map_benchmark.evaluate_map(
        wells, well_meta["perturbation"].to_numpy(), control, well_meta["experiment"].to_numpy(), annotations,
        pca_components=n_comp, correction=correction, thresholds=thresholds,
        negative_controls=negative_controls, seed=seed)
    report["consistency"]["replicate_consistency"]["replicates"] = "experiment"
    return report, sims


def evaluate_blocks(features: np.ndarray, meta: pd.DataFrame, annotations: str, *, control: str,
                    pca_components: int = 64, correction: str = "centerscale",
                    thresholds: Sequence = ((0.05, 0.95),), tasks: Sequence[str] = ("perturbation",),
                    select_by: str = "perturbation", groups: str = "", dataset_dir: str | None = None,
                    probe_model: str = "ridge", split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
                    negative_controls: Sequence[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """The per-block report: recall per source and threshold, consistency, every probe task's
    accuracy, and the chosen block (by `select_by`'s validation score; the last block when that task
    is not run). `groups` is the functional-group source (eval/tasks.py:functional_groups)."""
    if features.ndim == 2:
        features = features[:, None]
    probes = tasks_lib.run_tasks(tasks, features, meta, groups_source=groups, dataset_dir=dataset_dir,
                                 default_probe=probe_model, fractions=split_fractions, seed=seed)
    selector = probes.get(select_by, {})
    best = selector["best_block"] - 1 if "best_block" in selector else features.shape[1] - 1
    wells, well_meta = well_profiles(features, meta)
    blocks, best_sims = [], None
    for k in range(features.shape[1]):
        mapped, sims = map_block(wells[:, k], well_meta, annotations, control=control,
                                 pca_components=pca_components, correction=correction, thresholds=thresholds,
                                 negative_controls=negative_controls, seed=seed)
        row: dict[str, Any] = {"block": k + 1, "recall": mapped["recall"],
                               "recall_mean": _mean_recall(mapped["recall"]), "consistency": mapped["consistency"],
                               "probes": {name: {"val": t["val"][k], "test": t["test"][k]}
                                          for name, t in probes.items() if "test" in t}}
        if "test" in selector:
            row["probe_val"], row["probe_test"] = selector["val"][k], selector["test"][k]
        blocks.append(row)
        if k == best:
            best_sims = sims
    how = (f"{select_by} probe, validation balanced accuracy" if "best_block" in selector
           else "last block (no selection task was run)")
    return {"num_crops": int(len(meta)), "num_wells": int(len(well_meta)), "correction": correction,
            "pca_components": pca_components, "tasks": probes, "blocks": blocks, "best_block": best + 1,
            "selected_by": how, "best": blocks[best], "last": blocks[-1],
            "_well_features": wells[:, best], "_well_meta": well_meta, "_similarities": best_sims}


def _mean_recall(records: list[dict]) -> dict[str, float]:
    keys = sorted({k for r in records for k in r if k.startswith("recall_")})
    return {k: float(np.mean([r[k] for r in records])) for k in keys}


def write_outputs(report: dict[str, Any], out_dir: str, title: str = "") -> dict[str, str]:
    """report.json, the chosen block's well embeddings as parquet (`feature_*` columns), the per-block
    curves (blocks.png) and the chosen block's similarity distribution with known pairs (similarity.png)."""
    os.makedirs(out_dir, exist_ok=True)
    wells, well_meta = report["_well_features"], report["_well_meta"]
    table = pd.concat([well_meta.reset_index(drop=True),
                       pd.DataFrame(wells, columns=[f"feature_{i}" for i in range(wells.shape[1])])], axis=1)
    paths = {"report": os.path.join(out_dir, "report.json"),
             "embeddings": os.path.join(out_dir, "embeddings.parquet"),
             "plot": os.path.join(out_dir, "blocks.png")}
    table.to_parquet(paths["embeddings"], index=False)
    plot_blocks(report, paths["plot"], title)
    sims = report.get("_similarities")
    if sims is not None and sims.queries:
        paths["similarity_plot"] = plots.plot_similarity_distribution(
            sims, os.path.join(out_dir, "similarity.png"), title=f"{title} block {report['best_block']}".strip())
    with open(paths["report"], "w") as f:
        json.dump(public(dict(report, outputs=paths)), f, indent=1)
    return paths


def public(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its in-memory arrays (keys starting with '_')."""
    return {k: v for k, v in report.items() if not k.startswith("_")}


def plot_blocks(report: dict[str, Any], path: str, title: str = "") -> None:
    """Three panels against the block index: recall per source, replicate consistency, probe tasks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = report["blocks"]
    x = [b["block"] for b in blocks]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), dpi=110)
    ax = axes[0]
    keys = sorted(blocks[0]["recall_mean"])   # the first threshold pair, e.g. recall_0.05_0.95
    if keys:
        key = keys[0]
        for src in [r["source"] for r in blocks[0]["recall"]]:
            ax.plot(x, [next(r[key] for r in b["recall"] if r["source"] == src) for b in blocks], "o-", ms=3,
                    label=src)
        ax.plot(x, [b["recall_mean"][key] for b in blocks], "k--", label="mean")
        ax.set_ylabel(key.replace("_", " ", 1))
        ax.legend(fontsize=7)
    ax.set_title("known-relationship recall")

    ax = axes[1]
    ax.plot(x, [b["consistency"]["replicate_consistency"]["ks_statistic"] for b in blocks], "o-", ms=3,
            label="KS statistic")
    ax.plot(x, [b["consistency"]["perturbation_consistency"]["fraction_consistent"] for b in blocks], "s-", ms=3,
            label="fraction consistent (p<=0.05)")
    ax.set_ylim(0, 1.02)
    twin = ax.twinx()
    twin.plot(x, [b["consistency"]["replicate_consistency"]["cvm_statistic"] for b in blocks], "^:", ms=3,
              color="C3", label="CvM statistic (right)")
    twin.set_ylabel("Cramer-von Mises")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7)
    ax.set_title("replicate consistency")

    ax = axes[2]
    for i, (name, task) in enumerate(t for t in report["tasks"].items() if "test" in t[1]):
        arrow = "" if task["higher_is_better"] else " (lower is better)"
        ax.plot(x, task["test"], "o-", ms=3, color=f"C{i}", label=f"{name}{arrow}")
        ax.axhline(task["chance"], color=f"C{i}", lw=0.7, ls=":")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("balanced accuracy (test; dotted: chance)")
    ax.set_title("linear probes")
    if ax.lines:
        ax.legend(fontsize=7)

    for ax in axes:
        ax.axvline(report["best_block"], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("transformer block")
        ax.set_xticks(x)
    fig.suptitle(title or "per-block evaluation", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
