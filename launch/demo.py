"""The main job, end to end on the built-in synthetic screen:

  generate the screen -> train an MAE -> checkpoint -> evaluate every block of (a) the trained MAE,
  (b) the same architecture untrained, (c) hand-crafted CellProfiler-style features -> one table.

  python -m launch.demo [--workdir runs/demo] [--preset demo] [--steps N]

Writes `<workdir>/report.json` keyed `mae`, `random_init`, `handcrafted` (plus `timings`), and per-model
outputs under `<workdir>/eval/`. Re-running resumes: an existing dataset and a finished run are reused.
"""
from __future__ import annotations

import argparse
import json
import os
import time


from eval import job, screen
from maejax import config as config_lib
from maejax.train import train

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "mae_synthetic.py")


def run(workdir: str, preset: str = "demo", steps: int | None = None, seed: int = 0) -> dict:
    from data.synthetic_screen import generate_screen

    os.makedirs(workdir, exist_ok=True)
    timings = {}
    dataset = os.path.join(workdir, "dataset")

    t = time.time()
    if not os.path.exists(os.path.join(dataset, "manifest.json")):
        print(f"== 1/3 generating the synthetic screen ({preset}) in {dataset}", flush=True)
        generate_screen(dataset, preset=preset, seed=seed)
    else:
        print(f"== 1/3 reusing the synthetic screen in {dataset}", flush=True)
    timings["generate_s"] = time.time() - t

    t = time.time()
    overrides = {"data.dir": dataset, "seed": seed}
    if steps:
        overrides["total_steps"] = steps
    config = config_lib.load(f"{CONFIG}:preset={preset}", overrides)
    print(f"== 2/3 training {config.model.name} {config.model.variant} for {config.total_steps} steps", flush=True)
    train(config, workdir)
    timings["train_s"] = time.time() - t

    reports = {}
    for kind in job.FEATURES:
        t = time.time()
        print(f"== 3/3 evaluating {kind}", flush=True)
        reports[kind] = screen.public(job.evaluate(kind, workdir))
        timings[f"eval_{kind}_s"] = time.time() - t
    reports["timings"] = timings
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(reports, f, indent=1)
    print(table(reports))
    print(f"\nreport: {os.path.join(workdir, 'report.json')}")
    return reports


# Probe tasks shown in the table (each at the chosen block): column title, task name.
PROBE_COLUMNS = (("perturbation", "perturbation"), ("func. group", "functional_group"),
                 ("experiment (lower better)", "experiment"))


def table(reports: dict) -> str:
    """Recall per source and threshold and the probes' test accuracy, all at each model's chosen block."""
    rows = [k for k in job.FEATURES if k in reports]
    first = reports[rows[0]]["best"]["recall"]
    cols = [(r["source"], k) for r in first for k in sorted(r) if k.startswith("recall_")]
    head = (["features", "block"] + [f"{s} {k[len('recall_'):]}" for s, k in cols] + ["mean recall"]
            + [title for title, _ in PROBE_COLUMNS])
    lines = [head]
    for name in rows:
        best = reports[name]["best"]
        by_source = {r["source"]: r for r in best["recall"]}
        vals = [by_source[s][k] for s, k in cols]
        probes = best.get("probes", {})
        lines.append([name, f"{reports[name]['best_block']}/{len(reports[name]['blocks'])}"]
                     + [f"{v:.3f}" for v in vals] + [f"{sum(vals) / len(vals):.3f}"]
                     + [f"{probes[task]['test']:.3f}" if task in probes else "-" for _, task in PROBE_COLUMNS])
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))
    out = [fmt(lines[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines[1:]]
    chance = {task: reports[rows[0]].get("tasks", {}).get(task, {}).get("chance") for _, task in PROBE_COLUMNS}
    chance_text = ", ".join(f"{t} {c:.3f}" for t, c in chance.items() if c)
    note = ("recall: fraction of known pairs in the top or bottom 5% of all pair similarities "
            "(random = 0.10); block chosen by the perturbation probe's accuracy on validation wells; "
            f"probes: balanced accuracy on held-out test wells (chance: {chance_text})")
    return "\n" + "\n".join(out) + "\n" + note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--preset", default="demo", help="synthetic-screen and config preset (demo | tiny)")
    ap.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    run(a.workdir, a.preset, a.steps, a.seed)


if __name__ == "__main__":
    main()
