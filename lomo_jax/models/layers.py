r"""The LLaMA-style decoder as pure functions of plain-dict parameters: one
layer, the whole forward, the loss, and the :class:`lomo_jax.LayeredModel`
view the fused step trains.

A layer merges its slice of ``params["layers"]`` into the NNX sub-modules of
:class:`~lomo_jax.models.nnx_module.LlamaDecoderLayer` (through
:func:`lomo_jax.nnx.module_builder`) and calls them, so this is the NNX
model's code; the model is :math:`h_0 = E[x]`, the :math:`L` layers under a
``lax.scan``, then the head (:mod:`lomo_jax.models.embed_head`).

Example::

    lm = llama_layered_model(cfg)
    step = lomo_jax.fused_train_step(lm, lomo_jax.adalomo(1e-3))
    logits = jax.jit(functools.partial(llama_logits, cfg))(params, batch)   # [B, T, V]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from lomo_jax.fused import LayeredModel
from lomo_jax.grad_order import param_grads_first
from lomo_jax.models.batch import check_batch, layer_context, llama_index_ranges
from lomo_jax.models.config import LlamaConfig, layer_sliding
from lomo_jax.models.embed_head import head_logits, llama_embed, llama_head
from lomo_jax.models.nnx_module import LlamaDecoderLayer, apply_branch, branch_names
from lomo_jax.models.lora_config import set_dropout_keys
from lomo_jax.nnx import module_builder

__all__ = ["llama_hidden", "llama_layer", "llama_layered_model", "llama_logits", "llama_loss"]


def llama_layer(config: LlamaConfig, layer_params, h, batch, index=None, key=None) -> jax.Array:
    """One decoder layer on one (unstacked) slice of ``params["layers"]``.

    The layer's own NNX sub-modules (norms, attention, MLP) are merged from the
    slice (``nnx.merge``) and called, so this is the NNX layer's code; each of
    the two residual branches runs under
    :func:`lomo_jax.grad_order.param_grads_first`, so the backward finishes the
    MLP's weight gradients (and frees its ``[B, T, F]`` activations) before
    the attention's backward starts. RoPE tables and the mask are rebuilt from
    ``batch`` (cheap; XLA hoists them). ``index``: the layer's position, needed
    (only) by configs with mixed ``layer_types``. ``key``: LoRA dropout's key
    (``config.lora.dropout > 0``, training; split between the two branches); None:
    no dropout.
    """
    context = layer_context(config, batch) + (layer_sliding(config, index),)
    attn_names, mlp_names = branch_names(config)
    attn = {k: layer_params[k] for k in attn_names}
    mlp = {k: layer_params[k] for k in mlp_names}
    attn_key, mlp_key = (None, None) if key is None else tuple(jax.random.split(key))
    h = h + param_grads_first(functools.partial(attention_branch, config))(
        attn, h, context + (attn_key,))
    return h + param_grads_first(functools.partial(mlp_branch, config))(mlp, h, (mlp_key,))


def _merged_branch(config, names, p, h, *args, key=None):
    """The residual branch ``names`` (norm, block[, post-norm]) merged from ``p``, on
    ``h``; with ``key``, its LoRA projections apply dropout (:func:`set_dropout_keys`)."""
    modules = [merge_submodule(config, n, p[n]) for n in names]
    if key is not None:
        for module in modules:
            set_dropout_keys(module, key)
    return apply_branch(modules, h, *args)


def attention_branch(config, p, h, cos, sin, mask, sliding=None, key=None):
    """The attention branch's output (before the residual add) from its params ``p``."""
    return _merged_branch(config, branch_names(config)[0], p, h, cos, sin, mask, sliding,
                          key=key)


def mlp_branch(config, p, h, key=None):
    """The MLP branch's output (before the residual add) from its params ``p``."""
    return _merged_branch(config, branch_names(config)[1], p, h, key=key)


@functools.lru_cache(maxsize=64)
def _submodule_builders(config: LlamaConfig) -> dict:
    layer = nnx.eval_shape(lambda: LlamaDecoderLayer(config, rngs=nnx.Rngs(0)))
    return {name: module_builder(getattr(layer, name)) for name in sum(branch_names(config), ())}


def merge_submodule(config: LlamaConfig, name: str, params):
    """The decoder layer's sub-module ``name`` holding ``params`` (a pure dict)."""
    return _submodule_builders(config)[name](params)


def llama_hidden(config: LlamaConfig, params, batch) -> jax.Array:
    """Hidden states after the last layer (``lax.scan`` over the stacked layers)."""

    def body(h, xs):
        p, i = xs
        return llama_layer(config, p, h, batch, i), None

    check_batch(config, batch, ("input_ids",), "lomo_jax.models")
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
    return head_logits(config, params["head"], h, params["embed"])


def llama_loss(config: LlamaConfig, params, batch) -> jax.Array:
    """The training loss on plain-dict params (same as the LayeredModel's)."""
    check_batch(config, batch, ("labels",), "lomo_jax.models")
    h = llama_hidden(config, params, batch)
    return llama_head(config, params["head"], h, batch, embed_params=params["embed"])


def llama_layered_model(config: LlamaConfig):
    """The model as a :class:`lomo_jax.LayeredModel` for ``lomo_jax.fused_train_step``.

    ``embed``/``layer``/``head`` are :func:`llama_embed`, :func:`llama_layer`,
    :func:`llama_head` with ``config`` bound; ``tied`` is
    ``config.tie_word_embeddings``. Params: the plain dict of
    :func:`lomo_jax.models.params.module_to_params` / :func:`lomo_jax.models.convert.params_from_hf`.

    Example::

        lm = llama_layered_model(cfg)
        step = lomo_jax.fused_train_step(lm, lomo_jax.adalomo(1e-3))
        loss = lm.loss(params, batch)     # == llama_loss(cfg, params, batch)

    With LoRA dropout (``config.lora.dropout > 0``) the layer takes ``key``, so the
    fused step needs ``key=`` or ``fused_init(..., rng=...)`` and ``lm.loss`` needs
    ``key=`` (evaluate with :func:`llama_loss`: no dropout).
    """
    def embed(p, batch):
        return llama_embed(config, p, batch)

    def layer(p, h, batch):
        return llama_layer(config, p, h, batch)

    def indexed_layer(p, h, batch, *, index):  # mixed windows: the layer needs its index
        return llama_layer(config, p, h, batch, index)

    def dropout_layer(p, h, batch, *, index, key):  # LoRA dropout: the layer's own key
        return llama_layer(config, p, h, batch, index, key)

    def head(p, h, batch, embed_params=None):
        return llama_head(config, p, h, batch, embed_params=embed_params)

    chosen = layer if config.layer_types is None else indexed_layer
    if config.lora is not None and config.lora.dropout > 0:
        chosen = dropout_layer
    return LayeredModel(embed, chosen, head,
                        tied=bool(config.tie_word_embeddings),
                        index_ranges=llama_index_ranges(config))
