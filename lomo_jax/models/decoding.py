r"""Text generation with a KV cache for :mod:`lomo_jax.models.llama`.

:func:`generate` decodes ``max_new_tokens`` tokens from a (left-padded) batch
of prompts, greedily or by sampling, in one jitted program:

1. **Prefill**: the prompt ``[B, T]`` runs through the stacked layers (a
   ``lax.scan``); every layer writes its rotated keys and values into slots
   ``0..T-1`` of a cache ``[L, B, T + N, K, d]`` (``N = max_new_tokens``), and
   the last position's logits give the first new token.
2. **Decode**: a ``lax.scan`` over the remaining ``N - 1`` steps feeds the
   previous token at slot ``T + i`` through the same layer scan, which writes
   one cache slot per layer and attends to the cache.

The layer math is the model's own: the layer's NNX sub-modules are merged from
the stacked parameters (:meth:`LlamaAttention.qkv` / :meth:`LlamaAttention.out`,
the MLP branch of :func:`lomo_jax.models.llama.llama_layer`), visibility is
:func:`lomo_jax.models.llama.attention_mask` (causal, sliding window,
padding) over cache slots, and hidden keys get the lowest fp32 value added to
their score, as in the full-sequence model. So the logits at every step equal
those of :func:`lomo_jax.models.llama.llama_logits` on the whole sequence so
far (with ``position_ids`` as below).

**Padding**, as ``transformers``' ``generate``: prompts are *left*-padded
(``attention_mask`` 0 = pad); positions are ``cumsum(attention_mask) - 1``
(pads get 0), so every row's first real token is at position 0; pad keys are
hidden from every query. The sliding window (Mistral) counts cache slots,
pads included, as ``transformers`` does; the cache still holds all ``T + N``
slots (the window is a mask, not a rolling buffer). Right padding (a pad
after a row's first token) is refused.

**Sampling**: ``temperature == 0`` is greedy (argmax). Otherwise the logits
are divided by the temperature, filtered by ``top_k`` then ``top_p``
(nucleus: the smallest set of most likely tokens whose probability reaches
``top_p``; tokens tied with the last kept one are kept), and a token is drawn
from the softmax with one key per step (``jax.random.split(rng, N)``), the
order of ``transformers``' logits warpers.

**Stopping**: none but ``max_new_tokens`` (the config has no EOS id): every
row gets exactly ``max_new_tokens`` tokens; cut them at your EOS id if you
have one.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lomo_jax.models.attention import attend, attention_mask
from lomo_jax.models.config import LlamaConfig, layer_sliding
from lomo_jax.models.embed_head import head_logits, llama_embed
from lomo_jax.models.layers import merge_submodule, mlp_branch
from lomo_jax.models.nnx_module import branch_names
from lomo_jax.models.params import check_params
from lomo_jax.models.rope import rotary_cos_sin

__all__ = ["generate", "filter_logits", "forward_cached", "init_cache", "prompt_positions"]


def generate(cfg: LlamaConfig, params, input_ids, *, attention_mask=None,
             max_new_tokens: int, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, rng=None) -> jax.Array:
    """Generates ``max_new_tokens`` tokens after each prompt with a KV cache.

    Args:
      cfg: the model's :class:`lomo_jax.models.LlamaConfig`.
      params: plain-dict parameters ``{"embed", "layers", "head"}``.
      input_ids: ``[B, T]`` integer prompts, left-padded if their lengths differ.
      attention_mask: ``[B, T]``, 1 = token, 0 = padding (``None``: all tokens).
        Every row needs a real token and no padding after its first token
        (checked unless ``generate`` is itself traced, e.g. under ``jax.jit``).
      max_new_tokens: ``N >= 1``; ``T + N`` may not exceed
        ``cfg.max_position_embeddings``.
      temperature: ``0.0`` (default) for greedy decoding, else the softmax
        temperature of sampling (a Python number; temperature, ``top_k`` and
        ``top_p`` values do not cause recompiles, turning them on/off does).
      top_k: keep the ``k`` most likely tokens when sampling (ignored if greedy).
      top_p: nucleus sampling mass in ``(0, 1]`` (ignored if greedy).
      rng: a ``jax.random`` key; required when ``temperature > 0``.

    Returns:
      The new tokens only, ``[B, N]`` int32 (no EOS handling: always ``N``).

    Raises:
      ValueError: naming the bad argument (shapes, dtypes, right padding,
        ranges, a missing ``rng``).

    Example::

        ids = jnp.array([[0, 0, 5, 9], [3, 7, 2, 4]])      # row 0 left-padded
        mask = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]])
        new = generate(cfg, params, ids, attention_mask=mask, max_new_tokens=3)
        new.shape                                          # (2, 3)
        full = jnp.concatenate([ids, new], axis=1)         # prompt + continuation
        sampled = generate(cfg, params, ids, attention_mask=mask, max_new_tokens=3,
                           temperature=0.7, top_p=0.9, rng=jax.random.key(0))
    """
    check_params(cfg, params)
    ids, mask = _check_prompt(cfg, input_ids, attention_mask, max_new_tokens)
    knobs = _check_sampling(cfg, temperature, top_k, top_p, rng)
    rng = None if knobs[0] is None else rng  # greedy: one program whatever rng is
    return _generate(cfg, params, ids, mask, rng, *knobs, max_new_tokens=int(max_new_tokens))


def _check_prompt(cfg, input_ids, attention_mask, max_new_tokens):
    """``(ids, mask)`` as int32 after checking shapes, dtypes and the padding side."""
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be a [B, T] integer array; got shape {ids.shape} "
                         f"and dtype {ids.dtype}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}.")
    total = ids.shape[1] + int(max_new_tokens)
    if total > cfg.max_position_embeddings:
        raise ValueError(f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} = "
                         f"{total} exceeds cfg.max_position_embeddings="
                         f"{cfg.max_position_embeddings}.")
    if attention_mask is None:
        return ids.astype(jnp.int32), jnp.ones(ids.shape, jnp.int32)
    mask = jnp.asarray(attention_mask)
    if mask.shape != ids.shape or not (jnp.issubdtype(mask.dtype, jnp.integer)
                                       or mask.dtype == jnp.bool_):
        raise ValueError(f"attention_mask must be an integer or bool array of the shape of "
                         f"input_ids {ids.shape}; got shape {mask.shape}, dtype {mask.dtype}.")
    _check_concrete(cfg, ids, mask)
    return ids.astype(jnp.int32), mask.astype(jnp.int32)


def _check_concrete(cfg, ids, mask):
    """Value checks (skipped for traced inputs): token range, 0/1 mask, left padding."""
    if isinstance(ids, jax.core.Tracer) or isinstance(mask, jax.core.Tracer):
        return
    ids, m = np.asarray(ids), np.asarray(mask).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise ValueError(f"input_ids must lie in [0, vocab_size={cfg.vocab_size}); got "
                         f"values in [{ids.min()}, {ids.max()}].")
    if not np.isin(m, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token).")
    if not m[:, -1].all():
        rows = np.flatnonzero(m[:, -1] == 0).tolist()
        raise ValueError(f"attention_mask rows {rows} end in padding: generate needs left "
                         "padding (right padding / empty prompts are not supported).")
    if (np.diff(m, axis=1) < 0).any():
        raise ValueError("attention_mask has padding after a token: generate needs left "
                         "padding (pads only before the first token of each row).")


def _check_sampling(cfg, temperature, top_k, top_p, rng):
    """``(temperature, top_k, top_p)`` as arrays, ``None`` where unused (greedy:
    all ``None``): values are traced, only which are ``None`` is compiled in."""
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0; got {temperature!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1; got {top_k!r}.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1]; got {top_p!r}.")
    if temperature == 0:
        return None, None, None
    if rng is None:
        raise ValueError(f"sampling (temperature={temperature}) needs rng, a jax.random key.")
    if not hasattr(rng, "dtype"):
        raise ValueError(f"rng must be a jax.random key; got {type(rng).__name__}.")
    key_like = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and jnp.ndim(rng) == 0
    if not key_like and not (rng.dtype == jnp.uint32 and jnp.shape(rng) == (2,)):
        raise ValueError(f"rng must be a single jax.random key; got dtype {rng.dtype}, "
                         f"shape {jnp.shape(rng)}.")
    top_k = None if top_k is None or top_k >= cfg.vocab_size else jnp.int32(top_k)
    top_p = None if top_p is None or top_p >= 1.0 else jnp.float32(top_p)
    return jnp.float32(temperature), top_k, top_p


@functools.partial(jax.jit, static_argnums=0, static_argnames="max_new_tokens")
def _generate(cfg, params, ids, mask, rng, temperature, top_k, top_p, *, max_new_tokens):
    """Prefill, then a ``lax.scan`` of decode steps; ``[B, N]`` new tokens."""
    n, t = max_new_tokens, ids.shape[1]
    keys = jnp.zeros((n,)) if temperature is None else jax.random.split(rng, n)
    pick = functools.partial(_next_token, temperature=temperature, top_k=top_k, top_p=top_p)
    valid = jnp.concatenate([mask, jnp.ones((ids.shape[0], n), jnp.int32)], axis=1)
    pos = prompt_positions(mask)
    cache = init_cache(cfg, ids.shape[0], t + n)
    logits, cache = forward_cached(cfg, params, cache, ids, pos, valid, 0)
    first = pick(logits, keys[0])

    def step(carry, xs):
        cache, tok = carry
        i, key = xs
        logits, cache = forward_cached(cfg, params, cache, tok[:, None],
                                       pos[:, -1:] + i, valid, t + i - 1)
        nxt = pick(logits, key)
        return (cache, nxt), nxt

    _, rest = lax.scan(step, (cache, first), (jnp.arange(1, n), keys[1:]))
    return jnp.concatenate([first[:, None], rest.T], axis=1).astype(jnp.int32)


def prompt_positions(mask: jax.Array) -> jax.Array:
    """Positions of a left-padded prompt, ``cumsum(mask) - 1`` with 0 at the pads
    (``transformers``' ``generate``): ``[[0, 1, 1]] -> [[0, 0, 1]]``."""
    mask = jnp.asarray(mask).astype(jnp.int32)
    return jnp.where(mask != 0, jnp.cumsum(mask, axis=1) - 1, 0)


def init_cache(cfg: LlamaConfig, batch: int, length: int) -> tuple:
    """An empty KV cache ``(k, v)``, each ``[L, batch, length, K, d]`` in ``cfg.dtype``."""
    shape = (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)
    return jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)


def forward_cached(cfg: LlamaConfig, params, cache, ids, pos, valid, start):
    """Runs tokens ``ids [B, C]`` at ``positions [B, C]`` in cache slots
    ``start..start+C-1`` through all layers (a ``lax.scan``), writing their keys
    and values into ``cache``; ``valid [B, S]`` (0 = padding slot).

    Returns ``(logits, cache)``: the last token's fp32 logits ``[B, V]`` and
    the updated cache.
    """
    cos, sin = rotary_cos_sin(cfg, pos)
    h = llama_embed(cfg, params["embed"], {"input_ids": ids})

    def body(h, xs):
        p, k, v, i = xs
        vis = attention_mask(cfg, valid.shape[1], valid, layer_sliding(cfg, i),
                             query_start=start, num_queries=ids.shape[1])[:, None]  # [B,1,C,S]
        h, k, v = _layer_cached(cfg, p, h, k, v, cos, sin, vis, start)
        return h, (k, v)

    layers = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
    h, cache = lax.scan(body, h, (params["layers"], *cache, layers))
    logits = head_logits(cfg, params["head"], h[:, -1:], params["embed"])
    return logits[:, 0].astype(jnp.float32), cache


def _layer_cached(cfg, p, h, k_cache, v_cache, cos, sin, visible, start):
    """One decoder layer (:func:`lomo_jax.models.llama.llama_layer`'s math) against its cache
    ``[B, S, K, d]``; returns ``(h, k_cache, v_cache)``."""
    names = branch_names(cfg)[0]
    norm, attn, *post = (merge_submodule(cfg, n, p[n]) for n in names)
    q, k, v = attn.qkv(norm(h), cos, sin)
    k_cache = lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, axis=1)
    v_cache = lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, axis=1)
    o = attn.out(attend(cfg, q, k_cache, v_cache, visible))
    for m in post:  # post_norms (Gemma 2)
        o = m(o)
    h = h + o
    return h + mlp_branch(cfg, p, h), k_cache, v_cache


def _next_token(logits, key, *, temperature, top_k, top_p):
    """Greedy (``temperature is None``) or sampled next token ``[B]`` from fp32 logits."""
    if temperature is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits / temperature, top_k, top_p),
                                  axis=-1).astype(jnp.int32)


def filter_logits(logits: jax.Array, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> jax.Array:
    """``logits [B, V]`` with the tokens outside the ``top_k`` most likely, then
    outside the ``top_p`` nucleus, set to ``-inf`` (ties with the last kept
    token are kept). ``top_k`` and ``top_p`` may be traced; ``None``: no filter."""
    srt = -jnp.sort(-logits, axis=-1)                      # descending
    if top_k is not None:
        kth = lax.dynamic_index_in_dim(srt, jnp.clip(top_k, 1, srt.shape[-1]) - 1, axis=-1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
        srt = jnp.where(srt < kth, -jnp.inf, srt)
    if top_p is not None:
        probs = jax.nn.softmax(srt, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # mass before it < top_p
        last = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < last, -jnp.inf, logits)
    return logits
