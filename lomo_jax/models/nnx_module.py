r"""The LLaMA-style decoder as Flax NNX modules.

Per decoder layer, :math:`h \in \mathbb{R}^{B \times T \times D}` (pre-norm
residual block, SwiGLU MLP):

.. math:: h \leftarrow h + \mathrm{Attn}(\mathrm{RMSNorm}_1(h)), \qquad
          h \leftarrow h + \mathrm{MLP}(\mathrm{RMSNorm}_2(h)), \qquad
          \mathrm{MLP}(x) = (\mathrm{silu}(x W_g) \odot x W_u) W_d

The ``L`` layers are built by ``nnx.vmap`` (stacked on a leading axis) and run
by ``nnx.scan``; the pure functional view (:mod:`lomo_jax.models.layers`)
merges one layer's parameters into these same modules, so the two cannot
drift apart.

Example::

    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    logits = model(input_ids, attention_mask=mask)      # [B, T, V]
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from lomo_jax.embedding import nan_row_ids
from lomo_jax.models.attention import attention
from lomo_jax.models.batch import check_batch, layer_context
from lomo_jax.models.config import _ACTIVATIONS, LlamaConfig, layer_sliding
from lomo_jax.models.lora_config import LoraLinear
from lomo_jax.models.embed_head import llama_head, scale_embedding, softcap_logits
from lomo_jax.models.norm import RMSNorm, rms_norm_module
from lomo_jax.models.rope import apply_rotary

__all__ = ["LlamaAttention", "LlamaDecoderLayer", "LlamaForCausalLM", "LlamaMLP", "RMSNorm",
           "branch_names"]


def _linear(config, d_in, d_out, use_bias, rngs, name=None):
    """The projection ``name`` (its Hugging Face module name): a
    :class:`~lomo_jax.models.lora_config.LoraLinear` when ``config.lora`` targets it."""
    lora = config.lora
    targeted = lora is not None and name in lora.targets
    kw = {"lora": lora, "name": name} if targeted else {}
    return (LoraLinear if targeted else nnx.Linear)(
        d_in,
        d_out,
        use_bias=use_bias,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nnx.initializers.normal(config.initializer_range),
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
        **kw,
    )


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings (see module docstring)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        d, h, k = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        self.q_proj = _linear(c, c.hidden_size, h * d, c.has_qkv_bias, rngs, "q_proj")
        self.k_proj = _linear(c, c.hidden_size, k * d, c.has_qkv_bias, rngs, "k_proj")
        self.v_proj = _linear(c, c.hidden_size, k * d, c.has_qkv_bias, rngs, "v_proj")
        self.o_proj = _linear(c, h * d, c.hidden_size, c.attention_bias, rngs, "o_proj")
        if c.qk_norm:
            self.q_norm = rms_norm_module(c, d)
            self.k_norm = rms_norm_module(c, d)

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
        self.gate_proj = _linear(c, c.hidden_size, c.intermediate_size, c.mlp_bias, rngs, "gate_proj")
        self.up_proj = _linear(c, c.hidden_size, c.intermediate_size, c.mlp_bias, rngs, "up_proj")
        self.down_proj = _linear(c, c.intermediate_size, c.hidden_size, c.mlp_bias, rngs, "down_proj")

    def __call__(self, x):
        return self.down_proj(_ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


def branch_names(config: LlamaConfig) -> tuple:
    """The sub-modules of the attention and the MLP residual branch, in order:
    input norm, block, then (``post_norms``, Gemma 2) the output norm."""
    if config.post_norms:
        return (("input_layernorm", "self_attn", "post_attention_layernorm"),
                ("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"))
    return ("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp")


def apply_branch(modules, h, *args):
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
        self.input_layernorm = rms_norm_module(c, c.hidden_size)
        self.self_attn = LlamaAttention(c, rngs=rngs)
        self.post_attention_layernorm = rms_norm_module(c, c.hidden_size)
        self.mlp = LlamaMLP(c, rngs=rngs)
        if c.post_norms:
            self.pre_feedforward_layernorm = rms_norm_module(c, c.hidden_size)
            self.post_feedforward_layernorm = rms_norm_module(c, c.hidden_size)

    def __call__(self, h, cos, sin, mask, sliding=None):
        attn, mlp = ([getattr(self, n) for n in names] for names in branch_names(self.config))
        h = h + apply_branch(attn, h, cos, sin, mask, sliding)
        return h + apply_branch(mlp, h)


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
        self.norm = rms_norm_module(c, c.hidden_size)
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
        check_batch(c, batch, ("input_ids",), "LlamaForCausalLM")
        cos, sin, mask = layer_context(c, batch)
        ids = nan_row_ids(jnp.asarray(input_ids), c.vocab_size)  # traced: NaN rows, not row V-1
        h = scale_embedding(c, self.embed_tokens(ids))

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
        def run(h, layer, i):
            return layer(h, cos, sin, mask, layer_sliding(c, i))

        return run(h, self.layers, jnp.arange(c.num_hidden_layers, dtype=jnp.int32))

    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None):
        """Logits ``[B, T, V]`` in ``config.dtype``."""
        h = self.norm(self.hidden_states(input_ids, attention_mask, position_ids, segment_ids))
        if self.lm_head is None:
            return softcap_logits(self.config, self.embed_tokens.attend(h))
        return softcap_logits(self.config, self.lm_head(h))

    def loss(self, batch: Mapping[str, Any]) -> jax.Array:
        """Mean next-token cross-entropy (see :func:`causal_lm_loss`,
        :func:`default_labels`)."""
        check_batch(self.config, batch, ("labels",), "LlamaForCausalLM.loss")
        h = self.hidden_states(batch["input_ids"], batch.get("attention_mask"),
                               batch.get("position_ids"), batch.get("segment_ids"))
        head = {"norm": self.norm.scale[...]}
        embed = {"embedding": self.embed_tokens.embedding[...]}
        if self.lm_head is not None:
            head["lm_head"] = self.lm_head.kernel[...]
        return llama_head(self.config, head, h, batch, embed_params=embed)
