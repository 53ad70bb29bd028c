"""Channel-agnostic training across screens, measured on the synthetic screen (issue 13 section 1).

  python -m benchmarks.channel_mixture [--workdir runs/channel_mixture] [--preset fast] [--steps N] [--seed S]

1. renders two screens: A (seed S) with the 6 stains DNA, ER, RNA, AGP, Mito, Golgi, and B (seed S + 1, other
   genes' effects and batches) with 5 of them in another order, Mito, AGP, DNA, RNA, ER;
2. trains a CA-MAE on the mixture A + B (data.mixture, equal weights; its vocabulary is A's six stains, so
   B's crops come padded to 6 with channel_ids / channel_mask), and a fixed-channel MAE of the same encoder
   and decoder on A alone; both from `configs/mae_synthetic.py:preset=<preset>` (same steps, batch, lr,
   per-plate normalisation, mean+std pooling, normalised-pixel targets), trained on 32-px random crops (a
   CA-MAE sees 6 x as many tokens per crop; the 64-px crops would cost 6 x the steps' time on a CPU);
3. evaluates every block on screen A (its whole 64-px crops) with `eval.job`: the CA-MAE and its untrained
   twin on 6, 5, 4 and 3 channels (`eval.channels`: all; no Golgi; DNA, ER, RNA, Mito; DNA, RNA, Mito), the
   MAE and its untrained twin on its 6 (it takes no other count), and the oracle (the ceiling);
4. prints one table (chosen block; recall of complex and pathway pairs, probes; 95% bootstrap intervals:
   genes for recall, held-out wells for probes) and writes `<workdir>/report.json`.

A rerun reuses the screens and finished training runs. Recipes are the preset's; nothing here was tuned on
the outcome.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from eval import job
from launch.demo import CONFIG, PROBES, RECALL, _fmt, _grid, summarise
from maejax import config as config_lib, flags, log
from maejax.train import train

STAINS = "DNA,ER,RNA,AGP,Mito,Golgi"
FIVE_ORDER = "Mito,AGP,DNA,RNA,ER"              # screen B: 5 channels, another order
SUBSETS = {6: "", 5: "DNA,ER,RNA,AGP,Mito", 4: "DNA,ER,RNA,Mito", 3: "DNA,RNA,Mito"}
TRAIN_CROP = 32


def screens(workdir: str, preset: str, seed: int) -> tuple[str, str]:
    from data.synthetic_screen import generate_screen
    out = []
    for name, s, channels in (("screen_a", seed, ""), ("screen_b", seed + 1, FIVE_ORDER)):
        path = os.path.join(workdir, name)
        if not os.path.exists(os.path.join(path, "manifest.json")):
            print(f"== rendering {name} (preset {preset}, seed {s}, channels {channels or STAINS})", flush=True)
            generate_screen(path, preset=preset, seed=s, channels=channels, workers=min(2, os.cpu_count() or 1))
        out.append(path)
    return out[0], out[1]


def train_run(workdir: str, preset: str, overrides: dict, seed: int, steps: int | None) -> float:
    config = config_lib.load(f"{CONFIG}:preset={preset}", {"seed": seed, "data.crop_size": TRAIN_CROP,
                                                          **({"total_steps": steps} if steps else {}), **overrides})
    t = time.time()
    print(f"== training {config.model.name} {config.model.variant} for {config.total_steps} steps in {workdir}",
          flush=True)
    train(config, workdir)
    return time.time() - t


def evaluate(kind: str, workdir: str, dataset: str, channels: str, out: str) -> dict:
    t = time.time()
    report = job.evaluate(kind, workdir, dataset_dir=dataset, out_dir=out, overrides={"channels": channels})
    row = summarise(report)
    row["channels"] = report["map_settings"]["channels"]
    row["seconds"] = time.time() - t
    return row


def table(rows: dict[str, dict]) -> str:
    head = (["features", "channels", "block"] + [f"{s[len('Synthetic'):].lower()} recall" for s in RECALL]
            + ["perturbation", "func. group", "experiment (lower better)"])
    lines = [head]
    for name, r in rows.items():
        lines.append([name.split("@")[0], str(len(r["channels"])), f"{r['block']}/{r['num_blocks']}"]
                     + [_fmt(r["recall"].get(s)) for s in RECALL] + [_fmt(r["probe"].get(t)) for t in PROBES])
    return _grid(lines)


def run(workdir: str, preset: str = "fast", steps: int | None = None, seed: int = 0) -> dict:
    os.makedirs(workdir, exist_ok=True)
    timings = {}
    t = time.time()
    a, b = screens(workdir, preset, seed)
    timings["render_s"] = time.time() - t
    ca_run, mae_run = os.path.join(workdir, "ca_mae"), os.path.join(workdir, "mae")
    timings["train_ca_mae_s"] = train_run(ca_run, preset, {"model.name": "ca_mae", "data.mixture": f"{a}=1,{b}=1"},
                                          seed, steps)
    timings["train_mae_s"] = train_run(mae_run, preset, {"data.dir": a}, seed, steps)

    rows: dict[str, dict] = {}
    plan = [("oracle", mae_run, "", "oracle")]
    for n, subset in SUBSETS.items():
        plan += [("mae", ca_run, subset, f"ca_mae@{n}"), ("random_init", ca_run, subset, f"ca_mae_untrained@{n}")]
    plan += [("mae", mae_run, "", "mae@6"), ("random_init", mae_run, "", "mae_untrained@6")]
    for kind, run_dir, subset, name in plan:
        print(f"== evaluating {name} on screen A", flush=True)
        rows[name] = evaluate(kind, run_dir, a, subset, os.path.join(workdir, "eval", name))
        timings[f"eval_{name}_s"] = rows[name]["seconds"]
    out = {"rows": rows, "screens": {"a": a, "b": b}, "preset": preset, "seed": seed, "timings": timings,
           "subsets": SUBSETS, "train_crop": TRAIN_CROP}
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(out, f, indent=1)
    print()
    print(table(rows))
    full, five = rows["ca_mae@6"], rows["ca_mae@5"]
    for s in RECALL:
        on5, on6 = five["recall"][s]["value"], full["recall"][s]["value"]
        print(f"CA-MAE {s} recall on 5 channels / on 6: {on5:.3f} / {on6:.3f}"
              + (f" = {on5 / on6:.2f}" if on6 > 0 else ""))
    print(f"report: {os.path.join(workdir, 'report.json')}")
    return out


def main(argv=None) -> None:
    ap = flags.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/channel_mixture", metavar="DIR", help="screens, runs and evals")
    ap.add_argument("--preset", default="fast", help="synthetic-screen and config preset (demo | fast | tiny)")
    ap.add_argument("--steps", type=int, default=None, help="training steps of both models (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0, help="screen A's seed and the training seed (B: seed + 1)")
    a = ap.parse_args(argv)
    log.setup()
    run(a.workdir, a.preset, a.steps, a.seed)


if __name__ == "__main__":
    main()
