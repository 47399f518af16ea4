"""Apply a transform to each slice of layer-stacked parameters.

``nnx.scan`` / ``nn.scan`` (and the fused step) keep a model's ``L`` decoder
layers as one pytree whose leaves have a leading axis of size ``L``. Rules
whose statistics depend on a whole tensor — AdaLomo's row/column means and
``RMS(param)``, Adafactor's factoring — must see one layer at a time, not the
stack: :func:`per_layer` maps the inner transform over the leading axis.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax


class PerLayerState(NamedTuple):
    """State of :func:`per_layer`: the inner state with a leading layer axis."""

    inner_state: Any


def _layer_count(tree, what: str) -> int:
    """The common leading-axis size of every leaf; a clear error otherwise."""
    sizes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path) or "<root>"
        if leaf.ndim == 0:
            raise ValueError(
                f"{what}: leaf {name} is a scalar; every leaf of a layer-stacked "
                "tree needs a leading layer axis."
            )
        sizes[name] = leaf.shape[0]
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(
            f"{what}: leaves have different leading (layer) axis sizes: {listing}."
        )
    return next(iter(sizes.values()), 0)


def per_layer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    r"""Run ``inner`` independently on every slice along the leading axis.

    For stacked parameters :math:`\Theta = [\theta_1; \dots; \theta_L]` this is
    exactly ``inner`` run on each :math:`\theta_l` with its own state
    :math:`s_l`; the state is the inner state with a leading axis ``L``
    (``jax.vmap(inner.init)``), so step counts and statistics are per layer.

    Example::

        # params = {"embed": ..., "layers": <leaves of shape (L, ...)>, "head": ...}
        tx = optax.multi_transform(
            {"stacked": lomo_jax.per_layer(lomo_jax.adalomo(1e-3)),
             "single": lomo_jax.adalomo(1e-3)},
            {"embed": "single", "layers": "stacked", "head": "single"},
        )

    Args:
      inner: any transform; it is vmapped, so it must be traceable per slice.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`PerLayerState`.
    """

    def init_fn(params):
        _layer_count(params, "per_layer")
        return PerLayerState(inner_state=jax.vmap(inner.init)(params))

    def update_fn(updates, state, params=None):
        _layer_count(updates, "per_layer")
        if params is None:
            new_updates, new_state = jax.vmap(lambda u, s: inner.update(u, s))(
                updates, state.inner_state
            )
        else:
            new_updates, new_state = jax.vmap(inner.update)(
                updates, state.inner_state, params
            )
        return new_updates, PerLayerState(inner_state=new_state)

    return optax.GradientTransformation(init_fn, update_fn)
