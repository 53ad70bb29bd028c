"""Test set-up: 8 fake CPU devices for sharding tests (set before jax is imported anywhere).
Reference files beside the repo: tests/reference_data.py."""
import os

# LLVM optimisation level 0 for every program the tests compile: compiling is most of the suite's time, and
# level 0 compiles a tiny model about twice as fast (the trainer subprocesses use it too: tiny_training.py).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, in-process tests and the commands they start alike: many
# tests compile the same tiny programs (a trainer resumed in-process recompiles its step; eval embeds the same
# model per dataset), and a cache hit costs milliseconds (the mixture test: 57 s -> 34 s).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="maejax-tests-jax-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _absl_flags_parsed():
    # grain worker processes read absl flags, which pytest never parses (grain#1355).
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@pytest.fixture(autouse=True)
def _logging_as_it_was():
    # A command's main() run in-process sets up absl logging (maejax.log.setup: absl's handler on the root
    # logger, at INFO, writing to the stderr of that moment): each test ends with the logging it began with.
    import logging
    from absl import logging as absl_logging
    root, absl_logger, handler = logging.getLogger(), absl_logging.get_absl_logger(), absl_logging.get_absl_handler()
    had, level, absl_level = handler in root.handlers, root.level, absl_logger.level
    filters, stream = list(handler.filters), handler.python_handler.stream
    yield
    if not had:
        root.removeHandler(handler)
    root.setLevel(level)
    absl_logger.setLevel(absl_level)
    handler.filters[:] = filters
    handler.python_handler.stream = stream
