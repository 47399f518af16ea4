"""lomo_jax: LOMO and AdaLomo for JAX.

Optax transforms (:func:`lomo`, :func:`adalomo` and their ``scale_by_*``
halves), a per-layer combinator for layer-stacked parameters
(:func:`per_layer`), and a fused training step that updates each layer inside
the backward scan so only one layer's gradient is ever alive
(:class:`LayeredModel`, :func:`fused_init`, :func:`fused_train_step`), and
stochastic rounding into bf16/fp16 parameters (:func:`apply_updates`,
:mod:`lomo_jax.rounding`). Your own Flax NNX model: :mod:`lomo_jax.nnx`.

``import lomo_jax`` is light: each name is imported from its module on first
use (PEP 562), so ``import lomo_jax.records`` (JSONL records for PyTorch too)
imports no JAX. Example::

    import lomo_jax
    step = lomo_jax.fused_train_step(model, lomo_jax.adalomo(1e-3))   # jax imported here
"""

import importlib
import importlib.util

__version__ = "0.1.0"

# public name -> the module that defines it
_NAMES = {
    "ScaleByAdaLomoState": "lomo_jax.transforms",
    "adalomo": "lomo_jax.transforms",
    "lomo": "lomo_jax.transforms",
    "scale_by_adalomo": "lomo_jax.transforms",
    "scale_by_lomo": "lomo_jax.transforms",
    "PerLayerState": "lomo_jax._per_layer",
    "per_layer": "lomo_jax._per_layer",
    "FusedState": "lomo_jax.fused",
    "LayeredModel": "lomo_jax.fused",
    "LossScaleState": "lomo_jax.fused",
    "fused_init": "lomo_jax.fused",
    "fused_train_step": "lomo_jax.fused",
    "layer_key": "lomo_jax.fused",
    "apply_updates": "lomo_jax.rounding",
    "AdaptiveClipState": "lomo_jax.adaptive_clipping",
    "adaptive_clip": "lomo_jax.adaptive_clipping",
}
# the public submodules, listed by dir(lomo_jax); any submodule is an attribute on first use.
# No module may share a name of _NAMES: importing it would set that attribute to the module
# (per_layer lives in _per_layer, adaptive_clip in adaptive_clipping).
_SUBMODULES = ("aot", "checkpoint", "data", "fused", "hlo_cost", "models", "nnx",
               "records", "rounding", "sharding", "transforms")


def _is_submodule(name: str) -> bool:
    return (name.isidentifier() and not name.startswith("__")
            and importlib.util.find_spec(f"lomo_jax.{name}") is not None)


def __getattr__(name):
    """Import ``name``'s module on first use (then cache the name here)."""
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif _is_submodule(name):
        value = importlib.import_module(f"lomo_jax.{name}")
    else:
        raise AttributeError(f"module 'lomo_jax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_NAMES) | set(_SUBMODULES))


__all__ = sorted(_NAMES)
