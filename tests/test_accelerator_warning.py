"""The trainer says loudly when the machine has a GPU or TPU but jax runs on the CPU (maejax/platform_check.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maejax import platform_check as pc

REPO = Path(__file__).resolve().parents[1]


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_gpu_and_tpu_device_files_and_nvidia_smi_are_seen(tmp_path):
    dev = tmp_path / "dev"
    (dev / "vfio").mkdir(parents=True)
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "accel0", "vfio/0", "vfio/vfio"):
        (dev / name).touch()
    smi = _executable(tmp_path / "bin" / "nvidia-smi")
    seen = pc.accelerators_seen(dev=str(dev), path=str(smi.parent))
    assert seen == {
        "gpu": [f"NVIDIA GPU devices {dev}/nvidia0, {dev}/nvidia1", f"nvidia-smi at {smi}"],
        "tpu": [f"TPU devices {dev}/accel0", f"VFIO devices {dev}/vfio/0 (how TPU v5e, v5p and v6e chips appear)"],
    }


def test_a_machine_with_only_control_device_files_has_no_accelerator(tmp_path):
    (tmp_path / "vfio").mkdir()
    for name in ("nvidiactl", "vfio/vfio", "null"):
        (tmp_path / name).touch()
    assert pc.accelerators_seen(dev=str(tmp_path), path=str(tmp_path)) == {}


GPU_SEEN = {"gpu": ["NVIDIA GPU devices /dev/nvidia0"]}


def test_the_warning_names_what_was_seen_why_jax_is_on_the_cpu_and_the_fix():
    msg = pc.unused_accelerator_warning("cpu", None, GPU_SEEN, {"cuda": "CUDA driver version is insufficient",
                                                                 "tpu": "Failed to open libtpu.so"},
                                        ["jax-cuda12-plugin 0.10.2"])
    assert "/dev/nvidia0" in msg
    assert "jax could not start cuda: CUDA driver version is insufficient" in msg
    assert "libtpu" not in msg      # the TPU backend's failure says nothing about this GPU
    assert "pip install -e '.[cuda12]'" in msg and "JAX_PLATFORMS=cpu" in msg


def test_the_warning_says_when_no_accelerator_build_of_jax_is_installed():
    msg = pc.unused_accelerator_warning("cpu", None, {"tpu": ["TPU devices /dev/accel0"]}, {}, [])
    assert "no TPU build of jax is installed (none of libtpu)" in msg and "pip install -e '.[tpu]'" in msg


@pytest.mark.parametrize("backend, jax_platforms, seen", [
    ("gpu", None, GPU_SEEN),          # jax uses the GPU
    ("cpu", "cpu", GPU_SEEN),         # the CPU asked for (JAX_PLATFORMS=cpu)
    ("cpu", None, {}),                # nothing to use
])
def test_no_warning_when_jax_uses_the_accelerator_or_the_cpu_is_chosen_or_there_is_none(backend, jax_platforms, seen):
    assert pc.unused_accelerator_warning(backend, jax_platforms, seen, {}, []) is None


def test_the_trainer_warns_before_training_when_nvidia_smi_is_on_path_but_jax_runs_on_the_cpu(tmp_path):
    """The real trainer command, with a stand-in nvidia-smi on PATH and JAX_PLATFORMS unset; it then stops
    on a dataset that does not exist."""
    if pc._installed([p for kind in pc.KINDS.values() for p in kind["packages"]]):
        pytest.skip("an accelerator build of jax is installed here: jax may really use it")
    fake = _executable(tmp_path / "bin" / "nvidia-smi")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["PATH"] = f"{fake.parent}{os.pathsep}{env.get('PATH', '')}"
    out = subprocess.run(
        [sys.executable, "-m", "maejax.train", "--config", "configs/mae_synthetic.py:preset=tiny",
         "--workdir", str(tmp_path / "run"), f"--config.data.dir={tmp_path / 'no_dataset'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0      # no dataset
    warning, _, rest = out.stderr.partition("JAX_PLATFORMS=cpu")
    assert "jax runs on the CPU, but this machine has an accelerator" in warning
    assert f"nvidia-smi at {fake}" in warning
    assert "no_dataset" in rest     # said before the trainer opened the dataset
