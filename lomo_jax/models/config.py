r"""The architecture record of the LLaMA-style decoders: :class:`LlamaConfig`.

One frozen, hashable dataclass covers LLaMA (1/2/3), Mistral, Qwen2, Qwen3,
Phi-3, Gemma and Gemma 2: they differ only in its switches. It checks its
fields on construction (a bad value raises ``ValueError`` naming it) and
derives what the model reads (``head_dim``, :math:`H/K` groups, the score
scale :math:`q^{-1/2}`, which layers slide).

Example::

    from lomo_jax.models.config import LlamaConfig
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    cfg.head_dim, cfg.num_kv_groups        # (16, 2)
    bf16 = cfg.replace(dtype=jnp.bfloat16)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lomo_jax.models.families import FAMILIES
from lomo_jax.models.hf_config import config_from_hf, config_to_hf
from lomo_jax.models.lora_config import LoraConfig

__all__ = ["LlamaConfig", "layer_sliding"]

_SUPPORTED_MODEL_TYPES = tuple(FAMILIES)  # ("llama", "mistral", "qwen2", ...)
_LAYER_TYPES = ("full_attention", "sliding_attention")
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")
_ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    r"""Architecture of a LLaMA-style decoder (also Mistral, Qwen2).

    Field names follow ``transformers.LlamaConfig``. The config is frozen and
    hashable (``rope_scaling`` is stored as a sorted tuple of items; read it as
    a dict with :attr:`rope_scaling_dict`).

    Attributes:
      vocab_size, hidden_size, intermediate_size, num_hidden_layers,
      num_attention_heads: as in ``transformers``.
      num_key_value_heads: ``K`` for grouped-query attention (``None``: = heads,
        i.e. multi-head attention). Must divide ``num_attention_heads``.
      head_dim: per-head size ``d`` (``None``: ``hidden_size // heads``).
      rms_norm_eps: :math:`\epsilon` of every RMSNorm.
      rope_theta: RoPE base :math:`\theta`.
      rope_scaling: ``None`` (default RoPE) or a ``transformers``-style dict
        with ``rope_type`` in ``"default"``, ``"linear"`` (``factor``),
        ``"llama3"`` (``factor``, ``low_freq_factor``, ``high_freq_factor``,
        ``original_max_position_embeddings``), ``"yarn"`` (``factor``,
        ``original_max_position_embeddings``, optional ``attention_factor``,
        ``beta_fast``, ``beta_slow``, ``mscale``, ``mscale_all_dim``,
        ``truncate``) or ``"dynamic"`` (``factor``; see :func:`rope_inv_freq`).
      max_position_embeddings: the length dynamic RoPE scales beyond; else only
        carried to/from ``transformers`` configs (and bounds ``generate``).
      tie_word_embeddings: logits use the input embedding (no ``lm_head``).
      attention_bias: bias on q, k, v **and** o projections (as
        ``transformers.LlamaConfig.attention_bias``).
      qkv_bias: bias on q, k, v only (Qwen2).
      mlp_bias: bias on the three MLP projections.
      hidden_act: MLP gate activation (``"silu"`` for SwiGLU).
      sliding_window: if set, query ``t`` sees keys ``t - W < s <= t`` in every
        layer (Mistral); ``None``: full causal attention.
      qk_norm: RMSNorm (own scale ``[d]``) on every query and key head before
        RoPE (Qwen3).
      norm_unit_offset: every RMSNorm scales by :math:`1 + w` (weights 0 at
        init), the product in fp32 before the cast (Gemma).
      scale_embeddings: :math:`h_0 = E[x] \sqrt{D}` (the factor rounded to fp32,
        then to ``dtype``; Gemma).
      post_norms: RMSNorms also on the attention and MLP outputs before each
        residual add (Gemma 2: ``post_attention_layernorm`` is then the
        attention's output norm, ``pre_feedforward_layernorm`` the MLP's input norm).
      query_pre_attn_scalar: scores are scaled by this to the power -1/2
        instead of ``head_dim`` (Gemma 2).
      attn_logit_softcapping: scores :math:`s \to c \tanh(s / c)` before the mask
        (Gemma 2; the model then uses its own XLA attention, not
        ``jax.nn.dot_product_attention``).
      final_logit_softcapping: the same on the logits (Gemma 2; applied chunk
        by chunk in the loss's chunked cross-entropy, so the ``[B, T, V]``
        logits still never exist whole).
      layer_types: per layer ``"sliding_attention"`` or ``"full_attention"``
        (Gemma 2 alternates them); only a mix is kept (all sliding: the
        window on every layer; all full: no window). A layer then needs its
        index (the :class:`lomo_jax.LayeredModel` layer takes ``index``).
      initializer_range: std of the normal initializer of kernels/embeddings.
      model_type: ``"llama"``, ``"mistral"``, ``"qwen2"``, ``"qwen3"``, ``"phi3"``,
        ``"gemma"`` or ``"gemma2"``; selects the
        ``transformers`` config/model class on export.
      dtype: computation dtype (activations, matmuls; softmax, RMSNorm
        statistics and the loss are fp32 regardless).
      param_dtype: dtype of freshly initialized parameters.
      attention_implementation: ``"auto"`` (cuDNN flash attention when compiled
        for a CUDA GPU in bf16/fp16, XLA's otherwise), ``"xla"`` or ``"cudnn"``;
        see :func:`attention`.
      bos_token_id, eos_token_id, pad_token_id: the checkpoint's special token
        ids, not used by the model; ``save_pretrained`` writes them back
        (``eos_token_id`` may be several ids: a tuple). ``None`` is written as
        null for a config read from a checkpoint (``generation_config`` set);
        in a config built by hand it leaves the ``transformers`` class's
        default (Llama: 1, 2, none).
      generation_config: the checkpoint's ``generation_config.json`` (less
        ``transformers_version``) that ``save_pretrained`` writes back: a dict,
        stored as canonical JSON text (hashable); read it with
        :attr:`generation_config_dict`. ``None``: built by hand (a save then
        derives one from the token ids, as ``transformers`` does).
      lora: a :class:`~lomo_jax.models.lora.LoraConfig`: every layer's targeted
        projections then carry a LoRA adapter (``lora_a``, ``lora_b`` beside
        the kernel; see :mod:`lomo_jax.models.lora`). ``None``: no adapter.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[Any] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: Optional[int] = None
    qk_norm: bool = False
    norm_unit_offset: bool = False
    scale_embeddings: bool = False
    post_norms: bool = False
    query_pre_attn_scalar: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    layer_types: Optional[tuple] = None
    initializer_range: float = 0.02
    model_type: str = "llama"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str = "auto"
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Any] = None
    pad_token_id: Optional[int] = None
    generation_config: Optional[Any] = None
    lora: Optional[LoraConfig] = None

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim."
                )
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings.")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}."
            )
        if self.model_type not in _SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type={self.model_type!r} is not supported; use one of "
                f"{_SUPPORTED_MODEL_TYPES}."
            )
        if self.attention_implementation not in _ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attention_implementation={self.attention_implementation!r}; use one of "
                f"{_ATTENTION_IMPLEMENTATIONS}."
            )
        if self.sliding_window is not None and int(self.sliding_window) < 1:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}.")
        if self.lora is not None and not isinstance(self.lora, LoraConfig):
            raise ValueError(f"lora must be a lomo_jax.models.lora.LoraConfig or None, got "
                             f"{type(self.lora).__name__}.")
        self._set_layer_types(set_)
        rs = self.rope_scaling
        if isinstance(rs, Mapping):
            rs = tuple(sorted((str(k), _freeze(v)) for k, v in rs.items()))
        elif rs is not None:
            rs = tuple(sorted(tuple(rs)))
        if rs is not None:
            d = dict(rs)
            rtype = d.get("rope_type", d.get("type", "default"))
            if rtype not in _SUPPORTED_ROPE_TYPES:
                raise NotImplementedError(
                    f"rope_scaling type {rtype!r} is not implemented; supported: "
                    f"{_SUPPORTED_ROPE_TYPES}."
                )
            if rtype == "default":
                rs = None
        set_("rope_scaling", rs)
        set_("dtype", jnp.dtype(self.dtype))
        set_("param_dtype", jnp.dtype(self.param_dtype))
        self._set_special_tokens(set_)

    def _set_special_tokens(self, set_) -> None:
        """Checks the token ids (``eos_token_id`` a tuple if several) and stores
        ``generation_config`` as canonical JSON text."""
        def token(field, v):
            if v is None or (isinstance(v, numbers.Integral) and not isinstance(v, bool)):
                return None if v is None else int(v)
            raise ValueError(f"{field}={v!r} must be an integer token id or None.")

        for f in ("bos_token_id", "pad_token_id"):
            set_(f, token(f, getattr(self, f)))
        eos = self.eos_token_id
        if isinstance(eos, (list, tuple)):
            set_("eos_token_id", tuple(token("eos_token_id", v) for v in eos))
        else:
            set_("eos_token_id", token("eos_token_id", eos))
        gen = self.generation_config
        if gen is None:
            return
        if isinstance(gen, str):
            gen = json.loads(gen)
        if not isinstance(gen, Mapping):
            raise ValueError(f"generation_config must be a dict or None, got {type(gen).__name__}.")
        gen = {str(k): v for k, v in gen.items() if k != "transformers_version"}
        try:
            set_("generation_config", json.dumps(gen, sort_keys=True, separators=(",", ":")))
        except TypeError as e:
            raise ValueError(f"generation_config must hold JSON values only: {e}") from None

    def _set_layer_types(self, set_) -> None:
        """Checks ``layer_types``; keeps it (a tuple) only if it mixes both kinds."""
        types = self.layer_types
        if types is None:
            return
        types = tuple(types)
        if len(types) != self.num_hidden_layers or any(t not in _LAYER_TYPES for t in types):
            raise ValueError(
                f"layer_types={list(types)} must list one of {_LAYER_TYPES} per layer "
                f"(num_hidden_layers={self.num_hidden_layers}).")
        if "sliding_attention" in types and self.sliding_window is None:
            raise ValueError(f"layer_types={list(types)} has sliding layers but sliding_window=None.")
        if "full_attention" not in types or "sliding_attention" not in types:
            types = None
            if "sliding_attention" not in self.layer_types:
                set_("sliding_window", None)
        set_("layer_types", types)

    # ---- derived --------------------------------------------------------

    @property
    def sliding_layers(self) -> Optional[np.ndarray]:
        """``[L]`` bool, which layers use the window (``None`` unless ``layer_types`` mixes)."""
        if self.layer_types is None:
            return None
        return np.array([t == "sliding_attention" for t in self.layer_types])

    @property
    def attention_scale(self) -> Optional[float]:
        """The score scale when it is not ``head_dim ** -0.5`` (else ``None``)."""
        q = self.query_pre_attn_scalar
        return None if q is None else float(q) ** -0.5

    @property
    def rope_scaling_dict(self) -> Optional[dict]:
        """``rope_scaling`` as a dict (``None`` for the default RoPE)."""
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def generation_config_dict(self) -> Optional[dict]:
        """``generation_config`` as a dict (``None`` if the config carries none)."""
        return None if self.generation_config is None else json.loads(self.generation_config)

    @property
    def rope_type(self) -> str:
        d = self.rope_scaling_dict or {}
        return d.get("rope_type", d.get("type", "default"))

    @property
    def num_kv_groups(self) -> int:
        """Query heads per key/value head, ``H / K``."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def has_qkv_bias(self) -> bool:
        return bool(self.attention_bias or self.qkv_bias)

    def replace(self, **kw) -> "LlamaConfig":
        """A copy with some fields changed (e.g. ``dtype=jnp.bfloat16``)."""
        if "rope_scaling" not in kw:
            kw["rope_scaling"] = self.rope_scaling_dict
        if "sliding_window" in kw and "layer_types" not in kw:
            kw["layer_types"] = None
        return dataclasses.replace(self, **kw)

    # ---- transformers ---------------------------------------------------

    @classmethod
    def from_hf(cls, hf_config, *, dtype=jnp.float32, param_dtype=None) -> "LlamaConfig":
        """Build from a ``transformers`` config: see
        :func:`lomo_jax.models.hf_config.config_from_hf`."""
        return config_from_hf(hf_config, cls=cls, dtype=dtype, param_dtype=param_dtype)

    def to_hf(self, **overrides):
        """The matching ``transformers`` config: see
        :func:`lomo_jax.models.hf_config.config_to_hf`."""
        return config_to_hf(self, **overrides)


def _freeze(v):
    if isinstance(v, list):
        return tuple(v)
    return v


def layer_sliding(config: LlamaConfig, index):
    """Whether layer ``index`` (may be traced) uses the sliding window, for a
    config with mixed ``layer_types``; ``None`` otherwise (no index needed)."""
    if config.layer_types is None:
        return None
    return jnp.asarray(config.sliding_layers)[index]
