r"""The two ends of the LLaMA-style decoders as pure functions of plain-dict
parameters: the embedding and the output head with its loss.

.. math:: h_0 = E[x]\;(\times\sqrt D \text{ with scale\_embeddings}), \qquad
          \mathrm{logits} = \mathrm{RMSNorm}(h_L)\, W_{\mathrm{lm}}

with :math:`W_{\mathrm{lm}} = E^\top` when embeddings are tied (and
:math:`c \tanh(z/c)` on the logits with ``final_logit_softcapping``). The
head's loss never builds the ``[B, T, V]`` logits
(:func:`lomo_jax.cross_entropy.linear_cross_entropy`).

Example::

    h = llama_embed(cfg, params["embed"], batch)                      # [B, T, D]
    loss = llama_head(cfg, params["head"], h, batch, embed_params=params["embed"])
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lomo_jax.cross_entropy import linear_cross_entropy
from lomo_jax.embedding import embedding_lookup
from lomo_jax.models.batch import IGNORE_INDEX, default_labels, next_token_targets
from lomo_jax.models.config import LlamaConfig
from lomo_jax.models.norm import rms_norm

__all__ = ["head_logits", "llama_embed", "llama_head", "scale_embedding", "softcap_logits"]


def llama_embed(config: LlamaConfig, embed_params, batch) -> jax.Array:
    """``h_0 = E[input_ids]`` in ``config.dtype``: ``[B, T, D]`` (its gradient is
    summed in fp32 and allocated late, see :mod:`lomo_jax.embedding`)."""
    ids = jnp.asarray(batch["input_ids"])
    if ids.ndim != 2:
        raise ValueError(f"batch['input_ids'] must be [B, T] (a batch axis, then the sequence), "
                         f"got shape {list(ids.shape)}; for one sequence pass input_ids[None].")
    h = embedding_lookup(jnp.asarray(embed_params["embedding"]), ids).astype(config.dtype)
    return scale_embedding(config, h)


def scale_embedding(config: LlamaConfig, h):
    r""":math:`h \sqrt{D}` for ``scale_embeddings`` (the factor rounded to fp32,
    then to ``h``'s dtype, as ``transformers``' Gemma), else ``h``."""
    if not config.scale_embeddings:
        return h
    return h * jnp.asarray(np.float32(math.sqrt(config.hidden_size)), h.dtype)


def _head_input_and_weight(config: LlamaConfig, head_params, h, embed_params):
    """``(x, w, transposed)``: the normed ``h`` and the output projection, the
    tied embedding (``[V, D]``, ``transposed``) or the LM head (``[D, V]``)."""
    x = rms_norm(h, jnp.asarray(head_params["norm"]), config.rms_norm_eps, config.dtype,
                 config.norm_unit_offset)
    if not config.tie_word_embeddings:
        return x, jnp.asarray(head_params["lm_head"]), False
    if embed_params is None:
        raise ValueError("a tied-embedding config needs embed_params for the head.")
    return x, jnp.asarray(embed_params["embedding"]), True


def head_logits(config: LlamaConfig, head_params, h, embed_params=None) -> jax.Array:
    """Logits of the last hidden states ``h`` in ``config.dtype`` (whole, for
    inference and decoding; the loss does not build them)."""
    x, w, transposed = _head_input_and_weight(config, head_params, h, embed_params)
    w = w.astype(config.dtype)
    if transposed:
        return softcap_logits(config, jnp.dot(x, w.T))
    return softcap_logits(config, lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ()))))


def softcap_logits(config: LlamaConfig, logits):
    r""":math:`c \tanh(z / c)` for ``final_logit_softcapping`` :math:`c`, else ``z``."""
    cap = config.final_logit_softcapping
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def llama_head(config: LlamaConfig, head_params, h, batch, embed_params=None) -> jax.Array:
    r"""Final norm, LM head (or the tied embedding), scalar fp32 loss.

    The same value as ``causal_lm_loss(logits, default_labels(batch))``, but
    computed by :func:`lomo_jax.cross_entropy.linear_cross_entropy` over
    vocabulary chunks: the ``[B, T, V]`` logits, their softmax and their
    cotangent never exist whole.
    """
    x, w, transposed = _head_input_and_weight(config, head_params, h, embed_params)
    targets = next_token_targets(default_labels(batch))
    return linear_cross_entropy(x, w, targets, transposed=transposed, ignore_index=IGNORE_INDEX,
                                logit_softcap=config.final_logit_softcapping)
