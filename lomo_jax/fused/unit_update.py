r"""One unit's update (the embedding, the head or one layer) and the guard every
write goes through: :math:`u, s' = \mathrm{tx.update}(g, s, \theta)`,
:math:`\theta' = \theta + u`, rounded into the parameter's dtype, or the old
values bit for bit where the step is skipped.

Example: ``p, s = apply_unit(tx, g, s, p, keep=ok)`` inside the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lomo_jax.fused.frozen import filled, kept
from lomo_jax.rounding import apply_updates


def apply_unit(tx, grads, state, params, key=None, keep=None, keep_state="select", frozen=None):
    """One ``tx.update`` + ``apply_updates`` on one unit (embed, head or one
    layer); with a ``key``, bf16/fp16 leaves are rounded stochastically
    (:func:`lomo_jax.rounding.apply_updates`). New state leaves are cast back
    to the dtypes they had, so the state keeps its type across steps (and can
    be written into the stack).

    ``keep`` (a bool scalar, or None): where False the result is ``params`` and
    ``state`` bit for bit (a skipped step). The parameters get the update
    ``-0.0`` instead of theirs (``p + (-0.0)`` is ``p`` for every ``p``, also
    rounded stochastically), which XLA fuses into the update: a select would
    hold the old parameters next to the new (a layer's worth on XLA:GPU). The
    state, by ``keep_state``: ``"select"``; ``"cond"``, chosen by a
    ``lax.cond`` (the head's: XLA:CPU does not fuse that select into the
    update and holds the new state next to the old); ``"caller"``, returned
    as is, for the caller to write only where ``keep`` (the layer scan,
    :func:`write_at_if`). Each measured, ``tests/jax/test_fused_memory.py``.

    ``frozen`` (a bool per leaf of ``params``, or None): those leaves have no
    gradient in ``grads`` (``optax.MaskedNode``) and come back as ``params``'
    own arrays (:mod:`lomo_jax.fused.frozen`).
    """
    updates, new_state = tx.update(filled(grads, params, frozen), state, params)
    if keep is not None:
        updates = jax.tree.map(
            lambda u: jnp.where(keep, u, jnp.asarray(-0.0, jnp.result_type(u))), updates)
    new_params = apply_updates(params, updates, rng=key)
    new_params = jax.tree.map(lambda n, o: n.astype(jnp.result_type(o)), new_params, params)
    new_params = kept(new_params, params, frozen)
    new_state = jax.tree.map(
        lambda n, o: jnp.asarray(n).astype(jnp.result_type(o)), new_state, state
    )
    if keep is None or keep_state == "caller":
        return new_params, new_state
    if keep_state == "cond":
        return new_params, lax.cond(keep, lambda: new_state, lambda: state)
    return new_params, keep_if_not(keep, new_state, state)


def keep_if_not(ok, new, old):
    """``new`` where ``ok`` (a bool scalar), else ``old`` bit for bit; ``new`` if ``ok`` is None."""
    if ok is None:
        return new
    return jax.tree.map(lambda n, o: lax.select(ok, n, o), new, old)


def scaled(tree, factor):
    """Gradients handed to tx: unchanged, or scaled in fp32 by ``factor``."""
    if factor is None:
        return tree
    return jax.tree.map(lambda g: g.astype(jnp.float32) * factor, tree)


def sq_norm(tree, factor=None):
    total = jnp.zeros([], jnp.float32)
    for g in jax.tree_util.tree_leaves(tree):
        g = g.astype(jnp.float32)
        if factor is not None:
            g = g * factor
        total = total + jnp.sum(jnp.square(g))
    return total


def all_finite(tree):
    """A bool scalar: every floating element of ``tree`` is finite."""
    ok = jnp.ones([], jnp.bool_)
    for x in jax.tree_util.tree_leaves(tree):
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(x))
    return ok
