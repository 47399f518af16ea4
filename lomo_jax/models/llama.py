r"""A LLaMA-architecture causal language model in Flax NNX, layer-stacked.

One code path covers LLaMA (1/2/3), Mistral, Qwen2, Qwen3, Phi-3, Gemma and
Gemma 2 checkpoints: they differ only in switches of :class:`LlamaConfig`
(biases, sliding window, RoPE scaling, q/k norms, Gemma's norms, embedding
scale, soft-capping and alternating windows). Conversion to and from Hugging Face ``transformers`` lives in
:mod:`lomo_jax.models.convert`.

This module gathers the model's public names; each idea has its own module:
:mod:`~lomo_jax.models.config` (:class:`LlamaConfig`),
:mod:`~lomo_jax.models.norm` (RMSNorm), :mod:`~lomo_jax.models.rope`
(rotary embeddings), :mod:`~lomo_jax.models.attention`,
:mod:`~lomo_jax.models.batch` (positions, labels, targets),
:mod:`~lomo_jax.models.embed_head` (embedding, head and loss),
:mod:`~lomo_jax.models.nnx_module` (the NNX modules),
:mod:`~lomo_jax.models.params` (NNX model <-> plain-dict parameters, through
:mod:`lomo_jax.nnx`) and :mod:`~lomo_jax.models.layers` (the pure layer, the
forward, the loss and the :class:`lomo_jax.LayeredModel` view).

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

from lomo_jax.models.attention import attend, attention, attention_mask, key_mask
from lomo_jax.models.batch import (
    IGNORE_INDEX,
    causal_lm_loss,
    default_labels,
    llama_index_ranges,
    next_token_targets,
    positions,
    segment_positions,
)
from lomo_jax.models.batch import check_batch as _check_batch  # noqa: F401 (old private name)
from lomo_jax.models.batch import layer_context as _context  # noqa: F401 (old private name)
from lomo_jax.models.config import LlamaConfig, layer_sliding
from lomo_jax.models.embed_head import head_logits as _head_logits  # noqa: F401 (old name)
from lomo_jax.models.embed_head import llama_embed, llama_head
from lomo_jax.models.layers import (
    llama_hidden,
    llama_layer,
    llama_layered_model,
    llama_logits,
    llama_loss,
)
from lomo_jax.models.layers import merge_submodule as _merge_submodule  # noqa: F401 (old name)
from lomo_jax.models.layers import mlp_branch as _mlp_branch  # noqa: F401 (old name)
from lomo_jax.models.nnx_module import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    branch_names,
)
from lomo_jax.models.norm import RMSNorm, rms_norm
from lomo_jax.models.params import (  # noqa: F401 (_params_layout: tests read it)
    _params_layout,
    check_params,
    init_params,
    module_to_params,
    param_shapes,
    params_to_module,
    update_module,
)
from lomo_jax.models.rope import apply_rotary, rope_attention_factor, rope_inv_freq, rotary_cos_sin
from lomo_jax.models.sharding import llama_shardings  # registers LlamaConfig's shapes


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
    "IGNORE_INDEX",
    "attend",
    "branch_names",
    "check_params",
    "layer_sliding",
    "rope_attention_factor",
    "llama_shardings",
]
