"""Training throughput of the real train step (maejax.step) on synthetic batches already on the devices,
so the input pipeline is not measured: step time, crops/s, TFLOP/s per device and MFU, per-device memory.
The first run is the baseline; every further run (`--compare`) prints its ratio to it.

  python -m benchmarks.train_throughput --config configs/mae_synthetic.py:preset=tiny --batch 32 --steps 20
  # one H100/H200, ViT-L/8 MAE, bf16, 256 x 256 x 6 crops; remat, batch and attention variants:
  python -m benchmarks.train_throughput --gpu_flags --config configs/mae_scale.py:preset=L8 \
      --batch 64 --remat full --attention cudnn --steps 20 \
      --compare model.remat=dots --compare model.remat=dots_no_batch \
      --compare model.remat=none,data.batch_size=32 --compare model.attention=None

MFU uses maejax.mfu's peak for the device kind (or --set peak_tflops=...). A CPU has no listed peak; there
the script measures an n x n float32 matmul and reports `of_matmul` = achieved / that (not an MFU).
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config file[:arg], as for maejax.train")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--compare", action="append", default=[], metavar="K=V[,K=V]",
                   help="a further run with these overrides (on top of --set), compared with the baseline")
    p.add_argument("--batch", type=int, help="global batch (data.batch_size)")
    p.add_argument("--remat", choices=("none", "full", "dots", "dots_no_batch"), help="model.remat")
    p.add_argument("--scan", choices=("true", "false"), help="model.scan_layers: scan over the blocks")
    p.add_argument("--attention", choices=("xla", "cudnn"), help="model.attention (cudnn: fused, GPUs only)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="model.dtype (compute)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run (after 2 warm-up steps)")
    p.add_argument("--gpu_flags", action="store_true",
                   help="launch/gpu_flags.sh's XLA flags and memory fraction, as the GPU launchers use")
    return p.parse_args(argv)


def shorthand(args) -> list[str]:
    """--batch/--remat/--scan/--attention/--dtype as config overrides."""
    keys = {"batch": "data.batch_size", "remat": "model.remat", "scan": "model.scan_layers",
            "attention": "model.attention", "dtype": "model.dtype"}
    out = []
    for arg, key in keys.items():
        value = getattr(args, arg)
        if value is not None:
            out.append(f"{key}={ {'xla': 'None', 'true': 'True', 'false': 'False'}.get(value, value)}")
    return out


def overrides(items) -> dict[str, str]:
    """`KEY=VALUE[,KEY=VALUE]` items (as --set and --compare take them) -> {KEY: VALUE}."""
    from maejax.config import parse_overrides
    return parse_overrides(kv for item in items for kv in filter(None, item.split(",")))


def measure(config, steps: int) -> dict:
    """Compiles the train step for `config` on all devices and times `steps` steps."""
    import jax
    import numpy as np

    from maejax import mfu, optim, sharding as shd, state as state_lib, step as step_lib

    mesh = shd.make_mesh(dict(config.mesh))
    rules = shd.rules_from_config(config.sharding_rules)
    step_lib.check_batch(config, mesh)
    total = int(config.total_steps)
    tx = optim.make(config.optim, total)
    sharded = state_lib.abstract(config.model, mesh, rules, seed=config.seed, tx=tx)
    model_state, opt_state = state_lib.initialize(config.model, mesh, rules, sharded, seed=config.seed, tx=tx,
                                                  compiler_options=step_lib.compiler_options(config))
    t0 = time.perf_counter()
    p_step = step_lib.jit_train_step(sharded, config, mesh, rules, optim.schedule(config.optim, total))
    compiled = step_lib.compile_train_step(p_step, sharded, config, mesh, rules)
    compile_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    shapes = step_lib.abstract_batch(config, mesh)
    images = rng.standard_normal(shapes["image"].shape, np.float32)
    batch = {"image": jax.device_put(images, shapes["image"].sharding),
             "label": jax.device_put(np.zeros(shapes["label"].shape, np.int32), shapes["label"].sharding)}
    with shd.activate(mesh, rules):
        for i in range(2):   # warm-up: first executions allocate
            model_state, opt_state, metrics = compiled(model_state, opt_state, batch, step_lib.step_arg(i))
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for i in range(2, 2 + steps):
            model_state, opt_state, metrics = compiled(model_state, opt_state, batch, step_lib.step_arg(i))
        jax.block_until_ready((model_state, opt_state, metrics))
        seconds = time.perf_counter() - t0
    crop = int(config.data.crop_size)
    flops = sharded.abstract_model().flops_per_crop(crop, crop)["train"]
    out = {"step_s": seconds / steps, "compile_s": compile_s, "loss": float(metrics["loss"]),
           "memory": step_lib.describe_memory(compiled)}
    out.update(mfu.throughput(flops, int(config.data.batch_size) * steps, seconds, jax.device_count(),
                              mfu.device_peak(config.peak_tflops)))
    return out


def _size(nbytes) -> str:
    if not nbytes:
        return "n/a"
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.gpu_flags:
        os.environ.update(gpu_env())  # before jax creates its GPU client
    import jax

    from maejax import config as config_lib, mfu

    common = overrides(shorthand(args) + args.set)
    runs = [("baseline", common)] + [(c, {**common, **overrides([c])}) for c in args.compare]
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
               f"{util:.1%}" if util is not None else "n/a", _size(mem),
               f"{r['compile_s']:.1f}", f"{r['examples_per_s'] / base['examples_per_s']:.2f}x"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
