r"""The model families :class:`~lomo_jax.models.llama.LlamaConfig` covers, one record each.

Every family is the LLaMA decoder with switches on; a :class:`Family` holds
all that differs between them on the ``transformers`` side: the config and
model class names, how the family's fields are read from a ``transformers``
config and written back (refusing what the other side cannot express), the
switches no ``transformers`` field names, the config fields only it has,
and its fused checkpoint tensors. Adding a family is adding one record to
:data:`FAMILIES`.

Example::

    from lomo_jax.models import families

    fam = families.family("qwen2")
    fam.config_class, fam.architecture      # "Qwen2Config", "Qwen2ForCausalLM"
    fam.read_fields(hf_config)              # {"qkv_bias": True, ...}
    fam.write_fields(cfg)                   # Qwen2Config kwargs, or ValueError
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

if TYPE_CHECKING:  # type hints only: llama imports this module
    from lomo_jax.models.llama import LlamaConfig

__all__ = ["FAMILIES", "Family", "check_switches", "family"]


@dataclasses.dataclass(frozen=True)
class Family:
    """One family's ``transformers`` side.

    Attributes:
      model_type: ``transformers``' ``model_type`` (= ``LlamaConfig.model_type``).
      config_class: the ``transformers`` config class name.
      architecture: the ``transformers`` causal-LM class name (``config.json``'s
        ``architectures``).
      read_fields: ``hf_config -> {LlamaConfig field: value}``, the family's own
        reading (on top of the fields every family reads alike); raises
        ``NotImplementedError`` on what the stacked model cannot compute.
      write_fields: ``cfg -> {config_class kwarg: value}``; raises
        ``ValueError`` on switches ``config_class`` cannot express.
      switches: the boolean switches no ``transformers`` field names, with this
        family's values (any switch not listed: ``False``).
      own_fields: config fields only this family has (``None`` elsewhere).
      fused: ``((checkpoint tensor, (our tensors stacked on its first axis)), ...)``,
        layer-relative names.
    """

    model_type: str
    config_class: str
    architecture: str
    read_fields: Callable[[Any], dict]
    write_fields: Callable[["LlamaConfig"], dict]
    switches: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    own_fields: tuple = ()
    fused: tuple = ()


# --------------------------------------------------------------------------
# Reading transformers configs
# --------------------------------------------------------------------------


def _no_fields(hf_config) -> dict:
    return {}


def _window_fields(hf_config) -> dict:
    return dict(sliding_window=getattr(hf_config, "sliding_window", None))


def _qwen2_fields(hf_config) -> dict:
    return dict(qkv_bias=True, attention_bias=False, sliding_window=_uniform_window(hf_config))


def _qwen3_fields(hf_config) -> dict:
    return dict(qk_norm=True, sliding_window=_uniform_window(hf_config))


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
    g = lambda name, *default: getattr(hf_config, name, *default)  # noqa: E731
    return dict(_gemma_fields(hf_config), post_norms=True,
                query_pre_attn_scalar=g("query_pre_attn_scalar"),
                attn_logit_softcapping=g("attn_logit_softcapping", None),
                final_logit_softcapping=g("final_logit_softcapping", None),
                sliding_window=g("sliding_window", None), layer_types=g("layer_types", None))


# --------------------------------------------------------------------------
# Writing transformers configs
# --------------------------------------------------------------------------


def _llama_to_hf(cfg: LlamaConfig) -> dict:
    if cfg.qkv_bias and not cfg.attention_bias:
        raise ValueError(
            "qkv_bias without attention_bias (bias on q/k/v but not o) has no "
            "transformers LlamaConfig equivalent; use model_type='qwen2'."
        )
    if cfg.sliding_window is not None:
        raise ValueError("transformers LlamaConfig has no sliding window; use model_type='mistral'.")
    return dict(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)


def _unbiased_window_to_hf(class_name: str) -> Callable[[LlamaConfig], dict]:
    """The writer of a family with a window and no biases (Mistral, Phi-3)."""

    def write(cfg: LlamaConfig) -> dict:
        if cfg.has_qkv_bias or cfg.mlp_bias:
            raise ValueError(f"transformers {class_name} has no attention/MLP biases.")
        return dict(sliding_window=cfg.sliding_window)

    return write


def _qwen2_to_hf(cfg: LlamaConfig) -> dict:
    if not cfg.qkv_bias or cfg.attention_bias or cfg.mlp_bias:
        raise ValueError(
            "transformers Qwen2 has bias on q/k/v only: needs qkv_bias=True, "
            "attention_bias=False, mlp_bias=False."
        )
    return dict(use_sliding_window=cfg.sliding_window is not None,
                sliding_window=cfg.sliding_window, max_window_layers=0)


def _qwen3_to_hf(cfg: LlamaConfig) -> dict:
    if cfg.qkv_bias != cfg.attention_bias or cfg.mlp_bias:
        raise ValueError(
            "transformers Qwen3 has attention_bias on q/k/v/o together and no MLP bias: needs "
            f"qkv_bias == attention_bias and mlp_bias=False (got qkv_bias={cfg.qkv_bias}, "
            f"attention_bias={cfg.attention_bias}, mlp_bias={cfg.mlp_bias}).")
    return dict(attention_bias=cfg.attention_bias,
                use_sliding_window=cfg.sliding_window is not None,
                sliding_window=cfg.sliding_window, max_window_layers=0)


def _gemma_to_hf(cfg: LlamaConfig) -> dict:
    if cfg.qkv_bias != cfg.attention_bias or cfg.mlp_bias or cfg.sliding_window is not None:
        raise ValueError(
            "transformers Gemma has attention_bias on q/k/v/o together, no MLP bias and no "
            f"window (got qkv_bias={cfg.qkv_bias}, attention_bias={cfg.attention_bias}, "
            f"mlp_bias={cfg.mlp_bias}, sliding_window={cfg.sliding_window}).")
    return dict(attention_bias=cfg.attention_bias)


def _gemma2_to_hf(cfg: LlamaConfig) -> dict:
    kw = _gemma_to_hf(cfg.replace(sliding_window=None))
    kind = "sliding_attention" if cfg.sliding_window is not None else "full_attention"
    return dict(
        kw, hidden_activation=cfg.hidden_act, sliding_window=cfg.sliding_window,
        layer_types=list(cfg.layer_types or [kind] * cfg.num_hidden_layers),
        query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
        attn_logit_softcapping=cfg.attn_logit_softcapping,
        final_logit_softcapping=cfg.final_logit_softcapping)


# --------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------

_GEMMA_SWITCHES = {"norm_unit_offset": True, "scale_embeddings": True}

FAMILIES: Mapping[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaConfig", "LlamaForCausalLM", _no_fields, _llama_to_hf),
    Family("mistral", "MistralConfig", "MistralForCausalLM", _window_fields,
           _unbiased_window_to_hf("MistralConfig")),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", _qwen2_fields, _qwen2_to_hf),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", _qwen3_fields, _qwen3_to_hf,
           switches={"qk_norm": True}),
    # a window (if any) on every layer; fused weights in the checkpoint
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", _window_fields,
           _unbiased_window_to_hf("Phi3Config"),
           fused=(("self_attn.qkv_proj.weight", ("self_attn.q_proj.weight",
                                                 "self_attn.k_proj.weight",
                                                 "self_attn.v_proj.weight")),
                  ("mlp.gate_up_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")))),
    Family("gemma", "GemmaConfig", "GemmaForCausalLM", _gemma_fields, _gemma_to_hf,
           switches=_GEMMA_SWITCHES),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM", _gemma2_fields, _gemma2_to_hf,
           switches={**_GEMMA_SWITCHES, "post_norms": True},
           own_fields=("query_pre_attn_scalar", "attn_logit_softcapping",
                       "final_logit_softcapping", "layer_types")),
)}

#: every switch and own field some family has, in registry order
_SWITCHES = tuple(dict.fromkeys(s for f in FAMILIES.values() for s in f.switches))
_OWN_FIELDS = tuple(dict.fromkeys(s for f in FAMILIES.values() for s in f.own_fields))


def family(model_type: str) -> Family:
    """The :class:`Family` of ``model_type``.

    Raises:
      ValueError: a ``model_type`` no record has (the message lists those supported).
    """
    if model_type not in FAMILIES:
        raise ValueError(
            f"transformers model_type {model_type!r} is not supported by lomo_jax.models.llama "
            f"(supported: {tuple(FAMILIES)})."
        )
    return FAMILIES[model_type]


def check_switches(cfg: LlamaConfig) -> None:
    """Raise ``ValueError`` if a switch or an own field of ``cfg`` differs from
    what ``cfg.model_type``'s ``transformers`` model has."""
    fam = family(cfg.model_type)
    for name in _SWITCHES:
        want = fam.switches.get(name, False)
        if getattr(cfg, name) != want:
            raise ValueError(
                f"{name}={getattr(cfg, name)!r} has no transformers equivalent for "
                f"model_type={cfg.model_type!r} (which has {name}={want!r}).")
    for name in _OWN_FIELDS:
        if name not in fam.own_fields and getattr(cfg, name) is not None:
            owners = [f.model_type for f in FAMILIES.values() if name in f.own_fields]
            raise ValueError(f"{name}={getattr(cfg, name)!r} has no transformers equivalent "
                             f"for model_type={cfg.model_type!r} (only {', '.join(owners)} "
                             "has it).")
