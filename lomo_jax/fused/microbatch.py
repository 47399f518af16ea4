"""Micro-batches inside the fused step: a batch ``[B, ...]`` viewed as
``[B/M, M, ...]`` (a reshape, no copy), micro-batch ``k`` being rows ``k, k+M,
k+2M, ...``; scalars go to every micro-batch.

Example: ``pick(to_micro(batch, 4), 1)`` is rows ``1, 5, 9, ...`` of every
batch leaf; ``from_micro(to_micro(batch, 4))`` is ``batch``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lomo_jax._layout import path_str as _path
from lomo_jax.fused.stack import slice_at, write_at


def to_micro(tree, m: int):
    """``[B, ...] -> [B/M, M, ...]`` (a reshape, no copy): micro-batch ``k`` is
    ``[:, k]``, rows ``k, k+M, k+2M, ...`` (strided, so a batch split over
    devices splits every micro-batch alike). A scalar goes to every
    micro-batch: ``[M]``."""

    def split(x):
        x = jnp.asarray(x)
        if x.ndim == 0:
            return jnp.broadcast_to(x, (m,))
        return x.reshape((x.shape[0] // m, m) + x.shape[1:])

    return jax.tree.map(split, tree)


def from_micro(tree):
    """The inverse of :func:`to_micro` (a scalar comes back from micro-batch 0)."""
    return jax.tree.map(lambda x: x[0] if x.ndim == 1 else x.reshape((-1,) + x.shape[2:]), tree)


def _micro_axis(x) -> int:
    return 0 if jnp.ndim(x) == 1 else 1


def pick(tree, k):
    """Micro-batch ``k`` of a tree in :func:`to_micro` layout."""
    return slice_at(tree, k, _micro_axis)


def put(tree, value, k):
    """``tree`` with micro-batch ``k`` replaced by ``value`` (in place)."""
    return write_at(tree, value, k, _micro_axis)


def check_microbatches(batch, m: int) -> None:
    """Every batch leaf with a leading axis must split into ``m`` equal parts."""
    for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = jnp.shape(x)
        if shape and shape[0] % m:
            raise ValueError(
                f"fused_train_step(..., microbatches={m}): {_path('batch', path)} has "
                f"{shape[0]} rows on its leading (batch) axis (shape {list(shape)}), which "
                f"{m} equal micro-batches cannot split; make it a multiple of {m}. (Every "
                "batch leaf with a leading axis is split along it; scalars go to every "
                "micro-batch.)")
