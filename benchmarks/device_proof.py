"""The accelerator proof (issue 14): one script that measures, on one H100/H200, what users ask first.

  python -m benchmarks.device_proof --out DIR [--budget_s 480]      # one GPU, about 8 minutes
  python -m benchmarks.device_proof --out DIR --dry_run             # CPU, tiny shapes, same code paths

Sections, each under its share of the time budget, each row caught and written to DIR/device_proof.json as
soon as it is measured (one failure never loses the other figures), with a log in DIR/device_proof.log:

  parity     cuDNN attention against XLA attention (jax.nn.dot_product_attention), forward and gradient,
             bfloat16 and float32: max abs / relative errors, each also against a float32 XLA reference.
  train_l8   the ViT-L/8 MAE of configs/mae_scale.py (preset L8: 256 x 256 x 6 crops, bf16 compute, float32
             master weights) on device-resident batches: step time, crops/s, TFLOP/s, MFU and the compiled
             memory for remat full / dots / none x attention xla / cudnn, each at the largest batch that
             fits: the batch is searched by compiling the step ahead of time (maejax.aot.compile_step) and
             comparing its memory_analysis() with the device memory (doubling / halving, guided by a linear
             fit of memory against batch); batches that do not fit are recorded, never fatal. Timed with
             benchmarks.train_throughput.measure, the trainer's own step (maejax.step).
  train_g8   the same for ViT-G/8 (preset G8), remat full.
  inference  ViT-L/8 every-block embedding (eval.embed.Embedder: model.embed -> "blocks") at batch 256,
             bf16: crops/s and fraction of peak, on a device-resident batch and end to end from the host.
  map_sweep  the 48-block map sweep of benchmarks.map_sweep_speed (20,000 perturbations x 1,664 features, PCA
             on the jax backend): time per block and for the sweep (extrapolated, and said so, when the
             budget ends first).
  profiles   where a target is missed (training MFU >= 55%, inference >= 60% of peak, sweep < 60 s), a short
             jax.profiler trace, summarised in the log and the JSON: top ops by time.

Analytic FLOPs are the models' flops_per_crop ("train": remat not counted; "infer"); the peak is
maejax.mfu's dense bf16 figure for the device kind (a CPU has none: the dry run divides by a measured
float32 matmul instead and says so). The script asserts nothing about the figures.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import glob
import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCALE_CONFIG = REPO / "configs" / "mae_scale.py"
DEFAULT_ANNOTATIONS = REPO / ".." / "shared" / "reference" / "efaar_annotations"

TARGETS = {"train_mfu": 0.55, "inference_of_peak": 0.60, "sweep_s": 60.0}
SECTIONS = ("parity", "train_l8", "train_g8", "inference", "map_sweep", "profiles")
# Shares of the time budget. A section's deadline is its share of what is left when it starts, so time a
# section does not use goes to the ones after it.
SHARES = {"parity": 0.04, "train_l8": 0.42, "train_g8": 0.15, "inference": 0.06, "map_sweep": 0.23,
          "profiles": 0.10}
# Real tables' sizes (pairs), for synthetic stand-ins when the reference annotations are not present.
ANNOTATION_ROWS = {"CORUM": 75_298, "HuMAP": 117_076, "Reactome": 22_865, "SIGNOR": 12_177,
                   "StringDB": 116_118}

log = logging.getLogger("device_proof")
NO_CUDNN = "cuDNN attention needs a CUDA GPU; on this platform the row would repeat the XLA one"


# --- what to run: the real shapes, or tiny ones for --dry_run ----------------------------------------

@dataclasses.dataclass
class Plan:
    train_overrides: dict            # on top of the preset, for L/8 and G/8 rows
    g8_overrides: dict
    l8_start: dict                   # remat -> first batch tried
    g8_start: int
    max_batch: int
    g8_max_batch: int
    steps_s: float                   # aim for this many seconds of timed steps per row (3..20 steps)
    infer_batch: int
    infer_iters: int
    sweep: dict                      # benchmarks.map_sweep_speed sizes
    parity_shapes: tuple             # (B, T, heads, head_dim)
    annotation_scale: float          # synthetic tables: fraction of the real tables' sizes


FULL = Plan(
    train_overrides={}, g8_overrides={},
    l8_start={"full": 256, "dots": 128, "none": 64}, g8_start=64, max_batch=4096, g8_max_batch=2048,
    steps_s=4.0, infer_batch=256, infer_iters=10,
    sweep=dict(perturbations=20_000, replicates=4, batches=4, controls=500, features=1664, pca=128, blocks=48),
    parity_shapes=((8, 257, 16, 64), (4, 1025, 16, 64)),   # L/8 training (25% of 1024 + cls), inference
    annotation_scale=1.0)

# The dry run's model, for the L/8 and the G/8 rows alike (same drop-path and schedule, hence the same
# program: the G/8 row's compile is a cache hit). A CPU compiles even this train step in ~8-25 s.
TINY_MODEL = {"model.variant": "mu/8", "model.decoder_width": 32, "model.decoder_depth": 1,
              "model.decoder_heads": 2, "model.drop_path": 0.1, "data.crop_size": 32,
              "total_steps": 1000, "optim.warmup_steps": 100, "xla_backend_optimization_level": 0}
DRY = Plan(
    train_overrides=TINY_MODEL, g8_overrides=TINY_MODEL,
    l8_start={"full": 8, "dots": 8, "none": 8}, g8_start=8, max_batch=8, g8_max_batch=8,
    steps_s=0.0, infer_batch=8, infer_iters=2,
    sweep=dict(perturbations=120, replicates=2, batches=2, controls=10, features=32, pca=8, blocks=2),
    parity_shapes=((2, 17, 2, 16),),
    annotation_scale=0.002)


# --- output: one JSON written after every row, and a log -------------------------------------------

class Results:
    """The JSON document, rewritten atomically (tmp + rename) after every change."""

    def __init__(self, path: Path, doc: dict):
        self.path, self.doc, self.lock = path, doc, threading.RLock()
        self.save()

    def save(self) -> None:
        with self.lock:
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.doc, indent=1, default=_jsonable))
            os.replace(tmp, self.path)


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def short(e: BaseException, n: int = 400) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:n]}"


def is_oom(e: BaseException) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "Out of memory" in s or "out of memory" in s.lower()


def setup_logging(path: Path) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(seconds)7.1f s  %(message)s")
    start = time.time()

    def stamp(record):
        record.seconds = record.created - start
        return True
    for h in (logging.FileHandler(path, mode="w"), logging.StreamHandler(sys.stdout)):
        h.setFormatter(fmt)
        h.addFilter(stamp)
        log.addHandler(h)


class Budget:
    """The whole run's time budget, handed out to sections by share of what is left."""

    def __init__(self, total_s: float, sections):
        self.start, self.total = time.perf_counter(), float(total_s)
        self.pending = list(sections)
        self.deadline = self.start + self.total

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def open(self, name: str) -> float:
        """Starts section `name`; returns its deadline (perf_counter seconds)."""
        now = time.perf_counter()
        shares = sum(SHARES[s] for s in self.pending)
        left = max(0.0, self.start + self.total - now)
        deadline = now + left * SHARES[name] / shares if shares else now
        if name in self.pending:
            self.pending.remove(name)
        return deadline


def gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


# --- environment --------------------------------------------------------------------------------------

# module -> distribution: what the sections import (maejax.step/state need orbax, ml_collections, absl and
# etils; the sweep scipy, pandas, threadpoolctl) and what they do not (grain, tensorboardX, clu)
MODULES = {"jax": "jax", "jaxlib": "jaxlib", "flax": "flax", "optax": "optax", "orbax.checkpoint": "orbax-checkpoint",
           "ml_collections": "ml-collections", "numpy": "numpy", "scipy": "scipy", "pandas": "pandas",
           "threadpoolctl": "threadpoolctl", "absl": "absl-py", "etils": "etils", "msgpack": "msgpack",
           "clu": "clu", "grain": "grain", "tensorboardX": "tensorboardX"}


def environment(args) -> dict:
    import importlib.metadata
    import importlib.util
    import platform

    import jax
    mods = {}
    for name, dist in MODULES.items():   # looked up, not imported
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "present"
        mods[name] = version if found else "missing"
    dev = jax.devices()[0]
    env = {"python": platform.python_version(), "platform": dev.platform, "device_kind": dev.device_kind,
           "device_count": jax.device_count(), "modules": mods,
           "env": {k: os.environ.get(k) for k in ("JAX_PLATFORMS", "XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                                                  "NCCL_NVLS_ENABLE")}}
    try:
        env["memory_stats"] = {k: v for k, v in (dev.memory_stats() or {}).items()
                               if k in ("bytes_limit", "bytes_reservable_limit", "bytes_in_use")}
    except Exception as e:  # noqa: BLE001
        env["memory_stats"] = short(e)
    try:
        from jax._src.lib import cuda_versions  # only on CUDA builds
        env["cudnn"] = cuda_versions.cudnn_get_version() if cuda_versions else None
    except Exception:  # noqa: BLE001
        env["cudnn"] = None
    return env


def device_capacity(args) -> tuple[int, str]:
    """Bytes a compiled program may use on one device, and where the figure comes from."""
    import jax
    if args.capacity_gib:
        return int(args.capacity_gib * 2**30 * args.headroom), f"--capacity_gib {args.capacity_gib} x headroom"
    dev = jax.devices()[0]
    try:
        limit = (dev.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001
        limit = None
    if limit:
        return int(limit * args.headroom), f"allocator bytes_limit {gib(limit)} x headroom {args.headroom}"
    from maejax.aot import DEVICE_MEMORY
    for kind, nbytes in DEVICE_MEMORY.items():
        if kind.lower() in dev.device_kind.lower():
            return int(nbytes * args.headroom), f"maejax.aot.DEVICE_MEMORY[{kind!r}] x headroom"
    raise RuntimeError(f"no memory size known for {dev.device_kind}: pass --capacity_gib")


def peak_flops(args, dry: bool) -> tuple[float | None, str]:
    from maejax import mfu
    peak = mfu.device_peak(args.peak_tflops)
    if peak:
        return peak, "--peak_tflops" if args.peak_tflops else "maejax.mfu table (dense bf16)"
    if dry:   # a CPU: no listed peak; a measured matmul keeps every figure numeric (it is not an MFU)
        return mfu.measure_matmul_flops(n=512, repeats=3), "measured float32 512x512 matmul (CPU: not a peak)"
    return None, "unknown device kind (pass --peak_tflops)"


def cudnn_available() -> bool:
    import jax
    return jax.devices()[0].platform == "gpu"


# --- 5. parity: cuDNN against XLA attention -----------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _attention_fn(impl: str, dtype):
    """jit((q, k, v, cotangent) -> (out, dq, dk, dv)), float32 in and out, attention computed in `dtype`."""
    import jax
    import jax.numpy as jnp

    def fwd(q, k, v):
        return jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                            implementation=impl).astype(jnp.float32)

    def fwd_bwd(q, k, v, ct):
        out, vjp = jax.vjp(fwd, q, k, v)
        return (out, *vjp(ct))

    return jax.jit(fwd_bwd)


def _errors(a: dict, b: dict) -> dict:
    out = {}
    for name in a:
        x, y = np.asarray(a[name], np.float64), np.asarray(b[name], np.float64)
        diff = np.abs(x - y)
        out[name] = {"max_abs": float(diff.max()), "max_rel": float(diff.max() / max(np.abs(y).max(), 1e-30)),
                     "mean_abs": float(diff.mean())}
    return out


def run_attention(impl: str, dtype, q, k, v, ct, reps: int = 1) -> tuple[dict, float]:
    """Outputs {fwd, dq, dk, dv} (float32) and the best forward + backward time (ms)."""
    import jax
    f = _attention_fn(impl, dtype)
    out = jax.block_until_ready(f(q, k, v, ct))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(q, k, v, ct))
        best = min(best, time.perf_counter() - t)
    return dict(zip(("fwd", "dq", "dk", "dv"), out)), best * 1e3


def section_parity(ctx) -> None:
    import jax
    import jax.numpy as jnp
    sec = ctx.section("parity", {"candidate": "cudnn" if ctx.cudnn else "xla", "reference": "xla",
                                 "rows": []})
    if not ctx.cudnn:
        sec["cudnn_skipped"] = ("cuDNN attention needs a CUDA GPU (platform "
                                f"{jax.devices()[0].platform}); the candidate is XLA, to run the same code path")
    cand = sec["candidate"]
    for shape in ctx.plan.parity_shapes:
        keys = jax.random.split(jax.random.key(0), 4)
        q, k, v, ct = (jax.random.normal(kk, shape, jnp.float32) for kk in keys)
        # the reference: float32 XLA, at full matmul precision on a GPU (TF32 otherwise); a CPU computes
        # float32 exactly anyway, and the same program then serves the float32 row
        with jax.default_matmul_precision("highest") if ctx.cudnn else contextlib.nullcontext():
            truth, _ = run_attention("xla", jnp.float32, q, k, v, ct)
        for dtype in (jnp.bfloat16, jnp.float32):
            row = ctx.row(sec, {"shape_btnh": list(shape), "dtype": jnp.dtype(dtype).name})
            if not ctx.time_left(5):
                ctx.skip(row, "budget")
                continue
            try:
                reps = 1 if ctx.dry else 5
                base, row["xla_ms"] = run_attention("xla", dtype, q, k, v, ct, reps)
                row["xla_vs_f32_reference"] = _errors(base, truth)
                try:
                    got, row[f"{cand}_ms"] = run_attention(cand, dtype, q, k, v, ct, reps)
                    row[f"{cand}_vs_xla"] = _errors(got, base)
                    row[f"{cand}_vs_f32_reference"] = _errors(got, truth)
                    row["status"] = "ok"
                except Exception as e:  # noqa: BLE001 - e.g. cuDNN refuses float32
                    row["status"], row["error"] = "error", f"{cand}: {short(e)}"
                e_fwd = row.get(f"{cand}_vs_xla", {}).get("fwd", {})
                log.info(f"parity {shape} {row['dtype']}: {cand} vs xla fwd max_abs {e_fwd.get('max_abs')} "
                         f"max_rel {e_fwd.get('max_rel')}; dq max_rel "
                         f"{row.get(f'{cand}_vs_xla', {}).get('dq', {}).get('max_rel')}; "
                         f"xla {row.get('xla_ms', 0):.2f} ms, {cand} {row.get(f'{cand}_ms', float('nan')):.2f} ms"
                         + (f"; {row['error']}" if "error" in row else ""))
            except Exception as e:  # noqa: BLE001
                ctx.fail(row, e)
            ctx.save()


# --- 1./2. training ---------------------------------------------------------------------------------

def load_config(preset: str, overrides: dict):
    from maejax import config as config_lib
    # one device: no FSDP over 128 (G/8's preset mesh); the batch sits on the one device
    ov = {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1, **overrides}
    return config_lib.load(f"{SCALE_CONFIG}:preset={preset}", {k: str(v) for k, v in ov.items()})


def _memory_model(tried: list[dict]) -> tuple[float, float] | None:
    """(intercept, bytes per crop) of peak memory against batch, from the compiles that reported memory:
    a line through the two largest fitting points, else through one point and its argument bytes
    (parameters and optimiser state: what does not grow with the batch)."""
    pts = sorted({(r["batch"], r["peak_bytes"], r.get("argument_bytes") or 0) for r in tried
                  if r.get("peak_bytes")})
    if len(pts) >= 2:
        (b1, p1, _), (b2, p2, _) = pts[-2], pts[-1]
        slope = (p2 - p1) / (b2 - b1)
        return p2 - slope * b2, slope
    if pts:
        b, p, arg = pts[0]
        return float(arg), (p - arg) / b
    return None


def search_batch(compile_at, start: int, max_batch: int, capacity: int, time_ok) -> tuple[dict | None, list]:
    """The largest power-of-two multiple of `start` (or `start` halved) whose compiled step fits in
    `capacity` bytes. Each try compiles ahead of time (no device memory touched); a try whose compile fails
    (e.g. the compiler's own out-of-memory) counts as not fitting. Returns (best try, all tries)."""
    tried: list[dict] = []

    def attempt(b: int) -> dict:
        t = time.perf_counter()
        try:
            r = compile_at(b)
            m = r["memory"]
            peak = m.get("peak")
            row = {"batch": b, "peak_bytes": peak, "argument_bytes": m.get("argument"),
                   "temp_bytes": m.get("temp"), "fits": peak is not None and peak <= capacity}
        except Exception as e:  # noqa: BLE001 - recorded as a batch that does not fit
            row = {"batch": b, "fits": False, "error": short(e, 300)}
        row["compile_s"] = time.perf_counter() - t
        tried.append(row)
        log.info(f"    batch {b}: {'fits' if row['fits'] else 'does not fit'} "
                 f"(peak {gib(row.get('peak_bytes'))} of {gib(capacity)}, compile {row['compile_s']:.1f} s)"
                 + (f" {row['error']}" if "error" in row else ""))
        return row

    best = None
    b = start
    r = attempt(b)
    if r["fits"]:
        best = r
        while b < max_batch and time_ok():
            model = _memory_model(tried)
            predicted = (capacity - model[0]) / model[1] if model and model[1] > 0 else max_batch
            nb = 2 * b
            while nb * 2 <= min(predicted, max_batch):
                nb *= 2
            fitted = sum(1 for t in tried if t["fits"])
            if nb > max_batch or (fitted >= 2 and nb > predicted):   # two fits make the line trustworthy
                break
            r = attempt(nb)
            if r["fits"]:
                best, b = r, nb
                continue
            hi = nb          # the jump overshot: halve back towards the last batch that fitted
            while hi // 2 > b and time_ok():
                hi //= 2
                r = attempt(hi)
                if r["fits"]:
                    best, b = r, hi
                    break
            break
    else:
        while b > 1 and time_ok():
            b //= 2
            r = attempt(b)
            if r["fits"]:
                best = r
                break
    return best, tried


def train_case(ctx, sec: dict, name: str, preset: str, overrides: dict, remat: str, attention: str,
               start: int, max_batch: int) -> dict | None:
    """One (remat, attention) row: batch search, then the timed step; returns the row."""
    import jax

    from benchmarks import train_throughput
    from maejax import aot

    row = ctx.row(sec, {"model": name, "remat": remat, "attention": attention})
    if attention == "cudnn" and not ctx.cudnn:
        return ctx.skip(row, NO_CUDNN)
    used = attention
    est = 3 * ctx.compile_s.get(preset, 20.0 if not ctx.dry else 2.0)
    if not ctx.time_left(est):
        return ctx.skip(row, f"budget: under {est:.0f} s left in the section")
    if not ctx.capacity:
        return ctx.skip(row, f"no device memory size for the batch search: {ctx.capacity_source}")
    try:
        cfg = lambda b: load_config(preset, {**overrides, "model.remat": remat, "data.batch_size": b,
                                              "model.attention": "None" if used == "xla" else used,
                                              "peak_tflops": ctx.peak / 1e12 if ctx.peak else 0.0})
        c0 = cfg(start)
        row.update(variant=c0.model.variant, crop=int(c0.data.crop_size), channels=int(c0.model.in_channels),
                   dtype=c0.model.dtype, param_dtype=c0.model.param_dtype, optimizer=c0.optim.name,
                   capacity_bytes=ctx.capacity)
        log.info(f"{name} remat={remat} attention={attention}: searching the batch from {start}")

        def compile_at(b):
            r = aot.compile_step(cfg(b), jax.devices())
            ctx.compile_s[preset] = r["compile_s"]
            row["params"], row["train_flops_per_crop"] = r["params"], r["train_flops_per_crop"]
            return r

        best, tried = search_batch(compile_at, start, max_batch, ctx.capacity,
                                   lambda: ctx.time_left(ctx.compile_s.get(preset, 0) + 5))
        row["search"] = tried
        ctx.save()
        if best is None:
            row["status"] = "oom"
            row["error"] = (f"no batch down to {min(t['batch'] for t in tried)} fits in {gib(ctx.capacity)}"
                            if all("error" not in t for t in tried[-1:]) else tried[-1]["error"])
            log.info(f"  -> {row['error']}")
            return row
        b = best["batch"]
        row["runtime_oom"] = []
        while True:
            flops = row.get("train_flops_per_crop") or 0
            step_guess = flops * b / (0.4 * ctx.peak) if ctx.peak and not ctx.dry else 0.0
            steps = int(min(20, max(3, ctx.plan.steps_s / step_guess))) if step_guess else (3 if not ctx.dry else 2)
            try:
                r = train_throughput.measure(cfg(b), steps)
                break
            except Exception as e:  # noqa: BLE001
                if not (is_oom(e) and b > 1 and ctx.time_left(10)):
                    raise
                row["runtime_oom"].append({"batch": b, "error": short(e, 300)})
                log.info(f"  batch {b}: out of memory when run ({short(e, 160)}); halving")
                b //= 2
        row.update(status="ok", batch=b, steps=steps, step_s=r["step_s"], crops_per_s=r["examples_per_s"],
                   tflops_per_device=r["tflops_per_device"], mfu=r.get("mfu"), loss=r["loss"],
                   compile_s=r["compile_s"], memory=r["memory"])
        log.info(f"  -> batch {b}: step {r['step_s'] * 1e3:.1f} ms, {r['examples_per_s']:.1f} crops/s, "
                 f"{r['tflops_per_device']:.4g} TFLOP/s, MFU {_pct(r.get('mfu'))}{ctx.peak_note}, "
                 f"peak memory {gib(r['memory'].get('peak'))}, loss {r['loss']:.4f}")
        ctx.best_train_configs.append((r.get("mfu") or 0.0, name, cfg(b)))
    except Exception as e:  # noqa: BLE001
        ctx.fail(row, e)
    return row


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def section_train(ctx, key: str, name: str, preset: str, remats, attentions, start_of, max_batch,
                  overrides) -> None:
    sec = ctx.section(key, {"model": name, "config": f"configs/mae_scale.py:preset={preset}",
                            "overrides": {**overrides, "mesh.data": 1, "mesh.fsdp": -1},
                            "capacity_bytes": ctx.capacity, "capacity_source": ctx.capacity_source,
                            "peak_flops": ctx.peak, "peak_source": ctx.peak_source, "rows": []})
    for remat in remats:
        fitted = None   # the xla row's batch seeds the cudnn row of the same remat (similar memory)
        for attention in attentions:
            start = fitted or start_of(remat)
            row = train_case(ctx, sec, name, preset, overrides, remat, attention, start, max_batch)
            if row and row.get("status") == "ok":
                fitted = row["batch"]
            ctx.save()
    ok = [r for r in sec["rows"] if r.get("status") == "ok"]
    if ok:
        best = max(ok, key=lambda r: r.get("mfu") or 0)
        sec["best"] = {k: best.get(k) for k in ("remat", "attention", "batch", "step_s", "crops_per_s",
                                                 "tflops_per_device", "mfu")}


# --- 3. inference --------------------------------------------------------------------------------------

def section_inference(ctx) -> None:
    """model.embed -> "blocks" jitted on a device-resident, already standardised float32 batch (what the
    device does per crop), then eval.embed.Embedder end to end (uint8 from the host, numpy features back)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from maejax import mfu, sharding as shd, state as state_lib, step as step_lib
    sec = ctx.section("inference", {"model": "ViT-L/8 MAE encoder", "output": "blocks (every block, mean-pooled)",
                                    "batch": ctx.plan.infer_batch, "peak_flops": ctx.peak,
                                    "peak_source": ctx.peak_source, "rows": []})
    state = None
    for attention in ("xla", "cudnn"):
        used = attention
        row = ctx.row(sec, {"attention": attention})
        if attention == "cudnn" and not ctx.cudnn:
            ctx.skip(row, NO_CUDNN)
            continue
        if not ctx.time_left(20 if not ctx.dry else 2):
            ctx.skip(row, "budget")
            continue
        try:
            cfg = load_config("L8", {**ctx.plan.train_overrides, "data.batch_size": ctx.plan.infer_batch,
                                     "model.attention": "None" if used == "xla" else used})
            mesh = shd.make_mesh(dict(cfg.mesh))
            rules = shd.rules_from_config(cfg.sharding_rules)
            layout = state_lib.abstract(cfg.model, mesh, rules, seed=cfg.seed)
            if state is None:   # the parameters do not depend on the attention implementation
                state = state_lib.initialize(cfg.model, mesh, rules, layout, seed=cfg.seed)
            b, c, s = ctx.plan.infer_batch, int(cfg.model.in_channels), int(cfg.data.crop_size)
            in_sh = shd.batch_sharding(mesh, rules, 4)
            images = jax.device_put(np.random.default_rng(0).standard_normal((b, c, s, s), np.float32), in_sh)
            graphdef = layout.model_def

            def blocks(state, images):
                return nnx.merge(graphdef, state).embed(images)["blocks"]

            with shd.activate(mesh, rules):
                t = time.perf_counter()
                compiled = jax.jit(blocks, in_shardings=(layout.model_shardings, in_sh)).lower(
                    state, images).compile()
                compile_s = time.perf_counter() - t
                for _ in range(2):
                    out = compiled(state, images)
                jax.block_until_ready(out)
                t = time.perf_counter()
                for _ in range(ctx.plan.infer_iters):
                    out = compiled(state, images)
                jax.block_until_ready(out)
                secs = time.perf_counter() - t
            flops = layout.abstract_model().flops_per_crop(s, s)["infer"]
            r = mfu.throughput(flops, b * ctx.plan.infer_iters, secs, jax.device_count(), ctx.peak)
            row.update(status="ok", batch=b, crop=s, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                       blocks_shape=list(out.shape), blocks_finite=bool(jnp.isfinite(out).all()),
                       step_s=secs / ctx.plan.infer_iters, crops_per_s=r["examples_per_s"],
                       tflops_per_device=r["tflops_per_device"], of_peak=r.get("mfu"), infer_flops_per_crop=flops,
                       compile_s=compile_s, memory=step_lib.describe_memory(compiled))
            log.info(f"inference {attention}: batch {b}, {row['crops_per_s']:.1f} crops/s on device ({row['tflops_per_device']:.4g} "
                     f"TFLOP/s, {_pct(row['of_peak'])} of peak{ctx.peak_note}), compile {compile_s:.1f} s, "
                     f"memory {gib(row['memory'].get('peak'))}")
            ctx.infer_fns.append((row.get("of_peak") or 0.0, attention, compiled, state, images, mesh, rules))
            ctx.save()
            if attention == "xla":
                end_to_end(ctx, row, cfg, mesh, rules, graphdef, state, b, c, s)
        except Exception as e:  # noqa: BLE001
            ctx.fail(row, e)
        ctx.save()


def end_to_end(ctx, row: dict, cfg, mesh, rules, graphdef, state, b: int, c: int, s: int) -> None:
    """crops/s through eval.embed.Embedder (the eval path: host uint8 in, padded, numpy features out)."""
    from flax import nnx
    if not ctx.time_left(10 if not ctx.dry else 2):
        row["end_to_end"] = "skipped: budget"
        return
    try:
        from eval.embed import Embedder
        from maejax import sharding as shd
        with shd.activate(mesh, rules):
            model = nnx.merge(graphdef, state)
        emb = Embedder(model, mesh, b, rules=rules, keys=("blocks",))
        images = np.random.default_rng(0).integers(0, 256, (b, c, s, s), dtype=np.uint8)
        emb(images)
        t = time.perf_counter()
        for _ in range(2):
            emb(images)
        row["end_to_end_crops_per_s"] = 2 * b / (time.perf_counter() - t)
        log.info(f"  end to end (eval.embed.Embedder, host uint8 in, numpy out): "
                 f"{row['end_to_end_crops_per_s']:.1f} crops/s")
    except Exception as e:  # noqa: BLE001 - the device figure above stands without it
        row["end_to_end"] = f"error: {short(e)}"
        log.info(f"  end to end failed: {short(e)}")


# --- 4. the map sweep ----------------------------------------------------------------------------------

def synthetic_annotations(folder: Path, genes: list[str], scale: float, seed: int = 0) -> Path:
    """Relationship tables with the real tables' names and (scaled) sizes over `genes`, for a machine
    without ../shared/reference (the device machine gets only the repository)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for source, rows in ANNOTATION_ROWS.items():
        n = max(20, int(rows * scale))
        pairs = rng.integers(0, len(genes), (n, 2))
        lines = "".join(f"{genes[a]},{genes[b]}\n" for a, b in pairs)
        (folder / f"{source}.txt").write_text("entity1,entity2\n" + lines)
    return folder


def section_sweep(ctx) -> None:
    import jax
    import pandas as pd

    from benchmarks import map_sweep_speed as mb
    from eval import efaar, recall
    p = ctx.plan.sweep
    sec = ctx.section("map_sweep", {"sizes": p, "backend": "jax", "jax_platform": jax.devices()[0].platform,
                                    "pca_backend_used": "jax" if efaar._use_jax("jax") else "numpy",
                                    "target_s": TARGETS["sweep_s"], "per_block": []})
    try:
        ann = Path(ctx.args.annotations) if ctx.args.annotations else DEFAULT_ANNOTATIONS
        if ctx.dry or not (ann / "CORUM.txt").is_file():
            pool = [f"SYN{i:05d}" for i in range(int(0.9 * p["perturbations"]))]
            ann = synthetic_annotations(ctx.tmp / "annotations", pool, ctx.plan.annotation_scale)
            sec["annotations"] = (f"synthetic tables (the real tables' names and {ctx.plan.annotation_scale:g} x "
                                  f"their sizes) in {ann}: no reference annotations at "
                                  f"{ctx.args.annotations or DEFAULT_ANNOTATIONS}" if not ctx.dry
                                  else f"synthetic tables ({ctx.plan.annotation_scale:g} x the real sizes), dry run")
        else:
            sec["annotations"] = str(ann.resolve())
        thresholds = list(recall.RECALL_THRESHOLDS)
        genes = mb.gene_names(p["perturbations"], ann)
        perts, batch = mb.screen_layout(genes, p["replicates"], p["batches"], p["controls"])
        is_control = perts == mb.CONTROL
        codes = pd.Index(genes).get_indexer(perts)
        codes[is_control] = len(genes)
        x = np.empty((len(perts), p["features"]), np.float32)
        sec["matrix_rows"], sec["input_mib"] = int(len(x)), x.nbytes / 2**20
        t = time.perf_counter()
        mb.fill_block(x, codes, batch, 0)
        gen_s = time.perf_counter() - t
        sec["data"] = ("block 0's synthetic embeddings for every block (generation excluded from the timing, as "
                       "in map_sweep_speed; the pipeline's cost does not depend on the values)"
                       if not ctx.args.sweep_fresh_blocks else "fresh synthetic embeddings per block")
        log.info(f"map sweep: {len(x):,} rows x {p['features']} features ({x.nbytes / 2**30:.2f} GiB per block), "
                 f"{p['blocks']} blocks, PCA {p['pca']} on the jax backend ({jax.devices()[0].platform}); "
                 f"annotations: {sec['annotations']}; block generated in {gen_s:.1f} s")
        totals = []
        for block in range(p["blocks"]):
            need = (np.median(totals[1:] or totals) if totals else 0.0)
            if not ctx.time_left(need):
                sec["stopped"] = f"budget: stopped after {block} of {p['blocks']} blocks"
                break
            if ctx.args.sweep_fresh_blocks and block:
                t = time.perf_counter()
                mb.fill_block(x, codes, batch, block)
                gen_s += time.perf_counter() - t
            times, records, _ = mb.run_ours(x, perts, batch, is_control, ann, p["pca"], thresholds, backend="jax")
            total = sum(times[k] for k in mb.STAGES)
            totals.append(total)
            sec["per_block"].append({"block": block, **{k: times[k] for k in mb.STAGES}, "total_s": total})
            if block == 0:
                sec["recall_block0"] = [{"source": r["source"], "query_pairs": r["query_distribution_size"],
                                         "recall_0.05_0.95": r.get("recall_0.05_0.95")} for r in records]
                ctx.sweep_inputs = (x, perts, batch, is_control, ann, p["pca"], thresholds)
            log.info(f"  block {block:2d}: " + "  ".join(f"{k} {times[k]:.2f}" for k in mb.STAGES)
                     + f"  | {total:.2f} s")
            steady = totals[1:] or totals
            measured = sum(totals)
            sec.update(blocks_measured=len(totals), measured_s=measured, first_block_s=totals[0],
                       median_block_s=float(np.median(steady)),
                       median_stage_s={k: float(np.median([b[k] for b in sec["per_block"][1:] or sec["per_block"]]))
                                       for k in mb.STAGES},
                       sweep_s=measured + float(np.median(steady)) * (p["blocks"] - len(totals)),
                       extrapolated=len(totals) < p["blocks"], generation_s=gen_s)
            ctx.save()
        if not totals:
            sec["status"], sec["error"] = "skipped", sec.get("stopped", "no block ran")
        else:
            sec["status"] = "ok"
            log.info(f"map sweep: {sec['blocks_measured']} of {p['blocks']} blocks measured in "
                     f"{sec['measured_s']:.1f} s; median block {sec['median_block_s']:.2f} s; "
                     f"{p['blocks']}-block sweep {sec['sweep_s']:.1f} s"
                     + (" (extrapolated)" if sec["extrapolated"] else ""))
    except Exception as e:  # noqa: BLE001
        ctx.fail(sec, e)


# --- profiles where a target is missed -------------------------------------------------------------------

HOST_NOISE = ("profiler.py", "contextlib.py", "threading.py")


def summarize_trace(trace_dir: Path, top: int = 15) -> dict:
    """Top ops by total time from the *.trace.json.gz the profiler wrote: the device's XLA ops (or its
    kernels) when the trace has a device, else host events."""
    files = sorted(glob.glob(str(trace_dir / "**" / "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(files[-1]) as f:
        events = json.load(f)["traceEvents"]
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device = [e for e in spans if "/device:" in procs.get(e["pid"], "")]
    if device:
        line = lambda e: threads.get((e["pid"], e.get("tid")), "")
        ops = [e for e in device if "XLA Ops" in line(e)]
        where = "device: XLA Ops"
        if not ops:   # kernels on the streams, without the derived lines (modules, steps) that overlap them
            ops = [e for e in device if not any(w in line(e) for w in ("XLA Modules", "Steps", "Launch", "Source"))]
            where = "device: kernels"
    else:
        ops = [e for e in spans if not any(n in e["name"] for n in HOST_NOISE)]
        where = "host (inclusive; python frames nest)"
    total, count = Counter(), Counter()
    for e in ops:
        total[e["name"]] += e["dur"]
        count[e["name"]] += 1
    busy = sum(total.values()) or 1.0
    by_kind = defaultdict(float)
    for name, us in total.items():
        by_kind[name.split(".")[0].split("(")[0][:40]] += us
    return {"trace": files[-1], "where": where, "events": len(ops), "total_ms": busy / 1e3,
            "top_ops": [{"name": n[:160], "total_ms": us / 1e3, "count": count[n], "share": us / busy}
                        for n, us in total.most_common(top)],
            "by_kind": [{"kind": k, "total_ms": us / 1e3, "share": us / busy}
                        for k, us in sorted(by_kind.items(), key=lambda kv: -kv[1])[:10]]}


def _profile(ctx, sec: dict, name: str, trigger: str, fn, python: bool = False) -> None:
    """Traces fn() (without the Python tracer unless `python`: device ops are what a step is made of)."""
    import jax
    row = sec.setdefault(name, {"trigger": trigger, "python_tracer": python})
    if not ctx.time_left(5):
        ctx.skip(row, "budget")
        return
    try:
        trace_dir = ctx.tmp / "profiles" / name
        trace_dir.mkdir(parents=True, exist_ok=True)
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = int(python)
        with jax.profiler.trace(str(trace_dir), profiler_options=options):
            fn()
        row.update(summarize_trace(trace_dir), status="ok")
        trace = Path(row.pop("trace"))
        if trace.stat().st_size <= 16 * 2**20:   # kept beside the JSON when small (perfetto / chrome://tracing)
            (ctx.out / "profiles").mkdir(exist_ok=True)
            shutil.copy(trace, ctx.out / "profiles" / f"{name}.trace.json.gz")
            row["trace"] = f"profiles/{name}.trace.json.gz"
        else:
            row["trace"] = f"not kept ({trace.stat().st_size / 2**20:.0f} MiB)"
        log.info(f"profile {name} ({trigger}), {row['where']}, {row['total_ms']:.1f} ms in {row['events']} events; "
                 "top ops:\n" + "\n".join(f"    {o['share']:6.1%} {o['total_ms']:10.2f} ms  x{o['count']:<5d} {o['name']}"
                                        for o in row["top_ops"])
                 + "\n  by kind: " + ", ".join(f"{k['kind']} {k['share']:.0%}" for k in row["by_kind"]))
    except Exception as e:  # noqa: BLE001
        ctx.fail(row, e)
    ctx.save()


def section_profiles(ctx) -> None:
    import jax

    from benchmarks import train_throughput
    sec = ctx.section("profiles", {"targets": TARGETS, "forced": bool(ctx.args.force_profiles)})
    force = ctx.args.force_profiles
    if ctx.best_train_configs:   # the target is ViT-L/8's: its best row (G/8's only when L/8 has none)
        l8 = [t for t in ctx.best_train_configs if "L/8" in t[1]] or ctx.best_train_configs
        mfu, name, cfg = max(l8, key=lambda t: t[0])
        if force or mfu < TARGETS["train_mfu"]:
            _profile(ctx, sec, "train", f"best {name} MFU {_pct(mfu)} (target {_pct(TARGETS['train_mfu'])}): "
                     f"remat {cfg.model.remat}, attention {cfg.model.attention or 'xla'}, batch {cfg.data.batch_size}; "
                     "trace of train_throughput.measure(config, 2): init, 2 warm-up and 2 timed steps",
                     lambda: train_throughput.measure(cfg, 2))
    if ctx.infer_fns:
        of_peak, attention, compiled, state, images, mesh, rules = max(ctx.infer_fns, key=lambda t: t[0])
        if force or of_peak < TARGETS["inference_of_peak"]:
            from maejax import sharding as shd

            def run():
                with shd.activate(mesh, rules):
                    jax.block_until_ready([compiled(state, images) for _ in range(3)])
            _profile(ctx, sec, "inference", f"{attention}: {_pct(of_peak)} of peak (target "
                     f"{_pct(TARGETS['inference_of_peak'])})", run)
    sweep = ctx.doc["sections"].get("map_sweep", {})
    if ctx.sweep_inputs is not None and (force or sweep.get("sweep_s", 0) >= TARGETS["sweep_s"]):
        from benchmarks import map_sweep_speed as mb
        _profile(ctx, sec, "map_sweep", f"sweep {sweep.get('sweep_s', float('nan')):.1f} s (target "
                 f"< {TARGETS['sweep_s']:.0f} s): one block, host stages", lambda: mb.run_ours(*ctx.sweep_inputs, backend="jax"),
                 python=True)


# --- driver ---------------------------------------------------------------------------------------------

class Context:
    def __init__(self, args, plan: Plan, out: Path, results: Results, budget: Budget):
        self.args, self.plan, self.out, self.results, self.budget = args, plan, out, results, budget
        self.tmp = Path(tempfile.mkdtemp(prefix="device_proof_"))   # compilation cache, traces, tables
        self.doc = results.doc
        self.dry = args.dry_run
        self.deadline = budget.deadline
        self.compile_s: dict[str, float] = {}
        self.best_train_configs: list = []
        self.infer_fns: list = []
        self.sweep_inputs = None
        self.cudnn = False
        self.capacity, self.capacity_source = 0, ""
        self.peak, self.peak_source, self.peak_note = None, "", ""

    def section(self, name: str, init: dict) -> dict:
        sec = self.doc["sections"].setdefault(name, {})
        sec.update(init)
        sec["deadline_s"] = self.deadline - self.budget.start
        self.save()
        return sec

    def row(self, sec: dict, init: dict) -> dict:
        row = {"status": "running", **init}
        sec.setdefault("rows", []).append(row)
        self.save()
        return row

    def skip(self, row: dict, why: str) -> dict:
        row["status"], row["error"] = "skipped", why
        log.info(f"  skipped: {why}")
        self.save()
        return row

    def fail(self, row: dict, e: BaseException) -> None:
        row["status"] = "oom" if is_oom(e) else "error"
        row["error"] = short(e, 600)
        log.info(f"  failed: {short(e, 600)}\n{traceback.format_exc(limit=8)}")
        self.save()

    def time_left(self, need: float = 0.0) -> bool:
        return time.perf_counter() + need <= self.deadline

    def save(self) -> None:
        self.doc["elapsed_s"] = self.budget.elapsed()
        self.results.save()


def apply_gpu_flags() -> str:
    """launch/gpu_flags.sh's environment (the launchers' XLA flags, XLA_PYTHON_CLIENT_MEM_FRACTION=0.92), set
    before jax creates its GPU client. XLA aborts the process on a flag its version does not know, so a
    child process tries them first; without them only the memory share is kept."""
    from benchmarks import train_throughput
    try:
        flags = train_throughput.gpu_env()
    except Exception as e:  # noqa: BLE001
        return f"not applied: {short(e)}"
    try:
        probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].device_kind)"],
                               env={**os.environ, **flags}, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as e:
        probe = subprocess.CompletedProcess(e.cmd, -1, "", "timed out after 180 s")
    if probe.returncode == 0:
        os.environ.update(flags)
        return "applied: " + " ".join(f"{k}={v.strip()}" for k, v in flags.items())
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = flags.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    return (f"XLA flags dropped (a jax with them exited {probe.returncode}: "
            f"{' '.join(probe.stderr.split())[-400:]}); XLA_PYTHON_CLIENT_MEM_FRACTION kept")


def parse_args(argv):
    from maejax import flags
    p = flags.ArgumentParser(description=__doc__.split("\n\n")[0],
                             formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for device_proof.json, device_proof.log and traces")
    p.add_argument("--dry_run", action="store_true", help="CPU, tiny shapes, the same code paths")
    p.add_argument("--budget_s", type=float, default=0.0,
                   help="time budget of all sections together (default 480; a dry run 900: a loaded CPU "
                        "compiles slowly, and the dry run is there to run every path)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list from {','.join(SECTIONS)}")
    p.add_argument("--remats", default="", help="ViT-L/8 remat policies, in order (default full,dots,none; "
                   "a dry run: full, as every other policy is one more ~8-25 s CPU compile)")
    p.add_argument("--attentions", default="xla,cudnn", help="attention implementations, in order")
    p.add_argument("--capacity_gib", type=float, default=0.0,
                   help="device memory for the batch search (default: the allocator's limit)")
    p.add_argument("--headroom", type=float, default=0.95, help="fraction of the memory a step may plan to use")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="peak per device (default: maejax.mfu's table)")
    p.add_argument("--annotations", default="", help="EFAAR relationship tables (default ../shared/reference/"
                   "efaar_annotations; synthetic stand-ins when absent)")
    p.add_argument("--sweep_fresh_blocks", action="store_true", help="generate new embeddings for every block")
    p.add_argument("--force_profiles", action="store_true", help="profile even where a target is met")
    p.add_argument("--no_gpu_flags", action="store_true", help="do not source launch/gpu_flags.sh's environment")
    p.add_argument("--hard_stop_s", type=float, default=75.0,
                   help="seconds past the budget after which the script writes what it has and exits")
    args = p.parse_args(argv)
    args.budget_s = args.budget_s or (900.0 if args.dry_run else 480.0)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out / "device_proof.log")
    if args.dry_run:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        args.force_profiles = True
        args.capacity_gib = args.capacity_gib or 0.02   # small: the search halves as well as doubles
    gpu_flags = "not applied (dry run)" if args.dry_run else "not applied (--no_gpu_flags)"
    if not args.dry_run and not args.no_gpu_flags:
        gpu_flags = apply_gpu_flags()
    plan = DRY if args.dry_run else FULL
    sections = [s for s in SECTIONS if s in args.sections.split(",")]
    budget = Budget(args.budget_s, sections)
    doc = {"issue": 14, "dry_run": args.dry_run, "argv": sys.argv[1:] if argv is None else list(argv),
           "budget_s": args.budget_s, "targets": TARGETS, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "gpu_flags": gpu_flags, "environment": {}, "sections": {}, "elapsed_s": 0.0}
    results = Results(out / "device_proof.json", doc)

    def hard_stop():
        doc["aborted"] = f"hard stop at {budget.elapsed():.0f} s (budget {args.budget_s:.0f} s + {args.hard_stop_s:.0f} s)"
        log.info(doc["aborted"])
        results.save()
        logging.shutdown()
        os._exit(3)
    timer = threading.Timer(args.budget_s + args.hard_stop_s, hard_stop)
    timer.daemon = True
    timer.start()

    ctx = Context(args, plan, out, results, budget)
    try:
        import jax
        doc["environment"] = environment(args)
        try:   # the batch search compiles each step once; train_throughput.measure compiles it again: a hit
            jax.config.update("jax_compilation_cache_dir", str(ctx.tmp / "jax_cache"))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
            doc["environment"]["compilation_cache"] = str(ctx.tmp / "jax_cache")
        except Exception as e:  # noqa: BLE001 - only slower without it
            doc["environment"]["compilation_cache"] = f"off: {short(e)}"
        ctx.cudnn = cudnn_available()
        try:
            ctx.capacity, ctx.capacity_source = device_capacity(args)
        except Exception as e:  # noqa: BLE001 - only the training rows need it
            ctx.capacity, ctx.capacity_source = None, short(e)
        ctx.peak, ctx.peak_source = peak_flops(args, args.dry_run)
        ctx.peak_note = "" if "table" in ctx.peak_source or "--peak" in ctx.peak_source else " (of a measured matmul)"
        doc["environment"].update(capacity_bytes=ctx.capacity, capacity_source=ctx.capacity_source,
                                  peak_flops=ctx.peak, peak_source=ctx.peak_source, cudnn_attention=ctx.cudnn)
        env = doc["environment"]
        log.info(f"device proof{' (dry run)' if args.dry_run else ''}: {env['device_count']} x {env['device_kind']} "
                 f"({env['platform']}), jax {env['modules'].get('jax')}, python {env['python']}; memory for the "
                 f"batch search {gib(ctx.capacity) if ctx.capacity else 'unknown'} ({ctx.capacity_source}); peak "
                 f"{(ctx.peak or 0) / 1e12:.4g} TFLOP/s ({ctx.peak_source}); budget {args.budget_s:.0f} s")
        results.save()
    except Exception as e:  # noqa: BLE001 - without a device nothing else can run
        doc["error"] = short(e, 1000)
        log.info(f"set-up failed: {short(e, 1000)}\n{traceback.format_exc()}")
        results.save()
        shutil.rmtree(ctx.tmp, ignore_errors=True)
        return doc

    remats = [r for r in (args.remats or ("full" if args.dry_run else "full,dots,none")).split(",") if r]
    attentions = [a for a in args.attentions.split(",") if a]
    runners = {
        "parity": lambda: section_parity(ctx),
        "train_l8": lambda: section_train(ctx, "train_l8", "ViT-L/8 MAE", "L8", remats, attentions,
                                          lambda r: plan.l8_start.get(r, 64), plan.max_batch, plan.train_overrides),
        "train_g8": lambda: section_train(ctx, "train_g8", "ViT-G/8 MAE", "G8", ["full"], attentions,
                                          lambda r: plan.g8_start, plan.g8_max_batch, plan.g8_overrides),
        "inference": lambda: section_inference(ctx),
        "map_sweep": lambda: section_sweep(ctx),
        "profiles": lambda: section_profiles(ctx),
    }
    for name in sections:
        ctx.deadline = budget.open(name)
        t = time.perf_counter()
        log.info(f"== {name}: {ctx.deadline - t:.0f} s of budget (elapsed {budget.elapsed():.0f} s)")
        try:
            runners[name]()
        except Exception as e:  # noqa: BLE001 - a section's own failure; the next one still runs
            ctx.fail(doc["sections"].setdefault(name, {}), e)
        doc["sections"].setdefault(name, {})["section_s"] = time.perf_counter() - t
        ctx.save()
    timer.cancel()
    shutil.rmtree(ctx.tmp, ignore_errors=True)
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    ctx.save()
    log.info(f"done in {budget.elapsed():.0f} s: {out / 'device_proof.json'}")
    return doc


if __name__ == "__main__":
    main()
