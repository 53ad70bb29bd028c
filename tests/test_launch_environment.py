"""maejax.distributed.plan: which multi-process set-up each launcher's environment asks for."""
import pytest

from maejax.distributed import plan


def test_single_process_by_default():
    assert plan({}) is None
    assert plan({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None   # one task: nothing to join


def test_explicit_coordinator():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert plan(env) == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
    assert plan(dict(env, MAEJAX_DISTRIBUTED="0")) is None


def test_half_specified_explicit_set_up_is_an_error():
    with pytest.raises(ValueError, match=r"\['JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'\] are not"):
        plan({"JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(ValueError, match="JAX_PROCESS_ID=4 is not in"):
        plan({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "4"})


def test_slurm_and_tpu_are_detected_by_jax():
    assert plan({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) == {}
    assert plan({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "2"}) == {}
    assert plan({"MAEJAX_DISTRIBUTED": "1"}) == {}
    assert plan({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}) == {}
