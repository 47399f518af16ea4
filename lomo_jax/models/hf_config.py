r"""``transformers`` configs <-> :class:`~lomo_jax.models.llama.LlamaConfig`.

Every family reads the sizes, norms, RoPE and token ids alike
(:func:`config_from_hf`); what differs is its :class:`~lomo_jax.models.families.Family`
record. RoPE: the transformers>=5 ``rope_parameters`` dict or the older
``rope_theta`` + ``rope_scaling``. This module does not import
:mod:`lomo_jax.models.llama` (which calls it from ``LlamaConfig.from_hf`` /
``to_hf``): the config class is an argument.

Example::

    from lomo_jax.models import hf_config, llama

    cfg = hf_config.config_from_hf(hf_model.config, cls=llama.LlamaConfig)
    hf = hf_config.config_to_hf(cfg)        # a transformers.Qwen2Config, say
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import TYPE_CHECKING, Mapping, Optional

import numpy as np

from lomo_jax.models.families import FAMILIES, check_switches, family

if TYPE_CHECKING:  # type hints only: llama imports this module
    from lomo_jax.models.llama import LlamaConfig

__all__ = ["config_from_hf", "config_to_hf"]

GENERATION_CONFIG_NAME = "generation_config.json"
#: the special token ids LlamaConfig carries (with generation_config)
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
#: fields written to every family's transformers config under the same name
_HF_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
    "tie_word_embeddings", "hidden_act", "initializer_range")
#: LlamaConfig fields that say how a model is computed or initialized, not what it is;
#: and the special tokens (a given ``hf_config``'s are the ones written)
_NOT_ARCHITECTURE = ("dtype", "param_dtype", "attention_implementation", "initializer_range",
                     *_TOKEN_FIELDS, "generation_config", "lora")


def config_from_hf(hf_config, *, cls, dtype=None, param_dtype=None, generation_config=None):
    """A ``cls`` (:class:`LlamaConfig`) from a ``transformers`` config of any
    family of :data:`~lomo_jax.models.families.FAMILIES`: ``cls(**fields)``.

    ``dtype``/``param_dtype`` are not taken from the checkpoint (default fp32).
    The special token ids are kept, and ``generation_config`` (a dict or
    ``transformers.GenerationConfig``: the checkpoint's; default: derived from
    ``hf_config`` as ``transformers`` does for a checkpoint without one), so
    that a save writes them back.

    Raises:
      ValueError: unsupported ``model_type``.
      NotImplementedError: an unsupported RoPE type, or a config the stacked
        model cannot compute (e.g. mixed sliding-window and full layers).
    """
    import jax.numpy as jnp

    mt = getattr(hf_config, "model_type", "llama") or "llama"
    fam = family(mt)
    dtype = jnp.float32 if dtype is None else dtype
    fields = {**_hf_common_fields(hf_config), **fam.read_fields(hf_config),
              **_hf_token_fields(hf_config, generation_config)}
    return cls(**fields, model_type=mt, dtype=dtype,
               param_dtype=dtype if param_dtype is None else param_dtype)


def _hf_common_fields(hf_config) -> dict:
    """The fields every family reads the same way."""
    g = lambda name, *default: getattr(hf_config, name, *default)  # noqa: E731
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


def config_to_hf(cfg: LlamaConfig, **overrides):
    """The matching ``transformers`` config (its family's ``config_class``, by
    ``cfg.model_type``), with ``cfg``'s token ids (see :func:`_token_ids_to_hf`);
    ``overrides`` are passed on (e.g. ``bos_token_id``). Needs ``transformers``.

    Raises:
      ValueError: if the switches cannot be expressed by that class (q/k/v
        bias without o bias is Qwen2 only, o bias is LLaMA only, ...).
    """
    import transformers

    kw = {f: getattr(cfg, f) for f in _HF_SHARED_FIELDS}
    kw.update(_rope_to_hf(cfg, _transformers_major()))
    check_switches(cfg)
    fam = family(cfg.model_type)
    kw.update(fam.write_fields(cfg))
    kw.update(_token_ids_to_hf(cfg))
    kw.update(overrides)
    return getattr(transformers, fam.config_class)(**kw)


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


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


# --------------------------------------------------------------------------
# The config files of a save_pretrained directory
# --------------------------------------------------------------------------


def _check_hf_config(cfg: LlamaConfig, hf_config) -> None:
    """Raise if ``hf_config`` describes another model than ``cfg``: any field
    :func:`config_from_hf` reads from it (sizes, family switches, RoPE, norms,
    windows, soft-caps) that differs, except :data:`_NOT_ARCHITECTURE`."""
    check = config_from_hf(hf_config, cls=type(cfg), generation_config={})
    for f in dataclasses.fields(cfg):
        if f.name not in _NOT_ARCHITECTURE and getattr(check, f.name) != getattr(cfg, f.name):
            raise ValueError(
                f"hf_config.{f.name}={getattr(check, f.name)!r} (as lomo_jax reads it) does "
                f"not match the params' config ({getattr(cfg, f.name)!r})."
            )


def _config_to_write(cfg: LlamaConfig, hf_config, first_dtype: np.dtype):
    """The ``transformers`` config to save: a copy of ``hf_config`` or
    ``cfg.to_hf()``, with ``architectures`` and the dtype of the first tensor."""
    hf_config = cfg.to_hf() if hf_config is None else copy.deepcopy(hf_config)
    mt = getattr(hf_config, "model_type", "llama")
    hf_config.architectures = [FAMILIES[mt].architecture if mt in FAMILIES else "LlamaForCausalLM"]
    dt = "bfloat16" if first_dtype.name == "bfloat16" else str(first_dtype)
    # transformers >= 5 calls it ``dtype`` (``torch_dtype`` is deprecated); 4.x ``torch_dtype``.
    setattr(hf_config, "dtype" if _transformers_major() >= 5 else "torch_dtype", dt)
    return hf_config


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


def _read_generation_config(path: str) -> Optional[dict]:
    """``path``'s ``generation_config.json`` as a dict (``None`` if there is none)."""
    file = os.path.join(path, GENERATION_CONFIG_NAME)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)
