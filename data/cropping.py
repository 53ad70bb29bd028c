"""Where crops are cut from a site: a regular tiling or seeded random positions."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class CropSpec:
    size: int = 256
    mode: str = "tile"   # "tile": non-overlapping grid, row-major, remainder dropped; "random"
    random_per_site: int = 4  # crops per site in "random" mode

    def validate(self) -> None:
        if self.mode not in ("tile", "random"):
            raise ValueError(f"crop mode must be 'tile' or 'random', got {self.mode!r}")
        if self.size < 1 or self.random_per_site < 1:
            raise ValueError(f"crop size and crops per site must be >= 1, got {self.size}, {self.random_per_site}")

    def positions(self, height: int, width: int, rng: np.random.Generator) -> list[tuple[int, int]]:
        """Top-left corners (y, x); `tile` is the index into this list."""
        s = self.size
        if height < s or width < s:
            raise ValueError(f"a {height}x{width} site is smaller than the {s}x{s} crop")
        if self.mode == "tile":
            return [(r * s, c * s) for r in range(height // s) for c in range(width // s)]
        return [(int(rng.integers(height - s + 1)), int(rng.integers(width - s + 1)))
                for _ in range(self.random_per_site)]

    def count(self, height: int, width: int) -> int:
        return (height // self.size) * (width // self.size) if self.mode == "tile" else self.random_per_site

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

