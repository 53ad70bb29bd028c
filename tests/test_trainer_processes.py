"""Real trainer processes (`python -m maejax.train`, tiny preset, 32 px crops, 8 fake CPU devices, mesh
data 2 x fsdp 2 x tensor 2, 2 input streams) against one uninterrupted reference run:

- two processes over loopback (4 devices each, hybrid mesh with the data axis across processes) give the
  reference's losses; a SIGTERM to one of them makes both save the same step and stop; they resume;
- one process stopped by SIGTERM (preemption) or SIGKILL resumes with the reference's losses;
- a half-written checkpoint is never used, and a checkpoint resumes on 4 devices and another mesh;
- a NaN stops the run naming the step and the last good checkpoint, in one line;
- after a SIGKILL and a resume, metrics.jsonl holds each step once.

The runs share a persistent compilation cache, so only the first run of each program pays the compile.
"""
import os
import shutil
import signal

import numpy as np
import pytest

from maejax.train import PREEMPTED_EXIT_CODE
from tests import tiny_training as tt

STEPS = 10
RUN = {"total_steps": STEPS, "ckpt_every": 2, "keep_ckpts": 3, "log_every": 1, "data.streams": 2,
       "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    dataset = tt.write_tiny_dataset(root / "dataset")
    env = dict(JAX_COMPILATION_CACHE_DIR=root / "jax-cache", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0,
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0)
    return root, dict(RUN, **{"data.dir": dataset}), env


def start(setup, name, devices=8, **overrides):
    root, run, env = setup
    workdir = root / name
    return workdir, tt.start(workdir, dict(run, **overrides), devices=devices, **env)


def finish(proc, workdir, timeout=300, rc=0):
    assert proc.wait(timeout=timeout) == rc, open(f"{workdir}.log").read()[-3000:]


@pytest.fixture(scope="module")
def reference(setup):
    workdir, proc = start(setup, "reference")
    finish(proc, workdir, timeout=300)
    return tt.losses(workdir)


def assert_same_losses(got, want, rtol=1e-6):
    steps = sorted(want)
    assert sorted(got) == steps
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=rtol)


def test_uninterrupted_run_reports_and_keeps_the_last_three_checkpoints(setup, reference):
    workdir = setup[0] / "reference"
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert all(np.isfinite(list(reference.values())))
    assert tt.steps_saved(workdir) == [6, 8, 10]   # saved every 2 steps, the last 3 kept
    log = open(f"{workdir}.log").read()
    assert log.index("per-device memory: peak") < log.index("step 1/")   # memory analysis before step 1
    row = tt.jsonl_rows(workdir / "metrics.jsonl")[-1]
    assert {"loss", "lr", "grad_norm", "step_time_s", "examples_per_s", "tflops_per_device"} <= set(row)
    assert "mfu" not in row   # a CPU has no peak in maejax.mfu


def test_sigterm_saves_at_the_next_step_and_the_resumed_run_matches(setup, reference):
    workdir, proc = start(setup, "sigterm")
    tt.wait_for(lambda: len(tt.losses(workdir)) >= 3, proc, 300, "step 3", f"{workdir}.log")
    proc.send_signal(signal.SIGTERM)
    finish(proc, workdir, rc=PREEMPTED_EXIT_CODE)  # a clean exit, not a kill
    stopped = max(tt.losses(workdir))
    assert 3 <= stopped < STEPS
    log = open(f"{workdir}.log").read()
    assert f"Preemption notice: saved the checkpoint of step {stopped} and stopped" in log
    assert tt.steps_saved(workdir)[-1] == stopped
    _, proc = start(setup, "sigterm")  # resume
    finish(proc, workdir)
    assert_same_losses(tt.losses(workdir), reference)


def test_sigkill_mid_run_then_resume_reproduces_the_losses(setup, reference):
    workdir, proc = start(setup, "sigkill")
    tt.wait_for(lambda: (workdir / "checkpoints" / "6").is_dir() and len(tt.losses(workdir)) >= 7, proc, 300,
                "the checkpoint of step 6 and step 7", f"{workdir}.log")
    proc.kill()
    proc.wait()
    before_kill = tt.losses(workdir)
    _, proc = start(setup, "sigkill")
    finish(proc, workdir)
    after = tt.losses(workdir)
    assert_same_losses(after, reference)
    # Each step once in metrics.jsonl: the rows of the steps after the checkpoint of step 6 were dropped.
    assert [r["step"] for r in tt.jsonl_rows(workdir / "metrics.jsonl")] == list(range(1, STEPS + 1))
    # Steps done before the kill and again after the resume (same data, same masks) agree.
    assert_same_losses({s: after[s] for s in before_kill}, before_kill)


def test_a_half_written_step_is_ignored_and_the_run_resumes_on_four_devices(setup, reference):
    root = setup[0]
    workdir = root / "four-devices"
    shutil.copytree(root / "reference" / "checkpoints", workdir / "checkpoints")
    # Step 10 as a save cut off half-way leaves it: still under orbax's temporary name, an item missing.
    partial = workdir / "checkpoints" / "10.orbax-checkpoint-tmp-1700000000"
    os.rename(workdir / "checkpoints" / "10", partial)
    shutil.rmtree(partial / "optimizer")
    assert tt.steps_saved(workdir) == [6, 8]
    _, proc = start(setup, "four-devices", devices=4, **{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 1})
    finish(proc, workdir)
    assert not partial.exists()   # the trainer's checkpoint manager deleted it
    assert "at step 8" in open(f"{workdir}.log").read()
    # Another mesh sums in another order: equal to float32 rounding, not bit for bit.
    assert_same_losses(tt.losses(workdir), {s: reference[s] for s in (9, 10)}, rtol=1e-5)


def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(setup):
    # lr 1e30: after the first real update the activations overflow and the loss is NaN.
    workdir, proc = start(setup, "nan", **{"optim.lr": 1e30, "ckpt_every": 1})
    rc = proc.wait(timeout=300)
    log = open(f"{workdir}.log").read()
    assert rc != 0
    assert "NonFiniteError: non-finite loss or gradient at step 3" in log, log[-3000:]
    assert f"the last good checkpoint is step 2 in {workdir / 'checkpoints'}" in log
    assert "Traceback" not in log   # one line
    assert tt.steps_saved(workdir) == [1, 2]
    assert not [p for p in os.listdir(workdir / "checkpoints") if "tmp" in p]


def start_two_processes(setup, workdir, port):
    """Two trainer processes with 4 devices each; process 0 logs to <workdir>.log, process 1 to -1.log."""
    root, run, env = setup
    mesh = {"mesh.data": 1, "mesh.dcn_data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    return [tt.start(workdir, dict(run, **mesh), devices=4, log=f"{workdir}{'-1' * i}.log", **env,
                     JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i)
            for i in range(2)]


def test_two_processes_match_one_and_stop_together_on_a_preemption_notice(setup, reference):
    workdir = setup[0] / "two-processes"
    procs = start_two_processes(setup, workdir, tt.free_port())
    tt.wait_for(lambda: len(tt.losses(workdir)) >= 3, procs[0], 300, "step 3", f"{workdir}.log")
    procs[1].send_signal(signal.SIGTERM)   # one host is preempted; both must save the same step
    for i, proc in enumerate(procs):
        finish(proc, f"{workdir}{'-1' * i}", rc=PREEMPTED_EXIT_CODE)
    stopped = max(tt.losses(workdir))
    assert 3 <= stopped < STEPS
    for log in (f"{workdir}.log", f"{workdir}-1.log"):
        assert f"Preemption notice: saved the checkpoint of step {stopped} and stopped" in open(log).read()
    assert "8 cpu devices, 2 processes, 2 input streams" in open(f"{workdir}.log").read()
    procs = start_two_processes(setup, workdir, tt.free_port())
    for i, proc in enumerate(procs):
        finish(proc, f"{workdir}{'-1' * i}")
    # Same SPMD program, collectives over gloo instead of in-process: equal to a few float32 ulps.
    assert_same_losses(tt.losses(workdir), reference, rtol=1e-6)
