"""Probe tasks chosen by name (big_vision's "evaluators by name"): what a linear probe on every block's
features must predict, from which rows, split how, at which level, with which probe.

  config.eval.tasks = ["perturbation", "functional_group:split=perturbations", "qc", "experiment"]

Each entry is `NAME` or `NAME:key=value,...` with keys
  split       wells (whole wells held out; stratified per class when a well has a single label),
              experiments (whole experiments held out) or perturbations (whole perturbations held out,
              stratified per class: do unseen members of a group land with the seen ones?);
  level       crop (one sample per crop) or well (crop features averaged per well);
  probe       ridge (closed form, default) or logistic (optax), see eval/probe.py;
  correction  centerscale (features standardised on each experiment's control rows first) or none.

Tasks (label source, rows used, defaults):
  perturbation      perturbation identity, RxRx1-style; controls excluded; wells, crop
  functional_group  the perturbed gene's group, "Anax"-style: a `gene,group` CSV, or the complex /
                    pathway of the synthetic screen's ground_truth.json; genes without a group
                    excluded; wells, well
  qc                the crop's image-quality label (metadata column `qc`: ok, blur, saturation,
                    debris, empty); all rows; wells, crop
  experiment        the experiment (batch) a crop comes from: a batch-effect indicator, LOWER IS
                    BETTER; all rows; wells, crop, correction none (the representation's own batch
                    information; `experiment:correction=centerscale` measures what the correction leaves)

Scores are balanced accuracies (chance = 1 / classes). All blocks of a task are probed together; the
task's best block is picked on validation (lowest for `experiment`) and reported with its test score.
Every block's test score gets a 95% percentile bootstrap interval (eval/bootstrap.py) that resamples
the held-out units: wells (perturbations for split=perturbations; wells too for split=experiments,
where a handful of experiments would make a degenerate interval). Given `families` (gene -> family),
the tasks over perturbations (perturbation, functional_group) also report each block's balanced
accuracy on the test rows of each family's genes, with its interval.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from eval import bootstrap, efaar, probe

WELL_KEYS = ["experiment", "plate", "well"]
SPLITS = ("wells", "experiments", "perturbations")
LEVELS = ("crop", "well")
PROBES = ("ridge", "logistic")
CORRECTIONS = ("centerscale", "none")


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    split: str = "wells"
    level: str = "crop"
    probe: str = "ridge"
    correction: str = "centerscale"
    higher_is_better: bool = True

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TASKS: dict[str, Task] = {
    "perturbation": Task("perturbation"),
    "functional_group": Task("functional_group", level="well"),
    "qc": Task("qc"),
    # Uncorrected by default: the batch information the representation itself carries. After a
    # correction on controls, the controls' estimation error is itself an offset per experiment, which a
    # probe reads even from pure noise when control crops are few.
    "experiment": Task("experiment", correction="none", higher_is_better=False),
}
_CHOICES = {"split": SPLITS, "level": LEVELS, "probe": PROBES, "correction": CORRECTIONS}


def parse_task(spec: str, default_probe: str = "ridge") -> Task:
    """"functional_group:split=perturbations,level=crop" -> Task (unknown names, keys or values are
    errors that name them). `default_probe` applies unless the spec sets `probe`."""
    name, _, options = spec.strip().partition(":")
    if name not in TASKS:
        raise ValueError(f"unknown probe task {name!r} in {spec!r}; choose from {sorted(TASKS)}")
    if default_probe not in PROBES:
        raise ValueError(f"probe model {default_probe!r}: choose one of {PROBES}")
    values: dict[str, str] = {"probe": default_probe}
    for item in filter(None, options.split(",")):
        key, eq, value = item.partition("=")
        if key not in _CHOICES or not eq:
            raise ValueError(f"probe task {spec!r}: option {item!r} must be KEY=VALUE with KEY in {sorted(_CHOICES)}")
        if value not in _CHOICES[key]:
            raise ValueError(f"probe task {spec!r}: {key}={value!r} is not one of {_CHOICES[key]}")
        values[key] = value
    task = dataclasses.replace(TASKS[name], **values)
    if (task.name, task.split) in (("experiment", "experiments"), ("perturbation", "perturbations")):
        raise ValueError(f"probe task {spec!r}: holding out {task.split} leaves every test label unseen in training")
    return task


# --- label sources ------------------------------------------------------------------------------

class TaskUnavailable(ValueError):
    """The dataset lacks what a task's labels come from (reported as skipped, not an error)."""


def functional_groups(source: str, dataset_dir: str | None = None) -> dict[str, str]:
    """gene -> group. `source`: a CSV with columns `gene,group`, or `ground_truth:complex` /
    `ground_truth:pathway` (the synthetic screen's ground_truth.json in `dataset_dir`)."""
    kind, sep, level = source.partition(":")
    if kind == "ground_truth" and sep:
        if level not in ("complex", "pathway"):
            raise ValueError(f"functional groups {source!r}: use ground_truth:complex or ground_truth:pathway")
        path = os.path.join(dataset_dir or "", "ground_truth.json")
        if not os.path.isfile(path):
            raise TaskUnavailable(f"{path} does not exist (only synthetic screens have one); set eval.groups "
                                  "to a CSV with columns gene,group")
        with open(path) as f:
            genes = json.load(f)["genes"]
        return {g: v[level] for g, v in genes.items() if v.get(level)}
    if not os.path.isfile(source):
        raise ValueError(f"functional-group table {source!r} does not exist (expected a CSV with columns "
                         "gene,group, or ground_truth:complex|pathway)")
    table = pd.read_csv(source, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    table.columns = [c.strip() for c in table.columns]
    if not {"gene", "group"} <= set(table.columns):
        raise ValueError(f"{source}: expected columns gene,group, got {list(table.columns)}")
    table = table[(table.gene != "") & (table.group != "")]
    clash = table.groupby("gene").group.nunique()
    if (clash > 1).any():
        raise ValueError(f"{source}: genes in more than one group, e.g. {clash[clash > 1].index[:5].tolist()}")
    return dict(zip(table.gene, table.group))


def labels_for(task: Task, meta: pd.DataFrame, groups: dict[str, str] | None = None) -> pd.Series:
    """One label per row (crop metadata), NaN where the row takes no part in the task."""
    control = meta["is_control"].to_numpy(bool)
    if task.name == "perturbation":
        return meta["perturbation"].astype(object).where(~control)
    if task.name == "functional_group":
        if groups is None:
            raise TaskUnavailable("no functional-group table (eval.groups)")
        return meta["perturbation"].map(groups).astype(object).where(~control)
    if task.name == "qc":
        if "qc" not in meta.columns:
            raise TaskUnavailable("the crop metadata has no `qc` column (synthetic screens have one; "
                                  "generate with --artifact_fraction > 0 to get artefacts)")
        if meta["qc"].nunique() < 2:
            raise TaskUnavailable(f"every crop has qc={meta['qc'].iloc[0]!r}: no artefacts to detect (synthetic "
                                  "screens: --artifact_fraction > 0 or preset demo_qc)")
        return meta["qc"].astype(object)
    if task.name == "experiment":
        return meta["experiment"].astype(object)
    raise ValueError(f"unknown probe task {task.name!r}")


# --- splits -------------------------------------------------------------------------------------

def _group_codes(rows: pd.DataFrame, groups: Sequence[str]) -> np.ndarray:
    return pd.factorize(pd.MultiIndex.from_frame(rows[list(groups)]))[0]


def _one_label_per_group(codes: np.ndarray, labels) -> bool:
    return bool((pd.Series(np.asarray(labels)).groupby(codes).nunique(dropna=False) <= 1).all())


def stratified_group_split(rows: pd.DataFrame, groups: Sequence[str], labels: np.ndarray,
                           fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/val/test masks that keep each group (a well, a perturbation) whole and deal every class's
    groups out separately, so every class with 3 or more groups is in all three splits (at least one
    group each in val and test, shares by `fractions`); classes with fewer groups stay in train.
    Each group must hold a single label."""
    codes = _group_codes(rows, groups)
    if not _one_label_per_group(codes, labels):
        raise ValueError(f"labels vary within {list(groups)} groups: cannot stratify by them")
    first = np.unique(codes, return_index=True)[1]
    f = np.asarray(fractions, float) / np.sum(fractions)
    rng = np.random.default_rng(seed)
    split_of = np.zeros(len(first), np.int8)
    for label in np.unique(np.asarray(labels)[first]):
        members = rng.permutation(np.flatnonzero(np.asarray(labels)[first] == label))
        n = len(members)
        if n < 3:
            continue
        n_test = min(max(1, round(f[2] * n)), n - 2)
        n_val = min(max(1, round(f[1] * n)), n - n_test - 1)
        split_of[members[:n_test]] = 2
        split_of[members[n_test:n_test + n_val]] = 1
    split = split_of[codes]
    return split == 0, split == 1, split == 2


def split_rows(task: Task, rows: pd.DataFrame, labels: np.ndarray, fractions: Sequence[float], seed: int):
    """(train, val, test) masks over `rows` for the task's split: stratified per class when every
    held-out unit has one label, else units dealt at random (per-crop labels such as qc)."""
    if task.split == "experiments":
        return probe.split_by_group(rows, "experiment", tuple(fractions), seed)
    groups = ["perturbation"] if task.split == "perturbations" else WELL_KEYS
    if _one_label_per_group(_group_codes(rows, groups), labels):
        return stratified_group_split(rows, groups, labels, fractions, seed)
    return probe.split_by_group(rows, groups, tuple(fractions), seed)


def well_means(features: np.ndarray, meta: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of crop features (N, ..., D) per well -> (wells (W, ..., D) float32, index of each well's
    first crop (W,), crops per well (W,)), wells in order of first appearance."""
    missing = [c for c in WELL_KEYS if c not in meta.columns]
    if missing:
        raise ValueError(f"crop metadata lacks column(s) {missing}")
    codes = _group_codes(meta, WELL_KEYS)
    wells, counts = efaar.group_means(features, codes, int(codes.max()) + 1, dtype=np.float32)
    first = np.full(len(counts), len(codes))
    np.minimum.at(first, codes, np.arange(len(codes)))
    return wells, first, counts


# --- running tasks ------------------------------------------------------------------------------

FAMILY_TASKS = ("perturbation", "functional_group")   # tasks whose rows are perturbations of genes


def bootstrap_unit(task: Task) -> list[str]:
    """Metadata columns naming the held-out unit that the test interval resamples."""
    return ["perturbation"] if task.split == "perturbations" else WELL_KEYS


def run_task(task: Task, features: np.ndarray, meta: pd.DataFrame, *, groups: dict[str, str] | None = None,
             fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
             families: dict[str, str] | None = None, n_boot: int = bootstrap.N_BOOT) -> dict[str, Any]:
    """Probes every block of (N, K, D) crop features for one task. Returns a JSON-ready record:
    the task spec, sample and class counts, chance, val/test balanced accuracy per block and the
    task's best block (1-based) chosen on validation; with n_boot > 0 also
      test_ci95            [[lo, hi], ...] per block (bootstrap over held-out units, seed `seed`),
      best_block_test_ci95 [lo, hi],
      bootstrap            {"unit": [columns], "num_units", "n_boot", "level"},
    and with `families` (tasks over perturbations only)
      by_family            {family: {"value": [per block], "ci95": [[lo, hi] per block],
                                     "num_test": rows, "num_units": held-out units, "genes": [...]}}
    (balanced accuracy over the test rows whose perturbation is in the family; families without a
    test row are left out)."""
    labels = labels_for(task, meta, groups)
    if task.level == "well":
        if not _one_label_per_group(_group_codes(meta, WELL_KEYS), labels):
            raise ValueError(f"probe task {task.name!r}: labels vary within wells, use level=crop")
        features, first, _ = well_means(features, meta)
        meta, labels = meta.iloc[first].reset_index(drop=True), labels.iloc[first].reset_index(drop=True)
    if task.correction == "centerscale":
        is_control, batches = meta["is_control"].to_numpy(bool), meta["experiment"].to_numpy()
        features = np.stack([efaar.centerscale_on_controls(features[:, k], is_control, batches)
                             for k in range(features.shape[1])], axis=1)
    keep = labels.notna().to_numpy()
    y, classes = pd.factorize(labels[keep].astype(str), sort=True)
    if len(classes) < 2:
        raise TaskUnavailable(f"{len(classes)} class(es) among the rows of task {task.name!r}: nothing to probe")
    rows = meta[keep].reset_index(drop=True)
    train, val, test = split_rows(task, rows, y, fractions, seed)
    for name, mask in (("train", train), ("val", val), ("test", test)):
        if not mask.any():
            raise TaskUnavailable(f"task {task.name!r}: the {task.split} split leaves {name} empty "
                                  f"({len(rows)} rows)")
    x = np.moveaxis(features[keep], 1, 0)                              # (K, n, D)
    fit = probe.ridge_probes if task.probe == "ridge" else probe.logistic_probes
    report = fit(x, y.astype(np.int32), train, val, test, num_classes=len(classes))
    best = int(np.argmax(report.val) if task.higher_is_better else np.argmin(report.val))
    out = {**task.describe(), "num_classes": int(len(classes)), "chance": 1.0 / len(classes),
           "num_train": int(train.sum()), "num_val": int(val.sum()), "num_test": int(test.sum()),
           "best_block": best + 1, "best_block_val": float(report.val[best]),
           "best_block_test": float(report.test[best]), "val": report.val.tolist(),
           "test": report.test.tolist(), "l2": report.best_l2.tolist()}
    if n_boot > 0:
        out.update(_test_intervals(task, rows.iloc[report.test_index].reset_index(drop=True),
                                   y[report.test_index], report.test_predictions, len(classes), best,
                                   families, n_boot, seed))
    return out


def _test_intervals(task: Task, test_rows: pd.DataFrame, labels: np.ndarray, predictions: np.ndarray,
                    num_classes: int, best: int, families: dict[str, str] | None, n_boot: int,
                    seed: int) -> dict[str, Any]:
    """The bootstrap keys of run_task's record for the test rows and their (blocks, n_test) predictions."""
    unit = bootstrap_unit(task)
    units = _group_codes(test_rows, unit)
    _, lo, hi = bootstrap.balanced_accuracy_ci(labels, predictions, units, num_classes, n_boot, seed)
    ci = [[float(a), float(b)] for a, b in zip(lo, hi)]
    out: dict[str, Any] = {"test_ci95": ci, "best_block_test_ci95": ci[best],
                           "bootstrap": {"unit": unit, "num_units": int(len(np.unique(units))),
                                         "n_boot": int(n_boot), "level": bootstrap.LEVEL}}
    if families is None or task.name not in FAMILY_TASKS:
        return out
    family = test_rows["perturbation"].astype(str).map(families)
    by_family = {}
    for name in sorted(family.dropna().unique()):
        m = (family == name).to_numpy()
        value, lo, hi = bootstrap.balanced_accuracy_ci(labels[m], predictions[:, m], units[m], num_classes,
                                                        n_boot, seed)
        records = [bootstrap.ci_record(v, a, b) for v, a, b in zip(value, lo, hi)]
        by_family[str(name)] = {"value": [r["value"] for r in records], "ci95": [r["ci95"] for r in records],
                                "num_test": int(m.sum()), "num_units": int(len(np.unique(units[m]))),
                                "genes": sorted(test_rows["perturbation"][m].astype(str).unique().tolist())}
    out["by_family"] = by_family
    return out


def run_tasks(specs: Sequence[str], features: np.ndarray, meta: pd.DataFrame, *, groups_source: str = "",
              dataset_dir: str | None = None, default_probe: str = "ridge",
              fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
              families: dict[str, str] | None = None, n_boot: int = bootstrap.N_BOOT) -> dict[str, dict[str, Any]]:
    """Every task of `specs` on (N, K, D) crop features. A task whose labels the dataset cannot give
    (no `qc` column, no group table, a single class) is reported as {"skipped": reason}; a bad spec
    raises. Keys are the task names. `families` and `n_boot`: see run_task."""
    tasks = [parse_task(s, default_probe) for s in specs]
    names = [t.name for t in tasks]
    if len(set(names)) < len(names):
        raise ValueError(f"probe tasks {list(specs)} name a task twice")
    out: dict[str, dict[str, Any]] = {}
    groups = None
    for task in tasks:
        try:
            if task.name == "functional_group" and groups is None:
                groups = functional_groups(groups_source, dataset_dir) if groups_source else None
            out[task.name] = run_task(task, features, meta, groups=groups, fractions=fractions, seed=seed,
                                      families=families, n_boot=n_boot)
        except TaskUnavailable as e:
            out[task.name] = {**task.describe(), "skipped": str(e)}
    return out
