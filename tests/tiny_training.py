"""Helpers for the training tests: a tiny dataset, the tiny config, and trainer runs in subprocesses."""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f"{REPO}/configs/mae_synthetic.py:preset=tiny"


def write_tiny_dataset(out_dir, *, num_records: int = 64, size: int = 40, channels: int = 6, seed: int = 0):
    """Random uint8 crops over 4 perturbations (one a control), larger than the 32 px training crop."""
    from data.arrayrecord_writer import write_dataset
    rng = np.random.default_rng(seed)

    def examples():
        for i in range(num_records):
            meta = dict(experiment=f"exp{i % 2}", plate="p1", well=f"A{i % 8:02d}", site=i % 4, tile=0,
                        perturbation=["non-targeting", "g1", "g2", "g3"][i % 4], is_control=i % 4 == 0)
            yield rng.integers(0, 256, (channels, size, size), dtype=np.uint8), meta

    return write_dataset(out_dir, examples(), name="tiny-test", source="tests",
                         channels=[f"c{k}" for k in range(channels)], num_shards=2)


def tiny_config(data_dir, **overrides):
    """The `tiny` preset (mu/8 MAE, batch 8, 32 px crops) with {"section.key": value} overrides; its train
    step compiled at LLVM optimisation level 0, like the subprocess runs (`subprocess_env`)."""
    from maejax import config as config_lib
    overrides = {"data.dir": str(data_dir), "data.streams": 2, "log_every": 1,
                 "xla_backend_optimization_level": 0, **overrides}
    return config_lib.load(CONFIG, overrides)


def cli_args(workdir, overrides: dict) -> list[str]:
    return [sys.executable, "-m", "maejax.train", f"--config={CONFIG}", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in overrides.items()]]


def subprocess_env(devices: int, **extra) -> dict[str, str]:
    # LLVM optimisation level 0: the tiny model compiles ~40% faster; every run of a test uses the same flags.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start(workdir, overrides: dict, *, devices: int = 8, log=None, **env) -> subprocess.Popen:
    """Starts the trainer CLI in a subprocess (stdout+stderr to `log`, default <workdir>.log)."""
    log = open(log or f"{workdir}.log", "w")
    return subprocess.Popen(cli_args(workdir, overrides), cwd=REPO, env=subprocess_env(devices, **env),
                            stdout=log, stderr=subprocess.STDOUT)


def jsonl_rows(path) -> list[dict]:
    """The rows of a JSON-lines file such as <workdir>/metrics.jsonl (blank lines skipped)."""
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def losses(workdir) -> dict[int, float]:
    """step -> loss from <workdir>/metrics.jsonl (the last row wins when a resumed run repeats a step)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return {r["step"]: r["loss"] for r in jsonl_rows(path)} if path.exists() else {}


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str, log=None) -> None:
    """Polls `predicate()` until true; fails if the process exits or the time runs out."""
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited (rc={proc.returncode}) before {what}:\n{_tail(log)}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{_tail(log)}")
        time.sleep(0.05)


def _tail(log) -> str:
    return pathlib.Path(log).read_text()[-3000:] if log and pathlib.Path(log).exists() else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steps_saved(workdir):
    """The checkpoint steps in <workdir>/checkpoints."""
    from maejax.checkpoint import Checkpoints
    ckpts = Checkpoints(str(pathlib.Path(workdir) / "checkpoints"))
    try:
        return ckpts.all_steps()
    finally:
        ckpts.close()
