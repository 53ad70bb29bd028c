"""The scaling sweep, end to end: synthetic screens -> one training run per (model, dataset size) -> eval of
every run on the same held-out screen -> baselines -> table and plot (eval/scaling.py).

  python -m launch.scaling_sweep [--out runs/scaling] [--models mu/8 Ti/8:6 S/8:6] [--data small large]
      [--steps 300]

Models are `VARIANT[:DEPTH]` (configs/scaling.py); runs go to `<out>/<variant><d depth>-<data>`, e.g.
`runs/scaling/S8d6-large`. Re-running resumes: existing datasets, finished runs and eval reports are reused.
Baselines on the eval screen: hand-crafted features and the middle model of --models untrained.
"""
from __future__ import annotations

import argparse
import json
import os
import time


from configs import scaling as sweep
from eval import job, scaling
from maejax import config as config_lib, flags, log
from maejax.checkpoint import Checkpoints, run_checkpoint_dir

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "scaling.py")


def run_name(model: str, data: str) -> str:
    variant, _, depth = model.partition(":")
    return variant.replace("/", "") + (f"d{depth}" if depth else "") + f"-{data}"


def ensure_dataset(root: str, name: str) -> str:
    from data.synthetic_screen import generate_screen
    path = sweep.dataset_dir(root, name)
    if not os.path.exists(os.path.join(path, "manifest.json")):
        t = time.time()
        generate_screen(path, preset=sweep.SCREEN_PRESET, **sweep.DATASETS[name])
        print(f"dataset {name}: {time.time() - t:.0f} s", flush=True)
    return path


def finished(workdir: str, steps: int) -> bool:
    ckpt_dir = run_checkpoint_dir(workdir)
    if not os.path.isdir(ckpt_dir):
        return False
    ckpts = Checkpoints(ckpt_dir)
    done = ckpts.latest_step() == steps
    ckpts.close()
    return done


def run_sweep(root: str, models: list[str], datasets: list[str], steps: int) -> dict:
    from maejax.train import train

    timings: dict[str, float] = {}
    eval_dir = ensure_dataset(root, "eval")
    for name in datasets:
        ensure_dataset(root, name)
    runs = []
    for data in datasets:
        for model in models:
            variant, _, depth = model.partition(":")
            workdir = os.path.join(root, run_name(model, data))
            runs.append(workdir)
            if not finished(workdir, steps):
                t = time.time()
                config = config_lib.load(f"{CONFIG}:variant={variant},depth={depth or 0},data={data},"
                                         f"root={root},steps={steps}")
                print(f"== training {run_name(model, data)}", flush=True)
                train(config, workdir)
                timings[f"train {run_name(model, data)} s"] = round(time.time() - t, 1)
            report = os.path.join(workdir, scaling.DEFAULT_REPORT)
            if not os.path.isfile(report):
                t = time.time()
                print(f"== evaluating {run_name(model, data)} on {eval_dir}", flush=True)
                print(job.summary(job.evaluate("mae", workdir, dataset_dir=eval_dir)), flush=True)
                timings[f"eval {run_name(model, data)} s"] = round(time.time() - t, 1)
    baselines = []
    middle = len(models) // 2
    for kind, workdir in (("handcrafted", runs[0]), ("random_init", runs[middle])):
        out = os.path.join(root, "baselines", kind)
        if not os.path.isfile(os.path.join(out, "report.json")):
            t = time.time()
            print(job.summary(job.evaluate(kind, workdir, dataset_dir=eval_dir, out_dir=out)), flush=True)
            timings[f"eval {kind} s"] = round(time.time() - t, 1)
        label = kind if kind == "handcrafted" else f"untrained {run_name(models[middle], '').rstrip('-')}"
        baselines.append((label, os.path.join(out, "report.json")))
    result = scaling.summarize(runs, os.path.join(root, "summary"), baselines=baselines)
    with open(os.path.join(root, "summary", "timings.json"), "a") as f:
        f.write(json.dumps(timings) + "\n")
    print(result["table"])
    print(f"\nwrote {', '.join(result['paths'].values())}")
    return result


def main() -> None:
    ap = flags.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", deprecated="--root", default="runs/scaling", metavar="DIR",
                    help="the sweep's directory: datasets/, one run directory per point, baselines/, summary/")
    ap.add_argument("--models", nargs="+", default=["mu/8", "Ti/8:6", "S/8:6"], metavar="VARIANT[:DEPTH]")
    ap.add_argument("--data", nargs="+", default=["small", "large"], choices=[d for d in sweep.DATASETS if d != "eval"])
    ap.add_argument("--steps", type=int, default=300)
    a = ap.parse_args()
    log.setup()   # the trainer's progress lines (absl logging)
    run_sweep(a.out, a.models, a.data, a.steps)


if __name__ == "__main__":
    main()
