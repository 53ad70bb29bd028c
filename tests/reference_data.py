"""Paths to the read-only reference material next to the repo (../shared/reference), for tests.

Tests that need it call `require(...)`, which skips with the reason when the folder is absent
(e.g. a checkout without the shared notes)."""
from __future__ import annotations

from pathlib import Path

import pytest

REFERENCE = (Path(__file__).resolve().parents[1] / ".." / "shared" / "reference").resolve()
ANNOTATIONS = REFERENCE / "efaar_annotations"
GOLDEN = REFERENCE / "efaar_golden"
OPENPHENOM = REFERENCE / "openphenom_small"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data {path} not present (expected ../shared/reference next to the repo)")
    return path
