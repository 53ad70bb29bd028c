"""Device mesh and logical-axis sharding.

Models name the axes of their parameters and activations logically ("embed", "mlp", "heads", "act_batch"...);
the config's rules table maps those names to mesh axes (data, fsdp, tensor), so changing parallelism never
touches model code (the MaxText habit).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Default rules: FSDP over the model width of every large weight, tensor parallelism over heads and MLP,
# batch over (data, fsdp). Norm scales, biases over "embed" and position tables stay replicated.
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("layers", None),
    ("norm", None),
    ("patch", None),
    ("classes", None),
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


class MeshError(ValueError):
    """A mesh request that does not fit the devices."""


def mesh_shape(axis_sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves sizes for MESH_AXES from `axis_sizes` (one may be -1, filled from `num_devices`)."""
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = [int(axis_sizes.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive (or one -1)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(
                f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known}) do not divide the "
                f"{num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but there are {num_devices}")
    return tuple(sizes)


def make_mesh(axis_sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes (pjit-style sharding propagation)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(dict(axis_sizes), len(devices))
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def rules_from_config(rules: Iterable) -> tuple[tuple[str, object], ...]:
    """Config rules (lists, from JSON/ConfigDict) -> tuple-of-tuples that flax accepts."""
    out = []
    for rule in rules:
        name, axes = rule
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
            for a in axes:
                if a not in MESH_AXES:
                    raise MeshError(f"sharding rule {name!r} -> {axes}: {a!r} is not a mesh axis {MESH_AXES}")
        elif axes is not None and axes not in MESH_AXES:
            raise MeshError(f"sharding rule {name!r} -> {axes!r}: not a mesh axis {MESH_AXES}")
        out.append((str(name), axes))
    return tuple(out)


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
    """Context for building and tracing models: the mesh plus the logical rules."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield


def logical_spec(names: Sequence[str | None]) -> P:
    """Logical names -> PartitionSpec under the active rules (unknown names stay unsharded)."""
    rules = dict(spmd.get_logical_axis_rules())
    return P(*[rules.get(n) if n is not None else None for n in names])


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside a mesh/rules context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not spmd.get_logical_axis_rules():
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Global batches are split over (data, fsdp) on their leading axis."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
