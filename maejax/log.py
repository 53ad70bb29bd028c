"""Messages of the commands that run on every host (the trainer, the embedding job): absl logging, to
stderr in absl's format. Process 0 logs INFO and above; every other process WARNING and above (a
preemption, an error), so a job of many hosts says each thing once. Other libraries' INFO (orbax logs
every checkpoint save) is left out unless the command is given absl's --verbosity.

Library code logs with `from absl import logging`; a command's main calls `setup()` once, after
`maejax.distributed.initialize()`. Results a command prints as its output (tables, JSON lines, one-line
errors on stderr) stay prints."""
from __future__ import annotations

import logging as std_logging
import os

from absl import flags, logging

# This project's code: INFO records from elsewhere are dropped unless --verbosity asks for them.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN = tuple(os.path.join(_ROOT, p) + os.sep for p in ("maejax", "eval", "data", "benchmarks", "configs", "launch"))


class _Filter(std_logging.Filter):
    def __init__(self, process_index: int, everything: bool):
        super().__init__()
        self.process_index, self.everything = process_index, everything

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.WARNING:
            return True
        if self.process_index != 0:
            return False
        return self.everything or os.path.abspath(record.pathname).startswith(_OWN)


def setup(process_index: int | None = None) -> None:
    """absl's handler on the root logger at INFO (or at the --verbosity given), with the filter above.
    `process_index` defaults to jax.process_index() (so call it after jax.distributed is initialised)."""
    import jax
    if process_index is None:
        process_index = jax.process_index()
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()    # argparse commands: absl would warn about logging before flag parsing
    verbosity_given = flags.FLAGS["verbosity"].present
    logging.use_absl_handler()
    if not verbosity_given:
        logging.set_verbosity(logging.INFO)
    handler = logging.get_absl_handler()
    for f in [f for f in handler.filters if isinstance(f, _Filter)]:
        handler.removeFilter(f)
    handler.addFilter(_Filter(process_index, everything=bool(verbosity_given)))
    if jax.process_count() > 1:
        logging.info("process %d of %d: %d local of %d devices", process_index, jax.process_count(),
                     jax.local_device_count(), jax.device_count())
