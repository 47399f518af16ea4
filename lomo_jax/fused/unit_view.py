r"""The transform each unit of the fused step is updated with: ``tx`` itself, or
``tx`` seen through the unit's view of the whole parameter tree.

The fused step applies ``tx`` to one unit at a time (``params["embed"]``, one
layer's slice of ``params["layers"]``, ``params["head"]``). A ``tx`` keyed to
the whole tree - ``optax.multi_transform(transforms, labels)`` with ``labels``
shaped like ``params`` (or a prefix of it) - cannot take a unit alone. For such a
``tx`` (only: one that takes the unit keeps exactly today's state) the unit is
shown as the whole tree with an empty ``optax.MaskedNode()`` at every leaf of
the other units:

.. math::
    \mathrm{view}_u(x) = \{u: x,\ v: \varnothing\ (v \ne u)\}, \qquad
    \mathrm{tx}_u.\mathrm{update}(g, s, \theta) =
    \mathrm{tx.update}(\mathrm{view}_u(g), s, \mathrm{view}_u(\theta))[u]

``optax.masked`` maps its mask first, so an empty node at a label passes through
and each inner transform sees the unit's leaves only: the labels of
``params["layers"]`` apply to every layer's slice. Decided statically, from
``jax.eval_shape(tx.init, unit)``.

Example::

    txs = unit_transforms(tx, params)   # Units(embed=..., layers=..., head=...)
    state = txs.embed.init(params["embed"])
"""

from __future__ import annotations

from typing import Optional

import jax
import optax

from lomo_jax._layout import KEYS, Units, abstract, abstract_slice


def unit_transforms(tx: optax.GradientTransformation, params) -> Units:
    """``Units`` of the transform for the embedding, one layer's slice and the
    head: ``tx`` where ``tx.init`` takes that unit, else :func:`viewed` ``tx``.

    Raises:
      ValueError: ``tx`` takes neither the unit nor the whole tree (e.g. a
        ``multi_transform`` label tree that does not match ``params``); the
        message names where the trees differ.
    """
    shapes = abstract({k: params[k] for k in KEYS})
    skeleton = {k: jax.tree.map(lambda _: optax.MaskedNode(), shapes[k]) for k in KEYS}
    units = Units(shapes["embed"], abstract_slice(shapes["layers"]), shapes["head"])
    return Units(*(_for_unit(tx, name, unit, skeleton, shapes)
                   for name, unit in zip(KEYS, units)))


def viewed(tx: optax.GradientTransformation, name: str, skeleton) -> optax.GradientTransformation:
    """``tx`` on unit ``name`` shown inside ``skeleton`` (the whole tree, every
    leaf an ``optax.MaskedNode()``); its updates are the unit's part."""

    def view(tree):
        return {k: tree if k == name else v for k, v in skeleton.items()}

    def init_fn(params):
        return tx.init(view(params))

    def update_fn(updates, state, params=None):
        new, state = tx.update(view(updates), state, None if params is None else view(params))
        return new[name], state

    return optax.GradientTransformation(init_fn, update_fn)


def _init_error(tx, tree) -> Optional[Exception]:
    try:
        jax.eval_shape(tx.init, tree)
    except Exception as e:  # noqa: BLE001 - reported by the caller
        return e
    return None


def _for_unit(tx, name: str, unit, skeleton, shapes):
    if _init_error(tx, unit) is None:
        return tx
    view_tx = viewed(tx, name, skeleton)
    view_error = _init_error(view_tx, unit)
    if view_error is None:
        return view_tx
    why = _init_error(tx, shapes) or view_error
    raise ValueError(
        f"tx takes neither params['{name}'] on its own (the fused step updates one unit "
        "at a time) nor the whole params tree {'embed', 'layers', 'head'}; against the "
        f"whole tree (paths from params' root): {why}\nA tx keyed to the parameter tree, "
        "such as optax.multi_transform(transforms, labels), needs labels shaped like params "
        "or a prefix of it (the labels of params['layers'] apply to every layer's slice, "
        "with no layer axis), or a label function.") from why
