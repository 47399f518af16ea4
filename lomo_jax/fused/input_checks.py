"""Checks of one step's input inside the step, as reductions to a few scalars
(no host sync): the batch's ranged integer entries (token ids, labels) and the
learning rate every unit's update uses. A step that fails is skipped as a whole
and the next call raises (:class:`lomo_jax._loss_scale.StepWatch`).

.. math::
    \\text{valid} = \\bigwedge_k (\\min x_k \\ge 0 \\wedge \\max x_k < V_k)
    \\wedge \\bigwedge_u (\\eta_u \\text{ finite} \\wedge \\eta_u \\ge 0)

Example: ``valid, metrics = input_checks(model, tx, batch, s)`` inside the step;
``metrics["refused"]`` is ``not valid``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lomo_jax import embedding as _ids
from lomo_jax._layout import Units
from lomo_jax.fused.model import LayeredModel


def input_checks(model: LayeredModel, tx, batch, s: Units):
    """``(valid, metrics)``: a bool scalar, the batch's indices are inside
    ``model.index_ranges`` and the learning rate every unit's update will use
    is finite and >= 0 (``None`` when neither is checkable); the metrics hold
    ``refused`` and the values :class:`lomo_jax._loss_scale.StepWatch` reports.
    Reductions to a few scalars: the ids' min/max, one rate per layer."""
    metrics, checks = {}, []
    extremes = _ids.index_extremes(batch, model.index_ranges)
    if extremes:
        metrics["index_extremes"] = extremes
        checks.append(_ids.extremes_ok(extremes, model.index_ranges))
    rates = learning_rates(tx, s)
    if rates is not None:
        metrics["learning_rate_step"], metrics["learning_rate"], lr_ok = rates
        checks.append(lr_ok)
    if not checks:
        return None, metrics
    valid = checks[0] if len(checks) == 1 else checks[0] & checks[1]
    metrics["refused"] = jnp.logical_not(valid)
    return valid, metrics


def learning_rates(tx, s: Units):
    """``(step, rate, ok)`` from ``tx.update.learning_rate_at(state) -> (step,
    rate)`` (``lomo``/``adalomo`` with a schedule, :mod:`lomo_jax.transforms`),
    evaluated on the state each unit's update reads (every layer's too): ``ok``,
    all are finite and >= 0; ``step``/``rate``, the first bad one (else the
    embedding's). ``None`` for a ``tx`` without it."""
    at = getattr(tx.update, "learning_rate_at", None)
    if at is None:
        return None
    parts = [at(s.embed), jax.vmap(at)(s.layers), at(s.head)]
    steps = jnp.concatenate([jnp.reshape(t, (-1,)).astype(jnp.int32) for t, _ in parts])
    rates = jnp.concatenate([jnp.reshape(r, (-1,)).astype(jnp.float32) for _, r in parts])
    bad = jnp.logical_not(jnp.isfinite(rates) & (rates >= 0))
    first = jnp.argmax(bad)
    return steps[first], rates[first], jnp.logical_not(jnp.any(bad))
