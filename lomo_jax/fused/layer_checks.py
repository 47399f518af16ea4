"""Checks of the user's ``layer`` and ``head`` while the step is first traced:
the layer maps an activation to one of the same structure, shapes and dtypes
(its errors re-raised with the slice's shapes), and the head returns a real
scalar.

Example: a ``layer`` returning ``h[..., :-1]`` makes the step's first call
raise ``ValueError("model.layer must return an activation with the same
structure, shape and dtype as its input ...")``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lomo_jax._layout import STACKED_HINT, abstract as _abstract, describe as _describe


def check_activation(model, layer_slice, h, batch, n_layers, key=None):
    """The first (abstract) trace of ``model.layer``, on layer 0's slice: it must
    map ``h`` to the same structure/shapes/dtypes; if it raises, the error is
    re-raised with the slice's shapes and the stacking hint (:func:`layer_failed`)."""
    fn = lambda p, hh, i, k: model.call_layer(p, hh, batch, i, k)  # noqa: E731
    try:
        out = jax.eval_shape(fn, layer_slice, h, jnp.zeros([], jnp.int32), key)
    except Exception as e:  # noqa: BLE001 - re-raised, chained, with context
        raise layer_failed(e, layer_slice, h, n_layers, batch) from e
    h_abs = _abstract(h)
    ok = jax.tree.structure(out) == jax.tree.structure(h_abs) and all(
        a.shape == b.shape and a.dtype == b.dtype
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(h_abs))
    )
    if not ok:
        fmt = lambda t: jax.tree.map(_describe, t)  # noqa: E731
        raise ValueError(
            "model.layer must return an activation with the same structure, "
            "shape and dtype as its input (it is carried through lax.scan); it "
            f"maps {fmt(h_abs)} to {fmt(out)}."
        )


def layer_failed(e: Exception, layer_slice, h, n_layers: int, batch=None) -> Exception:
    """``e`` (raised inside the user's layer) with the slice's, ``h``'s and the
    batch's shapes and two hints (stacking, the batch's shapes): same type when
    it is a builtin exception (the nearest builtin base otherwise, e.g.
    ``TypeError`` for JAX's concretization errors)."""
    fmt = lambda t: jax.tree.map(_describe, _abstract(t))  # noqa: E731
    try:
        shown = fmt(batch)
    except Exception:  # noqa: BLE001 - a batch with non-array leaves
        shown = type(batch).__name__
    msg = (f"model.layer failed on one slice of params['layers'] (L = {n_layers}, slice "
           f"shapes: {fmt(layer_slice)}, h: {fmt(h)}, batch: {shown}): "
           f"{type(e).__name__}: {e}\n"
           f"{STACKED_HINT} (LayeredModel(..., num_layers=L) checks the layer axis.) "
           "If the slice is right, check the batch's shapes against what the layer "
           "expects (e.g. token ids [B, T] with a batch axis, not [T]).")
    base = next(c for c in type(e).__mro__ if c.__module__ == "builtins")
    try:
        return base(msg)
    except Exception:  # noqa: BLE001 - a builtin that takes other arguments
        return ValueError(msg)


def check_loss(loss):
    if jnp.shape(loss) != () or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
        raise ValueError(
            "model.head must return a real scalar loss; it returned "
            f"{_describe(jax.ShapeDtypeStruct(jnp.shape(loss), jnp.result_type(loss)))}"
            ". Reduce it (e.g. .mean()) inside head."
        )
