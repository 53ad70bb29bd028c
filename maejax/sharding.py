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
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from maejax.config import DEFAULT_RULES  # the rules table lives with the config (jax-free)

MESH_AXES = ("data", "fsdp", "tensor")



class MeshError(ValueError):
    """A mesh request that does not fit the devices."""


DCN_AXES = tuple(f"dcn_{a}" for a in MESH_AXES)


def mesh_shape(axis_sizes: dict[str, int], num_devices: int, what: str = "devices") -> tuple[int, ...]:
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
                f"{num_devices} {what}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} {what}, but there are {num_devices}")
    return tuple(sizes)


def make_mesh(axis_sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes (pjit-style sharding propagation).

    `axis_sizes` holds the sizes within a granule (`data`, `fsdp`, `tensor`, one may be -1) and optionally
    across granules (`dcn_data`, `dcn_fsdp`, `dcn_tensor`, default 1, one may be -1). A granule is a TPU
    slice (multi-slice jobs) or else a process (one per GPU node). With any dcn size > 1 the mesh is hybrid:
    each axis is dcn-major, so the inner (fast-network) part of every axis stays inside a granule. Put the
    cross-granule parallelism on `dcn_data`: only gradient all-reduces then cross the slow network.
    """
    devices = list(jax.devices() if devices is None else devices)
    axis_sizes = dict(axis_sizes)
    unknown = set(axis_sizes) - set(MESH_AXES) - set(DCN_AXES)
    if unknown:
        raise MeshError(f"unknown mesh keys {sorted(unknown)}; use {MESH_AXES} and {DCN_AXES}")
    dcn = {a: int(axis_sizes.get(f"dcn_{a}", 1)) for a in MESH_AXES}
    ici = {a: axis_sizes[a] for a in MESH_AXES if a in axis_sizes}
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if all(v == 1 for v in dcn.values()):
        shape = mesh_shape(ici, len(devices))
        if devices == jax.devices():
            return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)
    granule_attr, granules = _granules(devices)
    dcn_shape = mesh_shape(dcn, len(granules), what=f"granules ({granule_attr} values)")
    sizes = {len(g) for g in granules}
    if len(sizes) != 1:
        raise MeshError(f"granules ({granule_attr}) hold different numbers of devices {sorted(sizes)}")
    ici_shape = mesh_shape(ici, sizes.pop(), what="devices per granule")
    array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                 process_is_granule=granule_attr == "process_index")
    return Mesh(array, MESH_AXES, axis_types=axis_types)


def _granules(devices: Sequence[jax.Device]) -> tuple[str, list[list[jax.Device]]]:
    """Devices grouped by TPU slice when there are several slices, else by process."""
    slices = {getattr(d, "slice_index", 0) for d in devices}
    attr = "slice_index" if len(slices) > 1 else "process_index"
    groups: dict[int, list[jax.Device]] = {}
    for d in devices:
        groups.setdefault(getattr(d, attr), []).append(d)
    return attr, [groups[k] for k in sorted(groups)]


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


def logical_spec(names: Sequence[str | None], rules=None) -> P:
    """Logical names -> PartitionSpec under `rules` (default: the active rules; unknown names stay
    unsharded)."""
    table = dict(spmd.get_logical_axis_rules() if rules is None else rules)
    return P(*[table.get(n) if n is not None else None for n in names])


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside a mesh/rules context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not spmd.get_logical_axis_rules():
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names))


# The logical name of every batch's leading axis: the input batch is sharded like the activations, by the
# rules table's entry for it (MaxText derives its input sharding from the logical rules the same way).
BATCH = "act_batch"


def batch_axes(rules) -> tuple[str, ...]:
    """The mesh axes the rules split a batch over (those of BATCH), in order."""
    axes = dict(rules).get(BATCH)
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def batch_sharding(mesh: Mesh, rules, ndim: int = 1) -> NamedSharding:
    """Global batches are split over the rules' batch axes (`batch_axes`) on their leading axis."""
    return NamedSharding(mesh, logical_spec((BATCH,) + (None,) * (ndim - 1), rules))


def data_parallel_size(mesh, rules) -> int:
    """How many ways a batch is split: the product of its mesh axes' sizes (`batch_axes`)."""
    return math.prod(mesh.shape[a] for a in batch_axes(rules))


def batch_mesh(rules, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh for inference (embedding): every device on the first mesh axis the rules split a batch over
    (data where they split it over none), so a model evaluates data-parallel under its run's rules."""
    axes = batch_axes(rules)
    return make_mesh({axes[0] if axes else "data": -1}, devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_divisible(abstract_state, mesh: Mesh, what: str) -> None:
    """Every sharded dimension of `abstract_state` (nnx state of ShapeDtypeStructs with shardings) must be
    divisible by its mesh axes; otherwise a MeshError names the variable, the dimension and the axes.

    jit rejects such shardings only when compiling, with an error that names neither the variable nor the
    config key to change; this runs before any compute.
    """
    is_var = lambda x: isinstance(x, nnx.Variable)
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state, is_leaf=is_var):
        x = leaf.get_value() if is_var(leaf) else leaf
        logical = leaf.get_metadata().get("out_sharding") if is_var(leaf) else None
        for dim, (size, axes) in enumerate(zip(x.shape, x.sharding.spec)):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            ways = math.prod(mesh.shape[a] for a in axes)
            if size % ways:
                name = f" ({logical[dim]!r})" if logical and logical[dim] else ""
                split = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
                raise MeshError(
                    f"{what} {jax.tree_util.keystr(path, simple=True, separator='/')} of shape {x.shape}: "
                    f"dimension {dim}{name} of size {size} cannot be split over mesh axes {split}; choose mesh "
                    f"sizes that divide it (e.g. the tensor axis must divide the number of heads, fsdp the "
                    f"widths)")
