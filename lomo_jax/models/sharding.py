"""Device-mesh shardings of the fused step for :mod:`lomo_jax.models.llama`.

The generic rules are :mod:`lomo_jax.sharding`'s; this module only registers
the model's parameter shapes with them (every family of :class:`LlamaConfig`
has the same ``{"embed", "layers", "head"}`` layout), so
:func:`lomo_jax.sharding.model_shardings` accepts a ``LlamaConfig``.
:func:`llama_shardings` is that function (also reachable as
``lomo_jax.sharding.llama_shardings``); :mod:`lomo_jax.sharding` imports no
model code.

Example::

    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    sh = lomo_jax.models.sharding.llama_shardings(cfg, mesh, tx)
    params = jax.jit(lambda: llama.init_params(cfg, 0), out_shardings=sh.params)()
"""

from __future__ import annotations

from lomo_jax.models.config import LlamaConfig
from lomo_jax.models.params import param_shapes
from lomo_jax.sharding import model_shardings, param_shapes_of

__all__ = ["llama_shardings"]

param_shapes_of.register(LlamaConfig, param_shapes)

#: FSDP shardings of the fused step from a :class:`LlamaConfig` (nothing
#: allocated) or plain-dict parameters: :func:`lomo_jax.sharding.model_shardings`.
llama_shardings = model_shardings
