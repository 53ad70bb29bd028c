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


def test_slurm_one_task_per_node_drives_all_its_gpus():
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_NNODES": "4",
           "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    assert plan(env) == {"local_device_ids": [0, 1, 2, 3, 4, 5, 6, 7]}
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4"}
    assert plan(env) == {"local_device_ids": [0, 1, 2, 3]}


def test_slurm_one_task_per_gpu():
    bound = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_NNODES": "2", "CUDA_VISIBLE_DEVICES": "5"}
    assert plan(bound) == {"local_device_ids": [0]}          # --gpus-per-task=1: its GPU is device 0
    shared = dict(bound, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    assert plan(shared) == {}                                 # jax binds SLURM_LOCALID's GPU
    assert plan({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "2"}) == {}  # CPU job


def test_tpu_pods_are_detected_by_jax():
    assert plan({"MAEJAX_DISTRIBUTED": "1"}) == {}
    assert plan({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}) == {}
