"""Dynamic loss scaling for fp16 parameters (private helper of the fused step).

**Policy** (the same in ``lomo_torch.DynamicLossScaler``; ``lomo-optim``'s
without hysteresis): the loss is multiplied by a scale :math:`S` before the
backward pass and the gradients are divided by it in fp32. :math:`S` starts at
``2**16``. A step whose gradients overflow (a non-finite global norm) is
skipped, every parameter and state bit unchanged, and halves :math:`S`;
``window`` (default 1000) consecutive clean steps double it; it never goes
below ``min_scale`` (default 1). An overflow while :math:`S` is already at
``min_scale`` means the gradients overflow whatever the scale: that is an
error (:class:`OverflowWatch`), not a step to skip forever.

An fp16 loss cannot carry a seed of ``2**16`` (fp16's largest value is
65504): :func:`loss_seed` splits it, by linearity of the VJP.
"""

from __future__ import annotations

import collections
import math
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


def loss_seed(seed: jax.Array, loss_dtype):
    r"""``(s, r)`` with :math:`s \cdot r = \mathrm{seed}`: ``s`` the loss
    cotangent in ``loss_dtype``, ``r`` the fp32 factor for the VJP's outputs
    (:func:`times`), ``None`` when ``loss_dtype`` holds any fp32 seed.

    For fp16, :math:`s = \min(\mathrm{seed}, 2^{15})`: a cotangent must have
    the loss's dtype, so casting the loss to fp32 first would not help (the
    cast's VJP rounds the seed back to fp16, ``inf``).
    """
    info = jnp.finfo(loss_dtype)
    if info.maxexp >= jnp.finfo(jnp.float32).maxexp:
        return seed.astype(loss_dtype), None
    s = jnp.minimum(seed, 2.0 ** (info.maxexp - 1))
    return s.astype(loss_dtype), seed / s


def times(tree, r):
    """Each floating leaf times ``r`` (in fp32, rounded back once); ``tree`` if ``r`` is None."""
    if r is None:
        return tree

    def leaf(x):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return x  # float0 cotangent of an integer input
        return (x.astype(jnp.float32) * r).astype(x.dtype)

    return jax.tree.map(leaf, tree)


class OverflowWatch:
    """Raises once a step's gradients overflowed with the scale at ``min_scale``.

    The step is jitted and dispatched asynchronously, so the error cannot come
    from inside it without losing the donated inputs, and reading the flag
    right away would make the host wait for every step. Instead :meth:`see`
    keeps each step's (undonated) ``metrics["grad_norm"]`` and
    ``metrics["loss_scale"]``, and :meth:`check`, called before the next step
    is dispatched, reads those already computed (``is_ready()``), never
    waiting. So the error comes on the first call after the offending step
    has finished (usually the next call or the one after); the steps in
    between were whole steps, applied or skipped.
    """

    def __init__(self, min_scale: float):
        self.min_scale = float(min_scale)
        self._pending = collections.deque()

    def see(self, metrics) -> None:
        if "loss_scale" not in metrics:
            return
        pair = (metrics["grad_norm"], metrics["loss_scale"])
        if not any(isinstance(x, jax.core.Tracer) for x in pair):
            self._pending.append(pair)

    def check(self) -> None:
        while self._pending and all(x.is_ready() for x in self._pending[0]):
            norm, scale = self._pending.popleft()
            if not math.isfinite(float(norm)) and float(scale) <= self.min_scale:
                self._pending.clear()
                raise RuntimeError(
                    "fused step: the fp16 gradients overflowed (non-finite gradient norm) "
                    f"with the loss scale already at its minimum ({float(scale):g}, "
                    f"min_loss_scale={self.min_scale:g}); "
                    "the scale cannot go lower, so every further step would be skipped. "
                    "The gradients kept overflowing whatever the scale: check the loss and "
                    "the head for inf/NaN (compute the loss in fp32), lower the learning "
                    "rate, or train in bf16. This call dispatched nothing: the params and "
                    "opt_state passed to it are intact."
                )
