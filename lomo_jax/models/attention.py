r"""Causal grouped-query attention of the LLaMA-style decoders.

With :math:`H` query heads and :math:`K` key/value heads (query head :math:`h`
reads kv head :math:`\lfloor h/(H/K) \rfloor`):

.. math:: \mathrm{Attn}(x) = \Big[\mathrm{softmax}\Big(\frac{q_h k_{g(h)}^\top}
          {\sqrt d} + M\Big) v_{g(h)}\Big]_{h=1}^{H} W_o

where :math:`M_{ts} = 0` if key :math:`s` is visible from query :math:`t`
(causal, inside the sliding window if any, not padding, same packed
document) and the lowest fp32 value otherwise (added, as ``transformers``'
eager attention, so a query that sees no key averages all values instead of
giving NaN). Scores and softmax are fp32.

Example::

    mask = key_mask(batch)                                 # [B, 1, T, T] or None
    o = attention(cfg, q, k, v, mask)                      # q [B, T, H, d] -> [B, T, H, d]
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from jax import lax

from lomo_jax.models.config import LlamaConfig

__all__ = ["attend", "attention", "attention_mask", "key_mask"]


def attention_mask(config: LlamaConfig, seq_len: int, padding_mask=None,
                   sliding=None, *, query_start=0, num_queries=None) -> jax.Array:
    r"""Boolean visibility ``[B or 1, Q, T]`` (query, key): causal, inside the
    sliding window if any, and key not padding (``padding_mask [B, T]``, nonzero
    = keep). The model itself passes causality and the window to
    ``jax.nn.dot_product_attention`` as flags and builds only
    :func:`key_mask`; this dense form is for inspection, tests and decoding.
    ``sliding``: with mixed ``config.layer_types``, whether this layer uses
    the window (a bool, may be traced); required then. The queries are
    positions ``query_start .. query_start + num_queries - 1`` (``query_start``
    may be traced; default: all ``T``, so ``Q = T``) -- a decoding step builds
    only its own rows."""
    keys = jnp.arange(seq_len)
    queries = keys if num_queries is None else query_start + jnp.arange(num_queries)
    vis = keys[None, :] <= queries[:, None]
    if config.sliding_window is not None:
        in_window = keys[None, :] > queries[:, None] - int(config.sliding_window)
        if config.layer_types is not None:
            if sliding is None:
                raise ValueError("this config mixes sliding and full attention layers "
                                 "(layer_types): pass the layer's `sliding` flag.")
            in_window = in_window | ~jnp.asarray(sliding)
        vis = vis & in_window
    vis = vis[None]
    if padding_mask is not None:
        vis = vis & (jnp.asarray(padding_mask) != 0)[:, None, :]
    return vis


def key_mask(batch: Mapping[str, Any]) -> Optional[jax.Array]:
    r"""The part of the attention mask that is not causal: ``[B, 1, T, T]`` bool
    (``None`` when the batch has neither ``attention_mask`` nor ``segment_ids``).

    Key :math:`s` is visible from query :math:`t` when it is not padding
    (``attention_mask[b, s] != 0``) and, with packed sequences, when both are
    in the same document (``segment_ids[b, t] == segment_ids[b, s]``).
    """
    pad, seg = batch.get("attention_mask"), batch.get("segment_ids")
    mask = None
    if pad is not None:
        mask = (jnp.asarray(pad) != 0)[:, None, None, :]
    if seg is not None:
        seg = jnp.asarray(seg)
        same = seg[:, None, :, None] == seg[:, None, None, :]
        mask = same if mask is None else mask & same
    return mask


def attention(config: LlamaConfig, q, k, v, mask=None, sliding=None) -> jax.Array:
    r"""Causal grouped-query attention, ``jax.nn.dot_product_attention``.

    ``q [B, T, H, d]``, ``k, v [B, T, K, d]``, ``mask [B, 1, T, T]`` bool or
    ``None`` (:func:`key_mask`: padding, packed-sequence segments).
    ``config.attention_implementation``:

    * ``"xla"``: XLA's implementation, fp32 scores and softmax. Without a key
      mask, causality and the window are flags; with one, visibility is an
      additive fp32 bias (the lowest float where hidden), as in
      ``transformers``' eager attention: a query that sees no key (a
      left-padding position) averages all values instead of giving NaN, with
      the same values and gradients as PyTorch.
    * ``"cudnn"``: cuDNN's flash attention (bf16/fp16, GPU): causality and the
      window are flags (no ``[T, T]`` scores exist); a key mask becomes a
      ``[B, 1, T, T]`` bias. A query that sees no key then averages the values
      it may causally see (its output is padding either way).
    * ``"auto"`` (default): cuDNN when the program is compiled for a CUDA GPU
      (``lax.platform_dependent``: decided when lowering, so the same traced
      step runs XLA's on CPU/TPU) and the dtype and head size allow it, else XLA.

    Configs with ``attn_logit_softcapping`` or mixed ``layer_types`` (then
    ``sliding`` is this layer's flag) always use :func:`attend` (XLA, the
    dense visibility as a bias), whatever the implementation setting.
    """
    if config.attn_logit_softcapping is not None or config.layer_types is not None:
        visible = attention_mask(config, q.shape[1], sliding=sliding)[:, None]
        return attend(config, q, k, v, visible if mask is None else visible & mask)
    window = None
    if config.sliding_window is not None:
        window = (int(config.sliding_window) - 1, 0)

    def xla(q, k, v):
        return _xla_attention(config, q, k, v, mask, window)

    def cudnn(q, k, v):
        bias = None
        if mask is not None:  # cuDNN wants the bias [B, 1, T, T] in full
            b, t = q.shape[:2]
            bias = jnp.where(mask, 0.0, jnp.finfo(q.dtype).min).astype(q.dtype)
            bias = jnp.broadcast_to(bias, (b, 1, t, t))
        return jax.nn.dot_product_attention(
            q, k, v, bias=bias, scale=config.attention_scale, is_causal=True,
            local_window_size=window, implementation="cudnn")

    impl = config.attention_implementation
    if impl == "auto":
        if not _cudnn_eligible(q):
            return xla(q, k, v)
        return lax.platform_dependent(q, k, v, cuda=cudnn, default=xla)
    return xla(q, k, v) if impl == "xla" else cudnn(q, k, v)


def _xla_attention(config, q, k, v, mask, window):
    """XLA's ``dot_product_attention``; a key mask becomes an additive fp32 bias."""

    def run(q, k, v):
        if mask is None:
            return jax.nn.dot_product_attention(
                q, k, v, scale=config.attention_scale, is_causal=True, local_window_size=window,
                implementation="xla")
        bias = _visibility_bias(mask & attention_mask(config, q.shape[1])[:, None])
        return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=config.attention_scale,
                                            implementation="xla")

    if q.dtype != jnp.float16:
        return run(q, k, v)

    def upcast(q, k, v):  # XLA:CPU has no fp16 x fp16 -> fp32 matmul
        return run(*(a.astype(jnp.float32) for a in (q, k, v))).astype(q.dtype)

    return lax.platform_dependent(q, k, v, cpu=upcast, default=run)


def _visibility_bias(visible):
    """0 where visible, the lowest fp32 value where hidden (added to the scores)."""
    return jnp.where(visible, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def attend(config: LlamaConfig, q, k, v, visible) -> jax.Array:
    r"""XLA attention of ``q [B, C, H, d]`` on ``k, v [B, S, K, d]`` with a dense
    visibility ``[B or 1, 1, C, S]`` bool (hidden keys get the lowest fp32 value
    added to their score, so a query that sees none averages all values, as
    ``transformers``' eager attention). With ``attn_logit_softcapping`` :math:`c`
    the scores are :math:`c \tanh(s / c)` before the mask (:func:`_softcapped`).
    Used by :func:`attention` and by the KV-cache decoding."""
    bias = _visibility_bias(visible)
    dtype = q.dtype
    if dtype == jnp.float16:  # XLA:CPU has no fp16 x fp16 -> fp32 matmul
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    if config.attn_logit_softcapping is None:
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=config.attention_scale,
                                           implementation="xla")
    else:
        scale = config.attention_scale or q.shape[-1] ** -0.5
        out = _softcapped(q, k, v, bias, scale, float(config.attn_logit_softcapping))
    return out.astype(dtype)


def _softcapped(q, k, v, bias, scale, cap):
    r""":math:`\mathrm{softmax}(c \tanh(q k^\top \sigma / c) + M) v` per query head
    (grouped-query: head :math:`h` reads kv head :math:`h / G`), fp32 scores."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, h // kh, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    s = cap * jnp.tanh(s / cap) + bias[:, :, None]
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(b, t, h, d)


def _cudnn_eligible(q) -> bool:
    d = q.shape[-1]
    return q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128 and _cudnn_traceable()


@functools.lru_cache(maxsize=1)
def _cudnn_traceable() -> bool:
    """Whether this JAX can trace cuDNN attention at all (it needs the CUDA
    plugin and cuDNN libraries, also for a deviceless GPU compile)."""
    x = jax.ShapeDtypeStruct((1, 64, 1, 64), jnp.bfloat16)
    try:
        jax.eval_shape(lambda a: jax.nn.dot_product_attention(a, a, a, implementation="cudnn"), x)
    except Exception:  # noqa: BLE001 - no CUDA plugin / cuDNN: XLA's attention
        return False
    return True
