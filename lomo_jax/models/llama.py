r"""A LLaMA-architecture causal language model in Flax NNX, layer-stacked.

One code path covers LLaMA (1/2/3), Mistral, Qwen2, Qwen3, Phi-3, Gemma and
Gemma 2 checkpoints: they differ only in switches of :class:`LlamaConfig`
(biases, sliding window, RoPE scaling, q/k norms, Gemma's norms, embedding
scale, soft-capping and alternating windows). Conversion to and from Hugging Face ``transformers`` lives in
:mod:`lomo_jax.models.convert`.

**Why NNX (not linen).** NNX modules are plain Python objects holding their
parameters, so the model reads like the PyTorch reference (which keeps the
weight mapping obvious), the decoder stack is built with ``nnx.vmap`` and run
with ``nnx.scan`` without linen's ``variable_axes``/``split_rngs`` plumbing,
and ``nnx.split``/``nnx.merge`` give the pure functional view the fused LOMO
step needs *from the same module code*: the pure per-layer function
:func:`llama_layer` merges one layer's slice of the plain-dict parameters into
the :class:`LlamaDecoderLayer` graph and calls it, so the NNX model and the
:class:`lomo_jax.LayeredModel` view cannot drift apart.

The math (per decoder layer, :math:`h \in \mathbb{R}^{B \times T \times D}`)
----------------------------------------------------------------------------

* **RMSNorm** (computed in fp32, then cast back, as in ``transformers``):

  .. math:: \mathrm{RMSNorm}(x) = w \odot \frac{x}{\sqrt{\tfrac1D \sum_j x_j^2
            + \epsilon}}

* **Rotary embeddings** on queries and keys, for position :math:`p` and
  frequencies :math:`\omega_i = \theta^{-2i/d}` (``rope_theta``
  :math:`=\theta`, head size :math:`d`; ``"linear"`` divides every
  :math:`\omega_i` by the factor, ``"llama3"`` only the low frequencies with a
  smooth ramp):

  .. math:: \mathrm{RoPE}(x)_p = x_p \cos(p\,\omega) +
            \mathrm{rot}(x_p) \sin(p\,\omega), \qquad
            \mathrm{rot}([x_1, x_2]) = [-x_2, x_1]

  (``transformers``' "rotate half" convention: the two halves of the head
  dimension are the real and imaginary parts).

* **Grouped-query attention** with :math:`H` query heads and :math:`K`
  key/value heads (query head :math:`h` reads kv head :math:`\lfloor h/(H/K)
  \rfloor`):

  .. math:: \mathrm{Attn}(x) = \Big[\mathrm{softmax}\Big(\frac{q_h k_{g(h)}^\top}
            {\sqrt d} + M\Big) v_{g(h)}\Big]_{h=1}^{H} W_o

  where :math:`M_{ts} = 0` if key :math:`s` is visible from query :math:`t`
  (:math:`s \le t`, inside the sliding window :math:`t - s < W` if one is
  set, and not padding) and :math:`-\infty` otherwise (in practice the lowest
  fp32 value *added* to the score, as ``transformers``' eager attention does,
  so a query row that sees no key -- a left-padding position -- gives a
  finite uniform average instead of NaN, with the same values and gradients
  as PyTorch). The softmax is done in fp32.

* **SwiGLU MLP**: :math:`\mathrm{MLP}(x) = (\mathrm{silu}(x W_g) \odot x W_u) W_d`.

* **Pre-norm residual block**:

  .. math:: h \leftarrow h + \mathrm{Attn}(\mathrm{RMSNorm}_1(h)), \qquad
            h \leftarrow h + \mathrm{MLP}(\mathrm{RMSNorm}_2(h))

The model is :math:`h_0 = E[x]`, the :math:`L` layers above (stacked on a
leading axis and run by a scan), then :math:`\mathrm{logits} =
\mathrm{RMSNorm}(h_L) W_{\mathrm{lm}}` with :math:`W_{\mathrm{lm}} = E^\top`
when embeddings are tied. The loss is next-token cross-entropy averaged over
the positions whose (shifted) label is not ``-100``:

.. math:: \ell = \frac{1}{|\mathcal V|} \sum_{(b,t) \in \mathcal V}
          -\log \mathrm{softmax}(\mathrm{logits}_{b,t})_{y_{b,t+1}}

exactly ``LlamaForCausalLM``'s loss. Labels default to ``input_ids`` with the
padding positions (``attention_mask == 0``) set to ``-100``.

Positions default to ``0..T-1`` for every row, as in ``transformers`` when no
``position_ids`` are given (so with left padding the first real token is not at
position 0 -- pass ``batch["position_ids"]`` to change that; it is passed the
same way to both frameworks in the parity tests).

Plain-dict parameters (what the fused step and the converters use)::

    {"embed":  {"embedding": [V, D]},
     "layers": {"input_layernorm": {"scale": [L, D]},
                "self_attn": {"q_proj": {"kernel": [L, D, H*d], "bias": [L, H*d]},
                              "k_proj": {"kernel": [L, D, K*d], "bias": ...},
                              "v_proj": {"kernel": [L, D, K*d], "bias": ...},
                              "o_proj": {"kernel": [L, H*d, D], "bias": ...}},
                "post_attention_layernorm": {"scale": [L, D]},
                "mlp": {"gate_proj": {"kernel": [L, D, F]}, "up_proj": {"kernel": [L, D, F]},
                        "down_proj": {"kernel": [L, F, D]}}},
     "head":   {"norm": [D], "lm_head": [D, V]}}        # no "lm_head" when tied

(``bias`` entries exist only when the config asks for them.)

Example::

    import jax, optax, lomo_jax
    from flax import nnx
    from lomo_jax.models import llama

    cfg = llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2)
    model = llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    logits = model(input_ids, attention_mask=mask)             # [B, T, V]

    params = llama.module_to_params(model)                      # plain dict
    lm = llama.llama_layered_model(cfg)                         # lomo_jax.LayeredModel
    tx = lomo_jax.adalomo(1e-3)
    opt_state = lomo_jax.fused_init(tx, params)
    step = lomo_jax.fused_train_step(lm, tx, clip_grad_norm=1.0)
    batch = {"input_ids": input_ids, "attention_mask": mask}
    params, opt_state, metrics = step(params, opt_state, batch)
    llama.update_module(model, params)                          # back into the NNX model

Generation with a KV cache: :func:`lomo_jax.models.generate`. Not
implemented: dropout, RoPE types other than ``default``, ``linear``,
``llama3``, ``yarn`` and ``dynamic`` (``from_hf`` raises), partial rotary
embeddings, Qwen2/Qwen3 checkpoints that mix sliding-window and
full-attention layers (``from_hf`` raises; Gemma 2's mix is supported).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from lomo_jax.cross_entropy import linear_cross_entropy
from lomo_jax.embedding import IndexRange, check_indices, embedding_lookup, nan_row_ids
from lomo_jax.grad_order import param_grads_first

__all__ = [
    "LlamaConfig",
    "RMSNorm",
    "LlamaAttention",
    "LlamaMLP",
    "LlamaDecoderLayer",
    "LlamaForCausalLM",
    "rms_norm",
    "rope_inv_freq",
    "rotary_cos_sin",
    "apply_rotary",
    "attention",
    "attention_mask",
    "key_mask",
    "positions",
    "segment_positions",
    "causal_lm_loss",
    "default_labels",
    "next_token_targets",
    "init_params",
    "param_shapes",
    "module_to_params",
    "params_to_module",
    "update_module",
    "llama_embed",
    "llama_layer",
    "llama_head",
    "llama_hidden",
    "llama_index_ranges",
    "llama_logits",
    "llama_loss",
    "llama_layered_model",
]

IGNORE_INDEX = -100

_SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2")
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


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------


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
        import json
        import numbers

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
        import json

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
        :func:`lomo_jax.models.convert.config_from_hf`."""
        from lomo_jax.models.convert import config_from_hf

        return config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)

    def to_hf(self, **overrides):
        """The matching ``transformers`` config: see
        :func:`lomo_jax.models.convert.config_to_hf`."""
        from lomo_jax.models.convert import config_to_hf

        return config_to_hf(self, **overrides)


def _freeze(v):
    if isinstance(v, list):
        return tuple(v)
    return v


# --------------------------------------------------------------------------
# Building blocks (pure array functions)
# --------------------------------------------------------------------------


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype=None,
             unit_offset: bool = False) -> jax.Array:
    r""":math:`w \odot x / \sqrt{\mathrm{mean}(x^2) + \epsilon}`; statistics in
    fp32, the normalized activation cast to ``dtype`` (default ``x.dtype``)
    before the scale, as in ``transformers``' ``LlamaRMSNorm``. With
    ``unit_offset`` (Gemma) the factor is :math:`1 + w` and the product is
    taken in fp32, then cast."""
    dtype = x.dtype if dtype is None else dtype
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * lax.rsqrt(var + eps)
    if unit_offset:
        return (y * (1.0 + scale.astype(jnp.float32))).astype(dtype)
    return scale.astype(dtype) * y.astype(dtype)


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


def _context(config: LlamaConfig, batch: Mapping[str, Any]):
    """``(cos, sin, key mask or None)`` shared by every layer, from the batch."""
    cos, sin = rotary_cos_sin(config, positions(batch))
    return cos, sin, key_mask(batch)


# --------------------------------------------------------------------------
# NNX modules
# --------------------------------------------------------------------------


def _linear(config, d_in, d_out, use_bias, rngs):
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=use_bias,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nnx.initializers.normal(config.initializer_range),
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


def _rms_norm_module(config: LlamaConfig, dim: int) -> "RMSNorm":
    return RMSNorm(dim, config.rms_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype,
                   unit_offset=config.norm_unit_offset)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned ``scale`` (``transformers``' ``weight``), ones at init."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 unit_offset: bool = False):
        init = jnp.zeros if unit_offset else jnp.ones  # the factor 1 either way
        self.scale = nnx.Param(init((dim,), param_dtype))
        self.eps = float(eps)
        self.dtype = dtype
        self.unit_offset = unit_offset

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps, self.dtype, self.unit_offset)


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings (see module docstring)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        d, h, k = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        self.q_proj = _linear(c, c.hidden_size, h * d, c.has_qkv_bias, rngs)
        self.k_proj = _linear(c, c.hidden_size, k * d, c.has_qkv_bias, rngs)
        self.v_proj = _linear(c, c.hidden_size, k * d, c.has_qkv_bias, rngs)
        self.o_proj = _linear(c, h * d, c.hidden_size, c.attention_bias, rngs)
        if c.qk_norm:
            self.q_norm = _rms_norm_module(c, d)
            self.k_norm = _rms_norm_module(c, d)

    def __call__(self, x, cos, sin, mask, sliding=None):
        """``x [B, T, D]``, ``cos/sin [B, T, d]``, ``mask [B, 1, T, T]`` bool or ``None``
        (see :func:`key_mask`; causality and the window are added here);
        ``sliding``: see :func:`attention`."""
        q, k, v = self.qkv(x, cos, sin)
        return self.out(attention(self.config, q, k, v, mask, sliding))

    def qkv(self, x, cos, sin):
        """Rotated queries ``[B, T, H, d]``, rotated keys and values ``[B, T, K, d]``
        (also used by :mod:`lomo_jax.models.decoding` to fill its KV cache)."""
        c = self.config
        b, t, _ = x.shape
        d, h, kh = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        q, k = self.q_proj(x).reshape(b, t, h, d), self.k_proj(x).reshape(b, t, kh, d)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(x).reshape(b, t, kh, d)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def out(self, o):
        """The output projection of the attention result ``o [B, T, H, d]``."""
        b, t, h, d = o.shape
        return self.o_proj(o.reshape(b, t, h * d))


class LlamaMLP(nnx.Module):
    r"""SwiGLU: :math:`(\mathrm{act}(x W_g) \odot x W_u) W_d`."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        self.act = c.hidden_act
        self.gate_proj = _linear(c, c.hidden_size, c.intermediate_size, c.mlp_bias, rngs)
        self.up_proj = _linear(c, c.hidden_size, c.intermediate_size, c.mlp_bias, rngs)
        self.down_proj = _linear(c, c.intermediate_size, c.hidden_size, c.mlp_bias, rngs)

    def __call__(self, x):
        return self.down_proj(_ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


def branch_names(config: LlamaConfig) -> tuple:
    """The sub-modules of the attention and the MLP residual branch, in order:
    input norm, block, then (``post_norms``, Gemma 2) the output norm."""
    if config.post_norms:
        return (("input_layernorm", "self_attn", "post_attention_layernorm"),
                ("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"))
    return ("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp")


def _branch(modules, h, *args):
    """``post(block(norm(h), *args))`` for ``modules = (norm, block[, post])``."""
    x = modules[1](modules[0](h), *args)
    for m in modules[2:]:
        x = m(x)
    return x


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: ``h + Attn(norm1(h))`` then ``h + MLP(norm2(h))`` (with
    ``post_norms`` each branch's output is normed too, see :func:`branch_names`)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.input_layernorm = _rms_norm_module(c, c.hidden_size)
        self.self_attn = LlamaAttention(c, rngs=rngs)
        self.post_attention_layernorm = _rms_norm_module(c, c.hidden_size)
        self.mlp = LlamaMLP(c, rngs=rngs)
        if c.post_norms:
            self.pre_feedforward_layernorm = _rms_norm_module(c, c.hidden_size)
            self.post_feedforward_layernorm = _rms_norm_module(c, c.hidden_size)

    def __call__(self, h, cos, sin, mask, sliding=None):
        attn, mlp = ([getattr(self, n) for n in names] for names in branch_names(self.config))
        h = h + _branch(attn, h, cos, sin, mask, sliding)
        return h + _branch(mlp, h)


class LlamaForCausalLM(nnx.Module):
    """The causal LM: embedding, ``L`` decoder layers stacked on a leading axis
    (built by ``nnx.vmap``, run by ``nnx.scan``), final RMSNorm, LM head.

    Example::

        model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
        logits = model(input_ids, attention_mask=mask)      # [B, T, V]
        loss = model.loss({"input_ids": input_ids, "attention_mask": mask})
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed_tokens = nnx.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            embedding_init=nnx.initializers.normal(c.initializer_range),
            rngs=rngs,
        )

        @nnx.split_rngs(splits=c.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs):
            return LlamaDecoderLayer(c, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = _rms_norm_module(c, c.hidden_size)
        if c.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _linear(c, c.hidden_size, c.vocab_size, False, rngs)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None,
                      segment_ids=None):
        """Final hidden states after the last layer (before the final norm)."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "position_ids": position_ids, "segment_ids": segment_ids}
        c = self.config
        _check_batch(c, batch, ("input_ids",), "LlamaForCausalLM")
        cos, sin, mask = _context(c, batch)
        ids = nan_row_ids(jnp.asarray(input_ids), c.vocab_size)  # traced: NaN rows, not row V-1
        h = _scale_embedding(c, self.embed_tokens(ids))

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
        def run(h, layer, i):
            return layer(h, cos, sin, mask, layer_sliding(c, i))

        return run(h, self.layers, jnp.arange(c.num_hidden_layers, dtype=jnp.int32))

    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None):
        """Logits ``[B, T, V]`` in ``config.dtype``."""
        h = self.norm(self.hidden_states(input_ids, attention_mask, position_ids, segment_ids))
        if self.lm_head is None:
            return _softcap_logits(self.config, self.embed_tokens.attend(h))
        return _softcap_logits(self.config, self.lm_head(h))

    def loss(self, batch: Mapping[str, Any]) -> jax.Array:
        """Mean next-token cross-entropy (see :func:`causal_lm_loss`,
        :func:`default_labels`)."""
        _check_batch(self.config, batch, ("labels",), "LlamaForCausalLM.loss")
        h = self.hidden_states(batch["input_ids"], batch.get("attention_mask"),
                               batch.get("position_ids"), batch.get("segment_ids"))
        head = {"norm": self.norm.scale[...]}
        embed = {"embedding": self.embed_tokens.embedding[...]}
        if self.lm_head is not None:
            head["lm_head"] = self.lm_head.kernel[...]
        return llama_head(self.config, head, h, batch, embed_params=embed)


# --------------------------------------------------------------------------
# NNX module <-> plain dict params
# --------------------------------------------------------------------------


def _module_layout(config: LlamaConfig, params) -> dict:
    """Plain-dict params -> the pure dict of ``nnx.state(model, nnx.Param)``."""
    out = {
        "embed_tokens": {"embedding": params["embed"]["embedding"]},
        "layers": params["layers"],
        "norm": {"scale": params["head"]["norm"]},
    }
    if not config.tie_word_embeddings:
        out["lm_head"] = {"kernel": params["head"]["lm_head"]}
    return out


def _params_layout(config: LlamaConfig, pure) -> dict:
    head = {"norm": pure["norm"]["scale"]}
    if not config.tie_word_embeddings:
        head["lm_head"] = pure["lm_head"]["kernel"]
    return {"embed": {"embedding": pure["embed_tokens"]["embedding"]},
            "layers": pure["layers"], "head": head}


def module_to_params(model: LlamaForCausalLM) -> dict:
    """The plain-dict parameters ``{"embed", "layers", "head"}`` of an NNX
    model (the arrays themselves, not copies)."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return _params_layout(model.config, pure)


@functools.lru_cache(maxsize=64)
def _abstract_params(config: LlamaConfig) -> dict:
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    return module_to_params(model)


def param_shapes(config: LlamaConfig) -> dict:
    """``jax.ShapeDtypeStruct`` tree of the plain-dict parameters (nothing allocated)."""
    return jax.tree.map(lambda x: x, _abstract_params(config))


def init_params(config: LlamaConfig, rng=0) -> dict:
    """Freshly initialized plain-dict parameters (``rng``: int seed or key)."""
    return module_to_params(LlamaForCausalLM(config, rngs=nnx.Rngs(rng)))


def check_params(config: LlamaConfig, params, what: str = "params") -> None:
    """Raise ``ValueError`` naming every missing/unexpected key or wrong shape."""
    want = _abstract_params(config)
    w = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    try:
        g = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    except Exception as e:  # pragma: no cover - exotic inputs
        raise ValueError(f"{what} is not a pytree of arrays: {e}") from e
    ks = jax.tree_util.keystr
    missing = [ks(p) for p in w if p not in g]
    extra = [ks(p) for p in g if p not in w]
    bad = [
        f"{what}{ks(p)}: got shape {tuple(jnp.shape(g[p]))}, expected {tuple(w[p].shape)}"
        for p in w
        if p in g and tuple(jnp.shape(g[p])) != tuple(w[p].shape)
    ]
    msgs = []
    if missing:
        msgs.append(f"missing {', '.join(what + m for m in missing)}")
    if extra:
        msgs.append(f"unexpected {', '.join(what + m for m in extra)}")
    msgs.extend(bad)
    if msgs:
        raise ValueError("parameters do not match the config: " + "; ".join(msgs))


def update_module(model: LlamaForCausalLM, params) -> LlamaForCausalLM:
    """Write plain-dict ``params`` into ``model`` in place (shapes checked);
    returns ``model``."""
    check_params(model.config, params)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, _module_layout(model.config, params))
    nnx.update(model, state)
    return model


def params_to_module(config: LlamaConfig, params) -> LlamaForCausalLM:
    """An NNX :class:`LlamaForCausalLM` holding ``params`` (no random init is
    run: the module is built abstractly and then filled)."""
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    return update_module(model, params)


# --------------------------------------------------------------------------
# Pure functional forms (for lomo_jax.fused_train_step)
# --------------------------------------------------------------------------


def llama_embed(config: LlamaConfig, embed_params, batch) -> jax.Array:
    """``h_0 = E[input_ids]`` in ``config.dtype``: ``[B, T, D]`` (its gradient is
    summed in fp32 and allocated late, see :mod:`lomo_jax.embedding`)."""
    ids = jnp.asarray(batch["input_ids"])
    if ids.ndim != 2:
        raise ValueError(f"batch['input_ids'] must be [B, T] (a batch axis, then the sequence), "
                         f"got shape {list(ids.shape)}; for one sequence pass input_ids[None].")
    h = embedding_lookup(jnp.asarray(embed_params["embedding"]), ids).astype(config.dtype)
    return _scale_embedding(config, h)


def llama_index_ranges(config: LlamaConfig) -> dict:
    """The batch's integer entries that index the vocabulary: ``input_ids`` in
    ``[0, V)``, ``labels`` in ``[0, V)`` or ``-100`` (for
    :class:`lomo_jax.LayeredModel`'s ``index_ranges``)."""
    v = config.vocab_size
    return {"input_ids": IndexRange(v), "labels": IndexRange(v, ignore=IGNORE_INDEX)}


def _check_batch(config: LlamaConfig, batch, keys, where: str) -> None:
    """Concrete ``batch[k]`` (``k`` in ``keys``) outside :func:`llama_index_ranges`
    raise ``ValueError`` naming the key, the value and ``vocab_size``. Traced
    ones cannot raise: an id out of range reads a NaN row
    (:func:`lomo_jax.embedding.embedding_lookup`) and a label gets a NaN weight
    (:func:`lomo_jax.cross_entropy.linear_cross_entropy`), so the loss, the
    gradients and the logits from that token on are NaN, never finite and wrong."""
    ranges = tuple((k, r) for k, r in sorted(llama_index_ranges(config).items()) if k in keys)
    check_indices({k: batch.get(k) for k in keys}, ranges, where)


def _scale_embedding(config: LlamaConfig, h):
    r""":math:`h \sqrt{D}` for ``scale_embeddings`` (the factor rounded to fp32,
    then to ``h``'s dtype, as ``transformers``' Gemma), else ``h``."""
    if not config.scale_embeddings:
        return h
    return h * jnp.asarray(np.float32(math.sqrt(config.hidden_size)), h.dtype)


def layer_sliding(config: LlamaConfig, index):
    """Whether layer ``index`` (may be traced) uses the sliding window, for a
    config with mixed ``layer_types``; ``None`` otherwise (no index needed)."""
    if config.layer_types is None:
        return None
    return jnp.asarray(config.sliding_layers)[index]


def llama_layer(config: LlamaConfig, layer_params, h, batch, index=None) -> jax.Array:
    """One decoder layer on one (unstacked) slice of ``params["layers"]``.

    The layer's own NNX sub-modules (norms, attention, MLP) are merged from the
    slice (``nnx.merge``) and called, so this is the NNX layer's code; each of
    the two residual branches runs under
    :func:`lomo_jax.grad_order.param_grads_first`, so the backward finishes the
    MLP's weight gradients (and frees its ``[B, T, F]`` activations) before
    the attention's backward starts. RoPE tables and the mask are rebuilt from
    ``batch`` (cheap; XLA hoists them). ``index``: the layer's position, needed
    (only) by configs with mixed ``layer_types``.
    """
    context = _context(config, batch) + (layer_sliding(config, index),)
    attn_names, mlp_names = branch_names(config)
    attn = {k: layer_params[k] for k in attn_names}
    mlp = {k: layer_params[k] for k in mlp_names}
    h = h + param_grads_first(functools.partial(_attention_branch, config))(attn, h, context)
    return h + param_grads_first(functools.partial(_mlp_branch, config))(mlp, h)


def _merged_branch(config, names, p, h, *args):
    return _branch([_merge_submodule(config, n, p[n]) for n in names], h, *args)


def _attention_branch(config, p, h, cos, sin, mask, sliding=None):
    return _merged_branch(config, branch_names(config)[0], p, h, cos, sin, mask, sliding)


def _mlp_branch(config, p, h):
    return _merged_branch(config, branch_names(config)[1], p, h)


@functools.lru_cache(maxsize=64)
def _submodule_templates(config: LlamaConfig) -> dict:
    layer = nnx.eval_shape(lambda: LlamaDecoderLayer(config, rngs=nnx.Rngs(0)))
    return {name: nnx.split(getattr(layer, name)) for name in sum(branch_names(config), ())}


def _merge_submodule(config: LlamaConfig, name: str, params):
    """The decoder layer's sub-module ``name`` holding ``params`` (a pure dict)."""
    graphdef, abstract = _submodule_templates(config)[name]
    state = jax.tree.map(lambda x: x, abstract)  # fresh Variables, template untouched
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


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


def _head_logits(config: LlamaConfig, head_params, h, embed_params=None) -> jax.Array:
    x, w, transposed = _head_input_and_weight(config, head_params, h, embed_params)
    w = w.astype(config.dtype)
    if transposed:
        return _softcap_logits(config, jnp.dot(x, w.T))
    return _softcap_logits(config, lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ()))))


def _softcap_logits(config: LlamaConfig, logits):
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


def llama_hidden(config: LlamaConfig, params, batch) -> jax.Array:
    """Hidden states after the last layer (``lax.scan`` over the stacked layers)."""

    def body(h, xs):
        p, i = xs
        return llama_layer(config, p, h, batch, i), None

    _check_batch(config, batch, ("input_ids",), "lomo_jax.models")
    h = llama_embed(config, params["embed"], batch)
    h, _ = lax.scan(body, h, (params["layers"], jnp.arange(config.num_hidden_layers)))
    return h


def llama_logits(config: LlamaConfig, params, batch) -> jax.Array:
    """Forward only on plain-dict params: logits ``[B, T, V]`` in ``config.dtype``.

    ``batch``: ``{"input_ids", "attention_mask" (optional), "position_ids"
    (optional)}``. Jit it with the config closed over, e.g.
    ``jax.jit(functools.partial(llama_logits, cfg))``.
    """
    h = llama_hidden(config, params, batch)
    return _head_logits(config, params["head"], h, params["embed"])


def llama_loss(config: LlamaConfig, params, batch) -> jax.Array:
    """The training loss on plain-dict params (same as the LayeredModel's)."""
    _check_batch(config, batch, ("labels",), "lomo_jax.models")
    h = llama_hidden(config, params, batch)
    return llama_head(config, params["head"], h, batch, embed_params=params["embed"])


def llama_layered_model(config: LlamaConfig):
    """The model as a :class:`lomo_jax.LayeredModel` for ``lomo_jax.fused_train_step``.

    ``embed``/``layer``/``head`` are :func:`llama_embed`, :func:`llama_layer`,
    :func:`llama_head` with ``config`` bound; ``tied`` is
    ``config.tie_word_embeddings``. Params: the plain dict of
    :func:`module_to_params` / :func:`lomo_jax.models.convert.params_from_hf`.

    Example::

        lm = llama_layered_model(cfg)
        step = lomo_jax.fused_train_step(lm, lomo_jax.adalomo(1e-3))
        loss = lm.loss(params, batch)     # == llama_loss(cfg, params, batch)
    """
    from lomo_jax.fused import LayeredModel  # lazy: lomo_jax may still be in flux

    def embed(p, batch):
        return llama_embed(config, p, batch)

    def layer(p, h, batch):
        return llama_layer(config, p, h, batch)

    def indexed_layer(p, h, batch, *, index):  # mixed windows: the layer needs its index
        return llama_layer(config, p, h, batch, index)

    def head(p, h, batch, embed_params=None):
        return llama_head(config, p, h, batch, embed_params=embed_params)

    return LayeredModel(embed, layer if config.layer_types is None else indexed_layer, head,
                        tied=bool(config.tie_word_embeddings),
                        index_ranges=llama_index_ranges(config))
