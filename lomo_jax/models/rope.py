r"""Rotary position embeddings (RoPE) of the LLaMA-style decoders.

For position :math:`p` and frequencies :math:`\omega_i = \theta^{-2i/d}`
(``rope_theta`` :math:`=\theta`, head size :math:`d`)

.. math:: \mathrm{RoPE}(x)_p = x_p \cos(p\,\omega) + \mathrm{rot}(x_p) \sin(p\,\omega),
          \qquad \mathrm{rot}([x_1, x_2]) = [-x_2, x_1]

(``transformers``' "rotate half" convention). ``"linear"`` scaling divides
every :math:`\omega_i` by the factor, ``"llama3"`` only the low frequencies
with a smooth ramp, ``"yarn"`` blends per dimension and scales ``cos``/``sin``,
``"dynamic"`` rescales the base for sequences beyond
``max_position_embeddings``.

Example::

    cos, sin = rotary_cos_sin(cfg, positions)          # [B, T, head_dim]
    q = apply_rotary(q, cos, sin)                      # q [B, T, H, head_dim]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lomo_jax.models.config import LlamaConfig

__all__ = ["apply_rotary", "rope_attention_factor", "rope_inv_freq", "rotary_cos_sin"]


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    r"""The RoPE inverse frequencies :math:`\omega_i = \theta^{-2i/d}`, ``[head_dim // 2]``
    fp32, scaled as ``transformers`` does for ``linear`` (all divided by the
    factor), ``llama3`` (low frequencies divided, a smooth ramp between) and
    ``yarn`` (:func:`_yarn_inv_freq`). For ``dynamic`` these are the default
    frequencies, those of sequences up to ``max_position_embeddings``
    (:func:`rotary_cos_sin` rescales longer ones)."""
    d = config.head_dim
    base = np.float32(config.rope_theta)
    inv = (np.float32(1.0) / (base ** (np.arange(0, d, 2).astype(np.float32) / np.float32(d)))).astype(
        np.float32
    )
    sc = config.rope_scaling_dict or {}
    rtype = config.rope_type
    if rtype == "linear":
        inv = (inv / np.float32(sc["factor"])).astype(np.float32)
    elif rtype == "llama3":
        inv = _llama3_inv_freq(inv, sc)
    elif rtype == "yarn":
        inv = _yarn_inv_freq(config, sc)
    return inv


def _llama3_inv_freq(inv: np.ndarray, sc: dict) -> np.ndarray:
    """Llama 3: wavelengths above ``original / low_freq_factor`` divided by the
    factor, below ``original / high_freq_factor`` kept, a linear blend between."""
    factor = np.float32(sc["factor"])
    lo, hi = np.float32(sc["low_freq_factor"]), np.float32(sc["high_freq_factor"])
    old = np.float32(sc["original_max_position_embeddings"])
    lo_wl, hi_wl = old / lo, old / hi
    wl = (np.float32(2 * math.pi) / inv).astype(np.float32)
    out = np.where(wl > lo_wl, inv / factor, inv).astype(np.float32)
    smooth = (old / wl - lo) / (hi - lo)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wl < hi_wl) & ~(wl > lo_wl)
    return np.where(medium, smoothed, out).astype(np.float32)


def _yarn_factor(config: LlamaConfig, sc: dict) -> float:
    return float(sc.get("factor") or
                 config.max_position_embeddings / sc["original_max_position_embeddings"])


def _yarn_inv_freq(config: LlamaConfig, sc: dict) -> np.ndarray:
    r"""YaRN: :math:`\omega_i = \omega_i/s\,(1 - e_i) + \omega_i\,e_i` with
    :math:`e_i = 1 - \mathrm{clip}((i - l)/(h - l), 0, 1)`, where :math:`[l, h]`
    are the dimensions that turn ``beta_fast`` and ``beta_slow`` times over
    ``original_max_position_embeddings`` positions, :math:`s` the factor."""
    d, base = config.head_dim, float(config.rope_theta)
    factor = np.float32(_yarn_factor(config, sc))
    pos_freqs = (np.float32(base) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
                 ).astype(np.float32)
    lo, hi = _yarn_range(sc, d, base)
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo),
                   0, 1).astype(np.float32)
    keep = np.float32(1) - ramp
    inv = (np.float32(1) / (factor * pos_freqs)) * (1 - keep) + (np.float32(1) / pos_freqs) * keep
    return inv.astype(np.float32)


def _yarn_range(sc: dict, d: int, base: float) -> tuple:
    """The dimension range ``(l, h)`` of the YaRN ramp (``truncate``: integers)."""
    omax = sc["original_max_position_embeddings"]

    def dim_of(rotations):
        return d * math.log(omax / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = dim_of(sc.get("beta_fast") or 32), dim_of(sc.get("beta_slow") or 1)
    if sc.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    return lo, (hi + 0.001 if lo == hi else hi)


def rope_attention_factor(config: LlamaConfig) -> float:
    r"""The factor on ``cos``/``sin`` (1 but for ``yarn``: ``attention_factor``, else
    :math:`m(s) = 0.1 \ln s + 1` for factor :math:`s > 1`, or
    :math:`m(s, \mathrm{mscale}) / m(s, \mathrm{mscale\_all\_dim})` with
    :math:`m(s, a) = 0.1\,a \ln s + 1` when both are set)."""
    sc = config.rope_scaling_dict or {}
    if config.rope_type != "yarn":
        return 1.0
    if sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])
    s = _yarn_factor(config, sc)

    def m(a=1.0):
        return 1.0 if s <= 1 else 0.1 * a * math.log(s) + 1.0

    if sc.get("mscale") and sc.get("mscale_all_dim"):
        return float(m(sc["mscale"]) / m(sc["mscale_all_dim"]))
    return m()


def _dynamic_inv_freq(config: LlamaConfig, positions: jax.Array) -> jax.Array:
    r"""Dynamic NTK for the sequence length :math:`s = \max(\text{positions}) + 1`
    (over the whole batch, as ``transformers``): the default frequencies when
    :math:`s \le M` (``max_position_embeddings``), else those of the base
    :math:`\theta\,(f s / M - (f - 1))^{d/(d-2)}`. Traced, so exact for any length."""
    d, big_m = config.head_dim, config.max_position_embeddings
    f = float(config.rope_scaling_dict["factor"])
    s = jnp.max(positions).astype(jnp.int32) + 1
    sf = jnp.maximum(s, big_m).astype(jnp.float32)
    base = jnp.float32(config.rope_theta) * ((f * sf / big_m) - (f - 1)) ** (d / (d - 2))
    inv = 1.0 / base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    return jnp.where(s > big_m, inv, jnp.asarray(rope_inv_freq(config)))


def rotary_cos_sin(config: LlamaConfig, positions: jax.Array, dtype=None):
    r"""``cos, sin`` of :math:`p\,\omega` for integer ``positions [B, T]``:
    ``[B, T, head_dim]`` (each frequency twice, halves layout), computed in
    fp32 (times :func:`rope_attention_factor` for ``yarn``) then cast to ``dtype``."""
    if config.rope_type == "dynamic":
        inv = _dynamic_inv_freq(config, positions)
    else:
        inv = jnp.asarray(rope_inv_freq(config))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    dtype = config.dtype if dtype is None else dtype
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    factor = rope_attention_factor(config)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.astype(dtype), sin.astype(dtype)


def _rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    r""":math:`x \cos + \mathrm{rot}(x) \sin` for ``x [B, T, heads, d]`` and
    ``cos, sin [B, T, d]``."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + _rotate_half(x) * sin
