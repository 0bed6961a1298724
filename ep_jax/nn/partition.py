"""Logical axes -> mesh axes: the one place that says how arrays split over a device mesh.

A mesh has two axes (`runtime.sharding.parse_mesh`): `data` (examples of a batch) and `model`
(tensor parallel: attention heads, MLP width, vocabulary). Arrays name their dimensions with
the logical axes below; a dimension is split over its mesh axis only when the mesh has that
axis with more than one device and the size divides evenly, otherwise it is replicated (e.g.
Qwen2.5-VL-72B's 8 kv heads on a `model` axis of 16, or a batch of 3 over `data=2`).

`constrain` adds a sharding constraint inside a traced function when a mesh is active
(`jax.set_mesh`, which `runtime.engine` sets while compiling for a model placed on a mesh); on
one device it returns its argument unchanged, so the single-device graph is the same as before.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

# logical axis -> mesh axis, or mesh axes tried in turn (the first that divides the size)
LOGICAL_AXES = {
    "batch": "data",
    # examples spread over every device, where a per-example computation does not split
    # otherwise (the prune stage's eigenvalue solves); else over `data` alone
    "examples": (("data", "model"), "data"),
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "vocab": "model",
}


def partition_spec(shape, axes, mesh_shape: dict) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` whose trailing dimensions are named `axes`
    (leading extra dimensions, such as a stacked layer axis, are replicated; None = replicated)."""
    lead = len(shape) - len(axes)
    if lead < 0:
        raise ValueError(f"{len(axes)} axis names {axes} for an array of shape {tuple(shape)}")
    spec: list = [None] * lead
    for size, name in zip(shape[lead:], axes):
        spec.append(_mesh_axis(size, LOGICAL_AXES.get(name) if name is not None else None, mesh_shape))
    return PartitionSpec(*spec)


def _mesh_axis(size: int, choice, mesh_shape: dict):
    """The mesh axis (or axes) a dimension of `size` splits over, None when none divides it."""
    options = choice if isinstance(choice, tuple) and isinstance(choice[0], tuple) else (choice,)
    for option in options:
        if option is None:
            continue
        names = option if isinstance(option, tuple) else (option,)
        n = 1
        for name in names:
            n *= mesh_shape.get(name, 1)
        if n > 1 and size % n == 0 and all(name in mesh_shape for name in names):
            return option
    return None


def active_mesh_shape() -> dict:
    """{axis name: size} of the mesh set for tracing ({} when none)."""
    mesh = jax.sharding.get_abstract_mesh()
    return {} if mesh.empty else dict(mesh.shape)


def constrain(x: jax.Array, *axes):
    """`x` constrained to the logical `axes` of its trailing dimensions under the active mesh;
    unchanged without one."""
    shape = active_mesh_shape()
    if not shape:
        return x
    return jax.lax.with_sharding_constraint(x, partition_spec(x.shape, axes, shape))
