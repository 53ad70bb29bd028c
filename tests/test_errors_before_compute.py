"""Bad parallelism or config settings fail with an error naming the setting, before anything is computed
(the work directory is created only after every check has passed)."""
import subprocess
import sys

import pytest

from maejax import sharding as shd
from maejax.train import train
from tests.tiny_training import CONFIG, REPO, subprocess_env, tiny_config


def run_expecting(tmp_path, error, match, **overrides):
    workdir = tmp_path / "run"
    with pytest.raises(error, match=match):
        train(tiny_config(tmp_path / "no-dataset-needed", **overrides), str(workdir))
    assert not workdir.exists(), "the error came after the run had started"


def test_mesh_that_does_not_fit_the_devices(tmp_path):
    run_expecting(tmp_path, shd.MeshError, r"needs 12 devices, but there are 8",
                  **{"mesh.data": 3, "mesh.fsdp": 4})
    run_expecting(tmp_path, shd.MeshError, r"fixed axes \(3\) do not divide the 8 devices",
                  **{"mesh.data": -1, "mesh.fsdp": 3})


def test_hybrid_mesh_needs_as_many_granules_as_the_dcn_axes(tmp_path):
    run_expecting(tmp_path, shd.MeshError, r"needs 2 granules \(process_index values\), but there are 1",
                  **{"mesh.dcn_data": 2})


def test_batch_not_divisible_by_the_data_parallel_size(tmp_path):
    run_expecting(tmp_path, ValueError, r"data.batch_size=12 is not divisible by the data-parallel size 8",
                  **{"mesh.data": 8, "data.batch_size": 12})
    run_expecting(tmp_path, ValueError, r"microbatch 4 .* not divisible by the data-parallel size 8",
                  **{"mesh.data": 8, "data.batch_size": 16, "optim.grad_accum_steps": 4})
    run_expecting(tmp_path, ValueError, r"data.batch_size=8 is not divisible by optim.grad_accum_steps=3",
                  **{"optim.grad_accum_steps": 3})


def test_heads_not_divisible_by_the_tensor_axis(tmp_path):
    # mu/8 has 2 heads (decoder: 2); 4-way tensor parallelism cannot split them.
    run_expecting(tmp_path, shd.MeshError,
                  r"dimension \d \('heads'\) of size 2 cannot be split over mesh axes tensor=4",
                  **{"mesh.data": 2, "mesh.tensor": 4})


def test_width_not_divisible_by_fsdp(tmp_path):
    run_expecting(tmp_path, shd.MeshError,
                  r"decoder/.*\('embed'\) of size 36 cannot be split over mesh axes fsdp=8",
                  **{"mesh.data": 1, "mesh.fsdp": 8, "model.decoder_width": 36})


def test_unknown_key_in_a_config_file(tmp_path):
    config = tiny_config(tmp_path)
    with config.unlocked():
        config.optim.lrr = 1e-3
    with pytest.raises(KeyError, match="unknown config key 'optim.lrr'"):
        train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_unknown_key_on_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "maejax.train", f"--config={CONFIG}", f"--workdir={tmp_path}/run",
                          "--config.optim.lrr=1"], cwd=REPO, env=subprocess_env(1), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert "unknown config key 'optim.lrr'" in out.stderr and "did you mean optim.lr?" in out.stderr
    assert not (tmp_path / "run").exists()

