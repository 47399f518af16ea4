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

**Ids out of range.** ``jnp.take`` reads row ``V - 1`` for id ``-1`` and NaN
for an id ``>= V``. :func:`embedding_lookup` refuses concrete ids outside
``[0, V)`` with a ``ValueError`` naming the value; traced ids (under ``jit``)
cannot raise, so every id outside the table reads a NaN row (a negative one
too), never another token's row. The :class:`IndexRange` helpers below are the
same check for the integer entries of a batch (token ids, labels with their
ignore value), used by the models and by the fused step.

Example::

    from lomo_jax.embedding import embedding_lookup
    h = embedding_lookup(params["embedding"], batch["input_ids"])   # [B, T, D]
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["IndexRange", "check_indices", "embedding_lookup"]


def embedding_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``table[ids]``: rows of ``table [V, D]`` for integer ``ids [...]`` -> ``[..., D]``.

    Concrete ids outside ``[0, V)`` raise ``ValueError``; traced ones read NaN rows.
    """
    vocab = jnp.shape(table)[0]
    if _concrete(ids):
        ranges = index_ranges({"ids": IndexRange(vocab, size_name="the table's row count")})
        check_indices({"ids": ids}, ranges, "embedding_lookup", prefix="")
    return _lookup(table, nan_row_ids(jnp.asarray(ids), vocab))


def nan_row_ids(ids: jax.Array, vocab: int) -> jax.Array:
    """``ids`` with negative entries set to ``vocab``, so that ``jnp.take``
    (whose default mode fills out-of-range rows with NaN) reads a NaN row for
    every id outside ``[0, vocab)`` instead of row ``vocab - 1`` for ``-1``."""
    if not jnp.issubdtype(ids.dtype, jnp.signedinteger):
        return ids
    return jnp.where(ids < 0, jnp.asarray(vocab, ids.dtype), ids)


@jax.custom_vjp
def _lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
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


_lookup.defvjp(_fwd, _bwd)


# --------------------------------------------------------------------------
# Integer batch entries that index a table (token ids, labels)
# --------------------------------------------------------------------------


class IndexRange(NamedTuple):
    """The valid values of an integer batch entry: ``0 <= x < size``, or
    ``x == ignore`` (labels' ``-100``). ``size_name`` names ``size`` in errors."""

    size: int
    ignore: Optional[int] = None
    size_name: str = "vocab_size"


def index_ranges(ranges: Optional[Mapping[str, Any]]) -> tuple:
    """``{key: IndexRange or int}`` as a sorted tuple of ``(key, IndexRange)``
    (hashable), each checked; ``()`` for ``None``."""
    out = []
    for key, r in sorted(dict(ranges or {}).items()):
        r = IndexRange(r) if isinstance(r, (int, np.integer)) else r
        if not isinstance(r, IndexRange) or isinstance(r.size, bool) or \
                not isinstance(r.size, (int, np.integer)) or r.size < 1:
            raise ValueError(f"index_ranges[{key!r}] must be a positive int or an "
                             f"IndexRange(size, ignore=None) with size >= 1, got {r!r}.")
        out.append((str(key), IndexRange(int(r.size), r.ignore, r.size_name)))
    return tuple(out)


def _entries(batch, ranges: tuple):
    """``(key, array)`` for each ranged key present (not ``None``) in ``batch``."""
    if not ranges:
        return []
    if not isinstance(batch, Mapping):
        raise TypeError(f"the batch must be a dict holding {[k for k, _ in ranges]} (the "
                        f"model's index_ranges), got {type(batch).__name__}.")
    out = []
    for key, r in ranges:
        x = batch.get(key)
        if x is None:
            continue
        if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            raise TypeError(f"batch[{key!r}] must hold integers (indices below {r.size_name} = "
                            f"{r.size}), got {jnp.result_type(x)}.")
        out.append((key, x))
    return out


def index_extremes(batch, ranges: tuple) -> dict:
    """``{key: [min, max]}`` over the entries of ``batch[key]`` that are not the
    ignore value, with 0 folded in (0 is always valid): a reduction to two
    integers per key, computed on device (traceable)."""
    out = {}
    for key, x in _entries(batch, ranges):
        r = dict(ranges)[key]
        x = jnp.asarray(x)
        kept = x if r.ignore is None else jnp.where(x == r.ignore, jnp.zeros_like(x), x)
        out[key] = jnp.stack([jnp.min(kept, initial=0), jnp.max(kept, initial=0)])
    return out


def extremes_ok(extremes: dict, ranges: tuple) -> jax.Array:
    """A bool scalar: every ``[min, max]`` of :func:`index_extremes` is in range."""
    ok = jnp.ones([], jnp.bool_)
    for key, r in ranges:
        if key in extremes:
            lo, hi = extremes[key][0], extremes[key][1]
            ok = ok & (lo >= 0) & (hi < r.size)
    return ok


def out_of_range(name: str, lo: int, hi: int, r: IndexRange) -> Optional[str]:
    """The sentence for the entry ``name`` (e.g. ``"batch['labels']"``) with
    extremes ``lo, hi``, or ``None`` if they are in range."""
    bad = [v for v in (int(lo), int(hi)) if v < 0 or v >= r.size]
    if not bad:
        return None
    also = "" if r.ignore is None else f" or be {r.ignore} (ignored)"
    held = " and ".join(str(v) for v in dict.fromkeys(bad))
    return (f"{name} holds {held}; its entries must lie in [0, {r.size}) "
            f"({r.size_name} = {r.size}){also}")


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer) and (
        not isinstance(x, jax.Array) or x.is_fully_addressable)


def check_indices(batch, ranges: tuple, where: str, prefix: str = "batch") -> Optional[jax.Array]:
    """Check ``batch``'s ranged integer entries.

    Concrete entries outside their range raise ``ValueError`` (``where`` opens
    the message, ``prefix`` names the batch: ``batch['labels']``; ``""``:
    ``labels``); if any entry is traced (under ``jit``, where nothing can
    raise), returns a float32 scalar that is 1 when every entry is in range and
    NaN otherwise, for the caller to multiply its result by; else ``None``.
    """
    entries = _entries(batch, ranges)
    if not entries:
        return None
    if all(_concrete(x) for _, x in entries):
        for key, x in entries:
            x = np.asarray(x)
            r = dict(ranges)[key]
            kept = x if r.ignore is None else np.where(x == r.ignore, 0, x)
            name = f"{prefix}[{key!r}]" if prefix else key
            msg = out_of_range(name, np.min(kept, initial=0), np.max(kept, initial=0), r)
            if msg:
                raise ValueError(f"{where}: {msg}.")
        return None
    ok = extremes_ok(index_extremes(dict(entries), ranges), ranges)
    return jnp.where(ok, jnp.float32(1), jnp.float32(jnp.nan))


def nan_unless(factor: Optional[jax.Array], x):
    """Every floating leaf of ``x`` times :func:`check_indices`' factor (in its
    dtype); ``x`` if the factor is None."""
    if factor is None:
        return x

    def leaf(v):
        if not jnp.issubdtype(jnp.result_type(v), jnp.inexact):
            return v
        return v * factor.astype(jnp.result_type(v))

    return jax.tree.map(leaf, x)
