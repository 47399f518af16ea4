"""Device-mesh shardings of the fused step for :mod:`lomo_jax.models.llama`.

The generic rules are :mod:`lomo_jax.sharding`'s; this module only feeds them
the model's parameter shapes (every family of :class:`LlamaConfig` has the
same ``{"embed", "layers", "head"}`` layout). ``lomo_jax.sharding.llama_shardings``
is this function.
"""

from __future__ import annotations

from typing import Optional

import optax
from jax.sharding import Mesh

from lomo_jax.models import llama
from lomo_jax.sharding import DEFAULT_MIN_SIZE, AxisNames, FusedShardings, fused_shardings

__all__ = ["llama_shardings"]


def llama_shardings(
    config_or_params,
    mesh: Mesh,
    tx: optax.GradientTransformation,
    *,
    fsdp_axis: AxisNames = "fsdp",
    batch_axes: Optional[AxisNames] = None,
    min_size: int = DEFAULT_MIN_SIZE,
    **init_kwargs,
) -> FusedShardings:
    r"""FSDP shardings of the fused step for :mod:`lomo_jax.models.llama`.

    ``config_or_params`` is a :class:`~lomo_jax.models.llama.LlamaConfig`
    (shapes from ``llama.param_shapes``; nothing is allocated) or LLaMA
    plain-dict parameters. With the default rule every layer kernel is split
    along its first axis after the layer axis (``D`` of ``[L, D, F]`` MLP and
    attention kernels, ``F`` of the down projection), the embedding and LM
    head along ``D`` (see :func:`lomo_jax.sharding.param_shardings`); norm scales are replicated
    (below ``min_size``).

    Example::

        mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
        sh = lomo_jax.models.sharding.llama_shardings(cfg, mesh, tx)
        params = jax.jit(lambda: llama.init_params(cfg, 0), out_shardings=sh.params)()

    Returns:
      :class:`lomo_jax.sharding.FusedShardings`, as
      :func:`lomo_jax.sharding.fused_shardings`.
    """
    if isinstance(config_or_params, llama.LlamaConfig):
        params = llama.param_shapes(config_or_params)
    else:
        params = config_or_params
    return fused_shardings(
        tx,
        params,
        mesh,
        fsdp_axis=fsdp_axis,
        batch_axes=batch_axes,
        min_size=min_size,
        **init_kwargs,
    )
