"""Worker processes for CPU-heavy loops (dataset builds, screen rendering, CellProfiler features).

One rule for all of them: spawned, not forked (callers may have started jax or threads, which do not
survive a fork); each worker dies with the process that started it (`die_with_parent`), so a killed build
leaves nothing running that keeps writing into its folder; and a pool is only worth starting when every
worker gets at least MIN_CHUNKS_PER_WORKER chunks (a spawned worker costs seconds to import).
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent import futures

MIN_CHUNKS_PER_WORKER = 8
PR_SET_PDEATHSIG = 1   # <linux/prctl.h>


def pool_size(workers: int, num_chunks: int) -> int:
    """Workers worth spawning for `num_chunks` chunks (<= 1: run in this process)."""
    return min(workers, num_chunks // MIN_CHUNKS_PER_WORKER, os.cpu_count() or 1)


def spawn_pool(workers: int, initializer=None, initargs: tuple = ()) -> futures.ProcessPoolExecutor:
    """A pool of `workers` spawned processes that die with this one; `initializer(*initargs)` runs in each
    after `die_with_parent`."""
    return futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init, initargs=(os.getpid(), initializer, initargs))


def _init(parent_pid: int, initializer, initargs: tuple) -> None:
    die_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)


def die_with_parent(parent_pid: int, poll_seconds: float = 1.0) -> str:
    """Ends this process as soon as its parent `parent_pid` is gone; call it first in a worker initializer.

    Linux: prctl(PR_SET_PDEATHSIG, SIGKILL) through ctypes: the kernel kills the worker the moment its
    parent dies, whatever the worker is doing (blocked in a read, busy in C code holding the GIL), and
    nothing needs to keep running for it. SIGKILL, not SIGTERM: a worker has nothing to clean up that a
    re-run does not (a killed shard is a `.tmp` file the next run deletes), and no library handler can
    catch or delay it. Caveat of the kernel mechanism: the signal follows the parent *thread* that
    spawned the worker; pools here are created, used and shut down by one thread. The check of
    getppid() after prctl covers a parent that died while the worker was starting.
    Elsewhere (no prctl): a daemon thread that polls os.getppid() every `poll_seconds` and exits the
    process with os._exit(1) when the parent changed. Returns "prctl" or "watchdog".
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != parent_pid:   # the parent died before the signal was armed
                os._exit(1)
            return "prctl"

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
    return "watchdog"
