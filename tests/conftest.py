"""Test set-up: 8 fake CPU devices for sharding tests (set before jax is imported anywhere).
Reference files beside the repo: tests/reference_data.py."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _absl_flags_parsed():
    # grain worker processes read absl flags, which pytest never parses (grain#1355).
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
