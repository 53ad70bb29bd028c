"""Ahead-of-time compilation of the train step for a target topology, without the hardware: how much
memory each device needs, before a pod or a cluster is booked.

  # a TPU topology, compiled by the real TPU compiler (needs `pip install libtpu==0.0.42.*`, no TPU):
  python -m maejax.aot --config configs/mae_scale.py:preset=G8 --topology v5p:8x8x8
  # fake CPU devices (the CPU compiler's memory, a rough guide for GPUs):
  python -m maejax.aot --config configs/mae_synthetic.py:preset=tiny --fake_devices 8
  # the README table (ViT-L/8 and ViT-G/8 at the papers' batch sizes on several layouts), with overrides:
  python -m maejax.aot --table [--layouts v5p-256,v5p-512] [--config.model.remat=dots]

The step is the trainer's own (maejax.step.setup), lowered with abstract state and batch (ShapeDtypeStructs
with the target shardings), so nothing is allocated and the numbers are the compiled program's: per device,
arguments (parameter and optimiser shards, the batch) + temporaries (activations, gathered weights,
gradients) + outputs not aliased to donated inputs.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from typing import Any, Sequence

import jax
import ml_collections

from maejax import config as config_lib, step as step_lib

GiB = 2**30

# Memory a program may use per device (bytes), for the "fits" column. TPUs: the HBM the TPU compiler reports
# as available in its out-of-memory messages. GPUs: jax's share of nvidia-smi's total memory at
# XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 (launch/gpu_flags.sh).
DEVICE_MEMORY = {"TPU v4": 30.75 * GiB, "TPU v5 lite": 15.75 * GiB, "TPU v5": 95.74 * GiB,
                 "TPU v6 lite": 31.25 * GiB, "H100": 0.92 * 81559 * 2**20, "H200": 0.92 * 143771 * 2**20}


@dataclasses.dataclass(frozen=True)
class Layout:
    """A target: a TPU topology (compiled by libtpu) and, for GPU layouts, the device that it stands in for."""
    name: str
    topology: str           # libtpu topology name, e.g. "v5p:4x4x8"
    num_slices: int = 1
    stands_in_for: str = ""  # e.g. "H100": same device count, mesh and per-device batch, TPU compiler

    @property
    def memory_kind(self) -> str:
        return self.stands_in_for or {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5",
                                      "v6e": "TPU v6 lite"}[self.topology.split(":")[0]]


LAYOUTS = {l.name: l for l in (
    Layout("v4-256", "v4:4x4x8"),
    Layout("v4-512", "v4:4x8x8"),
    Layout("v5e-256", "v5e:16x16"),
    Layout("v5p-256", "v5p:4x4x8"),
    Layout("v5p-512", "v5p:4x8x8"),
    Layout("v5p-1024", "v5p:8x8x8"),
    Layout("v6e-256", "v6e:16x16"),
    Layout("16x(8xH100)", "v5p:4x4x8", stands_in_for="H100"),
    Layout("32x(8xH100)", "v5p:4x8x8", stands_in_for="H100"),
)}


def tpu_devices(topology: str, num_slices: int = 1) -> list:
    """Compile-only devices of a TPU topology (no TPU needed, only libtpu). TPU v4 is described as jax runs
    it, one megacore device per chip (libtpu's default there is one device per TensorCore)."""
    from jax._src import cloud_tpu_init
    if cloud_tpu_init.get_tpu_library_path() is None:
        raise RuntimeError("AOT for TPU topologies needs libtpu: pip install 'libtpu==0.0.42.*' (the version "
                           "jax 0.10.2 pins), or set TPU_LIBRARY_PATH to a libtpu.so")
    # Without a TPU VM around, libtpu would look for one; these say there is none to look for.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies
    chip = {"chip_config_name": "megacore"} if topology.startswith("v4:") else {}
    return list(topologies.get_topology_desc(topology, "tpu", num_slices=num_slices, **chip).devices)


def compile_step(config: ml_collections.ConfigDict, devices: Sequence) -> dict[str, Any]:
    """Compiles the train step of `config` for `devices`; returns the per-device memory and the set-up."""
    t0 = time.time()
    train_setup = step_lib.setup(config, devices)
    compiled = train_setup.compile()
    return {
        "devices": len(devices), "device_kind": devices[0].device_kind, "mesh": dict(train_setup.mesh.shape),
        "batch": int(config.data.batch_size), "per_device_batch": int(config.data.batch_size) / len(devices),
        "params": train_setup.num_params, "train_flops_per_crop": train_setup.flops_per_example,
        "memory": step_lib.describe_memory(compiled), "compile_s": time.time() - t0,
    }


# The README table: (preset, layout) pairs; the G/8 layouts are the L/8 ones with twice the devices per crop.
TABLE = (("L8", "v5p-256"), ("L8", "v5p-512"), ("L8", "v5p-1024"), ("L8", "v4-256"), ("L8", "v5e-256"),
         ("L8", "v6e-256"), ("L8", "16x(8xH100)"),
         ("G8", "v5p-256"), ("G8", "v5p-512"), ("G8", "v5p-1024"), ("G8", "v4-512"), ("G8", "v5e-256"),
         ("G8", "v6e-256"), ("G8", "32x(8xH100)"))


def table_row(preset: str, layout: Layout, overrides: dict[str, Any], done: dict) -> str:
    """One row; `done` memoises compiles by (preset, topology), which GPU stand-ins share with TPU rows.
    A program the TPU compiler cannot fit in the chip's memory is a row that says so."""
    config = config_lib.load(f"{os.path.dirname(os.path.dirname(__file__))}/configs/mae_scale.py:preset={preset}",
                             overrides)
    key = (preset, layout.topology, layout.num_slices)
    if key not in done:
        try:
            done[key] = compile_step(config, tpu_devices(layout.topology, layout.num_slices))
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            needed = re.search(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(e))
            done[key] = {"error": (f"TPU compiler: temporaries need {needed[1]} GiB of {needed[2]}" if needed
                                   else " ".join(str(e).split())[:160])}
    r = done[key]
    capacity = DEVICE_MEMORY[layout.memory_kind]
    row = f"| MAE-{config.model.variant} | {layout.name} | "
    if "error" in r:
        return row + f"| | | {config.model.remat} | | | | {capacity / GiB:.0f} | no: {r['error']} | |"
    m = r["memory"]
    mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1)
    fits = "yes" if m["peak"] <= capacity else "no"
    return row + (f"{r['devices']} | {mesh} | {r['per_device_batch']:g} | {config.model.remat} | "
                  f"{m['argument'] / GiB:.2f} | {m['temp'] / GiB:.2f} | {m['peak'] / GiB:.2f} | "
                  f"{capacity / GiB:.0f} | {fits} | {r['compile_s']:.0f} |")


TABLE_HEADER = ("| model | layout | devices | mesh | crops/device | remat | arguments GiB | temporaries GiB | "
                "peak GiB | device GiB | fits | compile s |\n|" + "---|" * 12)


def main(argv) -> None:
    del argv
    overrides = dict(_OVERRIDES)
    if _SET.value:   # deprecated: --set KEY=VALUE
        config_lib.deprecated_flag("--set KEY=VALUE", "--config.KEY=VALUE")
        overrides.update(config_lib.parse_override_flags([f"--config.{kv}" for kv in _SET.value])[1])
    if _TABLE.value:
        wanted = set(_LAYOUTS.value)
        rows = [(p, LAYOUTS[l]) for p, l in TABLE if not wanted or l in wanted or f"{p}:{l}" in wanted]
        print(TABLE_HEADER, flush=True)
        done: dict = {}
        for preset, layout in rows:
            print(table_row(preset, layout, overrides, done), flush=True)
        return
    config = config_lib.load(_CONFIG.value, overrides)
    if _FAKE_DEVICES.value:
        devices = jax.devices("cpu")
    else:
        devices = tpu_devices(_TOPOLOGY.value, _NUM_SLICES.value)
    r = compile_step(config, devices)
    print(f"{config.model.name} {config.model.variant}: {r['params'] / 1e6:.1f}M parameters, {r['devices']} x "
          f"{r['device_kind']}, mesh {r['mesh']}, {r['per_device_batch']:g} crops per device; compiled in "
          f"{r['compile_s']:.0f} s\nper-device memory: {step_lib.format_memory(r['memory'])}")


if __name__ == "__main__":
    from absl import app, flags

    _ARGV, _OVERRIDES = config_lib.parse_override_flags(sys.argv)
    _CONFIG = flags.DEFINE_string("config", None, "Config file (FILE.py[:ARG]); override its keys (and, with "
                                                  "--table, every row's) with --config.SECTION.KEY=VALUE.")
    _TOPOLOGY = flags.DEFINE_string("topology", None, "libtpu topology, e.g. v5p:4x4x8, v5e:16x16, v4:4x4x8")
    _NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices (multi-slice over DCN: set mesh.dcn_*)")
    _FAKE_DEVICES = flags.DEFINE_integer("fake_devices", 0, "compile for this many fake CPU devices instead")
    _TABLE = flags.DEFINE_bool("table", False, "print the README memory table (ViT-L/8 and ViT-G/8 MAE)")
    _LAYOUTS = flags.DEFINE_list("layouts", [], f"with --table: only these rows, LAYOUT or PRESET:LAYOUT, layouts "
                                                f"from {sorted(LAYOUTS)}")
    _SET = flags.DEFINE_multi_string("set", [], "deprecated: --config.KEY=VALUE")

    def _validate(argv):
        if not (flags.FLAGS.table or flags.FLAGS.config):
            raise app.UsageError("give --config (with --topology or --fake_devices) or --table")
        if flags.FLAGS.config and not (flags.FLAGS.topology or flags.FLAGS.fake_devices):
            raise app.UsageError("give --topology (a TPU topology) or --fake_devices N")
        if flags.FLAGS.fake_devices:  # before jax creates its CPU client
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                       f" --xla_force_host_platform_device_count={flags.FLAGS.fake_devices}")
        main(argv)

    app.run(_validate, argv=_ARGV)
