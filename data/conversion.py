"""16-bit (and illumination-corrected) channel images to uint8: the documented, configurable rule.

Crop records hold uint8, so every channel that does not decode to uint8 (16-bit TIFF/PNG/JPEG-2000,
or any channel divided by an illumination function) is mapped linearly with per-channel levels:

    uint8 = round(255 * clip((x - low) / (high - low), 0, 1))

Rules (`ConversionRule.kind`):
- "percentile" (default): for each plate and channel, low and high are the `low`-th and `high`-th
  percentiles (default 0.1 and 99.9) of pixels sampled from `sample_sites` sites of the plate (default
  16), `sample_pixels` pixels per site and channel (default 65,536). Sites and pixels are drawn from a
  generator seeded with (seed, plate), so the levels are deterministic. Per-plate levels take out
  plate-to-plate exposure differences while keeping the within-plate differences EFAAR corrects.
- "fixed": low and high are the given values for every plate (e.g. 0 and 65535, a plain rescale).

8-bit channels pass through unchanged. The rule goes into the manifest (`conversion`) and the
per-plate levels into `conversion.json`, so a dataset says exactly how its pixels were made.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

LEVELS_FILE = "conversion.json"
FORMULA = "uint8 = round(255 * clip((x - low) / (high - low), 0, 1))"


@dataclasses.dataclass(frozen=True)
class ConversionRule:
    kind: str = "percentile"   # "percentile" (per plate and channel) or "fixed"
    low: float = 0.1           # percentile (kind="percentile") or value (kind="fixed") mapped to 0
    high: float = 99.9         # ... mapped to 255
    sample_sites: int = 16     # per plate (percentile)
    sample_pixels: int = 65536  # per site and channel (percentile)

    def validate(self) -> None:
        if self.kind not in ("percentile", "fixed"):
            raise ValueError(f"conversion kind must be 'percentile' or 'fixed', got {self.kind!r}")
        if not self.low < self.high:
            raise ValueError(f"conversion needs low < high, got {self.low}, {self.high}")
        if self.kind == "percentile" and not 0 <= self.low < self.high <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.low}, {self.high}")
        if min(self.sample_sites, self.sample_pixels) < 1:
            raise ValueError("sample_sites and sample_pixels must be >= 1")

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "formula": FORMULA, "applies_to": "channels that do not decode to uint8"}


def needs_conversion(dtype: str) -> bool:
    return dtype != "uint8"


def to_uint8(image: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (image.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


def percentile_levels(
    num_sites: int,
    read: Callable[[int], list[np.ndarray] | None],
    channels: Sequence[int],
    rule: ConversionRule,
    rng: np.random.Generator,
) -> list[tuple[float, float]] | None:
    """Per-channel (low, high) of one plate from a seeded sample of its sites.

    read(i): the channel images of the plate's i-th site, or None when it is bad (bad sites are
    replaced by the next one in the seeded order; the shard pass reports them). channels: the
    channel indices to compute levels for. Returns None when no site of the plate can be read.
    """
    pixels: list[list[np.ndarray]] = [[] for _ in channels]
    used = 0
    for i in rng.permutation(num_sites):
        if used == rule.sample_sites:
            break
        images = read(int(i))
        if images is None:
            continue
        used += 1
        for slot, c in enumerate(channels):
            flat = images[c].reshape(-1)
            pixels[slot].append(flat[rng.integers(0, flat.size, rule.sample_pixels)])
    if not used:
        return None
    levels = []
    for sample in pixels:
        low, high = np.percentile(np.concatenate(sample).astype(np.float64), [rule.low, rule.high])
        levels.append((float(low), float(high) if high > low else float(low) + 1.0))  # flat channel
    return levels
