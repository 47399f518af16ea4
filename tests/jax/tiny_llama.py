"""Tiny LLaMA-family configs and transformers models shared by the LLaMA tests.

Everything is built offline from a config; weights are redrawn so logits are
O(1) and norm scales / biases are away from their init (every parameter matters).
"""

from __future__ import annotations

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def hf_model(kind="llama", seed=0, **kw):
    """A tiny fp32 transformers causal LM with eager attention (``kind`` is
    ``llama``, ``qwen2``, ``mistral``, ``qwen3``, ``gemma``, ``gemma2`` or
    ``phi3``); ``kw`` overrides :data:`TINY`."""
    import torch
    import transformers

    cls_cfg, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    }[kind]
    cfg = cls_cfg(**{**TINY, **kw})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls_model(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model
