r"""Frozen leaves: the parameters a transform never changes, which the fused step
then neither differentiates, copies nor writes back.

A leaf :math:`\theta_j` of a unit is frozen for ``tx`` when, whatever the inputs,
``tx.update(g, s, θ)`` gives it a constant zero update and no output reads its
gradient :math:`g_j`:

.. math::
    u_j \equiv \pm 0 \quad\text{and}\quad
    \partial\,\mathrm{tx.update}(g, s, \theta) / \partial g_j = 0
    \ \text{structurally}
    \;\Longrightarrow\; \theta_j' = \theta_j \ \text{bit for bit}.

Decided statically from the jaxpr of ``tx.update`` on the unit's shapes: the
update is a broadcast zero literal (``optax.set_to_zero()``,
``lomo_jax.models.lora.optimizer(base=None, ...)``) and :math:`g_j` reaches no
output. The step then keeps :math:`\theta_j` as it is (``-0.0`` included, where
:math:`\theta + 0` would give ``+0.0``): no gradient, no updated copy, no write,
and no part in ``clip_grad_norm``'s norm. A frozen LoRA base so costs what
inference costs (``benchmarks/memory.py --lora``).

Example::

    mask = frozen_leaves(tx, unit, state)           # a bool per leaf of unit
    g = trainable(g, mask)                         # frozen leaves -> MaskedNode()
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jex_core

from lomo_jax._layout import Units, abstract, abstract_slice

__all__ = ["any_frozen", "filled", "frozen_leaves", "kept", "trainable", "unit_masks"]

# Primitives that only change the shape or type of a constant.
_CONST_SHAPE_OPS = ("broadcast_in_dim", "convert_element_type", "reshape")


def frozen_leaves(tx: optax.GradientTransformation, params, state):
    """A bool per leaf of ``params`` (arrays or ``jax.ShapeDtypeStruct``s): True
    where ``tx.update(g, state, params)`` is a constant zero that reads no
    gradient of that leaf (see the module docstring)."""
    leaves, treedef = jax.tree.flatten(params)
    jaxpr = jax.make_jaxpr(tx.update)(params, state, params).jaxpr
    reached = _reached_by_gradients(jaxpr, len(leaves))
    updates = jaxpr.outvars[:len(leaves)]
    producers = {v: e for e in jaxpr.eqns for v in e.outvars}
    mask = [not (reached & (1 << j)) and _is_zero(u, producers) for j, u in enumerate(updates)]
    return jax.tree.unflatten(treedef, mask)


def _reached_by_gradients(jaxpr, n_grads: int) -> int:
    """A bit per gradient input (the first ``n_grads`` invars): set if it reaches
    any output. Conservative: an equation's outputs depend on all its inputs."""
    deps = {v: 1 << j for j, v in enumerate(jaxpr.invars[:n_grads])}
    for eqn in jaxpr.eqns:
        bits = 0
        for v in eqn.invars:
            if not isinstance(v, jex_core.Literal):
                bits |= deps.get(v, 0)
        for v in eqn.outvars:
            deps[v] = bits
    out = 0
    for v in jaxpr.outvars:
        if not isinstance(v, jex_core.Literal):
            out |= deps.get(v, 0)
    return out


def _is_zero(var, producers) -> bool:
    """``var`` is a literal zero, or a zero literal only reshaped, broadcast or cast."""
    while not isinstance(var, jex_core.Literal):
        eqn = producers.get(var)
        if eqn is None or eqn.primitive.name not in _CONST_SHAPE_OPS or eqn.effects:
            return False
        var = eqn.invars[0]
    return bool(np.all(np.asarray(var.val) == 0))


def any_frozen(mask) -> bool:
    return mask is not None and any(jax.tree.leaves(mask))


def trainable(tree, mask: Optional[object]):
    """``tree`` with every frozen leaf replaced by ``optax.MaskedNode()`` (a node
    with no arrays); ``tree`` itself without a mask."""
    if not any_frozen(mask):
        return tree
    return jax.tree.map(lambda x, f: optax.MaskedNode() if f else x, tree, mask)


def filled(tree, like, mask: Optional[object]):
    """A :func:`trainable` ``tree`` completed to ``like``'s structure: zeros (of
    ``like``'s shapes, never read) at the frozen leaves."""
    if not any_frozen(mask):
        return tree
    return jax.tree.map(
        lambda f, x, ref: jnp.zeros(jnp.shape(ref), jnp.result_type(ref)) if f else x,
        mask, tree, like)


def kept(new, old, mask: Optional[object]):
    """``new`` with every frozen leaf taken from ``old`` (the same array, uncopied)."""
    if not any_frozen(mask):
        return new
    return jax.tree.map(lambda f, n, o: o if f else n, mask, new, old)


def unit_masks(txs, p, s):
    """``Units`` of :func:`frozen_leaves` masks for the embedding, one layer's slice
    and the head (``txs``, ``p``, ``s``: ``Units`` of transforms, parameters and
    states, the layers stacked), or None where no leaf is frozen."""
    masks = Units(
        frozen_leaves(txs.embed, abstract(p.embed), abstract(s.embed)),
        frozen_leaves(txs.layers, abstract_slice(p.layers), abstract_slice(s.layers)),
        frozen_leaves(txs.head, abstract(p.head), abstract(s.head)),
    )
    return masks if any(any_frozen(m) for m in masks) else None
