"""Slices of stacked trees: read entry ``i`` along an axis, write it back in
place (``dynamic_update_slice``), or write it only where a flag holds.

Example: ``slice_at(params["layers"], 2)`` is layer 2's slice;
``write_at(stack, new_slice, 2)`` the stack with it replaced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax


def slice_at(tree, i, axis=lambda x: 0):
    """Entry ``i`` along each leaf's ``axis(leaf)`` (default: the layer axis)."""
    return jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, i, axis(x), keepdims=False), tree)


def write_at(tree, value, i, axis=lambda x: 0):
    """``tree`` with entry ``i`` along ``axis(leaf)`` replaced by ``value`` (in place);
    a leaf whose value is ``optax.MaskedNode()`` (frozen) is left as it is."""
    def leaf(x, v):
        if isinstance(v, optax.MaskedNode):
            return x
        return lax.dynamic_update_index_in_dim(x, v.astype(x.dtype), i, axis(x))

    return jax.tree.map(leaf, tree, value)


def write_at_if(ok, tree, value, i):
    """:func:`write_at` where ``ok`` (a bool scalar; ``None``: always), else ``tree``
    unchanged: a scatter to row ``i``, or to row ``L`` (out of range, dropped).
    For a skipped step's layer state: XLA:GPU holds a select's old operand
    (about 2 MiB more for AdaLomo at 2048 wide), XLA:CPU a select at the write
    (a layer's AdamW state); this costs neither (``tests/jax/test_fused_memory.py``)."""
    if ok is None:
        return write_at(tree, value, i)

    def leaf(x, v):
        row = jnp.where(ok, i, x.shape[0])
        return x.at[row].set(v.astype(x.dtype), mode="drop")

    return jax.tree.map(leaf, tree, value)
