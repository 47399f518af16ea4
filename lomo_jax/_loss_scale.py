"""Dynamic loss scaling for fp16 parameters (private helper of the fused step).

The same policy as ``lomo-optim``'s ``DynamicLossScaler`` (without hysteresis):
start at ``2**16``, halve on a step whose gradients overflow (and skip that
step), double after ``window`` consecutive clean steps, never go below
``min_scale``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

DEFAULT_INIT_SCALE = 2.0**16


class LossScaleState(NamedTuple):
    """Dynamic loss-scale state: the scale and the number of clean steps since
    the last change. Both are scalars and live in :class:`FusedState`."""

    scale: jax.Array  # f32[]
    good_steps: jax.Array  # i32[]


def init(scale: float = DEFAULT_INIT_SCALE) -> LossScaleState:
    if not scale > 0:
        raise ValueError(f"loss_scale must be positive, got {scale!r}.")
    return LossScaleState(
        scale=jnp.asarray(scale, jnp.float32), good_steps=jnp.zeros([], jnp.int32)
    )


def update(
    state: LossScaleState, finite: jax.Array, window: int, min_scale: float
) -> LossScaleState:
    """Next state after a step whose gradients were ``finite`` (bool scalar)."""
    good = state.good_steps + 1
    grow = good >= window
    scale_ok = jnp.where(grow, state.scale * 2.0, state.scale)
    good_ok = jnp.where(grow, 0, good)
    scale_bad = jnp.maximum(state.scale * 0.5, jnp.float32(min_scale))
    return LossScaleState(
        scale=jnp.where(finite, scale_ok, scale_bad).astype(jnp.float32),
        good_steps=jnp.where(finite, good_ok, 0).astype(jnp.int32),
    )
