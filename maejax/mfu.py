"""Model FLOP utilisation: analytic model FLOPs per second per device over the device's peak.

Peaks are dense bf16 matmul FLOP/s per jax device from the vendors' data sheets (no sparsity). A TPU v3
jax device is one TensorCore (half a chip); from v4 on a device is a chip.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# (substring of device_kind, lower case) -> peak FLOP/s; the first match wins, so specific names go first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),      # SXM (device_kind "NVIDIA H100 80GB HBM3")
    ("gh200", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
    ("l4", 121e12),
    ("tpu v3", 61.5e12),   # per TensorCore (123e12 per chip)
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),   # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),        # v5p reports "TPU v5"
    ("tpu v6 lite", 918e12),   # v6e (Trillium)
    ("tpu v6e", 918e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this kind; None when unknown (CPUs and unlisted chips)."""
    kind = device_kind.lower()
    for key, flops in PEAK_FLOPS:
        if key in kind:
            return flops
    return None


def device_peak(override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of this job's devices: the override (TFLOP/s) when given, else the table's."""
    if override_tflops:
        return float(override_tflops) * 1e12
    return peak_flops(jax.devices()[0].device_kind)


def throughput(flops_per_example: float, examples: int, seconds: float, num_devices: int,
               peak: float | None) -> dict[str, float]:
    """examples/s, per-device TFLOP/s and (when the peak is known) MFU for `examples` done in `seconds`."""
    per_device = flops_per_example * examples / seconds / num_devices
    out = {"examples_per_s": examples / seconds, "tflops_per_device": per_device / 1e12}
    if peak:
        out["mfu"] = per_device / peak
    return out


def measure_matmul_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """FLOP/s of an n x n matmul on the default device: a measured reference where no peak is listed (CPU)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best
