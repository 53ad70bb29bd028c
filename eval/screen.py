"""Evaluating a whole screen's embeddings block by block: where does the biology live in the network?

Input: per-crop features for every block, (N, K, D), with the crops' metadata. For each block:
  crops -> wells (mean) -> EFAAR map (PCA, correction on each experiment's controls, mean per perturbation)
  -> recall of known relationships (two-sided, per annotation source) and replicate consistency
  (EFAAR's per-perturbation consistency vs a null, KS and Cramer-von Mises of "ViTally Consistent");
and the probe tasks chosen by name (eval/tasks.py: perturbation identity, functional group, image QC,
experiment identity), all blocks probed together. The block reported as "best" is chosen on the
validation score of one task (`select_by`, default perturbation identity), never on test scores or
on recall.

Every recall and probe test figure carries a 95% percentile bootstrap interval (eval/bootstrap.py):
recall resamples the map's perturbations (genes), probes resample the held-out wells. Given
`families` (gene -> family, e.g. complexes or pathways), every block also reports recall over the
known pairs with both genes in each family (the null stays all pairs) and the perturbation-level
probes over each family's test rows, with their intervals.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from eval import bootstrap, map_benchmark, plots, recall as recall_lib, tasks as tasks_lib
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
              negative_controls: Sequence[str] | None, seed: int, batch_col: str = "experiment",
              pca_batch_col: str | None = None, drop: Sequence[str] = (), mean_average_precision: bool = True,
              null_cache_dir: str | None = None):
    """EFAAR map of one block's (W, D) well features -> ({"recall", "consistency",
    "mean_average_precision" (copairs mAP, unless switched off; nulls cached in `null_cache_dir`)},
    similarities, and the PerturbationMap itself). `batch_col` / `pca_batch_col` (experiment | plate)
    are the batches of the correction and of the pre-PCA scaling; `drop`: more labels (e.g. other
    controls) left out of the map. Replicates are experiments."""
    n_comp = map_benchmark.pca_components_for(pca_components, *wells.shape)
    report, pmap, sims = map_benchmark.evaluate_map(
        wells, well_meta["perturbation"].to_numpy(), control, well_meta[batch_col].to_numpy(), annotations,
        pca_components=n_comp, correction=correction, thresholds=thresholds,
        pca_batches=well_meta[pca_batch_col].to_numpy() if pca_batch_col else None, drop=drop,
        negative_controls=negative_controls, seed=seed, replicates=well_meta["experiment"].to_numpy(),
        mean_average_precision=mean_average_precision, null_cache_dir=null_cache_dir)
    report["consistency"]["replicate_consistency"]["replicates"] = "experiment"
    return report, sims, pmap


def recall_intervals(pmap, sources: Sequence[str], annotations: str, thresholds: Sequence, *,
                     families: dict[str, str] | None = None, n_boot: int = bootstrap.N_BOOT,
                     seed: int = 0) -> dict[str, Any]:
    """Gene-bootstrap intervals of one map's recall, on one set of resamples for every source, the
    mean over sources and every family:
      {"recall_ci": [{"source", "query_distribution_size", "recall_{lo}_{hi}": {"value", "ci95"}}, ...],
       "recall_mean_ci": {"recall_{lo}_{hi}": {"value", "ci95"}},
       "by_family": {family: {source: {"query_distribution_size", "recall_{lo}_{hi}": {...}}}}}
    Values equal recall.recall_table's; a family's recall scores the known pairs with both genes in
    the family against the whole null (sources without such a pair are left out)."""
    labels = np.asarray(pmap.labels).astype(str)
    positions = bootstrap.known_pair_positions(labels, annotations, list(sources))
    boot = bootstrap.PairBootstrap(recall_lib.upper_triangle_cosines(pmap.features), n_boot=n_boot, seed=seed)
    queries: dict[Any, np.ndarray] = {(src, None): pos for src, pos in positions.items()}
    family_of = pd.Series(labels).map(families or {}).to_numpy(object)
    names = sorted({str(f) for f in family_of if isinstance(f, str)})
    for name in names:
        member = family_of == name
        for src, pos in positions.items():
            queries[(src, name)] = boot.restrict(pos, member)
    samples = boot.samples(queries, thresholds)
    record = lambda value, boot_samples: bootstrap.ci_record(value, *bootstrap.interval(boot_samples))
    out: dict[str, Any] = {"recall_ci": [], "recall_mean_ci": {}, "by_family": {n: {} for n in names}}
    for (src, family), by_key in samples.items():
        rec = {"query_distribution_size": int(len(queries[(src, family)])),
               **{k: record(v, b) for k, (v, b) in by_key.items()}}
        if family is None:
            out["recall_ci"].append({"source": src, **rec})
        else:
            out["by_family"][family][src] = rec
    overall = [samples[(src, None)] for src in positions]
    for key in (overall[0] if overall else {}):
        value = float(np.mean([o[key][0] for o in overall]))             # as _mean_recall
        out["recall_mean_ci"][key] = record(value, np.mean([o[key][1] for o in overall], axis=0))
    return out


def evaluate_blocks(features: np.ndarray, meta: pd.DataFrame, annotations: str, *, control: str,
                    pca_components: int = 64, correction: str = "centerscale",
                    thresholds: Sequence = ((0.05, 0.95),), tasks: Sequence[str] = ("perturbation",),
                    select_by: str = "perturbation", groups: str = "", dataset_dir: str | None = None,
                    probe_model: str = "ridge", split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
                    negative_controls: Sequence[str] | None = None, seed: int = 0,
                    families: dict[str, str] | None = None, n_boot: int = bootstrap.N_BOOT,
                    batch_col: str = "experiment", pca_batch_col: str | None = None,
                    drop: Sequence[str] = (), mean_average_precision: bool = True) -> dict[str, Any]:
    """The per-block report: recall per source and threshold, consistency, every probe task's
    accuracy, and the chosen block (by `select_by`'s validation score; the last block when that task
    is not run). `groups` is the functional-group source (eval/tasks.py:functional_groups).

    With n_boot > 0 (bootstrap resamples; seed `seed`) every block row also has
      recall_ci        [{"source", "query_distribution_size", "recall_{lo}_{hi}": {"value", "ci95": [lo, hi]}}]
                       (one per `recall` record, same order and values),
      recall_mean_ci   {"recall_{lo}_{hi}": {"value", "ci95"}} (value = recall_mean's),
      probes[task]["test_ci95"] = [lo, hi] and probe_test_ci95 (the selection task's),
    and with `families` (gene -> family name)
      by_family        {family: {"recall": {source: {"query_distribution_size", "recall_{lo}_{hi}":
                                                      {"value", "ci95"}}},
                                 "probe": {task: {"value", "ci95", "num_test"}}}}
    (recall over the known pairs with both genes in the family; probes over the family's test rows,
    for the tasks over perturbations). The tasks' records carry the same per block (tasks.run_task).

    With `mean_average_precision` (default) every block row also has
      mean_average_precision  JUMP-CP's mAP by copairs: phenotypic activity (wells against the control
                              wells of their batch) and consistency (per relationship table), with
                              BH-corrected p-values (eval/mean_average_precision.py:map_report);
    the blocks share one cache of copairs' null distributions."""
    if features.ndim == 2:
        features = features[:, None]
    probes = tasks_lib.run_tasks(tasks, features, meta, groups_source=groups, dataset_dir=dataset_dir,
                                 default_probe=probe_model, fractions=split_fractions, seed=seed,
                                 families=families, n_boot=n_boot)
    selector = probes.get(select_by, {})
    best = selector["best_block"] - 1 if "best_block" in selector else features.shape[1] - 1
    wells, well_meta = well_profiles(features, meta)
    blocks, best_sims = [], None
    nulls = tempfile.TemporaryDirectory(prefix="copairs-nulls-") if mean_average_precision else None
    for k in range(features.shape[1]):
        mapped, sims, pmap = map_block(wells[:, k], well_meta, annotations, control=control,
                                       pca_components=pca_components, correction=correction,
                                       thresholds=thresholds, negative_controls=negative_controls, seed=seed,
                                       batch_col=batch_col, pca_batch_col=pca_batch_col, drop=drop,
                                       mean_average_precision=mean_average_precision,
                                       null_cache_dir=nulls.name if nulls else None)
        row: dict[str, Any] = {"block": k + 1, "recall": mapped["recall"],
                               "recall_mean": _mean_recall(mapped["recall"]), "consistency": mapped["consistency"],
                               **{key: mapped[key] for key in ("mean_average_precision",) if key in mapped},
                               "probes": {name: {"val": t["val"][k], "test": t["test"][k],
                                                 **({"test_ci95": t["test_ci95"][k]} if "test_ci95" in t else {})}
                                          for name, t in probes.items() if "test" in t}}
        if "test" in selector:
            row["probe_val"], row["probe_test"] = selector["val"][k], selector["test"][k]
            if "test_ci95" in selector:
                row["probe_test_ci95"] = selector["test_ci95"][k]
        if n_boot > 0:
            cis = recall_intervals(pmap, list(sims.queries), annotations, thresholds, families=families,
                                   n_boot=n_boot, seed=seed)
            row["recall_ci"], row["recall_mean_ci"] = cis["recall_ci"], cis["recall_mean_ci"]
            if families is not None:
                row["by_family"] = _family_rows(cis["by_family"], probes, k)
        blocks.append(row)
        if k == best:
            best_sims = sims
    if nulls:
        nulls.cleanup()
    how = (f"{select_by} probe, validation balanced accuracy" if "best_block" in selector
           else "last block (no selection task was run)")
    return {"num_crops": int(len(meta)), "num_wells": int(len(well_meta)), "correction": correction,
            "pca_components": pca_components, "tasks": probes, "blocks": blocks, "best_block": best + 1,
            "selected_by": how, "best": blocks[best], "last": blocks[-1],
            "_well_features": wells[:, best], "_well_meta": well_meta, "_similarities": best_sims}


def _family_rows(recall_by_family: dict[str, dict], probes: dict[str, dict], k: int) -> dict[str, dict]:
    """{family: {"recall": {source: ...}, "probe": {task: {"value", "ci95", "num_test"}}}} for block k."""
    names = set(recall_by_family) | {f for t in probes.values() for f in t.get("by_family", {})}
    out = {}
    for name in sorted(names):
        probe_rows = {task: {"value": t["by_family"][name]["value"][k], "ci95": t["by_family"][name]["ci95"][k],
                             "num_test": t["by_family"][name]["num_test"]}
                      for task, t in probes.items() if name in t.get("by_family", {})}
        out[name] = {"recall": recall_by_family.get(name, {}), "probe": probe_rows}
    return out


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


def _band(ax, x, intervals, color) -> None:
    """Shades [lo, hi] per block when every block has a defined interval."""
    if not intervals or any(iv is None or None in iv for iv in intervals):
        return
    lo, hi = zip(*intervals)
    ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)


def plot_blocks(report: dict[str, Any], path: str, title: str = "") -> None:
    """Three panels against the block index: recall per source, replicate consistency, probe tasks
    (shaded: the 95% bootstrap intervals, when the report has them)."""
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
        for i, src in enumerate(r["source"] for r in blocks[0]["recall"]):
            ax.plot(x, [next(r[key] for r in b["recall"] if r["source"] == src) for b in blocks], "o-", ms=3,
                    color=f"C{i}", label=src)
            cis = [next((r[key]["ci95"] for r in b.get("recall_ci", []) if r["source"] == src), None)
                   for b in blocks]
            _band(ax, x, cis, f"C{i}")
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
        _band(ax, x, task.get("test_ci95"), f"C{i}")
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
