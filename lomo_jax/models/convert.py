r"""Hugging Face ``transformers`` <-> :mod:`lomo_jax.models.llama` weights.

Name and layout mapping (``i`` = layer index; PyTorch ``nn.Linear`` stores
``weight [out, in]``, Flax kernels are ``[in, out]``, so every projection is
transposed; the ``L`` per-layer tensors are stacked on a new leading axis)::

    model.embed_tokens.weight              [V, D]   -> embed.embedding                    [V, D]
    model.layers.i.input_layernorm.weight  [D]      -> layers.input_layernorm.scale       [L, D]
    model.layers.i.self_attn.q_proj.weight [H*d, D] -> layers.self_attn.q_proj.kernel     [L, D, H*d]
    model.layers.i.self_attn.q_proj.bias   [H*d]    -> layers.self_attn.q_proj.bias       [L, H*d]
    ... k_proj, v_proj, o_proj; post_attention_layernorm; mlp.gate_proj/up_proj/down_proj
    model.norm.weight                      [D]      -> head.norm                          [D]
    lm_head.weight                         [V, D]   -> head.lm_head                       [D, V]  (not when tied)

Conversion is exact (a transpose and a stack, dtype kept unless asked
otherwise), so torch -> JAX -> torch is bit-exact.

Reading needs only ``numpy`` and ``safetensors`` (plus ``transformers`` for
the config); a ``state_dict`` of torch tensors needs ``torch``. Writing a
``save_pretrained``-style directory writes ``config.json`` through the
``transformers`` config class, ``generation_config.json`` and
``model.safetensors`` (or shards plus ``model.safetensors.index.json``),
loadable by ``transformers.AutoModelForCausalLM.from_pretrained(path)``, each
file renamed into place once written (a killed save leaves the old export).
Loading checks that floating weights are finite (``check_finite=False`` to
skip), and the config keeps the checkpoint's special token ids and
``generation_config.json`` for the save.

Example::

    import transformers
    from lomo_jax.models import convert, llama

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(...))
    cfg, params = convert.from_hf_model(hf)                  # or:
    cfg = convert.config_from_hf(hf.config)                  # = llama.LlamaConfig.from_hf
    params = convert.params_from_hf(hf.state_dict(), cfg)
    cfg, params = convert.load_pretrained("path/to/dir")     # safetensors, sharded or not
    ...                                                       # train with lomo_jax
    convert.save_pretrained(params, cfg, "out/")              # AutoModelForCausalLM-loadable
    sd = convert.params_to_hf(params, cfg)                    # {name: torch.Tensor}
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import jax
import numpy as np

from lomo_jax.models.llama import LlamaConfig

__all__ = [
    "config_from_hf",
    "config_to_hf",
    "hf_parameter_shapes",
    "params_from_hf",
    "params_to_hf",
    "from_hf_model",
    "load_pretrained",
    "load_safetensors",
    "save_pretrained",
    "write_atomically",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"
# The special token ids LlamaConfig carries (with generation_config).
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")

# Buffers some checkpoints carry that are not parameters.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|(^|\.)rotary_emb\.original_inv_freq$")


# --------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------


def config_from_hf(hf_config, *, dtype=None, param_dtype=None,
                   generation_config=None) -> LlamaConfig:
    """A :class:`LlamaConfig` from a ``transformers`` config (``LlamaConfig``,
    ``MistralConfig``, ``Qwen2Config``).

    Reads both the transformers>=5 ``rope_parameters`` dict and the older
    ``rope_theta`` + ``rope_scaling`` fields. ``dtype``/``param_dtype`` are
    not taken from the checkpoint (default fp32; pass ``jnp.bfloat16`` for
    bf16). Also available as ``LlamaConfig.from_hf``. The special token ids
    are kept, and ``generation_config`` (a dict or ``transformers.GenerationConfig``:
    the checkpoint's; default: derived from ``hf_config`` as ``transformers``
    does for a checkpoint without one), so that a save writes them back.

    Raises:
      ValueError: unsupported ``model_type``.
      NotImplementedError: an unsupported RoPE type, or a Qwen2 config mixing
        sliding-window and full-attention layers.
    """
    import jax.numpy as jnp

    mt = getattr(hf_config, "model_type", "llama") or "llama"
    if mt not in _HF_FAMILY_FIELDS:
        raise ValueError(
            f"transformers model_type {mt!r} is not supported by lomo_jax.models.llama "
            f"(supported: {tuple(_HF_FAMILY_FIELDS)})."
        )
    dtype = jnp.float32 if dtype is None else dtype
    fields = {**_hf_common_fields(hf_config), **_HF_FAMILY_FIELDS[mt](hf_config),
              **_hf_token_fields(hf_config, generation_config)}
    return LlamaConfig(**fields, model_type=mt, dtype=dtype,
                       param_dtype=dtype if param_dtype is None else param_dtype)


def _hf_common_fields(hf_config) -> dict:
    """The fields every family reads the same way."""
    g = functools.partial(getattr, hf_config)
    heads = g("num_attention_heads")
    theta, scaling = _hf_rope(hf_config)
    # pretraining_tp only changes how transformers slices its matmuls: same math.
    return dict(
        vocab_size=g("vocab_size"),
        hidden_size=g("hidden_size"),
        intermediate_size=g("intermediate_size"),
        num_hidden_layers=g("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=g("num_key_value_heads", None) or heads,
        head_dim=g("head_dim", None) or g("hidden_size") // heads,
        rms_norm_eps=float(g("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=int(g("max_position_embeddings", 2048) or 2048),
        tie_word_embeddings=bool(g("tie_word_embeddings", False)),
        hidden_act=g("hidden_act", "silu"),
        initializer_range=float(g("initializer_range", 0.02)),
        attention_bias=bool(g("attention_bias", False)),
        mlp_bias=bool(g("mlp_bias", False)),
    )


def _hf_token_fields(hf_config, generation_config) -> dict:
    """The token ids of ``hf_config`` and the generation config to carry (a
    dict, without ``transformers_version``)."""
    if generation_config is None:
        import transformers

        generation_config = transformers.GenerationConfig.from_model_config(hf_config)
    if not isinstance(generation_config, Mapping):
        generation_config = generation_config.to_diff_dict()
    return dict({f: getattr(hf_config, f, None) for f in _TOKEN_FIELDS},
                generation_config=dict(generation_config))


def _hf_rope(hf_config):
    """``(rope_theta, rope_scaling dict or None)`` from a transformers config."""
    rp = getattr(hf_config, "rope_parameters", None)
    if isinstance(rp, Mapping) and rp:
        if all(isinstance(v, Mapping) for v in rp.values()):
            raise NotImplementedError(
                f"per-layer-type rope_parameters {dict(rp)} are not supported."
            )
        theta = rp.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    else:
        theta = getattr(hf_config, "rope_theta", 10000.0)
        scaling = getattr(hf_config, "rope_scaling", None)
        scaling = dict(scaling) if scaling else None
    if theta is None:
        theta = 10000.0
    if scaling is not None:
        _refuse_partial_rotary(scaling.pop("partial_rotary_factor", None))
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
    return theta, scaling


def _refuse_partial_rotary(factor) -> None:
    if factor is not None and float(factor) != 1.0:
        raise NotImplementedError(
            f"rope_parameters['partial_rotary_factor']={factor} (RoPE on part of each head) "
            "is not implemented; only 1.0 is.")


def _mistral_fields(hf_config) -> dict:
    return dict(sliding_window=getattr(hf_config, "sliding_window", None))


def _qwen2_fields(hf_config) -> dict:
    return dict(qkv_bias=True, attention_bias=False, sliding_window=_uniform_window(hf_config))


def _uniform_window(hf_config) -> Optional[int]:
    """The window of a config whose ``layer_types`` are all sliding (``None``
    when none are); mixing both kinds is refused."""
    types = list(getattr(hf_config, "layer_types", None) or [])
    sliding = [t == "sliding_attention" for t in types]
    if any(sliding) and not all(sliding):
        raise NotImplementedError(
            f"this {hf_config.model_type} config mixes sliding-window and full-attention "
            f"layers (layer_types={types}); the stacked model applies one attention "
            "pattern to every layer."
        )
    return getattr(hf_config, "sliding_window", None) if types and all(sliding) else None


def _gemma_fields(hf_config) -> dict:
    if getattr(hf_config, "use_bidirectional_attention", None):
        raise NotImplementedError(
            f"use_bidirectional_attention={hf_config.use_bidirectional_attention} (non-causal "
            "attention) is not implemented.")
    act = getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", None)
    return dict(norm_unit_offset=True, scale_embeddings=True, hidden_act=act)


def _gemma2_fields(hf_config) -> dict:
    g = functools.partial(getattr, hf_config)
    return dict(post_norms=True, query_pre_attn_scalar=g("query_pre_attn_scalar"),
                attn_logit_softcapping=g("attn_logit_softcapping", None),
                final_logit_softcapping=g("final_logit_softcapping", None),
                sliding_window=g("sliding_window", None), layer_types=g("layer_types", None))


_HF_FAMILY_FIELDS: dict[str, Callable[[Any], dict]] = {
    "llama": lambda hf_config: {},
    "mistral": _mistral_fields,
    "qwen2": _qwen2_fields,
    "qwen3": lambda hf_config: dict(qk_norm=True, sliding_window=_uniform_window(hf_config)),
    "phi3": _mistral_fields,  # a window (if any) on every layer; fused weights in the checkpoint
    "gemma": lambda hf_config: _gemma_fields(hf_config),
    "gemma2": lambda hf_config: {**_gemma_fields(hf_config), **_gemma2_fields(hf_config)},
}


# Fields written to every family's transformers config under the same name.
_HF_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
    "tie_word_embeddings", "hidden_act", "initializer_range")


def config_to_hf(cfg: LlamaConfig, **overrides):
    """The matching ``transformers`` config (``LlamaConfig``, ``MistralConfig``
    or ``Qwen2Config`` by ``cfg.model_type``), with ``cfg``'s token ids (see
    :func:`_token_ids_to_hf`); ``overrides`` are passed on (e.g.
    ``bos_token_id``). Needs ``transformers``. Also available as
    ``LlamaConfig.to_hf``.

    Raises:
      ValueError: if the switches cannot be expressed by that class (q/k/v
        bias without o bias is Qwen2 only, o bias is LLaMA only, ...).
    """
    import transformers

    kw = {f: getattr(cfg, f) for f in _HF_SHARED_FIELDS}
    kw.update(_rope_to_hf(cfg, int(transformers.__version__.split(".")[0])))
    _check_switches(cfg)
    cls_name, family_kw = _TO_HF[cfg.model_type](cfg)
    kw.update(family_kw)
    kw.update(_token_ids_to_hf(cfg))
    kw.update(overrides)
    return getattr(transformers, cls_name)(**kw)


def _token_ids_to_hf(cfg: LlamaConfig) -> dict:
    """The token ids to write: all of them (``None`` as null) for a config read
    from a checkpoint (``generation_config`` set); for one built by hand only
    those set (the ``transformers`` class's defaults stand for the others)."""
    ids = {f: getattr(cfg, f) for f in _TOKEN_FIELDS}
    ids = {f: list(v) if isinstance(v, tuple) else v for f, v in ids.items()}
    if cfg.generation_config is None:
        ids = {f: v for f, v in ids.items() if v is not None}
    return ids


def _rope_to_hf(cfg: LlamaConfig, major: int) -> dict:
    """``rope_parameters`` (transformers >= 5) or ``rope_theta`` + ``rope_scaling``."""
    rope = {"rope_type": cfg.rope_type, "rope_theta": float(cfg.rope_theta)}
    rope.update({k: v for k, v in (cfg.rope_scaling_dict or {}).items()
                 if k not in ("type", "rope_type")})
    if major >= 5:
        return {"rope_parameters": rope}
    return {"rope_theta": float(cfg.rope_theta), "rope_scaling": None if cfg.rope_scaling is None
            else {k: v for k, v in rope.items() if k != "rope_theta"}}


def _llama_to_hf(cfg: LlamaConfig):
    if cfg.qkv_bias and not cfg.attention_bias:
        raise ValueError(
            "qkv_bias without attention_bias (bias on q/k/v but not o) has no "
            "transformers LlamaConfig equivalent; use model_type='qwen2'."
        )
    if cfg.sliding_window is not None:
        raise ValueError("transformers LlamaConfig has no sliding window; use model_type='mistral'.")
    return "LlamaConfig", dict(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)


def _mistral_to_hf(cfg: LlamaConfig):
    if cfg.has_qkv_bias or cfg.mlp_bias:
        raise ValueError("transformers MistralConfig has no attention/MLP biases.")
    return "MistralConfig", dict(sliding_window=cfg.sliding_window)


def _qwen2_to_hf(cfg: LlamaConfig):
    if not cfg.qkv_bias or cfg.attention_bias or cfg.mlp_bias:
        raise ValueError(
            "transformers Qwen2 has bias on q/k/v only: needs qkv_bias=True, "
            "attention_bias=False, mlp_bias=False."
        )
    return "Qwen2Config", dict(use_sliding_window=cfg.sliding_window is not None,
                               sliding_window=cfg.sliding_window, max_window_layers=0)


def _qwen3_to_hf(cfg: LlamaConfig):
    if cfg.qkv_bias != cfg.attention_bias or cfg.mlp_bias:
        raise ValueError(
            "transformers Qwen3 has attention_bias on q/k/v/o together and no MLP bias: needs "
            f"qkv_bias == attention_bias and mlp_bias=False (got qkv_bias={cfg.qkv_bias}, "
            f"attention_bias={cfg.attention_bias}, mlp_bias={cfg.mlp_bias}).")
    return "Qwen3Config", dict(attention_bias=cfg.attention_bias,
                               use_sliding_window=cfg.sliding_window is not None,
                               sliding_window=cfg.sliding_window, max_window_layers=0)


def _phi3_to_hf(cfg: LlamaConfig):
    if cfg.has_qkv_bias or cfg.mlp_bias:
        raise ValueError("transformers Phi3Config has no attention/MLP biases.")
    return "Phi3Config", dict(sliding_window=cfg.sliding_window)


def _gemma_to_hf(cfg: LlamaConfig):
    if cfg.qkv_bias != cfg.attention_bias or cfg.mlp_bias or cfg.sliding_window is not None:
        raise ValueError(
            "transformers Gemma has attention_bias on q/k/v/o together, no MLP bias and no "
            f"window (got qkv_bias={cfg.qkv_bias}, attention_bias={cfg.attention_bias}, "
            f"mlp_bias={cfg.mlp_bias}, sliding_window={cfg.sliding_window}).")
    return "GemmaConfig", dict(attention_bias=cfg.attention_bias)


def _gemma2_to_hf(cfg: LlamaConfig):
    _, kw = _gemma_to_hf(cfg.replace(sliding_window=None))
    kind = "sliding_attention" if cfg.sliding_window is not None else "full_attention"
    return "Gemma2Config", dict(
        kw, hidden_activation=cfg.hidden_act, sliding_window=cfg.sliding_window,
        layer_types=list(cfg.layer_types or [kind] * cfg.num_hidden_layers),
        query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
        attn_logit_softcapping=cfg.attn_logit_softcapping,
        final_logit_softcapping=cfg.final_logit_softcapping)


_TO_HF = {"llama": _llama_to_hf, "mistral": _mistral_to_hf, "qwen2": _qwen2_to_hf,
          "qwen3": _qwen3_to_hf, "phi3": _phi3_to_hf, "gemma": _gemma_to_hf,
          "gemma2": _gemma2_to_hf}

# Switches no transformers config field names: each family's values (others: False).
_GEMMA = {"norm_unit_offset": True, "scale_embeddings": True}
_FAMILY_SWITCHES = {"qwen3": {"qk_norm": True}, "gemma": _GEMMA,
                    "gemma2": {**_GEMMA, "post_norms": True}}
_SWITCHES = ("qk_norm", "norm_unit_offset", "scale_embeddings", "post_norms")
_GEMMA2_ONLY = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                "layer_types")


def _check_switches(cfg: LlamaConfig) -> None:
    """Raise if a switch differs from what ``cfg.model_type``'s transformers model does."""
    want = _FAMILY_SWITCHES.get(cfg.model_type, {})
    for name in _SWITCHES:
        if getattr(cfg, name) != want.get(name, False):
            raise ValueError(
                f"{name}={getattr(cfg, name)!r} has no transformers equivalent for "
                f"model_type={cfg.model_type!r} (which has {name}={want.get(name, False)!r}).")
    for name in _GEMMA2_ONLY if cfg.model_type != "gemma2" else ():
        if getattr(cfg, name) is not None:
            raise ValueError(f"{name}={getattr(cfg, name)!r} has no transformers equivalent "
                             f"for model_type={cfg.model_type!r} (only gemma2 has it).")


def _layer_entries(cfg: LlamaConfig):
    """``(hf suffix, path in params['layers'], hf shape, is_linear)`` per layer tensor."""
    d, h, k = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    D, F = cfg.hidden_size, cfg.intermediate_size
    out = [
        ("input_layernorm.weight", ("input_layernorm", "scale"), (D,), False),
        ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), (D,), False),
    ]
    for name, o, i, bias in (
        ("q_proj", h * d, D, cfg.has_qkv_bias),
        ("k_proj", k * d, D, cfg.has_qkv_bias),
        ("v_proj", k * d, D, cfg.has_qkv_bias),
        ("o_proj", D, h * d, cfg.attention_bias),
    ):
        out.append((f"self_attn.{name}.weight", ("self_attn", name, "kernel"), (o, i), True))
        if bias:
            out.append((f"self_attn.{name}.bias", ("self_attn", name, "bias"), (o,), False))
    if cfg.qk_norm:
        out += [(f"self_attn.{n}.weight", ("self_attn", n, "scale"), (d,), False)
                for n in ("q_norm", "k_norm")]
    if cfg.post_norms:
        out += [(f"{n}.weight", (n, "scale"), (D,), False)
                for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm")]
    for name, o, i in (("gate_proj", F, D), ("up_proj", F, D), ("down_proj", D, F)):
        out.append((f"mlp.{name}.weight", ("mlp", name, "kernel"), (o, i), True))
        if cfg.mlp_bias:
            out.append((f"mlp.{name}.bias", ("mlp", name, "bias"), (o,), False))
    return out


# Checkpoint tensors that hold several of ours stacked on their first axis, by family.
_FUSED = {"phi3": (("self_attn.qkv_proj.weight", ("self_attn.q_proj.weight",
                                                   "self_attn.k_proj.weight",
                                                   "self_attn.v_proj.weight")),
                   ("mlp.gate_up_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")))}


def _fused_parts(cfg: LlamaConfig) -> dict:
    """``{part name: (fused name, first row, last row + 1)}`` over all layers
    (HF names; empty for families without fused tensors)."""
    shapes = {suffix: shape for suffix, _, shape, _ in _layer_entries(cfg)}
    out = {}
    for fused, parts in _FUSED.get(cfg.model_type, ()):
        row = 0
        for part in parts:
            for i in range(cfg.num_hidden_layers):
                out[f"model.layers.{i}.{part}"] = (f"model.layers.{i}.{fused}", row,
                                                   row + shapes[part][0])
            row += shapes[part][0]
    return out


def _fuse(tensors: dict, cfg: LlamaConfig) -> dict:
    """A ``{HF name: numpy array}`` dict with each family's fused tensors
    concatenated from their parts (in place of the parts)."""
    groups: dict = {}
    for part, (fused, _, _) in _fused_parts(cfg).items():
        groups.setdefault(fused, []).append(tensors.pop(part))
    for fused, arrays in groups.items():
        tensors[fused] = np.concatenate(arrays, axis=0)
    return tensors


def _unfused(src: "_Source", cfg: LlamaConfig, rename) -> "_Source":
    """``src`` with each fused tensor also readable as its parts (row ranges)."""
    parts = {rename(p): (rename(f), lo, hi) for p, (f, lo, hi) in _fused_parts(cfg).items()}
    if not parts:
        return src

    def where(name, index):
        fused, lo, hi = parts[name]
        index = tuple(index or ()) or (slice(None),)
        a, b, step = index[0].indices(hi - lo)
        return fused, (slice(lo + a, lo + b, step),) + index[1:]

    def read(name, index):
        return src.read(*where(name, index)) if name in parts else src.read(name, index)

    def shape(name):
        if name not in parts:
            return src.shape(name)
        fused, lo, hi = parts[name]
        return (hi - lo,) + tuple(src.shape(fused)[1:])

    return _Source(list(src.keys) + list(parts), read, shape)


def hf_parameter_shapes(cfg: LlamaConfig, *, include_tied: bool = False) -> dict[str, tuple]:
    """``{transformers name: shape}`` that ``LlamaForCausalLM`` (or Mistral/Qwen2)
    with this config has. ``include_tied``: list ``lm_head.weight`` also when
    embeddings are tied (``state_dict()`` does, ``save_pretrained`` does not)."""
    V, D = cfg.vocab_size, cfg.hidden_size
    shapes = {"model.embed_tokens.weight": (V, D)}
    for i in range(cfg.num_hidden_layers):
        for suffix, _, shape, _ in _layer_entries(cfg):
            shapes[f"model.layers.{i}.{suffix}"] = shape
    for part, (fused, lo, hi) in _fused_parts(cfg).items():
        shapes[fused] = (shapes.get(fused, (0,))[0] + hi - lo,) + shapes.pop(part)[1:]
    shapes["model.norm.weight"] = (D,)
    if not cfg.tie_word_embeddings or include_tied:
        shapes["lm_head.weight"] = (V, D)
    return shapes


# --------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------


def _to_numpy(x) -> np.ndarray:
    """torch tensor / jax array / numpy array -> numpy, bit-exact (bf16 via ml_dtypes)."""
    if type(x).__module__.startswith("torch"):
        import torch

        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return t.numpy().copy()  # never alias torch memory (torch may update it in place)
    return np.asarray(x)


def _to_torch(a: np.ndarray):
    import torch

    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


class _Source:
    """Name -> array access over a mapping or lazily opened safetensors files.

    ``read(name, index)`` returns only the ``index`` (a tuple of slices) of a
    tensor, so a loader that places arrays shard by shard reads only what its
    devices hold. ``where(name)``: the file a tensor is in (``None``: in memory)."""

    def __init__(self, keys: Iterable[str], read: Callable[[str, Any], Any],
                 shape: Callable[[str], tuple], where: Callable[[str], Optional[str]] = None):
        self.keys = list(keys)
        self._read = read
        self._shape = shape
        self.where = where or (lambda name: None)

    def get(self, name):
        return _to_numpy(self._read(name, None))

    def read(self, name, index=None):
        return _to_numpy(self._read(name, index))

    def shape(self, name):
        return tuple(self._shape(name))


def _mapping_source(sd: Mapping[str, Any]) -> _Source:
    def read(name, index):
        x = sd[name]
        return x if index is None else x[index]

    return _Source(sd.keys(), read, lambda n: tuple(sd[n].shape))


def _finite_source(src: _Source) -> _Source:
    """``src`` whose every read of floating data (each chunk, as it is read)
    raises ``ValueError`` if it holds a NaN or an infinity."""

    def read(name, index):
        a = src.read(name, index)
        if not _all_finite(a):
            raise _nonfinite_error(src, name, index, a)
        return a

    return _Source(src.keys, read, src.shape, src.where)


#: 16-bit floats, checked on their bits (no float temporaries; numpy's isfinite is slow
#: on them): an exponent of all ones is an infinity or a NaN
_EXPONENT_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}


def _all_finite(a: np.ndarray) -> bool:
    """Whether ``a`` holds no NaN or infinity (``True`` for non-floating dtypes)."""
    import jax.numpy as jnp

    if a.size == 0 or not jnp.issubdtype(a.dtype, jnp.inexact):
        return True
    mask = _EXPONENT_BITS.get(a.dtype.name)
    if mask is None:
        return bool(np.isfinite(a).all())
    bits = np.ascontiguousarray(a).view(np.uint16) & np.uint16(mask)
    return int(bits.max()) != mask


def _nonfinite_error(src: _Source, name: str, index, a: np.ndarray) -> ValueError:
    """The error for a read ``a`` (``index`` of tensor ``name``) holding a NaN or an
    infinity: where the first one is, in the whole tensor, and its value."""
    at = np.argwhere(~np.isfinite(a.astype(np.float32) if a.dtype.itemsize < 4 else a))[0]
    shape, index = src.shape(name), tuple(index or ())
    pos = [int(index[k].indices(shape[k])[0] + i * index[k].indices(shape[k])[2])
           if k < len(index) else int(i) for k, i in enumerate(at)]
    file = src.where(name)
    return ValueError(
        f"{name}{f' (in {file})' if file else ''} holds a non-finite value, "
        f"{a[tuple(at)]} at index {pos} of its {a.dtype} {list(shape)}: the checkpoint looks "
        "corrupted. Pass check_finite=False to load non-finite values anyway.")


def _shape_error(name: str, got, want, cfg: LlamaConfig) -> ValueError:
    return ValueError(
        f"parameter {name!r} has shape {tuple(got)} but the config expects {tuple(want)} "
        f"(vocab_size={cfg.vocab_size}, hidden_size={cfg.hidden_size}, "
        f"intermediate_size={cfg.intermediate_size}, heads={cfg.num_attention_heads}, "
        f"kv_heads={cfg.num_key_value_heads}, head_dim={cfg.head_dim})."
    )


def _check_checkpoint(src: _Source, cfg: LlamaConfig, strict: bool) -> Callable[[str], str]:
    """Raise on missing, unexpected (``strict``) or misshapen tensors; return the
    renaming of transformers names to the checkpoint's (a bare ``LlamaModel``
    dict has no ``model.`` prefix)."""
    keys = set(src.keys)
    prefix = "model."
    if "model.embed_tokens.weight" not in keys and "embed_tokens.weight" in keys:
        prefix = ""  # a bare LlamaModel state_dict
    expected = hf_parameter_shapes(cfg)
    rename = lambda n: prefix + n[len("model."):] if n.startswith("model.") else n  # noqa: E731
    missing = [rename(n) for n in expected if rename(n) not in keys]
    if missing:
        raise ValueError(
            f"checkpoint is missing {len(missing)} parameter(s) the config needs: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    known = {rename(n) for n in expected} | {"lm_head.weight"}
    unexpected = sorted(k for k in keys if k not in known and not _IGNORED.search(k))
    if unexpected and strict:
        raise ValueError(
            f"checkpoint has {len(unexpected)} parameter(s) this config does not use: "
            f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''} "
            "(wrong config? biases/tied embeddings/layer count; strict=False ignores them)."
        )
    for n, want in expected.items():
        got = src.shape(rename(n))
        if tuple(got) != tuple(want):
            raise _shape_error(rename(n), got, want, cfg)
    if cfg.tie_word_embeddings and "lm_head.weight" in keys:
        got = src.shape("lm_head.weight")
        if tuple(got) != (cfg.vocab_size, cfg.hidden_size):
            raise _shape_error("lm_head.weight", got, (cfg.vocab_size, cfg.hidden_size), cfg)
    return rename


class _Leaf(NamedTuple):
    """One params leaf: its path, its tensor name(s) in the checkpoint (one per
    layer when ``stacked``), and whether each tensor is transposed (Linear)."""

    path: tuple
    names: tuple
    transpose: bool
    stacked: bool


def _leaves(cfg: LlamaConfig, rename: Callable[[str], str]) -> list:
    out = [_Leaf(("embed", "embedding"), (rename("model.embed_tokens.weight"),), False, False)]
    for suffix, path, _, linear in _layer_entries(cfg):
        names = tuple(rename(f"model.layers.{i}.{suffix}") for i in range(cfg.num_hidden_layers))
        out.append(_Leaf(("layers",) + path, names, linear, True))
    out.append(_Leaf(("head", "norm"), (rename("model.norm.weight"),), False, False))
    if not cfg.tie_word_embeddings:
        out.append(_Leaf(("head", "lm_head"), ("lm_head.weight",), True, False))
    return out


_CHUNK_BYTES = 8 * 2**20


def _read(src: _Source, name: str, transpose: bool, index=None, dtype=None,
          out: Optional[np.ndarray] = None) -> np.ndarray:
    """``index`` (a tuple of slices in the params layout; ``None``: all) of one
    checkpoint tensor, transposed for a Linear weight, in ``dtype``, written
    into ``out`` if given. Only that part is read, in chunks of the
    checkpoint's rows of about ``_CHUNK_BYTES`` written straight into the
    result, so reading adds one chunk (not a tensor) to host memory."""
    hf_shape = src.shape(name)
    shape = hf_shape[::-1] if transpose else hf_shape
    index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
    ranges = [range(*sl.indices(n)) for sl, n in zip(index, shape)]
    if not ranges:  # a scalar
        return np.asarray(src.read(name, None), dtype)
    if out is None:
        out = np.empty([len(r) for r in ranges], dtype or _file_dtype(src, name))
    hf_ranges = ranges[::-1] if transpose else ranges
    for at, part in _row_chunks(hf_ranges, max(4, out.itemsize)):
        piece = src.read(name, part)
        if transpose:
            out[..., at] = piece.T
        else:
            out[at] = piece
        del piece  # before the next chunk is read
    return out


def _row_chunks(hf_ranges: list, itemsize: int):
    """``(position in the result, checkpoint index)`` per chunk of about
    ``_CHUNK_BYTES`` along the checkpoint's first axis of ``hf_ranges``."""
    rows, rest = hf_ranges[0], hf_ranges[1:]
    row_bytes = max(1, int(np.prod([len(r) for r in rest])) * itemsize)
    per_chunk = max(1, _CHUNK_BYTES // row_bytes)
    tail = tuple(slice(r.start, r.stop, r.step) for r in rest)
    for k in range(0, len(rows), per_chunk):
        sub = rows[k:k + per_chunk]
        yield slice(k, k + len(sub)), (slice(sub.start, sub.stop, sub.step),) + tail


def _set_path(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _convert(src: _Source, cfg: LlamaConfig, dtype, strict: bool) -> dict:
    """numpy params; each stacked leaf is allocated once and read layer by layer
    into its slices (no per-layer copies and stack)."""
    rename = _check_checkpoint(src, cfg, strict)
    src = _unfused(src, cfg, rename)
    params: dict = {}
    for leaf in _leaves(cfg, rename):
        if not leaf.stacked:
            _set_path(params, leaf.path, _read(src, leaf.names[0], leaf.transpose, dtype=dtype))
            continue
        shape = src.shape(leaf.names[0])
        shape = shape[::-1] if leaf.transpose else shape
        dt = np.dtype(dtype) if dtype is not None else _file_dtype(src, leaf.names[0])
        out = np.empty((len(leaf.names),) + tuple(shape), dt)
        for i, name in enumerate(leaf.names):
            _read(src, name, leaf.transpose, out=out[i])
        _set_path(params, leaf.path, out)
    return params


def _as_jax(params):
    import jax.numpy as jnp

    return jax.tree.map(jnp.array, params)


def params_from_hf(state_dict: Mapping[str, Any], cfg: LlamaConfig, *, dtype=None,
                   strict: bool = True, as_numpy: bool = False,
                   check_finite: bool = True) -> dict:
    """Plain-dict params from a ``transformers`` ``state_dict``.

    Args:
      state_dict: ``{name: tensor}`` of ``LlamaForCausalLM`` (torch tensors,
        numpy or jax arrays); a bare ``LlamaModel`` dict (no ``model.``
        prefix) works for tied configs. ``lm_head.weight`` is ignored when
        ``cfg.tie_word_embeddings``.
      cfg: the architecture (e.g. ``LlamaConfig.from_hf(hf_model.config)``).
      dtype: cast every array to this dtype (``None``: keep the checkpoint's).
      strict: raise on tensors the config does not use.
      as_numpy: return numpy arrays instead of jax arrays.
      check_finite: raise on a NaN or an infinity in a floating tensor
        (``False``: take them as they are).

    Raises:
      ValueError: a missing or unexpected tensor, a tensor whose shape
        does not match the config (the message names the tensor and both
        shapes), or a non-finite value (the tensor, the index and the value).
    """
    src = _mapping_source(state_dict)
    params = _convert(_finite_source(src) if check_finite else src, cfg, dtype, strict)
    return params if as_numpy else _as_jax(params)


def params_to_hf(params, cfg: LlamaConfig, *, include_tied: bool = True, framework: str = "pt",
                 dtype=None) -> dict:
    """A ``transformers`` ``state_dict`` from plain-dict params.

    Args:
      params: ``{"embed", "layers", "head"}`` (jax or numpy arrays).
      cfg: the architecture.
      include_tied: with tied embeddings also emit ``lm_head.weight`` (the same
        values as the embedding, as ``model.state_dict()`` does).
      framework: ``"pt"`` (torch tensors) or ``"np"``.
      dtype: cast to this (numpy/ml_dtypes) dtype (``None``: keep).

    Returns:
      ``{name: tensor}`` with ``[out, in]`` Linear weights; loadable with
      ``hf_model.load_state_dict(sd)``.
    """
    from lomo_jax.models.llama import check_params

    check_params(cfg, params)
    np_params = jax.tree.map(np.asarray, params)
    cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype))
    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": cast(np_params["embed"]["embedding"])}
    for suffix, path, _, linear in _layer_entries(cfg):
        node = np_params["layers"]
        for p in path:
            node = node[p]
        for i in range(cfg.num_hidden_layers):
            a = node[i]
            out[f"model.layers.{i}.{suffix}"] = cast(np.ascontiguousarray(a.T if linear else a))
    out["model.norm.weight"] = cast(np_params["head"]["norm"])
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = cast(np.ascontiguousarray(np_params["head"]["lm_head"].T))
    elif include_tied:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    out = _fuse(out, cfg)
    if framework == "np":
        return {k: np.ascontiguousarray(v) for k, v in out.items()}
    if framework != "pt":
        raise ValueError(f"framework must be 'pt' or 'np', got {framework!r}.")
    converted = {}
    for k, v in out.items():
        converted[k] = converted["model.embed_tokens.weight"] if (
            k == "lm_head.weight" and cfg.tie_word_embeddings) else _to_torch(v)
    return converted


def from_hf_model(hf_model, *, dtype=None, config_dtype=None, check_finite: bool = True):
    """``(LlamaConfig, params)`` from an instantiated ``transformers`` causal LM
    (the config keeps its token ids and ``generation_config``).

    ``config_dtype``: ``LlamaConfig.dtype``/``param_dtype`` (default fp32);
    ``dtype``: cast of the arrays (default: keep the model's);
    ``check_finite``: as :func:`params_from_hf`.
    """
    import jax.numpy as jnp

    cfg = config_from_hf(hf_model.config, dtype=config_dtype or jnp.float32,
                         generation_config=getattr(hf_model, "generation_config", None))
    return cfg, params_from_hf(hf_model.state_dict(), cfg, dtype=dtype, check_finite=check_finite)


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def load_safetensors(path: str) -> _Source:
    """Lazy access to the tensors of a ``save_pretrained`` directory: either
    ``model.safetensors`` or ``model.safetensors.index.json`` + shards (the
    first when both are there, as ``transformers``), or a single
    ``.safetensors`` file. Tensors are read on demand (memory-mapped).

    Returns an object with ``.keys`` (names), ``.get(name)`` (numpy array),
    ``.read(name, index)`` (only ``index``, a tuple of slices, is read) and
    ``.shape(name)`` (without reading the tensor)."""
    from safetensors import safe_open

    if os.path.isdir(path):
        index = os.path.join(path, SAFE_WEIGHTS_INDEX_NAME)
        single = os.path.join(path, SAFE_WEIGHTS_NAME)
        if os.path.exists(single):
            files = None
            path = single
        elif os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = {k: os.path.join(path, v) for k, v in weight_map.items()}
        else:
            raise FileNotFoundError(
                f"{path} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME} "
                "(only safetensors checkpoints are read; convert pytorch_model.bin with "
                "transformers' save_pretrained(safe_serialization=True) first)."
            )
    else:
        files = None
    def read(name, index):
        # a file is opened (memory-mapped) per read and closed after it, so the pages
        # read do not stay resident: host memory holds one tensor (slice) at a time
        with safe_open(files[name], framework="np") as f:
            return f.get_tensor(name) if index is None else f.get_slice(name)[index]

    def shape(name):
        with safe_open(files[name], framework="np") as f:
            return f.get_slice(name).get_shape()

    if files is None:
        with safe_open(path, framework="np") as f:
            files = {k: path for k in f.keys()}
    return _Source(files.keys(), read, shape, files.get)


def load_pretrained(path: str, *, dtype=None, config_dtype=None, strict: bool = True,
                    as_numpy: bool = False, shardings=None, check_finite: bool = True):
    """``(LlamaConfig, params)`` from a local ``save_pretrained`` directory.

    The config is read with ``transformers.AutoConfig.from_pretrained(path)``
    (local files only; it keeps the token ids and ``generation_config.json``,
    which :func:`save_pretrained` writes back), the weights with ``safetensors`` (sharded or not),
    tensor by tensor, each placed as it is read: a stacked ``[L, ...]`` leaf is
    allocated on its sharding and each layer is written into its slice in
    place, and only the parts of a tensor that this process's devices hold are
    read. Host memory beyond the arrays themselves is about one tensor (on a
    CPU backend, where the arrays are host memory too: the model plus that).

    Example::

        mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
        cfg, params = convert.load_pretrained("Llama-3-8B/", dtype=jnp.bfloat16,
                                              config_dtype=jnp.bfloat16, shardings=mesh)

    Args:
      path: the directory.
      dtype: cast of the arrays (default: keep the file's).
      config_dtype: computation/param dtype of the returned config (default fp32).
      strict: raise on tensors the config does not use.
      as_numpy: return numpy arrays (host memory) instead of placed jax arrays.
      shardings: where the arrays go: ``None`` (the default device), a
        ``Mesh`` (``lomo_jax.sharding.param_shardings`` on it), one
        ``Sharding`` for every leaf, or a pytree of shardings with the params'
        structure (e.g. ``lomo_jax.sharding.llama_shardings(...).params``).
      check_finite: check every chunk of floating data as it is read and raise
        ``ValueError`` on a NaN or an infinity (naming the tensor, its file, the
        index and the value; corrupted bytes); ``False`` loads them as they are.
    """
    import jax.numpy as jnp
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    cfg = config_from_hf(hf_config, dtype=config_dtype or jnp.float32,
                         generation_config=_read_generation_config(path))
    src = load_safetensors(path)
    src = _finite_source(src) if check_finite else src
    if as_numpy:
        if shardings is not None:
            raise ValueError("load_pretrained: as_numpy=True returns host arrays; "
                             "shardings applies to jax arrays only.")
        return cfg, _convert(src, cfg, dtype, strict)
    return cfg, _placed(src, cfg, dtype, strict, shardings)


def _read_generation_config(path: str) -> Optional[dict]:
    """``path``'s ``generation_config.json`` as a dict (``None`` if there is none)."""
    file = os.path.join(path, GENERATION_CONFIG_NAME)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


def _placed(src: _Source, cfg: LlamaConfig, dtype, strict: bool, shardings) -> dict:
    """jax params, each leaf read onto its sharding (see :func:`load_pretrained`)."""
    rename = _check_checkpoint(src, cfg, strict)
    src = _unfused(src, cfg, rename)
    shapes = _param_shapes(cfg)
    shardings = _leaf_shardings(shardings, shapes)
    params: dict = {}
    for leaf in _leaves(cfg, rename):
        shape, sharding = _at(shapes, leaf.path).shape, _at(shardings, leaf.path)
        dt = np.dtype(dtype) if dtype is not None else _file_dtype(src, leaf.names[0])
        onto = _stacked_onto if leaf.stacked else _matrix_onto
        _set_path(params, leaf.path, onto(src, leaf, shape, dt, sharding))
    return params


@functools.lru_cache(maxsize=64)
def _filler(shape, dt, sharding, axis: int):
    """``(zeros(), write(a, x, start))``: an array on ``sharding``, and the in-place
    (donated) write of a block ``x`` at ``start`` along ``axis`` (a stacked
    leaf's layer, without its leading axis, for ``axis=None``). Cached: leaves
    of one shape, dtype and sharding (and later loads) share the compiled pair."""
    import jax.numpy as jnp
    from jax import lax

    def put(a, x, i):
        if axis is None:
            return lax.dynamic_update_index_in_dim(a, x, i, 0)
        return lax.dynamic_update_slice_in_dim(a, x, i, axis)

    zeros = jax.jit(lambda: jnp.zeros(shape, dt), out_shardings=sharding)
    write = jax.jit(put, donate_argnums=0, out_shardings=sharding)
    return zeros, write


def _reader(src: _Source, leaf: "_Leaf", name: str, dt, offset=None):
    """A ``make_array_from_callback`` callback reading ``name``'s part for a
    device's index, once per distinct index (devices holding the same part,
    e.g. replicas on another mesh axis, share one read). ``offset``: a block's
    ``(axis, start, size)`` in the whole tensor."""
    cache: dict = {}

    def read(idx):
        if offset is not None:
            axis, start, size = offset
            idx = list(idx) + [slice(None)] * (axis + 1 - len(idx))
            lo, hi, step = idx[axis].indices(size)
            idx[axis] = slice(start + lo, start + hi, step)
            idx = tuple(idx)
        key = tuple((sl.start, sl.stop, sl.step) for sl in idx)
        if key not in cache:
            cache[key] = _read(src, name, leaf.transpose, idx, dt)
        return cache[key]

    return read


def _stacked_onto(src: _Source, leaf: _Leaf, shape, dt, sharding) -> jax.Array:
    """An ``[L, ...]`` array on ``sharding``, filled layer by layer; each layer is
    read only for the shards this process's devices hold."""
    zeros, write = _filler(tuple(shape), np.dtype(dt), sharding, None)
    layer_sharding = _without_leading_axis(sharding)
    arr = zeros()
    for i, name in enumerate(leaf.names):
        x = jax.make_array_from_callback(shape[1:], layer_sharding, _reader(src, leaf, name, dt))
        arr = write(arr, x, np.int32(i))
        del x
        _give_back_freed_host_memory()
    return arr


def _give_back_freed_host_memory() -> None:
    """Return freed heap pages to the OS (glibc's ``malloc_trim``; a no-op
    elsewhere). glibc's mmap threshold grows with every large ``free``, so a
    load's later ~8 MiB read buffers come from the heap, which keeps their
    pages after they are freed: on a CPU backend that held ~0.1-0.3 GB on top
    of the model."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _matrix_onto(src: _Source, leaf: _Leaf, shape, dt, sharding) -> jax.Array:
    """An unstacked leaf (embedding, head, final norm) on ``sharding``. A matrix
    whose checkpoint rows are not split over devices is written in blocks of
    about ``_CHUNK_BYTES`` of them (host memory holds one block's shards, not
    the tensor); otherwise each device's shard is read whole. Either way only
    this process's devices' shards are read."""
    name = leaf.names[0]
    axis = 1 if leaf.transpose else 0  # the checkpoint's rows
    if len(shape) != 2 or _is_split(sharding, axis, len(shape)):
        return jax.make_array_from_callback(shape, sharding, _reader(src, leaf, name, dt))
    step = max(1, _CHUNK_BYTES // (shape[1 - axis] * max(4, dt.itemsize)))
    zeros, write = _filler(tuple(shape), np.dtype(dt), sharding, axis)
    arr = zeros()
    for start in range(0, shape[axis], step):
        block = list(shape)
        block[axis] = min(step, shape[axis] - start)
        x = jax.make_array_from_callback(tuple(block), sharding,
                                         _reader(src, leaf, name, dt, (axis, start, block[axis])))
        arr = write(arr, x, np.int32(start))
        del x
    return arr


def _is_split(sharding, axis: int, ndim: int) -> bool:
    """Whether ``sharding`` may split ``axis`` (any sharding but a named or
    single-device one counts as splitting)."""
    from jax.sharding import NamedSharding, SingleDeviceSharding

    if isinstance(sharding, SingleDeviceSharding):
        return False
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * ndim
        return spec[axis] is not None and spec[axis] != ()
    return True


def _param_shapes(cfg: LlamaConfig) -> dict:
    from lomo_jax.models import llama

    return llama.param_shapes(cfg)


def _at(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _file_dtype(src: _Source, name: str) -> np.dtype:
    """A tensor's dtype, from one element."""
    return src.read(name, (slice(0, 1),) * len(src.shape(name))).dtype


def _leaf_shardings(shardings, shapes) -> dict:
    """One sharding per params leaf from ``load_pretrained``'s ``shardings``."""
    from jax.sharding import Mesh, Sharding, SingleDeviceSharding

    if shardings is None:
        shardings = SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, Mesh):
        from lomo_jax.sharding import param_shardings

        return param_shardings(shapes, shardings)
    if isinstance(shardings, Sharding):
        return jax.tree.map(lambda _: shardings, shapes)
    want, got = jax.tree.structure(shapes), jax.tree.structure(
        shardings, is_leaf=lambda x: isinstance(x, Sharding))
    if want != got:
        raise ValueError(f"load_pretrained: shardings has the structure {got}, but the params "
                         f"have {want} (pass a Mesh, one Sharding, or a tree like the params).")
    return shardings


def _without_leading_axis(sharding):
    """The sharding of one layer ``a[i]`` of an array on ``sharding``."""
    from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

    if isinstance(sharding, SingleDeviceSharding):
        return sharding
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    raise TypeError(f"load_pretrained: a stacked leaf's sharding must be a NamedSharding or "
                    f"SingleDeviceSharding, got {type(sharding).__name__}.")


_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma": "GemmaForCausalLM",
         "gemma2": "Gemma2ForCausalLM"}


def save_pretrained(params, cfg: LlamaConfig, path: str, *, hf_config=None, dtype=None,
                    max_shard_size: Optional[int] = None) -> str:
    """Write a directory ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

    Writes ``config.json`` (``hf_config`` if given; else ``cfg.to_hf()``, with
    the token ids ``cfg`` carries from the checkpoint it was loaded from),
    ``generation_config.json`` (the one ``cfg`` carries, else derived from the
    config as ``transformers`` does) and the weights as
    ``model.safetensors``, or, with ``max_shard_size`` (bytes), as
    ``model-0000k-of-0000n.safetensors`` shards (each at most
    ``max_shard_size`` bytes of tensors, unless one tensor alone is larger)
    plus ``model.safetensors.index.json``. Tied embeddings are written once.
    Names, ``[out, in]`` transposes and the ``dtype`` cast are
    :func:`params_to_hf`'s.

    Atomic: every file is written into a staging directory inside ``path``
    and only then renamed into place (:func:`write_atomically`), the weights'
    entry point (the index, or ``model.safetensors``) last; shards get names
    that no file in ``path`` has (``model-0000k-of-0000n-1.safetensors`` when
    the plain ones are taken), so the previous export's stay intact until the
    new index replaces its own; afterwards the files of the previous export
    that the new one does not use are removed. A save killed at any moment
    leaves the previous weights or the new ones, never a mix or a torn
    file. (``config.json`` and ``generation_config.json`` are renamed just
    before the weights' entry point, when they changed: a kill between those
    renames pairs them with the previous weights.)

    Streaming: the tensors are produced in checkpoint order (embedding,
    layer 0, ..., layer L-1, final norm, head), each stacked ``[L, ...]`` leaf
    one layer at a time (the layer sliced on its devices, then gathered to
    the host), and each written into its file at an offset fixed in advance
    (the safetensors header is computed from the shapes), so host memory
    holds one tensor at a time (at most the largest, e.g. the embedding;
    its device copy too on a CPU backend), never the model, with or
    without ``max_shard_size``. ``params`` may span several JAX processes
    (arrays that are not fully addressable): every process must call this
    with the same arguments (the gathers are collectives, run in the same
    order); only process 0 touches the file system (and imports
    ``transformers`` to write the config), and every process returns after
    a barrier once it is done.

    Raises:
      ValueError: ``params`` do not match ``cfg``, ``max_shard_size`` is not
        a positive integer, ``hf_config`` disagrees with ``cfg``, a dtype
        safetensors cannot store (on every process, before anything is
        gathered or written). An error of ``cfg.to_hf()`` is raised on
        process 0 only (before its first gather; the others wait there).

    Returns:
      ``path``.
    """
    from lomo_jax.models.llama import check_params

    check_params(cfg, params)
    plan = _save_plan(params, cfg, dtype)
    files = _shard_files(plan, max_shard_size)
    if hf_config is not None:
        _check_hf_config(cfg, hf_config)  # on every process, before any collective
    if jax.process_index() == 0:
        _save_files(params, cfg, hf_config, plan[0].dtype, files, path)
    else:
        _gather_weights(params, files)  # the collectives process 0 runs, in its order
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("lomo_jax.convert.save_pretrained")
    return path


def _save_files(params, cfg: LlamaConfig, hf_config, first_dtype, files: list, path: str) -> None:
    """Process 0's part of :func:`save_pretrained`: the configs and weights
    written into a staging directory, renamed into ``path`` (the weights'
    entry point last), then the previous export's leftovers removed."""
    os.makedirs(path, exist_ok=True)
    files = _free_shard_names(files, path)
    entry = SAFE_WEIGHTS_NAME if _one_file(files) else SAFE_WEIGHTS_INDEX_NAME
    with write_atomically(path, last=(entry,)) as tmp:
        _write_configs(cfg, hf_config, first_dtype, tmp)
        _write_weights(params, files, tmp)
    _remove_stale(path, {f for f, _ in files} | {entry})


def _one_file(files: list) -> bool:
    return len(files) == 1 and files[0][0] == SAFE_WEIGHTS_NAME


_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}(-\d+)?\.safetensors")


def _free_shard_names(files: list, path: str) -> list:
    """``files`` with shard names no file in ``path`` has (``-1``, ``-2``, ...
    added when the plain ones are taken), so that no new shard replaces one
    the current index points to."""
    if _one_file(files):
        return files
    n = len(files)
    for k in range(len(os.listdir(path)) + 1):
        names = [f"model-{j:05d}-of-{n:05d}{f'-{k}' if k else ''}.safetensors"
                 for j in range(1, n + 1)]
        if not any(os.path.lexists(os.path.join(path, name)) for name in names):
            return [(name, tensors) for name, (_, tensors) in zip(names, files)]
    raise AssertionError("unreachable: some suffix is free")  # pragma: no cover


def _remove_stale(path: str, keep: set) -> None:
    """Remove the weight files of a previous export in ``path`` that the new one
    (``keep``) does not use: first the other entry point, then the shards."""
    stale = [n for n in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME) if n not in keep]
    stale += sorted(n for n in os.listdir(path) if _SHARD_NAME.fullmatch(n) and n not in keep)
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, name))
    _fsync_dir(path)


def _write_configs(cfg: LlamaConfig, hf_config, first_dtype, path: str) -> None:
    """``config.json`` (:func:`_config_to_write`) and ``generation_config.json``
    (``cfg``'s, else derived from that config, as ``transformers`` does) into ``path``."""
    import transformers

    config = _config_to_write(cfg, hf_config, first_dtype)
    config.save_pretrained(path)
    carried = cfg.generation_config_dict
    generation = (transformers.GenerationConfig.from_model_config(config) if carried is None
                  else transformers.GenerationConfig.from_dict(carried))
    generation.save_pretrained(path)


_STAGING_PREFIX = ".lomo_staging-"
_SAME_FILE_BYTES = 2**20


@contextlib.contextmanager
def write_atomically(path: str, *, last: Sequence[str] = ()):
    """A new directory (its path, a str) to write files into, moved into ``path`` on a
    clean exit: each is fsynced, then renamed into place (``os.replace``), the
    names in ``last`` after the others in that order, so a process killed at
    any moment leaves each file of ``path`` whole, the old or the new one. A
    file byte-identical to the one it would replace (small files) is left as
    it is. On an exception nothing is moved. The directory is made inside
    ``path`` (the same file system) and removed either way; ones that killed
    writers left are removed first (one writer per directory at a time)."""
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.startswith(_STAGING_PREFIX):
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=path)
    try:
        yield tmp
        _move_into(tmp, path, tuple(last))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into(tmp: str, path: str, last: tuple) -> None:
    """Every file of ``tmp`` fsynced, then renamed into ``path``, ``last`` last."""
    names = sorted(os.listdir(tmp))
    dirs = [n for n in names if not os.path.isfile(os.path.join(tmp, n))]
    if dirs:
        raise ValueError(f"write_atomically moves files only; {dirs} are not files.")
    for name in names:
        _fsync_file(os.path.join(tmp, name))
    order = [n for n in names if n not in last] + [n for n in last if n in names]
    for name in order:
        src, dst = os.path.join(tmp, name), os.path.join(path, name)
        if not _same_small_file(src, dst):
            os.replace(src, dst)
    _fsync_dir(path)


def _same_small_file(a: str, b: str) -> bool:
    """Whether ``b`` exists with the same bytes as ``a`` (files up to 1 MiB)."""
    if not os.path.isfile(b) or os.path.getsize(a) != os.path.getsize(b) \
            or os.path.getsize(a) > _SAME_FILE_BYTES:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def _fsync_file(file: str) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    """Make renames in ``path`` durable (where directories can be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems without directory fsync
        pass
    finally:
        os.close(fd)


def _config_to_write(cfg: LlamaConfig, hf_config, first_dtype: np.dtype):
    """The ``transformers`` config to save: a copy of ``hf_config`` or
    ``cfg.to_hf()``, with ``architectures`` and the dtype of the first tensor."""
    hf_config = cfg.to_hf() if hf_config is None else copy.deepcopy(hf_config)
    hf_config.architectures = [_ARCH.get(getattr(hf_config, "model_type", "llama"), "LlamaForCausalLM")]
    dt = "bfloat16" if first_dtype.name == "bfloat16" else str(first_dtype)
    # transformers >= 5 calls it ``dtype`` (``torch_dtype`` is deprecated); 4.x ``torch_dtype``.
    import transformers

    attr = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    setattr(hf_config, attr, dt)
    return hf_config


#: LlamaConfig fields that say how a model is computed or initialized, not what it is;
#: and the special tokens (a given ``hf_config``'s are the ones written)
_NOT_ARCHITECTURE = ("dtype", "param_dtype", "attention_implementation", "initializer_range",
                     *_TOKEN_FIELDS, "generation_config")


def _check_hf_config(cfg: LlamaConfig, hf_config) -> None:
    """Raise if ``hf_config`` describes another model than ``cfg``: any field
    :func:`config_from_hf` reads from it (sizes, family switches, RoPE, norms,
    windows, soft-caps) that differs, except :data:`_NOT_ARCHITECTURE`."""
    check = config_from_hf(hf_config, generation_config={})
    for f in dataclasses.fields(LlamaConfig):
        if f.name not in _NOT_ARCHITECTURE and getattr(check, f.name) != getattr(cfg, f.name):
            raise ValueError(
                f"hf_config.{f.name}={getattr(check, f.name)!r} (as lomo_jax reads it) does "
                f"not match the params' config ({getattr(cfg, f.name)!r})."
            )


class _Out(NamedTuple):
    """One tensor to write: its checkpoint name, the ``(params leaf, layer)``
    pieces it is made of (layer ``None``: an unstacked leaf; several: a
    family's fused tensor, the pieces' rows concatenated), shape and dtype."""

    name: str
    pieces: tuple
    shape: tuple
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _save_plan(params, cfg: LlamaConfig, dtype) -> list:
    """The tensors of a ``save_pretrained`` checkpoint in checkpoint order:
    embedding, every layer's tensors (layer-major; a fused tensor where its
    first part would be), final norm, untied head."""
    shapes = hf_parameter_shapes(cfg)
    fused = _fused_parts(cfg)
    leaves = _leaves(cfg, lambda n: n)
    stacked = [lf for lf in leaves if lf.stacked]
    order = [(leaves[0], None)]
    order += [(lf, i) for i in range(cfg.num_hidden_layers) for lf in stacked]
    order += [(lf, None) for lf in leaves[1:] if not lf.stacked]
    pieces: dict = {}  # name -> [(first row, (leaf, layer))], in checkpoint order
    for lf, i in order:
        part = lf.names[0 if i is None else i]
        name, row = fused[part][:2] if part in fused else (part, 0)
        pieces.setdefault(name, []).append((row, (lf, i)))
    plan = []
    for name, rows in pieces.items():
        first = rows[0][1][0]
        dt = np.dtype(dtype if dtype is not None else _at(params, first.path).dtype)
        if dt.name not in _ST_DTYPES:
            raise ValueError(f"save_pretrained: {name} would be {dt}, which safetensors does "
                             f"not store (pass dtype=, e.g. jnp.bfloat16).")
        plan.append(_Out(name, tuple(p for _, p in sorted(rows, key=lambda r: r[0])),
                         tuple(shapes[name]), dt))
    return plan


def _shard_files(plan: list, max_shard_size: Optional[int]) -> list:
    """``[(file name, [_Out])]``: one ``model.safetensors``, or consecutive
    shards of at most ``max_shard_size`` bytes each (a tensor larger than
    that gets a shard of its own)."""
    if max_shard_size is None:
        return [(SAFE_WEIGHTS_NAME, list(plan))]
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, (int, np.integer)) \
            or max_shard_size <= 0:
        raise ValueError(f"save_pretrained: max_shard_size must be a positive number of bytes "
                         f"(an int) or None, got {max_shard_size!r}.")
    shards: list = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    n = len(shards)
    return [(f"model-{j:05d}-of-{n:05d}.safetensors", s) for j, s in enumerate(shards, 1)]


def _write_weights(params, files: list, path: str) -> None:
    """Every file of ``files`` under ``path`` (tensors gathered one at a time),
    and, for shards, ``model.safetensors.index.json``."""
    os.makedirs(path, exist_ok=True)
    for fname, tensors in files:
        _write_safetensors(os.path.join(path, fname), tensors, lambda t: _gather(params, t))
    if _one_file(files):
        return
    weight_map = {t.name: fname for fname, tensors in files for t in tensors}
    total = sum(t.nbytes for _, tensors in files for t in tensors)
    with open(os.path.join(path, SAFE_WEIGHTS_INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _gather_weights(params, files: list) -> None:
    """Gather every tensor as :func:`_write_weights` does, writing nothing (a
    process other than 0 takes part in the collectives)."""
    for _, tensors in files:
        for t in tensors:
            _gather(params, t)


def _gather(params, t: _Out) -> np.ndarray:
    """Tensor ``t`` on this host (C-contiguous, cast as :func:`params_to_hf`
    does): each piece cut out on its leaf's devices (:func:`_device_tensor`)
    and gathered (:func:`_to_host`); a fused tensor's pieces concatenated."""
    parts = [_gather_piece(params, leaf, layer) for leaf, layer in t.pieces]
    h = np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))
    return h if h.dtype == t.dtype else h.astype(t.dtype)


def _gather_piece(params, leaf: _Leaf, layer: Optional[int]) -> np.ndarray:
    """Layer ``layer`` of ``leaf`` (the leaf if ``None``), in HF's orientation, on this host."""
    a = _at(params, leaf.path)
    stacked = layer is not None
    if isinstance(a, jax.Array):
        return _to_host(_device_tensor(a, np.int32(layer or 0), stacked, leaf.transpose))
    h = np.asarray(a)[layer] if stacked else np.asarray(a)
    return h.T if leaf.transpose else h


@functools.partial(jax.jit, static_argnums=(2, 3))
def _device_tensor(a, i, stacked: bool, transpose: bool):
    """Layer ``i`` of a stacked leaf (else the leaf), transposed for a Linear
    weight, as a new array: ``np.asarray`` keeps the host copy it makes on
    the array it reads, which must not be a params leaf (the host would
    keep every unstacked leaf after the save). ``jnp.copy`` so that a jit
    that forwards an unchanged input never hands back the leaf itself."""
    import jax.numpy as jnp

    x = a[i] if stacked else a
    return jnp.copy(x.T if transpose else x)


def _to_host(x) -> np.ndarray:
    """``x`` as one numpy array on this host. An array spread over several
    processes (not fully addressable) is all-gathered
    (``multihost_utils.process_allgather``: a collective every process must
    call); others are copied from their devices."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
              "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
              "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def _safetensors_header(tensors: list) -> tuple:
    """``(header bytes, {name: data offset})`` of a safetensors file of
    ``tensors``: an 8-byte little-endian length, then the JSON header padded
    with spaces to a multiple of 8. The data are laid out by decreasing item
    size (every tensor aligned to its item size), in ``tensors``' order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offsets, at = {}, 0
    for t in sorted(tensors, key=lambda t: -t.dtype.itemsize):  # stable
        header[t.name] = {"dtype": _ST_DTYPES[t.dtype.name], "shape": list(t.shape),
                          "data_offsets": [at, at + t.nbytes]}
        offsets[t.name] = at
        at += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


def _write_safetensors(file: str, tensors: list, get: Callable[[_Out], np.ndarray]) -> None:
    """A safetensors file of ``tensors``: the header first, then each tensor,
    produced by ``get`` in ``tensors``' order, written at its offset and
    dropped (host memory: one tensor)."""
    head, offsets = _safetensors_header(tensors)
    with open(file, "wb") as f:
        f.write(head)
        f.truncate(len(head) + sum(t.nbytes for t in tensors))
        for t in tensors:
            a = get(t)
            if a.shape != t.shape or a.dtype != t.dtype:  # pragma: no cover - a bug here
                raise AssertionError(f"{t.name}: got {a.dtype}{a.shape}, planned {t.dtype}{t.shape}")
            f.seek(len(head) + offsets[t.name])
            f.write(a.reshape(-1).view(np.uint8).data)
            del a
