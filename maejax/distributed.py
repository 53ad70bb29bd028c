"""Joining a multi-process job, from the environment the launcher set up; and preemption notices.

One process per host (TPU VM worker, GPU node) or per GPU. `initialize()` must run before anything else
touches jax devices; it picks, in order:

- explicit: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID (any cluster, and the
  local multi-process launcher); optional JAX_LOCAL_DEVICE_IDS=0,1,... (read by jax itself);
- SLURM: SLURM_JOB_ID with more than one task. jax reads the node list and task ids; the GPUs a process
  drives are set here, since jax's default (the GPU numbered like the task's local id) is right only for
  one task per GPU that sees all of the node's GPUs: one task per node drives all its GPUs, a task bound
  to one GPU (`--gpus-per-task=1`) drives that one;
- TPU: MAEJAX_DISTRIBUTED=1 (set by launch/tpu_pod.sh on every worker; jax finds the coordinator from
  the TPU metadata), or MEGASCALE_COORDINATOR_ADDRESS (multi-slice);
- otherwise a single process. MAEJAX_DISTRIBUTED=0 forces that.

On CPU, cross-process collectives use gloo, jax 0.10's default (`jax_cpu_collectives_implementation`).
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Mapping

import jax


def plan(env: Mapping[str, str]) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize` the environment asks for (None: single
    process). Raises ValueError for a half-specified explicit set-up."""
    if env.get("MAEJAX_DISTRIBUTED") == "0":
        return None
    explicit = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    given = [k for k in explicit if env.get(k)]
    if given:
        missing = [k for k in explicit if not env.get(k)]
        if missing:
            raise ValueError(f"multi-process launch: {given} are set but {missing} are not; set all three")
        n, i = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        if not 0 <= i < n:
            raise ValueError(f"JAX_PROCESS_ID={i} is not in [0, JAX_NUM_PROCESSES={n})")
        return dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=n, process_id=i)
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1:
        return _slurm_devices(env)
    if env.get("MAEJAX_DISTRIBUTED") == "1" or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return {}
    return None


def _slurm_devices(env: Mapping[str, str]) -> dict:
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    gpus = len(visible) or int(env.get("SLURM_GPUS_ON_NODE", "0") or 0)
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")))
    if gpus and tasks == nodes:          # one task per node: all of its GPUs
        return {"local_device_ids": list(range(gpus))}
    if len(visible) == 1:                # a task bound to its own GPU sees it as device 0
        return {"local_device_ids": [0]}
    return {}                            # one task per GPU, all GPUs visible: jax binds local id -> GPU


def initialize(env: Mapping[str, str] | None = None) -> None:
    """Initialises jax.distributed when the environment describes a multi-process job (see module doc)."""
    kwargs = plan(os.environ if env is None else env)
    if kwargs is None or jax.distributed.is_initialized():
        return
    jax.distributed.initialize(**kwargs)   # maejax.log.setup then logs the process and device counts


class PreemptionNotice:
    """Answers, at each step boundary, whether to save and stop because the job is being preempted.

    Multi-process: jax's preemption service (it catches SIGTERM on any process and agrees with all of them
    on one step to stop at), so every process saves the same step. Single process: a SIGTERM handler that
    sets a flag; the previous handler is put back by `close()`.
    """

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        self._service = jax.process_count() > 1 and _preemption_service_running()
        if not self._service and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._flag.set())

    def reached(self, step: int) -> bool:
        """Call once per step (every process, the same steps), after the step has been dispatched."""
        if self._service:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _preemption_service_running() -> bool:
    from jax._src import distributed as jax_distributed  # no public accessor for the service
    return jax_distributed.global_state.preemption_sync_manager is not None
