"""Every preset of every config file in configs/ loads and lays out on the 8 fake CPU devices: the config
(every key known to base()), its mesh, the batch split, the abstract model and optimiser state (shapes only,
nothing allocated, so G/8 is as cheap as the tiny model) and their shardings. A preset whose mesh needs more
devices than there are (G/8's fsdp 128) is laid out with that axis cut to fit, and its shardings are then
checked against the mesh it asks for.

The scale presets take the published architecture from configs/model_zoo.py and add only the machine.
"""
from __future__ import annotations

import importlib
import math
import pathlib

import jax
import pytest

from maejax import config as config_lib, sharding as shd, step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))
# Arguments a config file needs besides `preset=` (model_zoo: the papers give epochs, not steps).
REQUIRED_ARGS = {"model_zoo": "steps=1000"}


def preset_specs() -> list[str]:
    """`configs/FILE.py:ARG` for every preset of every config file (a file without PRESETS: its default)."""
    specs = []
    for path in CONFIG_FILES:
        module = importlib.import_module(f"configs.{path.stem}")
        extra = REQUIRED_ARGS.get(path.stem, "")
        names = list(getattr(module, "PRESETS", [None]))
        specs += [f"configs/{path.name}:" + ",".join(filter(None, [name and f"preset={name}", extra]))
                  for name in names]
    return specs


def fitted_mesh_axes(mesh: dict, num_devices: int) -> tuple[dict[str, int], list[str]]:
    """The mesh `mesh` asks for, on `num_devices` devices of one process: each dcn size is folded into its
    axis (one granule here), and a fixed axis larger than the devices left is cut to what fits (gcd); a
    fully fixed mesh smaller than the devices takes the first ones (lay_out). Returns the axis sizes and a
    note per cut axis. Two -1 axes stay two: make_mesh names that mistake."""
    sizes, cuts, left = {}, [], num_devices
    for axis in shd.MESH_AXES:
        ici, dcn = int(mesh.get(axis, 1)), int(mesh.get(f"dcn_{axis}", 1))
        size = -1 if -1 in (ici, dcn) else ici * dcn
        if size != -1:
            fitted = math.gcd(size, left)
            if fitted != size:
                cuts.append(f"{axis} {size}->{fitted}")
            size, left = fitted, left // fitted
        sizes[axis] = size
    return sizes, cuts


def lay_out(config, devices):
    """Config -> (mesh, cuts, abstract model and optimiser state with shardings): the trainer's own set-up
    (maejax.step.setup: keys, mesh, batch split, optimiser, abstract state) with the mesh fitted to `devices`;
    nothing is allocated or compiled."""
    sizes, cuts = fitted_mesh_axes(dict(config.mesh), len(devices))
    used = len(devices) if -1 in sizes.values() else math.prod(sizes.values())
    fitted = config.copy_and_resolve_references()
    with fitted.unlocked():
        fitted.mesh.update(sizes, **{f"dcn_{a}": 1 for a in shd.MESH_AXES})
    train_setup = step_lib.setup(fitted, devices[:used])
    return train_setup.mesh, cuts, train_setup.layout


def requested_mesh(config) -> jax.sharding.AbstractMesh:
    """The smallest mesh the config asks for (every -1 axis at 1), without devices."""
    sizes = [max(1, int(config.mesh[a])) * max(1, int(config.mesh[f"dcn_{a}"])) for a in shd.MESH_AXES]
    return jax.sharding.AbstractMesh(tuple(sizes), shd.MESH_AXES)


@pytest.mark.parametrize("spec", preset_specs())
def test_preset_lays_out_on_eight_fake_devices(spec):
    config = config_lib.load(str(REPO / spec))
    mesh, cuts, layout = lay_out(config, jax.devices())
    params = jax.tree.leaves(layout.model_abstract)
    assert sum(x.size for x in params) > 0 and jax.tree.leaves(layout.opt_abstract)
    for x in params + jax.tree.leaves(layout.opt_abstract):
        assert isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == mesh
    if mesh.shape["fsdp"] > 1:   # the rules table reaches the weights: the big matrices are split over fsdp
        assert any("fsdp" in jax.tree.leaves(tuple(x.sharding.spec)) for x in params), spec
    if cuts:   # laid out smaller than asked: the shardings and the batch must also divide the mesh asked for
        full = requested_mesh(config)
        shd.check_divisible(layout.model_abstract, full, "parameter")
        shd.check_divisible(layout.opt_abstract, full, "optimizer state")
        step_lib.check_batch(config, full)


def test_every_config_file_has_its_presets_tested():
    """A new config file, or a preset added to PRESETS, is picked up without editing this test."""
    specs = preset_specs()
    assert {s.split(":")[0] for s in specs} == {f"configs/{p.name}" for p in CONFIG_FILES}
    assert {"configs/mae_scale.py:preset=L8", "configs/mae_scale.py:preset=G8",
            "configs/model_zoo.py:preset=mae_l8,steps=1000", "configs/mae_synthetic.py:preset=demo"} <= set(specs)


def test_g8_mesh_is_cut_to_eight_devices_and_checked_at_fsdp_128():
    config = config_lib.load(str(REPO / "configs/mae_scale.py:preset=G8"))
    assert fitted_mesh_axes(dict(config.mesh), 8) == ({"data": -1, "fsdp": 8, "tensor": 1}, ["fsdp 128->8"])
    assert dict(requested_mesh(config).shape) == {"data": 1, "fsdp": 128, "tensor": 1}
    # What the full-size check catches: G/8's width 1664 = 13 x 128 does not split over fsdp 256.
    layout = lay_out(config, jax.devices())[2]
    too_wide = jax.sharding.AbstractMesh((1, 256, 1), shd.MESH_AXES)
    with pytest.raises(shd.MeshError, match="cannot be split over mesh axes fsdp=256"):
        shd.check_divisible(layout.model_abstract, too_wide, "parameter")


def test_two_minus_one_axes_are_refused_on_the_fake_devices():
    config = config_lib.load(str(REPO / "configs/mae_synthetic.py:preset=tiny"), {"mesh.fsdp": -1})
    with pytest.raises(shd.MeshError, match="at most one axis may be -1"):
        lay_out(config, jax.devices())


@pytest.mark.parametrize("scale, paper", [("L8", "mae_l8"), ("G8", "mae_g8")])
def test_scale_presets_take_the_papers_model_from_the_zoo(scale, paper):
    """configs/mae_scale.py adds only mesh, dtype, remat and run settings to model_zoo's recipe."""
    scaled = config_lib.load(str(REPO / f"configs/mae_scale.py:preset={scale}")).to_dict()
    steps = scaled["total_steps"]
    recipe = config_lib.load(str(REPO / f"configs/model_zoo.py:preset={paper},steps={steps}")).to_dict()
    assert {k: v for k, v in scaled["model"].items() if k not in ("dtype", "remat")} == \
        {k: v for k, v in recipe["model"].items() if k not in ("dtype", "remat")}
    assert (scaled["model"]["dtype"], scaled["model"]["remat"]) == ("bfloat16", "full")
    assert scaled["optim"] == recipe["optim"] and scaled["data"]["batch_size"] == recipe["data"]["batch_size"]
    assert scaled["mesh"] != recipe["mesh"]
    # The published encoder: timm's ParallelScalingBlock without qkv bias, q/k norm, LayerScale, pooled norm.
    model_zoo = importlib.import_module("configs.model_zoo")
    assert {k: scaled["model"][k] for k in model_zoo.RECURSION_ENCODER} == model_zoo.RECURSION_ENCODER
