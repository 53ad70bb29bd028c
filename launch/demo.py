"""The main job, end to end on the built-in synthetic screen (version 2, docs/synthetic_screen.md):

  generate the screen -> train an MAE -> checkpoint -> evaluate every block of (a) the trained MAE,
  (b) the same architecture untrained, (c) CellProfiler-grade features (cp-measure), (d) the fast
  hand-crafted features, (e) the oracle (each well's true phenotype parameters) -> one table with 95%
  bootstrap intervals, broken down by phenotype family.

  python -m launch.demo [--workdir runs/demo] [--seed S] [--preset demo|fast|tiny] [--steps N]

`--seed` sets the screen's and the training's seed. Writes `<workdir>/report.json`: keys `mae`,
`random_init`, `handcrafted`, `handcrafted_fast`, `oracle`, each {"block", "recall", "probe", "by_family",
"blocks"}, with every figure as {"value", "ci95": [lo, hi]}; `loss` (the MAE's masked loss and the
interpolation baseline's on the same crops and masks); `screen`; `timings`. One figure,
`<workdir>/report.png`. Re-running resumes: an existing dataset and a finished run are reused.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from eval import job, screen
from maejax import config as config_lib, flags, log
from maejax.resume import ConfigChangeError
from maejax.train import train

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "mae_synthetic.py")
ROWS = tuple(k for k in ("oracle", "mae", "random_init", "handcrafted", "handcrafted_fast") if k in job.FEATURES)
RECALL = ("SyntheticComplex", "SyntheticPathway")
PROBES = ("perturbation", "functional_group", "experiment")
THRESHOLD = "recall_0.05_0.95"


def run(workdir: str, preset: str = "demo", steps: int | None = None, seed: int = 0,
        rows: tuple[str, ...] = ROWS) -> dict:
    from data.synthetic_screen import generate_screen

    os.makedirs(workdir, exist_ok=True)
    timings = {}
    dataset = os.path.join(workdir, "dataset")

    t = time.time()
    if not os.path.exists(os.path.join(dataset, "manifest.json")):
        print(f"== 1/4 generating the synthetic screen ({preset}, seed {seed}) in {dataset}", flush=True)
        generate_screen(dataset, preset=preset, seed=seed, workers=min(2, os.cpu_count() or 1))
    else:
        with open(os.path.join(dataset, "manifest.json")) as f:
            params = json.load(f).get("params", {})
        made = {k: params.get(k) for k in ("preset", "seed")}
        if made != {"preset": preset, "seed": seed}:
            raise DemoError(f"{dataset} holds the screen of preset {made['preset']!r}, seed {made['seed']}, not of "
                            f"--preset {preset} --seed {seed}: use a new --workdir")
        print(f"== 1/4 reusing the synthetic screen in {dataset}", flush=True)
    timings["generate_s"] = time.time() - t

    t = time.time()
    overrides = {"data.dir": dataset, "seed": seed}
    if steps:
        overrides["total_steps"] = steps
    config = config_lib.load(f"{CONFIG}:preset={preset}", overrides)
    print(f"== 2/4 training {config.model.name} {config.model.variant} for {config.total_steps} steps", flush=True)
    train(config, workdir)
    timings["train_s"] = time.time() - t

    t = time.time()
    print("== 3/4 masked loss of the MAE and of interpolating the visible pixels", flush=True)
    loss = masked_losses(workdir, seed, num_crops=64 if preset == "tiny" else 512)   # tiny: the tests' preset
    timings["loss_s"] = time.time() - t

    reports = {}
    for kind in rows:
        t = time.time()
        print(f"== 4/4 evaluating {kind}", flush=True)
        reports[kind] = summarise(job.evaluate(kind, workdir))
        timings[f"eval_{kind}_s"] = time.time() - t
    with open(os.path.join(dataset, "ground_truth.json")) as f:
        truth = json.load(f)
    out = dict(reports)
    out["loss"] = loss
    out["screen"] = {"seed": seed, "preset": preset, "genes": len(truth["genes"]),
                     "families": truth["families"], "dataset": dataset}
    out["timings"] = timings
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(out, f, indent=1)
    plot(out, os.path.join(workdir, "report.png"))
    print(table(out))
    print(f"\nreport: {os.path.join(workdir, 'report.json')}  figure: {os.path.join(workdir, 'report.png')}")
    return out


def masked_losses(workdir: str, seed: int, num_crops: int = 512) -> dict:
    """The MAE's masked MSE and the best interpolation's on the same `num_crops` crops and masks."""
    import jax

    from eval.reconstruction import reconstruction_losses
    from maejax import preprocess, state as state_lib
    from maejax.checkpoint import run_checkpoint_dir
    from maejax.input_pipeline import open_dataset

    model, config, _ = state_lib.load_model(run_checkpoint_dir(workdir))
    ds = open_dataset(config.data.dir)
    ids = np.sort(np.random.default_rng(seed).choice(len(ds), min(num_crops, len(ds)), replace=False))
    mode = config.data.normalize
    moments = (preprocess.plate_moments(ds.metadata.iloc[ids], preprocess.plate_statistics(ds))
               if mode == "plate" else None)
    images = preprocess.normalize(ds.reader.read_many(ids), mode, moments)
    return reconstruction_losses(model, images, jax.random.key(seed))


def _record(value, ci) -> dict:
    return {"value": float(value), "ci95": [float(ci[0]), float(ci[1])]}


def _block_summary(row: dict) -> dict:
    recall = {r["source"]: r[THRESHOLD] for r in row.get("recall_ci", []) if r["source"] in RECALL}
    probe = {t: _record(p["test"], p["test_ci95"]) for t, p in row["probes"].items() if "test_ci95" in p}
    by_family = {}
    for family, fam in row.get("by_family", {}).items():
        by_family[family] = {
            "recall": {src: r[THRESHOLD] for src, r in fam.get("recall", {}).items() if THRESHOLD in r},
            "probe": {t: {"value": p["value"], "ci95": p["ci95"]} for t, p in fam.get("probe", {}).items()}}
    return {"block": row["block"], "recall": recall, "probe": probe, "by_family": by_family}


def summarise(report: dict) -> dict:
    """The eval job's report -> {"block", "recall", "probe", "by_family", "blocks", "num_blocks"}: the
    chosen block's figures with intervals, and every block's (for the figure)."""
    blocks = [_block_summary(b) for b in report["blocks"]]
    best = blocks[report["best_block"] - 1]
    return {"block": int(report["best_block"]), "num_blocks": len(blocks), "recall": best["recall"],
            "probe": best["probe"], "by_family": best["by_family"], "selected_by": report["selected_by"],
            "blocks": blocks}


def _fmt(rec: dict | None) -> str:
    if not rec:
        return "-"
    lo, hi = rec["ci95"]
    return f"{rec['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def table(report: dict) -> str:
    """The chosen block's recall and probes with 95% intervals, one row per feature kind, then the same
    by phenotype family (complex recall | perturbation probe), then the masked loss."""
    rows = [k for k in ROWS if k in report]
    head = (["features", "block"] + [f"{s[len('Synthetic'):].lower()} recall" for s in RECALL]
            + ["perturbation", "func. group", "experiment (lower better)"])
    lines = [head]
    for name in rows:
        r = report[name]
        lines.append([name, f"{r['block']}/{r['num_blocks']}"] + [_fmt(r["recall"].get(s)) for s in RECALL]
                     + [_fmt(r["probe"].get(t)) for t in PROBES])
    out = ["", _grid(lines)]
    families = report.get("screen", {}).get("families") or sorted(
        {f for k in rows for f in report[k]["by_family"]})
    fam_lines = [["features"] + list(families)]
    for name in rows:
        cells = []
        for fam in families:
            f = report[name]["by_family"].get(fam, {})
            rec, prb = f.get("recall", {}).get(RECALL[0]), f.get("probe", {}).get("perturbation")
            cells.append(f"{rec['value']:.2f} | {prb['value']:.2f}" if rec and prb else "-")
        fam_lines.append([name] + cells)
    out += ["", "by phenotype family (complex recall | perturbation probe, chosen block):", _grid(fam_lines)]
    loss = report.get("loss")
    if loss:
        out.append(f"\nmasked loss (MSE per masked patch, {loss['num_crops']} crops, same masks): MAE {loss['mae']:.3f}, "
                   f"interpolation of the visible pixels {loss['interpolation']:.3f} "
                   f"(Gaussian sigma {loss['interpolation_sigma']:g} px, the best of {len(loss['interpolation_by_sigma'])}), "
                   f"predicting zero {loss['zero']:.3f}")
    out.append("recall: share of annotated pairs in the top or bottom 5% of all pair similarities (random 0.10); "
               "complex and pathway pairs are disjoint. Probes: balanced accuracy on held-out wells. "
               "[95% bootstrap interval: genes for recall, held-out wells for probes]. Block chosen by the "
               "perturbation probe on validation wells.")
    return "\n".join(out)


def _grid(lines: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(lines[0]))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))
    return "\n".join([fmt(lines[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines[1:]])


def plot(report: dict, path: str) -> str:
    """Complex recall and the perturbation probe per block for every row (with 95% bands), and both by
    phenotype family at each row's chosen block."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [k for k in ROWS if k in report]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4), dpi=100)
    for ax, (kind, name, title) in zip(axes[:2], (("recall", RECALL[0], "complex recall"),
                                                   ("probe", "perturbation", "perturbation probe"))):
        for i, row in enumerate(rows):
            blocks = report[row]["blocks"]
            x = [b["block"] for b in blocks]
            vals = [b[kind].get(name) for b in blocks]
            if not all(vals):
                continue
            y = [v["value"] for v in vals]
            lo, hi = [v["ci95"][0] for v in vals], [v["ci95"][1] for v in vals]
            if len(x) == 1:
                ax.axhline(y[0], color=f"C{i}", ls="--", lw=1, label=row)
                ax.axhspan(lo[0], hi[0], color=f"C{i}", alpha=0.12)
            else:
                ax.plot(x, y, "o-", ms=3, color=f"C{i}", label=row)
                ax.fill_between(x, lo, hi, color=f"C{i}", alpha=0.2)
        ax.set_xlabel("transformer block")
        ax.set_title(f"{title} per block (95% interval)")
        ax.legend(fontsize=7)
    families = report.get("screen", {}).get("families", [])
    width = 0.8 / max(len(rows), 1)
    for ax, (kind, name, title) in zip(axes[2:], (("recall", RECALL[0], "complex recall"),
                                                   ("probe", "perturbation", "perturbation probe"))):
        for i, row in enumerate(rows):
            vals = [report[row]["by_family"].get(f, {}).get(kind, {}).get(name) for f in families]
            x = np.arange(len(families)) + i * width
            y = [v["value"] if v else np.nan for v in vals]
            err = np.array([[v["value"] - v["ci95"][0], v["ci95"][1] - v["value"]] if v else [0, 0] for v in vals]).T
            ax.bar(x, y, width, yerr=err, color=f"C{i}", label=row, capsize=1.5)
        ax.set_xticks(np.arange(len(families)) + 0.4 - width / 2)
        ax.set_xticklabels(families, rotation=30, fontsize=7)
        ax.set_title(f"{title} by phenotype family")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> None:
    ap = flags.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/demo", metavar="DIR", help="run directory (its dataset/ included)")
    ap.add_argument("--preset", default="demo", help="synthetic-screen and config preset (demo | fast | tiny)")
    ap.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    ap.add_argument("--seed", type=int, default=0, help="the screen's and the training's seed")
    a = ap.parse_args()
    log.setup()   # the trainer's progress lines (absl logging)
    try:
        run(a.workdir, a.preset, a.steps, a.seed)
    except (DemoError, ConfigChangeError) as e:   # another screen or recipe in this workdir: one line
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


class DemoError(ValueError):
    """A workdir that holds another demo's screen."""


if __name__ == "__main__":
    main()
