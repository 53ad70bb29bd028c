"""Training throughput of the real train step (maejax.step.setup, as the trainer sets it up) on synthetic
batches already on the devices, so the input pipeline is not measured: step time, crops/s, TFLOP/s per
device and MFU, per-device memory. The first run is the baseline; every `--compare` starts a further run
and prints its ratio to the baseline.

  python -m benchmarks.train_throughput --config configs/mae_synthetic.py:preset=tiny \
      --config.data.batch_size=32 --steps 20
  # one H100/H200, ViT-L/8 MAE, bf16, 256 x 256 x 6 crops; remat, batch and attention variants:
  python -m benchmarks.train_throughput --gpu_flags --config configs/mae_scale.py:preset=L8 \
      --config.data.batch_size=64 --config.model.remat=full --config.model.attention=cudnn --steps 20 \
      --compare --config.model.remat=dots --compare --config.model.remat=dots_no_batch \
      --compare --config.model.remat=none --config.data.batch_size=32 --compare --config.model.attention=None

`--config.KEY=VALUE` flags before the first `--compare` hold for every run; those after a `--compare` (up to
the next) only for its run, on top. MFU uses maejax.mfu's peak for the device kind (or
--config.peak_tflops=...). A CPU has no listed peak; there the script measures an n x n float32 matmul and
reports `of_matmul` = achieved / that (not an MFU). Deprecated, for one release: `--set K=V`, `--compare
K=V[,K=V]` and the shorthands --batch, --remat, --scan, --attention, --dtype.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


GPU_ENV = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "NCCL_NVLS_ENABLE")


def gpu_env() -> dict[str, str]:
    """The environment launch/gpu_flags.sh sets (one list for the launchers and this script); XLA_FLAGS
    already set are kept, as the script appends to them."""
    script = f"source {REPO}/launch/gpu_flags.sh && printf '%s\\0' " + " ".join(f'"${k}"' for k in GPU_ENV)
    out = subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True).stdout
    return dict(zip(GPU_ENV, out.split("\0")))


def parse_args(argv):
    from maejax import flags
    p = flags.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config file[:arg], as for maejax.train; override its keys with "
                                                   "--config.KEY=VALUE")
    p.add_argument("--compare", action="store_true", help="starts a further run: the --config.KEY=VALUE flags after "
                                                          "it (up to the next --compare) are its overrides")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run (after 2 warm-up steps)")
    p.add_argument("--gpu_flags", action="store_true",
                   help="launch/gpu_flags.sh's XLA flags and memory fraction, as the GPU launchers use")
    hidden = argparse.SUPPRESS    # deprecated spellings of --config.KEY=VALUE, kept for one release
    p.add_argument("--set", action="append", default=[], help=hidden)
    for flag, (_, choices) in SHORTHANDS.items():
        p.add_argument(f"--{flag}", choices=choices, type=None if choices else int, help=hidden)
    return p.parse_args(argv)


# Deprecated shorthands: flag -> (config key, choices); the values the config takes where they differ.
SHORTHANDS = {"batch": ("data.batch_size", None), "remat": ("model.remat", ("none", "full", "dots", "dots_no_batch")),
              "scan": ("model.scan_layers", ("true", "false")), "attention": ("model.attention", ("xla", "cudnn")),
              "dtype": ("model.dtype", ("bfloat16", "float32"))}
SHORTHAND_VALUES = {"xla": "None"}


def split_runs(argv: list[str]) -> tuple[list[str], dict[str, str], list[dict[str, str]]]:
    """A command line -> (the arguments for `parse_args`, the overrides of every run, the overrides of each
    `--compare` run), every `--config.KEY=VALUE` checked by maejax.config.parse_override_flags. The
    deprecated `--compare K=V[,K=V]` is read as `--compare --config.K=V ...`."""
    from maejax.config import deprecated_flag, parse_override_flags
    segments: list[list[str]] = [[]]
    args = list(argv)
    while args:
        a = args.pop(0)
        if a != "--compare" and not a.startswith("--compare="):
            segments[-1].append(a)
            continue
        segments.append([])
        old = a.partition("=")[2] if "=" in a else (args.pop(0) if args and not args[0].startswith("-") else "")
        if old:
            deprecated_flag("--compare K=V[,K=V]", "--compare --config.K=V [--config.K=V]")
            segments[-1] += [f"--config.{kv}" for kv in filter(None, old.split(","))]
    rest, overrides = [], []
    for segment in segments:
        r, o = parse_override_flags(segment)
        rest += r
        overrides.append(o)
    return rest, overrides[0], overrides[1:]


def deprecated_overrides(args) -> dict[str, str]:
    """The overrides the deprecated --set and shorthand flags give (checked as --config.KEY=VALUE flags)."""
    from maejax.config import deprecated_flag, parse_override_flags
    items = []
    for flag, (key, _) in SHORTHANDS.items():
        value = getattr(args, flag)
        if value is not None:
            deprecated_flag(f"--{flag}", f"--config.{key}=VALUE")
            items.append(f"--config.{key}={SHORTHAND_VALUES.get(value, value)}")
    if args.set:
        deprecated_flag("--set KEY=VALUE", "--config.KEY=VALUE")
        items += [f"--config.{kv}" for item in args.set for kv in filter(None, item.split(","))]
    return parse_override_flags(items)[1]


def measure(config, steps: int) -> dict:
    """Sets the train step up for `config` on all devices as the trainer does, compiles it and times `steps`
    steps."""
    import jax
    import numpy as np

    from maejax import mfu, step as step_lib

    train_setup = step_lib.setup(config)
    model_state, opt_state = train_setup.initialize()
    t0 = time.perf_counter()
    compiled = train_setup.compile()
    compile_s = time.perf_counter() - t0
    batch = step_lib.device_batch(train_setup.abstract_batch())
    with train_setup.activate():
        for i in range(2):   # warm-up: first executions allocate
            model_state, opt_state, metrics = compiled(model_state, opt_state, batch, step_lib.step_arg(i))
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for i in range(2, 2 + steps):
            model_state, opt_state, metrics = compiled(model_state, opt_state, batch, step_lib.step_arg(i))
        jax.block_until_ready((model_state, opt_state, metrics))
        seconds = time.perf_counter() - t0
    out = {"step_s": seconds / steps, "compile_s": compile_s, "loss": float(metrics["loss"]),
           "memory": step_lib.describe_memory(compiled)}
    out.update(mfu.throughput(train_setup.flops_per_example, int(config.data.batch_size) * steps, seconds,
                              jax.device_count(), mfu.device_peak(config.peak_tflops)))
    return out


def main(argv=None) -> None:
    rest, common, compares = split_runs(sys.argv[1:] if argv is None else argv)
    args = parse_args(rest)
    common = {**deprecated_overrides(args), **common}
    if args.gpu_flags:
        os.environ.update(gpu_env())  # before jax creates its GPU client
    import jax

    from maejax import config as config_lib, mfu, step as step_lib

    runs = [("baseline", common)] + [(" ".join(f"{k}={v}" for k, v in c.items()), {**common, **c}) for c in compares]
    kind = jax.devices()[0].device_kind
    matmul = None if mfu.peak_flops(kind) else mfu.measure_matmul_flops()
    base_cfg = config_lib.load(args.config, common)
    print(f"{args.config} {' '.join(f'{k}={v}' for k, v in common.items())}: {base_cfg.model.name} {base_cfg.model.variant}, "
          f"batch {base_cfg.data.batch_size}, {base_cfg.data.crop_size}px x {base_cfg.model.in_channels} ch, "
          f"dtype {base_cfg.model.dtype}, remat {base_cfg.model.remat}, scan {base_cfg.model.scan_layers}, "
          f"attention {base_cfg.model.attention or 'xla'}; {jax.device_count()} x {kind}"
          + (f"; measured f32 matmul {matmul / 1e12:.3f} TFLOP/s per device" if matmul else ""), flush=True)
    header = ["run", "step ms", "crops/s", "TFLOP/s/dev", "MFU" if not matmul else "of_matmul", "peak mem",
              "compile s", "crops/s vs baseline"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    base = None
    for name, ov in runs:
        try:
            r = measure(config_lib.load(args.config, ov), args.steps)
        except jax.errors.JaxRuntimeError as e:   # e.g. out of memory: the other variants still run
            print(f"| {name} | failed: {' '.join(str(e).split())[:200]} |", flush=True)
            continue
        base = base or r
        util = r.get("mfu") if not matmul else r["tflops_per_device"] * 1e12 / matmul
        mem = r["memory"].get("peak")
        row = [name, f"{r['step_s'] * 1e3:.1f}", f"{r['examples_per_s']:.1f}", f"{r['tflops_per_device']:.4g}",
               f"{util:.1%}" if util is not None else "n/a", step_lib.format_bytes(mem) if mem else "n/a",
               f"{r['compile_s']:.1f}", f"{r['examples_per_s'] / base['examples_per_s']:.2f}x"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
