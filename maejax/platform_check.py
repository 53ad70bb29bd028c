"""A loud warning when this machine has a GPU or TPU but jax runs on the CPU.

jax falls back to the CPU when its accelerator build is missing or fails to start (e.g. after
`pip install 'jax[cuda12]'`, a CUDA plugin that does not match the driver), with one log line that is easy
to miss, and training then runs orders of magnitude slower. The trainer calls warn_if_accelerator_unused()
before it builds anything. Running on the CPU on purpose: set JAX_PLATFORMS=cpu, and nothing is said.
"""
from __future__ import annotations

import glob
import importlib.metadata
import os
import shutil

# Per kind of accelerator: jax's platform name, the distributions of jax's build for it, and the install.
KINDS = {
    "gpu": dict(platform="cuda", packages=("jax-cuda12-plugin", "jax-cuda13-plugin"),
                fix="pip install -e '.[cuda12]' (the driver must support CUDA 12: see nvidia-smi)"),
    "tpu": dict(platform="tpu", packages=("libtpu",), fix="pip install -e '.[tpu]'"),
}


def accelerators_seen(dev: str = "/dev", path: str | None = None) -> dict[str, list[str]]:
    """What says a GPU or TPU is attached, by kind, one phrase each: NVIDIA device files and nvidia-smi (on
    `path`, default $PATH); TPU device files (/dev/accel*, TPU v2-v4) and VFIO devices (/dev/vfio/N, TPU v5e
    and later). Kinds with nothing seen are left out."""
    def files(pattern: str) -> str:
        found = sorted(glob.glob(os.path.join(dev, pattern)))
        return ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")

    seen: dict[str, list[str]] = {}
    if gpus := files("nvidia[0-9]*"):
        seen.setdefault("gpu", []).append(f"NVIDIA GPU devices {gpus}")
    if smi := shutil.which("nvidia-smi", path=path):
        seen.setdefault("gpu", []).append(f"nvidia-smi at {smi}")
    if tpus := files("accel[0-9]*"):
        seen.setdefault("tpu", []).append(f"TPU devices {tpus}")
    if vfio := files("vfio/[0-9]*"):
        seen.setdefault("tpu", []).append(f"VFIO devices {vfio} (how TPU v5e, v5p and v6e chips appear)")
    return seen


def unused_accelerator_warning(backend: str, jax_platforms: str | None, seen: dict[str, list[str]],
                               backend_errors: dict[str, str], installed: list[str]) -> str | None:
    """The warning for jax's default `backend`, or None: jax runs on an accelerator, nothing was `seen`, or
    JAX_PLATFORMS chose the platforms (jax then fails loudly itself when one does not start).
    `backend_errors`: jax platform -> why it did not start; `installed`: accelerator builds of jax present."""
    if backend != "cpu" or not seen or jax_platforms:
        return None
    lines = []
    for kind, phrases in seen.items():
        platform, packages = KINDS[kind]["platform"], KINDS[kind]["packages"]
        have = [p for p in installed if p.split()[0] in packages]
        if platform in backend_errors:
            why = f"jax could not start {platform}: {backend_errors[platform]}"
        elif have:
            why = f"{', '.join(have)} is installed, but jax did not start {platform}"
        else:
            why = f"no {kind.upper()} build of jax is installed (none of {', '.join(packages)})"
        lines.append(f"  {kind.upper()}: {'; '.join(phrases)}.\n    Why: {why}.\n    Fix: {KINDS[kind]['fix']}, "
                     f"matching this environment's jax (README \"Installation\").")
    rule = "=" * 100
    return (f"\n{rule}\njax runs on the CPU, but this machine has an accelerator; training on the CPU is orders of "
            f"magnitude slower.\n" + "\n".join(lines) +
            f"\nCheck with: python -c 'import jax; print(jax.devices())'. To run on the CPU on purpose, set "
            f"JAX_PLATFORMS=cpu.\n{rule}")


def warn_if_accelerator_unused() -> str | None:
    """Logs unused_accelerator_warning() for this machine and jax as configured (initialises jax's
    backends: call it after maejax.distributed.initialize()); returns the warning, or None."""
    import jax
    from absl import logging

    packages = [p for kind in KINDS.values() for p in kind["packages"]]
    message = unused_accelerator_warning(jax.default_backend(), jax.config.jax_platforms, accelerators_seen(),
                                         _backend_errors(), _installed(packages))
    if message:
        logging.warning(message)
    return message


def _backend_errors() -> dict[str, str]:
    """Why jax's plugins did not start (a private table of jax; empty where it is missing)."""
    try:
        from jax._src import xla_bridge
        return {str(k): str(v) for k, v in dict(getattr(xla_bridge, "_backend_errors", {})).items()}
    except Exception:   # jax internals moved: the warning just says less
        return {}


def _installed(distributions: list[str]) -> list[str]:
    """`name version` of each of `distributions` that is installed."""
    found = []
    for name in distributions:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return found
