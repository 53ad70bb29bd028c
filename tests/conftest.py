"""Test set-up: 8 fake CPU devices for sharding tests (set before jax is imported anywhere), and the
location of the shared reference files."""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_REFERENCE = REPO.parent / "shared" / "reference"


def reference_dir(name: str) -> pathlib.Path:
    """A folder of ../shared/reference, or skip the test with the reason."""
    path = SHARED_REFERENCE / name
    if not path.is_dir():
        pytest.skip(f"reference folder {path} is absent (it ships beside the repo as ../shared/reference)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _absl_flags_parsed():
    # grain worker processes read absl flags, which pytest never parses (grain#1355).
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
