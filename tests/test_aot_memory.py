"""Ahead-of-time compilation of the real train step for a target set of devices reports per-device memory
without allocating anything; with libtpu installed, for a TPU topology this machine does not have."""
import os

import jax
import pytest

from maejax import aot
from tests.tiny_training import tiny_config


def check_report(r, devices, kind):
    m = r["memory"]
    assert r["devices"] == devices and kind in r["device_kind"]
    assert m["peak"] == m["argument"] + m["temp"] + m["output"] - m["alias"] > 0
    # The model and optimiser states are donated: their buffers are reused for the outputs.
    assert m["alias"] > 0.9 * m["output"]
    assert r["train_flops_per_crop"] > 0 and r["params"] == 152_352


def test_compile_for_eight_fake_cpu_devices():
    config = tiny_config("unused", **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    r = aot.compile_step(config, jax.devices())
    check_report(r, 8, "cpu")
    assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and r["per_device_batch"] == 1


def test_compile_for_a_tpu_topology_without_a_tpu():
    from jax._src import cloud_tpu_init
    if cloud_tpu_init.get_tpu_library_path() is None:
        pytest.skip("libtpu is not installed (pip install 'libtpu==0.0.42.*' or set TPU_LIBRARY_PATH)")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    r = aot.compile_step(tiny_config("unused", **{"mesh.data": 4}), aot.tpu_devices("v5p:2x2x1"))
    check_report(r, 4, "TPU v5")
