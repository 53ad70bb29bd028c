"""What the benchmarks measure with: this process's resident memory, an iterator's steady-state rate, and
the figures they write as JSON (`--json FILE`)."""
from __future__ import annotations

import json
import resource
import time


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS counter for this process (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mib(field: str = "VmHWM") -> float:
    """Current (VmRSS) or peak since the last reset (VmHWM) resident memory, MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def iterator_rate(iterator, batch_size: int, warmup: int, *, seconds: float | None = None,
                  batches: int | None = None) -> dict[str, float]:
    """Time to the first batch, then the steady-state rate after `warmup` batches, over `batches` batches
    or for `seconds`; closes the iterator."""
    start = time.perf_counter()
    next(iterator)
    first = time.perf_counter() - start
    for _ in range(warmup):
        next(iterator)
    start, n = time.perf_counter(), 0
    while (n < batches) if batches is not None else (time.perf_counter() - start < seconds):
        next(iterator)
        n += 1
    rate = n / (time.perf_counter() - start)
    iterator.close()
    return {"first_batch_s": first, "batches_per_s": rate, "crops_per_s": rate * batch_size}


def write_json(path: str | None, figures: dict) -> dict:
    """Writes a benchmark's figures to `path` (its --json FILE), when one is given; returns them."""
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=1)
    return figures
