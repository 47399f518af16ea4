r"""Embedding lookup whose gradient is summed in fp32 and never scattered.

.. math::
    h_{bt} = E_{x_{bt}}, \qquad
    \frac{\partial \ell}{\partial E_v} = \sum_{(b,t):\, x_{bt} = v} \bar h_{bt}

The gradient of ``jnp.take`` is a scatter-add into a zero ``[V, D]`` buffer in
the table's dtype: repeated tokens are summed in bf16, and the zero buffer is
a constant that XLA may allocate at the start of the step and hold to the
end. :func:`embedding_lookup` computes the same gradient as

1. the unique ids of the batch (at most ``N`` of them: ``jnp.unique`` with a
   static size) and the fp32 sum of the cotangent rows of each
   (``segment_sum`` over ``[N, D]``), rounded once to the table's dtype;
2. a *gather*: row ``v`` of the gradient is the summed row of ``v``'s slot
   among the unique ids, or zero.

So repeated tokens are summed exactly in fp32 (as PyTorch's embedding backward
accumulates), and the ``[V, D]`` gradient is an expression XLA fuses into
whatever consumes it: in the fused step's norm pass, :math:`\|\bar E\|^2` is
computed without a ``[V, D]`` buffer, and an elementwise update (LOMO) writes
the new table directly.

Example::

    from lomo_jax.embedding import embedding_lookup
    h = embedding_lookup(params["embedding"], batch["input_ids"])   # [B, T, D]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["embedding_lookup"]


@jax.custom_vjp
def embedding_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``table[ids]``: rows of ``table [V, D]`` for integer ``ids [...]`` -> ``[..., D]``."""
    return jnp.take(table, ids, axis=0)


def _fwd(table, ids):
    return jnp.take(table, ids, axis=0), (table, ids)


def _bwd(res, g):
    table, ids = res
    vocab, d = table.shape
    flat = ids.reshape(-1).astype(jnp.int32)
    n = flat.shape[0]
    uniq, inverse = jnp.unique(flat, size=n, fill_value=vocab, return_inverse=True)
    rows = jax.ops.segment_sum(
        g.reshape(n, d).astype(jnp.float32), inverse.reshape(-1), num_segments=n
    ).astype(table.dtype)
    # Row v of the gradient is rows[slot[v]] (or 0): a gather that XLA fuses
    # into its consumer (a norm, an elementwise update) instead of a scatter
    # into a dense [V, D] zero buffer.
    slot = jnp.full((vocab,), n, jnp.int32).at[uniq].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
    rows = jnp.concatenate([rows, jnp.zeros((1, d), rows.dtype)])
    return jnp.take(rows, slot, axis=0), None


embedding_lookup.defvjp(_fwd, _bwd)
