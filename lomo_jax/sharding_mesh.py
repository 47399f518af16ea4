"""Mesh axis names for the sharding helpers: the names given, checked against
a :class:`jax.sharding.Mesh` (present, ``Auto``), and the one mesh of a tree
of shardings.

Example::

    n = check_mesh(mesh, axes_tuple(("data", "fsdp"), "fsdp_axis"), "param_shardings")
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import jax
from jax.sharding import AxisType, Mesh, NamedSharding

__all__ = ["AxisNames", "axes_tuple", "check_mesh", "mesh_of"]

AxisNames = Union[str, Sequence[str]]


def axes_tuple(axes: AxisNames, what: str) -> tuple:
    if isinstance(axes, str):
        return (axes,)
    axes = tuple(axes)
    if not axes or not all(isinstance(a, str) for a in axes):
        raise TypeError(f"{what} must be a mesh axis name or a non-empty sequence of them, got {axes!r}.")
    return axes


def check_mesh(mesh, axes: tuple, what: str) -> int:
    """Check that ``axes`` are Auto axes of ``mesh``; return their total size."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(
            f"{what}: mesh has no axis {', '.join(map(repr, missing))}; its axes are "
            f"{tuple(mesh.axis_names)}."
        )
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    explicit = [a for a in axes if types[a] != AxisType.Auto]
    if explicit:
        raise ValueError(
            f"{what}: mesh axes {explicit} are {[types[a].name for a in explicit]}; the "
            "fused step is partitioned by the compiler and needs Auto axes. Build the "
            "mesh with jax.make_mesh(shape, names, "
            "axis_types=(jax.sharding.AxisType.Auto,) * len(names))."
        )
    return math.prod(mesh.shape[a] for a in axes)


def mesh_of(shardings) -> Mesh:
    meshes = {
        s.mesh for s in jax.tree.leaves(shardings) if isinstance(s, NamedSharding)
    }
    if len(meshes) != 1:
        raise ValueError(
            "expected a pytree of NamedSharding on one mesh; found "
            f"{len(meshes)} meshes."
        )
    return meshes.pop()
