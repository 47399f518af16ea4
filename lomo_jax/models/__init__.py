"""Model definitions for lomo_jax's fused step, with Hugging Face conversion.

* :mod:`lomo_jax.models.llama` -- a LLaMA-style causal LM (also Mistral, Qwen2/3, Phi-3, Gemma 1/2) in
  Flax NNX with stacked decoder layers, plus its pure-function
  :class:`lomo_jax.LayeredModel` view (:func:`llama_layered_model`).
* :mod:`lomo_jax.models.convert` -- ``transformers`` ``state_dict`` /
  ``save_pretrained`` directories <-> the plain-dict parameters (the entry
  points), over :mod:`~lomo_jax.models.families` (one record per family),
  :mod:`~lomo_jax.models.hf_config` (config mapping),
  :mod:`~lomo_jax.models.hf_names` (tensor names and shapes),
  :mod:`~lomo_jax.models.safetensors_load`, :mod:`~lomo_jax.models.load_placed`
  and :mod:`~lomo_jax.models.safetensors_save` (streaming I/O).
* :mod:`lomo_jax.models.decoding` -- :func:`generate`: greedy / sampled
  decoding with a KV cache on the plain-dict parameters.
* :mod:`lomo_jax.models.lora` -- LoRA adapters on any family's projections
  (``LlamaConfig.lora``): add, train (``lora.optimizer``), merge, and PEFT's
  adapter format (``save_adapter``/``load_adapter``).

Family-agnostic entry points (whatever family ``cfg`` is): :func:`logits`,
:func:`layered_model`, :func:`generate`, ``convert.from_hf_model`` and
``convert.load_pretrained``; the ``llama_*`` names are the same functions.

Example::

    from lomo_jax import models
    from lomo_jax.models import convert
    cfg, params = convert.load_pretrained("path/to/hf_dir")
    step = lomo_jax.fused_train_step(models.layered_model(cfg), lomo_jax.adalomo(1e-3))
    new_tokens = models.generate(cfg, params, prompt_ids, max_new_tokens=16)
"""

from lomo_jax.models import convert, llama
from lomo_jax.models.decoding import generate
from lomo_jax.models.convert import (
    from_hf_model,
    load_pretrained,
    params_from_hf,
    params_to_hf,
    save_pretrained,
)
from lomo_jax.models.llama import (
    LlamaConfig,
    LlamaForCausalLM,
    init_params,
    llama_layered_model,
    llama_logits,
    llama_loss,
    module_to_params,
    params_to_module,
    update_module,
)



def _family(cfg):
    """The model module of ``cfg``'s family (one today: Llama, Mistral, Qwen2,
    Qwen3, Phi-3, Gemma and Gemma 2 are switches of :class:`LlamaConfig`)."""
    if isinstance(cfg, LlamaConfig):
        return llama
    raise TypeError(f"cfg must be a lomo_jax.models.LlamaConfig (any supported family); got "
                    f"{type(cfg).__name__}.")


def logits(cfg, params, batch):
    """Logits ``[B, T, V]`` of ``batch`` (``input_ids``, optional ``attention_mask``,
    ``position_ids``, ``segment_ids``) for any supported family's ``cfg``.

    ``input_ids`` outside ``[0, vocab_size)`` raise ``ValueError`` naming the
    value when concrete; under ``jit`` they read NaN embedding rows, so the
    logits they reach are NaN, never another token's."""
    return _family(cfg).llama_logits(cfg, params, batch)


def layered_model(cfg):
    """The :class:`lomo_jax.LayeredModel` of ``cfg``'s family, for
    :func:`lomo_jax.fused_train_step`, with ``index_ranges``: ``input_ids`` in
    ``[0, vocab_size)``, ``labels`` there or ``-100`` (a batch outside them is
    refused by the fused step, see :class:`lomo_jax.LayeredModel`)."""
    return _family(cfg).llama_layered_model(cfg)


__all__ = [
    "LlamaConfig",
    "LlamaForCausalLM",
    "convert",
    "from_hf_model",
    "generate",
    "init_params",
    "layered_model",
    "llama",
    "llama_layered_model",
    "llama_logits",
    "llama_loss",
    "load_pretrained",
    "logits",
    "module_to_params",
    "params_from_hf",
    "params_to_hf",
    "params_to_module",
    "save_pretrained",
    "update_module",
]
