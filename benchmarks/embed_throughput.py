"""Embedding throughput (crops/s) measured here, and the projected time to embed RxRx3-core and a whole JUMP-CP
source with ViT-L/8 on 8 H100s from the FLOP count.

  python -m benchmarks.embed_throughput                       # this machine: ViT-S/16 MAE, 256 x 256 x 6
  python -m benchmarks.embed_throughput --variant L/8 --dtype bfloat16 --batch_size 256   # on a GPU

Measured, on whatever devices jax sees (all local devices, data-parallel, random weights):
  forward   `eval.embed.Embedder` on device-ready uint8 batches, every block's pooled features back on the
            host (the embed job's model step), one batch in flight: crops/s, achieved FLOP/s and, on a
            device with a listed peak (maejax/mfu.py), the MFU; on a CPU the share of a measured float32
            matmul instead (there is no listed CPU peak);
  job       `eval.embed_job.embed_dataset` end to end on a synthetic ArrayRecord dataset of `--job_crops`
            crops: reading, normalising, the forward pass, crop parquet for every block and the well
            means (skip with --job_crops 0).
Projected (nothing run): analytic inference FLOPs per crop of the target model (`flops_per_crop(h, w)
["infer"]`, maejax/models/flops.py: matmuls only, a multiply-add = 2) over the GPUs' dense bf16 peak
(maejax.mfu.PEAK_FLOPS, H100 SXM 989 TFLOP/s) x an assumed MFU (`--mfu`, default 0.40: a forward pass
only, no backward or optimiser, at a large batch; a stated assumption, not a measurement). Crop counts:
RxRx3-core 222,601 wells x 1 site x 4 tiles of 256 px (each 512 x 512 image cut 2 x 2; ../shared/notes/
recursion.md); a JUMP-CP source `--jump_plates` 384-well plates x 9 sites x 16 tiles of 256 px (1080 x
1080 images cut 4 x 4). The plate count of a source varies (see its plate.csv.gz); 300 is an assumption.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from benchmarks.measure import write_json

RXRX3_CORE_WELLS = 222_601          # recursion.md: 1,335,606 images = 222,601 wells x 6 channels
TILES_RXRX3 = 4                     # 512 x 512 -> 2 x 2 tiles of 256
JUMP_WELLS, JUMP_SITES, JUMP_TILES = 384, 9, 16     # 384-well plates, 9 sites a well, 1080 px -> 4 x 4 of 256


def model_config(variant: str, channels: int, dtype: str = "float32", name: str = "mae"):
    from maejax.config import base
    m = base().model
    m.name, m.variant, m.in_channels, m.dtype = name, variant, channels, dtype
    return m


def random_model(model_cfg, seed: int = 0):
    """The model with random parameters drawn on the host (no initialiser compiles)."""
    import jax
    from flax import nnx

    from maejax.models import build
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: build(model_cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        noise = rng.standard_normal(x.shape).astype(x.dtype)
        return 1.0 + 0.1 * noise if name in ("scale", "gamma") else 0.05 * noise

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def infer_flops(model_cfg, crop: int) -> float:
    from maejax.models.flops import abstract_model
    return abstract_model(model_cfg).flops_per_crop(crop, crop)["infer"]


def measure_forward(model, batch: int, crop: int, channels: int, batches: int) -> dict:
    """crops/s of the Embedder (every block to the host), one batch in flight, after one compile batch."""
    import jax

    from eval.embed import Embedder
    from maejax import sharding as shd
    rules = shd.DEFAULT_RULES    # those of base(), which model_config starts from
    embedder = Embedder(model, shd.batch_mesh(rules), batch, rules, keys=("blocks",))
    images = np.random.default_rng(0).integers(0, 256, (embedder.batch_size, channels, crop, crop), np.uint8)
    t = time.perf_counter()
    embedder(images)                      # compile
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    previous = None
    for _ in range(batches):
        handle = embedder.dispatch(images)
        if previous is not None:
            embedder.fetch(previous)
        previous = handle
    out = embedder.fetch(previous)["blocks"]
    seconds = time.perf_counter() - t
    return {"crops_per_s": batches * embedder.batch_size / seconds, "batch": embedder.batch_size,
            "batches": batches, "seconds": seconds, "compile_s": compile_s, "devices": jax.device_count(),
            "blocks_shape": list(out.shape[1:])}


def measure_job(model, model_cfg, crops: int, crop: int, channels: int, batch: int, work: str) -> dict:
    """eval.embed_job end to end over a synthetic dataset of `crops` crops (8 wells), into `work`."""
    from data.arrayrecord_writer import write_dataset
    from eval.embed_job import embed_dataset
    from maejax.config import base
    from maejax.convert import save_converted
    rng = np.random.default_rng(1)

    def examples():
        for i in range(crops):
            yield rng.integers(0, 256, (channels, crop, crop), np.uint8), dict(
                experiment="e1", plate="p1", well=f"A{i % 8:02d}", site=i // 8 % 4, tile=i // 32,
                perturbation=("non-targeting", "g1")[i % 2], is_control=i % 2 == 0)

    dataset = write_dataset(os.path.join(work, "dataset"), examples(), name="embed-bench", source="benchmark",
                            channels=[f"c{k}" for k in range(channels)], num_shards=2)
    config = base()
    config.model.update(model_cfg.to_dict())
    config.data.dir = str(dataset)
    config.eval.batch_size = batch
    save_converted(os.path.join(work, "run"), model, {"config": json.loads(config.to_json()), "step": 0})
    t = time.perf_counter()
    summary = embed_dataset(os.path.join(work, "run"), str(dataset), os.path.join(work, "out"), batch_size=batch,
                            shard_size=max(1, crops // 4), progress=False)
    return {"crops": crops, "seconds": time.perf_counter() - t, "loop_crops_per_s": summary["crops_per_s_here"]}


def projection(target_variant: str, crop: int, channels: int, gpus: int, mfu: float, peak: float,
               jump_plates: int) -> dict:
    cfg = model_config(target_variant, channels, "bfloat16")
    flops = infer_flops(cfg, crop)
    per_gpu = peak * mfu / flops
    rate = per_gpu * gpus
    from maejax.models.flops import abstract_model
    model = abstract_model(cfg)
    depth, width = int(model.encoder.cfg.depth), int(model.encoder.cfg.block.width)
    screens = {"RxRx3-core": RXRX3_CORE_WELLS * TILES_RXRX3,
               f"JUMP-CP source ({jump_plates} plates)": jump_plates * JUMP_WELLS * JUMP_SITES * JUMP_TILES}
    rows = {}
    for name, n in screens.items():
        rows[name] = {"crops": n, "hours": n / rate / 3600,
                      "input_GB": n * channels * crop * crop / 1e9,
                      "crop_rows_all_blocks_GB": n * depth * width * 4 / 1e9}
    return {"variant": target_variant, "infer_gflops_per_crop": flops / 1e9, "crops_per_s_per_gpu": per_gpu,
            "crops_per_s": rate, "input_GB_per_s": rate * channels * crop * crop / 1e9, "depth": depth,
            "width": width, "screens": rows}


def main(argv=None) -> dict:
    from maejax import flags
    p = flags.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="S/16", help="model measured here (ViT NAME/PATCH)")
    p.add_argument("--model", default="mae", choices=("mae", "ca_mae"))
    p.add_argument("--dtype", default="float32", help="compute dtype of the measured model (bfloat16 on GPUs)")
    p.add_argument("--crop_size", deprecated="--crop", type=int, default=256)
    p.add_argument("--channels", type=int, default=6)
    p.add_argument("--batch_size", deprecated="--batch", type=int, default=16,
                   help="crops per forward pass (all local devices)")
    p.add_argument("--batches", type=int, default=4, help="timed batches")
    p.add_argument("--job_crops", type=int, default=64, help="crops of the end-to-end embed_job run (0: skip)")
    p.add_argument("--target", default="L/8", help="variant of the projection")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--peak_tflops", type=float, default=0.0, help="default: H100 SXM dense bf16 (maejax.mfu)")
    p.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOP utilisation of the projection")
    p.add_argument("--jump_plates", type=int, default=300, help="plates of the JUMP-CP source projected")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    a = p.parse_args(argv)

    import jax

    from maejax import mfu as mfu_lib
    dev = jax.devices()[0]
    cfg = model_config(a.variant, a.channels, a.dtype, a.model)
    flops = infer_flops(cfg, a.crop_size)
    model = random_model(cfg)
    print(f"device: {jax.device_count()} x {dev.platform} ({dev.device_kind}), {os.cpu_count()} CPU cores; "
          f"measured model: {a.model} {a.variant} {a.dtype}, {a.crop_size} x {a.crop_size} x {a.channels} crops, "
          f"{flops / 1e9:.2f} GFLOP per crop (analytic, inference)", flush=True)
    fwd = measure_forward(model, a.batch_size, a.crop_size, a.channels, a.batches)
    achieved = fwd["crops_per_s"] * flops
    peak = mfu_lib.peak_flops(dev.device_kind)
    line = (f"forward: {fwd['crops_per_s']:.2f} crops/s (batch {fwd['batch']}, {fwd['batches']} batches in "
            f"{fwd['seconds']:.2f} s, compile {fwd['compile_s']:.1f} s), {achieved / 1e9:.1f} GFLOP/s")
    if peak:
        fwd["mfu"] = achieved / (peak * jax.device_count())
        line += f", MFU {fwd['mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s per device"
    else:
        matmul = mfu_lib.measure_matmul_flops(1024, repeats=3) * jax.device_count()
        fwd["of_matmul"] = achieved / matmul
        line += f" = {fwd['of_matmul']:.0%} of a measured float32 1024^3 matmul ({matmul / 1e9:.1f} GFLOP/s)"
    print(line, flush=True)
    out = {"device": {"platform": dev.platform, "kind": dev.device_kind, "count": jax.device_count()},
           "measured_model": {"model": a.model, "variant": a.variant, "dtype": a.dtype, "crop": a.crop_size,
                              "channels": a.channels, "infer_gflops_per_crop": flops / 1e9},
           "forward": fwd}
    if a.job_crops:
        with tempfile.TemporaryDirectory(prefix="embed_bench_") as work:
            job = measure_job(model, cfg, a.job_crops, a.crop_size, a.channels, a.batch_size, work)
        out["job"] = job
        print(f"embed_job end to end: {job['crops']} crops in {job['seconds']:.1f} s (with model load and compile); "
              f"{job['loop_crops_per_s']:.2f} crops/s in its loop (read, forward, parquet for all "
              f"{fwd['blocks_shape'][0]} blocks, well means)", flush=True)

    peak_h100 = a.peak_tflops * 1e12 if a.peak_tflops else mfu_lib.peak_flops("h100")
    proj = projection(a.target, 256, a.channels, a.gpus, a.mfu, peak_h100, a.jump_plates)
    out["projection"] = dict(proj, gpus=a.gpus, mfu=a.mfu, peak_tflops=peak_h100 / 1e12)
    print(f"projection: MAE {a.target} at 256 x 256 x {a.channels}: {proj['infer_gflops_per_crop']:.1f} GFLOP per "
          f"crop; {a.gpus} x H100 at {peak_h100 / 1e12:.0f} TFLOP/s dense bf16 x MFU {a.mfu:.2f} (assumed) = "
          f"{proj['crops_per_s_per_gpu']:,.0f} crops/s per GPU, {proj['crops_per_s']:,.0f} crops/s in all "
          f"(needs {proj['input_GB_per_s']:.1f} GB/s of uint8 records)")
    for name, r in proj["screens"].items():
        print(f"  {name}: {r['crops']:,} crops -> {r['hours']:.2f} h ({r['hours'] * 60:.1f} min); input "
              f"{r['input_GB']:,.0f} GB; crop rows of all {proj['depth']} blocks x {proj['width']} float32 "
              f"{r['crop_rows_all_blocks_GB']:,.0f} GB")
    return write_json(a.json, out)


if __name__ == "__main__":
    main()
