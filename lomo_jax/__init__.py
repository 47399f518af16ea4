"""lomo_jax: LOMO and AdaLomo for JAX.

Optax transforms (:func:`lomo`, :func:`adalomo` and their ``scale_by_*``
halves), a per-layer combinator for layer-stacked parameters
(:func:`per_layer`), and a fused training step that updates each layer inside
the backward scan so only one layer's gradient is ever alive
(:class:`LayeredModel`, :func:`fused_init`, :func:`fused_train_step`), and
stochastic rounding into bf16/fp16 parameters (:func:`apply_updates`,
:mod:`lomo_jax.rounding`). Your own Flax NNX model: :mod:`lomo_jax.nnx`.
"""

from lomo_jax.transforms import (
    ScaleByAdaLomoState,
    adalomo,
    lomo,
    scale_by_adalomo,
    scale_by_lomo,
)
from lomo_jax.per_layer import PerLayerState, per_layer
from lomo_jax.fused import (
    FusedState,
    LayeredModel,
    LossScaleState,
    fused_init,
    fused_train_step,
    layer_key,
)
from lomo_jax.rounding import apply_updates
from lomo_jax import rounding as rounding  # stochastic rounding into bf16/fp16
from lomo_jax import sharding as sharding  # FSDP shardings of the fused step over a mesh
from lomo_jax import checkpoint as checkpoint  # orbax checkpoints (orbax imported on first use)
from lomo_jax import hlo_cost as hlo_cost  # FLOPs and collectives of a compiled step

__version__ = "0.1.0"


def __getattr__(name):
    """``lomo_jax.nnx`` (the Flax NNX bridge) is imported on first use: flax stays optional."""
    if name == "nnx":
        import importlib

        return importlib.import_module("lomo_jax.nnx")
    raise AttributeError(f"module 'lomo_jax' has no attribute {name!r}")


__all__ = [
    "FusedState",
    "LayeredModel",
    "LossScaleState",
    "PerLayerState",
    "ScaleByAdaLomoState",
    "adalomo",
    "apply_updates",
    "fused_init",
    "fused_train_step",
    "layer_key",
    "lomo",
    "per_layer",
    "scale_by_adalomo",
    "scale_by_lomo",
]
