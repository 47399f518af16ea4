"""Model definitions for lomo_jax's fused step, with Hugging Face conversion.

* :mod:`lomo_jax.models.llama` -- a LLaMA/Mistral/Qwen2-style causal LM in
  Flax NNX with stacked decoder layers, plus its pure-function
  :class:`lomo_jax.LayeredModel` view (:func:`llama_layered_model`).
* :mod:`lomo_jax.models.convert` -- ``transformers`` ``state_dict`` /
  ``save_pretrained`` directories <-> the plain-dict parameters.

Example::

    from lomo_jax.models import LlamaConfig, LlamaForCausalLM, llama_layered_model
    from lomo_jax.models import convert
    cfg, params = convert.load_pretrained("path/to/hf_dir")
    step = lomo_jax.fused_train_step(llama_layered_model(cfg), lomo_jax.adalomo(1e-3))
"""

from lomo_jax.models import convert, llama
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

__all__ = [
    "LlamaConfig",
    "LlamaForCausalLM",
    "convert",
    "from_hf_model",
    "init_params",
    "llama",
    "llama_layered_model",
    "llama_logits",
    "llama_loss",
    "load_pretrained",
    "module_to_params",
    "params_from_hf",
    "params_to_hf",
    "params_to_module",
    "save_pretrained",
    "update_module",
]
