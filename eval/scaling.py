"""Scaling curves: recall and probe accuracy of several training runs against training FLOPs and parameters.

  python -m eval.scaling --runs runs/scaling [RUN_DIR ...] --out runs/scaling/summary \
      [--report eval/mae/report.json] [--baseline handcrafted=runs/scaling/handcrafted/report.json]

A run is a directory holding `config.json` (written by the trainer) and an eval report (default
`eval/mae/report.json`, written by `python -m eval.job`); a directory without config.json stands for every
run directly under it. Per run, read from the config and the report alone:
  params, encoder_params  exact counts of the abstract model (nothing is allocated)
  train_flops             analytic `flops_per_crop(crop, crop)["train"]` x crops seen, crops seen =
                          checkpoint step x global batch size (model FLOPs: a multiply-add is 2, training
                          = 3 x forward; see maejax/models/flops.py)
  data                    the training dataset's name and crop count (from its manifest)
  recall                  mean recall over sources (first threshold pair) at the chosen block
  probes                  every probe task's test balanced accuracy at the chosen block
  ks, cvm                 replicate consistency at the chosen block
Writes scaling.json, scaling.csv, scaling.md (the table) and scaling.png (the curves) into --out.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

import pandas as pd

from maejax import flags
from maejax.models.flops import abstract_model, param_count

DEFAULT_REPORT = os.path.join("eval", "mae", "report.json")


def find_runs(paths: Sequence[str]) -> list[str]:
    """Run directories: each path holding config.json, or the subdirectories of one that does not."""
    runs = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "config.json")):
            runs.append(path)
        elif os.path.isdir(path):
            runs += sorted(os.path.join(path, d) for d in os.listdir(path)
                           if os.path.isfile(os.path.join(path, d, "config.json")))
        else:
            raise ValueError(f"{path} is not a directory")
    if not runs:
        raise ValueError(f"no run directory (one holding config.json) in {list(paths)}")
    return runs


def _dataset(data_dir: str) -> tuple[str, int | None]:
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(path):
        return os.path.basename(os.path.normpath(data_dir)), None
    with open(path) as f:
        manifest = json.load(f)
    return os.path.basename(os.path.normpath(data_dir)), int(manifest["num_records"])


def run_row(run_dir: str, report_path: str = DEFAULT_REPORT) -> dict[str, Any]:
    """One table row from a run's config.json and eval report."""
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    path = os.path.join(run_dir, report_path)
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: evaluate the run first (python -m eval.job --workdir {run_dir})")
    with open(path) as f:
        report = json.load(f)
    for key in ("best_block", "best", "blocks"):
        if key not in report:
            raise ValueError(f"{path}: not an eval report (no {key!r})")
    model = abstract_model(config["model"])   # base()'s defaults for keys added since
    crop = int(config["data"]["crop_size"])
    batch = int(config["data"]["batch_size"])
    steps = int(report.get("checkpoint_step") or config["total_steps"])
    data_name, data_crops = _dataset(config["data"]["dir"])
    best = report["best"]
    row = {"run": os.path.basename(os.path.normpath(run_dir)), "variant": config["model"]["variant"],
           "depth": len(report["blocks"]), "params": param_count(model),
           "encoder_params": param_count(model.encoder), "data": data_name, "data_crops": data_crops,
           "steps": steps, "crops_seen": steps * batch,
           "train_flops": model.flops_per_crop(crop, crop)["train"] * steps * batch,
           "epochs": steps * batch / data_crops if data_crops else None,
           "best_block": report["best_block"], **_scores(report, best)}
    return row


def _scores(report: dict[str, Any], block: dict[str, Any]) -> dict[str, Any]:
    """Recall, consistency and probe scores of one block row of an eval report."""
    out: dict[str, Any] = {}
    if block["recall_mean"]:
        key = sorted(block["recall_mean"])[0]
        out["recall"] = block["recall_mean"][key]
        out.update({f"recall_{r['source']}": r[key] for r in block["recall"]})
    rc = block.get("consistency", {}).get("replicate_consistency")
    if rc:
        out["ks"], out["cvm"] = rc["ks_statistic"], rc["cvm_statistic"]
    out.update({f"probe_{name}": p["test"] for name, p in block.get("probes", {}).items()})
    if not block.get("probes") and "probe_test" in block:   # reports from before named tasks
        out["probe_perturbation"] = block["probe_test"]
    return out


def baseline_row(name: str, report_path: str) -> dict[str, Any]:
    """A reference without training (hand-crafted features, an untrained network): its chosen block."""
    with open(report_path) as f:
        report = json.load(f)
    return {"run": name, "best_block": report["best_block"], **_scores(report, report["best"])}


def markdown(rows: list[dict[str, Any]], baselines: Sequence[dict[str, Any]] = ()) -> str:
    """The README table: one line per run (sorted by data, then FLOPs), then the baselines."""
    metrics = [c for c in _metric_columns(rows) if c in ("recall", "ks", "cvm") or c.startswith("probe_")]
    head = ["run", "params (enc.)", "data (crops)", "epochs", "train FLOPs", "block"] + metrics
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (str(r["data"]), r["train_flops"])):
        cells = [r["run"], f"{r['params'] / 1e6:.2f}M ({r['encoder_params'] / 1e6:.2f}M)",
                 f"{r['data']} ({r['data_crops']:,})" if r["data_crops"] else str(r["data"]),
                 f"{r['epochs']:.1f}" if r["epochs"] else "-", f"{r['train_flops']:.2e}",
                 f"{r['best_block']}/{r['depth']}"]
        lines.append("| " + " | ".join(cells + [_fmt(r.get(m)) for m in metrics]) + " |")
    for b in baselines:
        cells = [b["run"], "-", "-", "-", "0", str(b["best_block"])]
        lines.append("| " + " | ".join(cells + [_fmt(b.get(m)) for m in metrics]) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None or v != v else f"{v:.3f}"


def _metric_columns(rows) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k in ("recall", "ks", "cvm") or k.startswith(("probe_", "recall_")):
                seen.setdefault(k, None)
    return list(seen)


def plot(rows: list[dict[str, Any]], path: str, baselines: Sequence[dict[str, Any]] = ()) -> str:
    """Mean recall and each probe task's accuracy against training FLOPs (one line per dataset, points
    labelled by variant), and mean recall against encoder parameters. Baselines are horizontal lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pd.DataFrame(rows)
    probes = [c for c in _metric_columns(rows) if c.startswith("probe_")]
    panels = [("recall", "train_flops", "mean recall (chosen block)")]
    panels += [(p, "train_flops", f"{p[len('probe_'):]} probe, test bal. acc."
                + (" (lower is better)" if p == "probe_experiment" else "")) for p in probes]
    panels += [("recall", "encoder_params", "mean recall (chosen block)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=110, squeeze=False)
    for ax, (metric, x_key, label) in zip(axes[0], panels):
        for i, (data, group) in enumerate(table.groupby("data", sort=True)):
            group = group.sort_values(x_key)
            ax.plot(group[x_key], group[metric], "o-", color=f"C{i}", label=f"data: {data}")
            for _, r in group.iterrows():
                ax.annotate(r["variant"], (r[x_key], r[metric]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        for j, b in enumerate(baselines):
            if b.get(metric) is not None:
                ax.axhline(b[metric], color="grey", ls=(0, (4, 2 + 2 * j)), lw=0.9, label=b["run"])
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs" if x_key == "train_flops" else "encoder parameters")
        ax.set_ylabel(label, fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summarize(run_paths: Sequence[str], out_dir: str, report_path: str = DEFAULT_REPORT,
              baselines: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """Rows for every run (+ baselines) -> scaling.json, scaling.csv, scaling.md, scaling.png in out_dir."""
    rows = [run_row(r, report_path) for r in find_runs(run_paths)]
    refs = [baseline_row(name, path) for name, path in baselines]
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"scaling.{k}") for k in ("json", "csv", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump({"runs": rows, "baselines": refs}, f, indent=1)
    pd.DataFrame(rows + refs).to_csv(paths["csv"], index=False)
    table = markdown(rows, refs)
    with open(paths["md"], "w") as f:
        f.write(table + "\n")
    plot(rows, paths["png"], refs)
    return {"rows": rows, "baselines": refs, "table": table, "paths": paths}


def main(argv: Sequence[str] | None = None) -> None:
    ap = flags.ArgumentParser(prog="python -m eval.scaling", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="run directories, or folders of them")
    ap.add_argument("--out", required=True, metavar="DIR", help="output directory")
    ap.add_argument("--report", default=DEFAULT_REPORT, help="eval report path inside each run")
    ap.add_argument("--baseline", nargs="*", default=[], metavar="NAME=REPORT",
                    help="reference reports drawn as horizontal lines (e.g. hand-crafted features)")
    a = ap.parse_args(argv)
    baselines = []
    for item in a.baseline:
        name, eq, path = item.partition("=")
        if not eq or not os.path.isfile(path):
            raise SystemExit(f"--baseline {item!r}: expected NAME=REPORT with an existing report file")
        baselines.append((name, path))
    try:
        result = summarize(a.runs, a.out, a.report, baselines)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(result["table"])
    print(f"\nwrote {', '.join(result['paths'].values())}")


if __name__ == "__main__":
    main()
