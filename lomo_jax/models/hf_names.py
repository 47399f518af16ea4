r"""The ``transformers`` checkpoint's tensor names and shapes for a :class:`LlamaConfig`.

``i`` = layer index; PyTorch ``nn.Linear`` stores ``weight [out, in]``, Flax
kernels are ``[in, out]``, so every projection is transposed; the ``L``
per-layer tensors are stacked on a new leading axis::

    model.embed_tokens.weight              [V, D]   -> embed.embedding                    [V, D]
    model.layers.i.input_layernorm.weight  [D]      -> layers.input_layernorm.scale       [L, D]
    model.layers.i.self_attn.q_proj.weight [H*d, D] -> layers.self_attn.q_proj.kernel     [L, D, H*d]
    model.layers.i.self_attn.q_proj.bias   [H*d]    -> layers.self_attn.q_proj.bias       [L, H*d]
    ... k_proj, v_proj, o_proj; post_attention_layernorm; mlp.gate_proj/up_proj/down_proj
    model.norm.weight                      [D]      -> head.norm                          [D]
    lm_head.weight                         [V, D]   -> head.lm_head                       [D, V]  (not when tied)

A family's fused tensors (Phi-3's ``qkv_proj``, ``gate_up_proj``: its
:class:`~lomo_jax.models.families.Family` ``fused``) hold several of these
stacked on their first axis.

Example::

    from lomo_jax.models import hf_names

    hf_names.hf_parameter_shapes(cfg)["model.layers.0.self_attn.q_proj.weight"]  # (H*d, D)
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np

from lomo_jax.models.families import family

if TYPE_CHECKING:
    from lomo_jax.models.llama import LlamaConfig

__all__ = ["hf_parameter_shapes"]

#: buffers some checkpoints carry that are not parameters
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|(^|\.)rotary_emb\.original_inv_freq$")


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


def _fused_parts(cfg: LlamaConfig) -> dict:
    """``{part name: (fused name, first row, last row + 1)}`` over all layers
    (HF names; empty for families without fused tensors)."""
    shapes = {suffix: shape for suffix, _, shape, _ in _layer_entries(cfg)}
    out = {}
    for fused, parts in family(cfg.model_type).fused:
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


class _Leaf(NamedTuple):
    """One params leaf: its path, its tensor name(s) in the checkpoint (one per
    layer when ``stacked``), and whether each tensor is transposed (Linear)."""

    path: tuple
    names: tuple
    transpose: bool
    stacked: bool


def _leaves(cfg: LlamaConfig, rename: Callable[[str], str]) -> list:
    """Every params leaf as a :class:`_Leaf`, in checkpoint order, its names
    passed through ``rename`` (see :func:`_check_checkpoint`)."""
    out = [_Leaf(("embed", "embedding"), (rename("model.embed_tokens.weight"),), False, False)]
    for suffix, path, _, linear in _layer_entries(cfg):
        names = tuple(rename(f"model.layers.{i}.{suffix}") for i in range(cfg.num_hidden_layers))
        out.append(_Leaf(("layers",) + path, names, linear, True))
    out.append(_Leaf(("head", "norm"), (rename("model.norm.weight"),), False, False))
    if not cfg.tie_word_embeddings:
        out.append(_Leaf(("head", "lm_head"), ("lm_head.weight",), True, False))
    return out


def _shape_error(name: str, got, want, cfg: LlamaConfig) -> ValueError:
    return ValueError(
        f"parameter {name!r} has shape {tuple(got)} but the config expects {tuple(want)} "
        f"(vocab_size={cfg.vocab_size}, hidden_size={cfg.hidden_size}, "
        f"intermediate_size={cfg.intermediate_size}, heads={cfg.num_attention_heads}, "
        f"kv_heads={cfg.num_key_value_heads}, head_dim={cfg.head_dim})."
    )


def _check_checkpoint(src, cfg: LlamaConfig, strict: bool) -> Callable[[str], str]:
    """Raise on missing, unexpected (``strict``) or misshapen tensors of ``src``
    (anything with ``.keys`` and ``.shape(name)``); return the renaming of
    transformers names to the checkpoint's (a bare ``LlamaModel`` dict has no
    ``model.`` prefix)."""
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
