r"""RMSNorm, as a function and as the NNX module that holds its scale.

.. math:: \mathrm{RMSNorm}(x) = w \odot \frac{x}{\sqrt{\tfrac1D \sum_j x_j^2 + \epsilon}}

computed in fp32, then cast back, as ``transformers``' ``LlamaRMSNorm``
(Gemma: the factor is :math:`1 + w`, see ``unit_offset``).

Example::

    y = rms_norm(x, scale, eps=1e-6)                      # [..., D]
    norm = RMSNorm(64, 1e-6); y = norm(x)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from lomo_jax.models.config import LlamaConfig

__all__ = ["RMSNorm", "rms_norm"]


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


def rms_norm_module(config: LlamaConfig, dim: int) -> "RMSNorm":
    """An :class:`RMSNorm` of size ``dim`` with ``config``'s epsilon, dtypes and offset."""
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
