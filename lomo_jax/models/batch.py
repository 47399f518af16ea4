r"""What a training batch means to the LLaMA-style decoders: positions,
labels, next-token targets, the vocabulary ranges of its ids, the
per-batch context (RoPE tables, key mask) every layer shares.

The loss is next-token cross-entropy averaged over the positions whose
(shifted) label is not ``-100``:

.. math:: \ell = \frac{1}{|\mathcal V|} \sum_{(b,t) \in \mathcal V}
          -\log \mathrm{softmax}(\mathrm{logits}_{b,t})_{y_{b,t+1}}

Labels default to ``input_ids`` with padding (``attention_mask == 0``) and
each packed document's first token set to ``-100``; positions default to
``0..T-1`` (restarting per document with ``segment_ids``).

Example::

    pos = positions(batch)                                 # [B, T] int32
    targets = next_token_targets(default_labels(batch))    # [B, T], -100 = no loss
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from lomo_jax.embedding import IndexRange, check_indices
from lomo_jax.models.attention import key_mask
from lomo_jax.models.config import LlamaConfig
from lomo_jax.models.rope import rotary_cos_sin

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "default_labels", "llama_index_ranges",
           "next_token_targets", "positions", "segment_positions"]

IGNORE_INDEX = -100


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 where each segment (document) starts:
    ``[[7, 7, 7, 2, 2]] -> [[0, 1, 2, 0, 1]]``."""
    seg = jnp.asarray(segment_ids)
    t = jnp.arange(seg.shape[-1], dtype=jnp.int32)
    return t - lax.cummax(jnp.where(_segment_starts(seg), t, 0), axis=seg.ndim - 1)


def _segment_starts(seg: jax.Array) -> jax.Array:
    """True where a segment starts (the first token of each row included)."""
    return jnp.concatenate(
        [jnp.ones_like(seg[..., :1], bool), seg[..., 1:] != seg[..., :-1]], axis=-1)


def positions(batch: Mapping[str, Any]) -> jax.Array:
    """``batch["position_ids"]``; else positions restarting in each segment
    (``segment_ids``); else ``0..T-1`` for every row."""
    pos = batch.get("position_ids")
    if pos is not None:
        return jnp.asarray(pos)
    if batch.get("segment_ids") is not None:
        return segment_positions(batch["segment_ids"])
    b, t = jnp.shape(batch["input_ids"])
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))


def default_labels(batch: Mapping[str, Any]) -> jax.Array:
    """``batch["labels"]`` if given, else ``input_ids`` with padding positions
    (``attention_mask == 0``) and the first token of every segment after the
    first (``segment_ids``: a document's first token is not predicted from the
    previous document) set to ``-100``."""
    labels = batch.get("labels")
    if labels is not None:
        return jnp.asarray(labels)
    labels = jnp.asarray(batch["input_ids"])
    mask = batch.get("attention_mask")
    if mask is not None:
        labels = jnp.where(jnp.asarray(mask) != 0, labels, IGNORE_INDEX)
    seg = batch.get("segment_ids")
    if seg is not None:
        new_doc = _segment_starts(jnp.asarray(seg)).at[..., 0].set(False)
        labels = jnp.where(new_doc, IGNORE_INDEX, labels)
    return labels


def next_token_targets(labels: jax.Array) -> jax.Array:
    """``labels`` shifted left by one, ``-100`` in the last column: the target
    of position ``t`` is ``labels[:, t + 1]``."""
    pad = jnp.full_like(labels[:, :1], IGNORE_INDEX)
    return jnp.concatenate([labels[:, 1:], pad], axis=1)


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    r"""Mean next-token cross-entropy in fp32 from full ``[B, T, V]`` logits:
    position ``t`` predicts ``labels[:, t + 1]``; labels equal to ``-100`` are
    ignored (0 if all are). The model's own loss computes the same without
    the logits (:func:`lomo_jax.cross_entropy.linear_cross_entropy`)."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, axis=-1)
    safe = jnp.where(valid, targets, 0).astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(valid, nll, 0.0))
    return total / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


def llama_index_ranges(config: LlamaConfig) -> dict:
    """The batch's integer entries that index the vocabulary: ``input_ids`` in
    ``[0, V)``, ``labels`` in ``[0, V)`` or ``-100`` (for
    :class:`lomo_jax.LayeredModel`'s ``index_ranges``)."""
    v = config.vocab_size
    return {"input_ids": IndexRange(v), "labels": IndexRange(v, ignore=IGNORE_INDEX)}


def check_batch(config: LlamaConfig, batch, keys, where: str) -> None:
    """Concrete ``batch[k]`` (``k`` in ``keys``) outside :func:`llama_index_ranges`
    raise ``ValueError`` naming the key, the value and ``vocab_size``. Traced
    ones cannot raise: an id out of range reads a NaN row
    (:func:`lomo_jax.embedding.embedding_lookup`) and a label gets a NaN weight
    (:func:`lomo_jax.cross_entropy.linear_cross_entropy`), so the loss, the
    gradients and the logits from that token on are NaN, never finite and wrong."""
    ranges = tuple((k, r) for k, r in sorted(llama_index_ranges(config).items()) if k in keys)
    check_indices({k: batch.get(k) for k in keys}, ranges, where)


def layer_context(config: LlamaConfig, batch: Mapping[str, Any]):
    """``(cos, sin, key mask or None)`` shared by every layer, from the batch."""
    cos, sin = rotary_cos_sin(config, positions(batch))
    return cos, sin, key_mask(batch)
