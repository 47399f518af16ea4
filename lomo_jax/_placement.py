r"""Where the fused step puts one layer's work on a mesh (FSDP proper).

Used inside :func:`lomo_jax.fused_train_step` when it is given ``shardings``;
public as :func:`lomo_jax.sharding.layer_placement`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from lomo_jax._layout import spec_axes, spec_entry


class LayerPlacement(NamedTuple):
    r"""How the fused step places one layer's work on the mesh (FSDP proper).

    Left alone, XLA's partitioner may compute a layer with its parameters
    still split and the *activations* all-gathered over the batch devices
    (cheaper than gathering a weight when tokens per device are few), which
    holds the whole global batch's activation on every device. The fused step
    therefore pins, for each layer call:

    * ``gathered``: the layer's slice all-gathered over the batch axes (its
      stacked spec without the layer axis, and without the mesh axes the batch
      is split over; other axes, e.g. tensor-parallel ones, are kept);
    * ``split``: the slice as stored (the stacked spec without the layer
      axis) -- its gradient is constrained to it, so the gradient is
      reduce-scattered and the update runs on this device's shard;
    * ``activation``: the batch's sharding, for the layer's input and output;
    * ``embed``, ``head``: those units' stored shardings, for their gradients
      (so, e.g., a chunked head's gradient is built in this device's shard,
      not whole on every device).

    Built by :func:`layer_placement`; ``tests/jax/test_collectives.py`` checks
    the collectives that result.
    """

    gathered: Any
    split: Any
    activation: NamedSharding
    embed: Any = None
    head: Any = None


def _without_layer_axis(sharding: NamedSharding, ndim: int, drop: frozenset) -> NamedSharding:
    spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))

    def keep(entry):
        axes = tuple(a for a in spec_axes(entry) if a not in drop)
        return None if not axes else spec_entry(axes)

    return NamedSharding(sharding.mesh, P(*[keep(e) for e in spec[1:]]))


def _batch_axes(batch_sh) -> tuple:
    """The mesh axes the leading axis of the batch is split over."""
    axes = []
    for s in jax.tree.leaves(batch_sh):
        if isinstance(s, NamedSharding) and len(s.spec):
            axes += [a for a in spec_axes(s.spec[0]) if a not in axes]
    return tuple(axes)


def layer_placement(param_sh, batch_sh, params) -> Optional[LayerPlacement]:
    """The :class:`LayerPlacement` of the fused step from the ``shardings``
    passed to it: ``param_sh`` (the params' shardings, a pytree prefix of
    ``{"embed", "layers", "head"}``), ``batch_sh`` (the batch's, a prefix) and
    ``params`` (arrays or shapes). ``None`` when these are not
    ``NamedSharding``\\ s on one mesh with a split batch (nothing to pin).

    Example::

        place = layer_placement(sh.params, sh.batch, params)
    """
    try:
        full = {k: jax.tree.broadcast(param_sh[k] if isinstance(param_sh, dict) else param_sh,
                                      params[k]) for k in ("embed", "layers", "head")}
    except (TypeError, ValueError, KeyError):
        return None
    shardings = jax.tree.leaves(full)
    axes = _batch_axes(batch_sh)
    if not axes or not all(isinstance(s, NamedSharding) for s in shardings):
        return None
    mesh = shardings[0].mesh
    if any(s.mesh != mesh for s in shardings):
        return None
    ndims = jax.tree.map(jnp.ndim, params["layers"])
    slice_of = lambda drop: jax.tree.map(  # noqa: E731
        lambda s, n: _without_layer_axis(s, n, drop), full["layers"], ndims)
    return LayerPlacement(gathered=slice_of(frozenset(axes)), split=slice_of(frozenset()),
                          activation=NamedSharding(mesh, P(spec_entry(axes))),
                          embed=full["embed"], head=full["head"])


def constrain(tree, shardings):
    """``with_sharding_constraint`` of ``tree`` to ``shardings``; ``tree`` itself when
    ``shardings`` is ``None``."""
    return tree if shardings is None else lax.with_sharding_constraint(tree, shardings)


def constrain_activation(h, placement: Optional[LayerPlacement]):
    """Every array of ``h`` with a leading (batch) axis split as the batch is."""
    if placement is None:
        return h
    return jax.tree.map(
        lambda x: lax.with_sharding_constraint(x, placement.activation) if jnp.ndim(x) else x, h)
