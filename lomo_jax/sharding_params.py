r"""FSDP shardings of ``{"embed", "layers", "head"}`` parameters: each leaf
large enough is split over the ``fsdp`` mesh axes along one axis their size
divides (never the leading layer axis of ``params["layers"]``); small or
indivisible leaves are replicated. LoRA adapters (:func:`is_adapter`) have a
rule of their own: replicated unless large, never split along the rank.
Public as :func:`lomo_jax.sharding.param_shardings`.

Example::

    shardings = param_shardings(params, mesh)   # [L, 4096, 11008] -> P(None, 'fsdp', None)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lomo_jax._layout import check_keys as _check_params
from lomo_jax._layout import spec_entry
from lomo_jax.sharding_mesh import AxisNames, axes_tuple, check_mesh

__all__ = ["DEFAULT_ADAPTER_MIN_SIZE", "DEFAULT_MIN_SIZE", "is_adapter", "param_shardings"]

# Leaves (per layer, for params["layers"]) with fewer elements are replicated:
# splitting a norm scale saves nothing and costs a collective.
DEFAULT_MIN_SIZE = 2**14

# LoRA adapter leaves (per layer) with fewer elements are replicated: rank 16 on
# every projection of LLaMA-7B is 0.6% of the model (its largest leaf, down_proj's
# lora_a, is 11008 x 16 = 176k elements), and a replicated adapter needs no
# all-gather in the layer scan; 2**20 (4 MiB of fp32 a leaf a layer) still
# splits rank 64+ adapters of 70B-class MLPs.
DEFAULT_ADAPTER_MIN_SIZE = 2**20

# The axis of an adapter leaf that is split when it is (counted from the end):
# lora_a [..., d_in, r] its input dimension, lora_b [..., r, d_out] its output
# dimension -- never the rank r.
_ADAPTER_SPLIT_AXIS = {"lora_a": -2, "lora_b": -1}


def _key_name(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def is_adapter(path) -> bool:
    """Whether the leaf at ``path`` (a ``jax.tree_util`` key path) is a LoRA
    adapter: some key on it contains ``"lora"`` (``lora_a``, ``lora_b``, see
    :mod:`lomo_jax.models.lora`).

    Example::

        jax.tree_util.tree_map_with_path(lambda p, x: is_adapter(p), params)
    """
    return any("lora" in _key_name(k) for k in path)


def _adapter_spec(path, shape, skip_leading: bool, n: int, min_size: int, entry) -> P:
    """An adapter's spec: split its ``_ADAPTER_SPLIT_AXIS`` over ``entry`` when it has
    at least ``min_size`` elements (per layer) and ``n`` divides that axis; else replicated."""
    shape = tuple(shape)
    axis = _ADAPTER_SPLIT_AXIS.get(_key_name(path[-1]) if path else "")
    if axis is None or len(shape) < 2 + skip_leading or n == 1:
        return P()
    axis %= len(shape)
    per_layer = math.prod(shape[1:] if skip_leading else shape)
    if per_layer < max(min_size, 1) or shape[axis] % n or shape[axis] < n:
        return P()
    spec = [None] * len(shape)
    spec[axis] = entry
    return P(*spec)


def _leaf_spec(shape, skip_leading: bool, n: int, min_size: int, entry,
               rule: str = "largest") -> P:
    """Split one axis over ``entry`` (``n`` devices): among the axes ``n`` divides
    (never a leading layer axis), the ``"largest"``, the ``"smallest"`` or the
    ``"first"`` (most major) one; replicated if small or none divides."""
    shape = tuple(shape)
    start = 1 if skip_leading else 0
    per_unit = math.prod(shape[start:]) if len(shape) > start else 1
    if n == 1 or per_unit < max(min_size, 1):
        return P()
    axes = [a for a in range(start, len(shape)) if shape[a] % n == 0 and shape[a] >= n]
    if not axes:
        return P()
    pick = {"largest": lambda: max(axes, key=lambda a: (shape[a], -a)),
            "smallest": lambda: min(axes, key=lambda a: (shape[a], a)),
            "first": lambda: axes[0]}[rule]
    spec = [None] * len(shape)
    spec[pick()] = entry
    return P(*spec)


def param_shardings(
    params,
    mesh: Mesh,
    *,
    fsdp_axis: AxisNames = "fsdp",
    min_size: int = DEFAULT_MIN_SIZE,
    adapter_min_size: int = DEFAULT_ADAPTER_MIN_SIZE,
):
    r"""FSDP shardings of ``{"embed", "layers", "head"}`` parameters.

    Each leaf is split over ``fsdp_axis`` along one axis whose size the axis
    size :math:`n` divides, so every device holds :math:`1/n` of it:

    * ``params["layers"]``: the first (most major) such axis after the layer
      axis. The fused step all-gathers one layer's slice at a time along that
      axis; a minor axis makes XLA:GPU transpose the whole stack (a full copy
      of it) to make the gathered axis major.
    * the embedding and the head: the *smallest* such axis (the model dimension
      of a ``[V, D]`` embedding or ``[D, V]`` head), so a vocabulary chunk of the
      head (:mod:`lomo_jax.cross_entropy`) is a local slice, all-gathered chunk
      by chunk (a vocabulary split makes the partitioner gather the whole
      matrix for every chunk). The leading layer axis of ``params["layers"]``
    leaves is never split. A leaf is replicated if it has fewer than
    ``min_size`` elements (per layer, for ``params["layers"]``) or no divisible
    axis.
    * LoRA adapters (leaves :func:`is_adapter` names, ``lora_a`` ``[L, d_in, r]``,
      ``lora_b`` ``[L, r, d_out]``): replicated below ``adapter_min_size``
      elements per layer -- an adapter is small beside its kernel, and a
      replicated one costs no all-gather in the layer scan; above it,
      ``lora_a`` is split along ``d_in`` and ``lora_b`` along ``d_out`` (never
      the rank). Other leaves named ``lora*`` are replicated.

    Example::

        mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
        shardings = lomo_jax.sharding.param_shardings(params, mesh)
        params = jax.device_put(params, shardings)
        # a [L, 4096, 11008] kernel -> PartitionSpec(None, 'fsdp', None)

    Args:
      params: the parameters, as arrays or ``jax.ShapeDtypeStruct``\ s (only
        shapes are read).
      mesh: a mesh whose ``fsdp_axis`` axes have ``AxisType.Auto``.
      fsdp_axis: the mesh axis (or a tuple of axes, e.g. ``("data", "fsdp")``
        for ZeRO-3 over every device) to split parameters over.
      min_size: leaves with fewer elements (per layer) are replicated; ``0``
        splits every leaf that has a divisible axis.
      adapter_min_size: the same for the LoRA adapters (default
        :data:`DEFAULT_ADAPTER_MIN_SIZE`, ``2**20``; ``0`` splits every adapter
        whose ``d_in``/``d_out`` the axis size divides).

    Returns:
      A pytree of :class:`~jax.sharding.NamedSharding` with the structure of
      ``params``.
    """
    _check_params(params)
    axes = axes_tuple(fsdp_axis, "fsdp_axis")
    n = check_mesh(mesh, axes, "param_shardings")
    entry = spec_entry(axes)

    def spec(path, x, skip_leading, rule):
        if is_adapter(path):
            return _adapter_spec(path, jnp.shape(x), skip_leading, n, int(adapter_min_size),
                                 entry)
        return _leaf_spec(jnp.shape(x), skip_leading, n, int(min_size), entry, rule)

    def unit(tree, skip_leading, rule):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: NamedSharding(mesh, spec(path, x, skip_leading, rule)), tree)

    return {
        "embed": unit(params["embed"], False, "smallest"),
        "layers": unit(params["layers"], True, "first"),
        "head": unit(params["head"], False, "smallest"),
    }
