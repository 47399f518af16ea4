"""Dynamic loss scaling for fp16 parameters (private helper of the fused step).

**Policy** (the same in ``lomo_torch.DynamicLossScaler``; ``lomo-optim``'s
without hysteresis): the loss is multiplied by a scale :math:`S` before the
backward pass and the gradients are divided by it in fp32. :math:`S` starts at
``2**16``. A step whose gradients overflow (a non-finite global norm) is
skipped, every parameter and state bit unchanged, and halves :math:`S`;
``window`` (default 1000) consecutive clean steps double it; it never goes
below ``min_scale`` (default 1). An overflow while :math:`S` is already at
``min_scale`` means the gradients overflow whatever the scale: that is an
error (:class:`StepWatch`), not a step to skip forever. The same watch
raises about a step the fused step refused (bad input: an index out of range,
a negative or non-finite learning rate).

An fp16 loss cannot carry a seed of ``2**16`` (fp16's largest value is
65504): :func:`loss_seed` splits it, by linearity of the VJP.
"""

from __future__ import annotations

import collections
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lomo_jax.embedding import out_of_range

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


class StepWatch:
    """Raises, when the step is next called, about an earlier step that was
    skipped for a reason that skipping again cannot cure.

    * an fp16 overflow with the scale already at ``min_scale``
      (``metrics["grad_norm"]``, ``metrics["loss_scale"]``): every further step
      would overflow too;
    * a refused step (``metrics["refused"]``): its batch held an index outside
      the model's ``index_ranges`` (``metrics["index_extremes"]``), or the
      learning rate it would have used was negative or not finite
      (``metrics["learning_rate"]`` at ``metrics["learning_rate_step"]``).

    The step is jitted and dispatched asynchronously, so the error cannot come
    from inside it without losing the donated inputs, and reading the flag
    right away would make the host wait for every step. Instead :meth:`see`
    keeps each step's (undonated) metrics, and :meth:`check`, called before
    the next step is dispatched, reads those already computed
    (``is_ready()``), never waiting. So the error comes on the first call after
    the offending step has finished (usually the next call or the one after);
    the steps in between were whole steps, applied or skipped.
    """

    _KEYS = ("grad_norm", "loss_scale", "refused", "index_extremes", "learning_rate",
             "learning_rate_step")

    def __init__(self, min_scale: float, index_ranges: tuple = ()):
        self.min_scale = float(min_scale)
        self.ranges = dict(index_ranges)
        self._pending = collections.deque()
        self._calls = 0

    def see(self, metrics) -> None:
        self._calls += 1
        if "loss_scale" not in metrics and "refused" not in metrics:
            return
        kept = {k: metrics[k] for k in self._KEYS if k in metrics}
        if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(kept)):
            self._pending.append((self._calls, kept))

    def check(self) -> None:
        while self._pending and all(x.is_ready() for x in jax.tree.leaves(self._pending[0][1])):
            call, m = self._pending.popleft()
            if "refused" in m and bool(m["refused"]):
                self._pending.clear()
                raise ValueError(self._refusal(call, m))
            if "loss_scale" in m:
                self._check_overflow(float(m["grad_norm"]), float(m["loss_scale"]))

    def _check_overflow(self, norm: float, scale: float) -> None:
        if not math.isfinite(norm) and scale <= self.min_scale:
            self._pending.clear()
            raise RuntimeError(
                "fused step: the fp16 gradients overflowed (non-finite gradient norm) "
                f"with the loss scale already at its minimum ({scale:g}, "
                f"min_loss_scale={self.min_scale:g}); "
                "the scale cannot go lower, so every further step would be skipped. "
                "The gradients kept overflowing whatever the scale: check the loss and "
                "the head for inf/NaN (compute the loss in fp32), lower the learning "
                "rate, or train in bf16. This call dispatched nothing: the params and "
                "opt_state passed to it are intact."
            )

    def _refusal(self, call: int, m) -> str:
        """The message for a refused step: what was wrong, and that nothing changed."""
        why = []
        for key, (lo, hi) in m.get("index_extremes", {}).items():
            msg = out_of_range(f"batch[{key!r}]", lo, hi, self.ranges[key])
            if msg:
                why.append(msg)
        if "learning_rate" in m:
            lr, t = float(m["learning_rate"]), int(m["learning_rate_step"])
            if not (math.isfinite(lr) and lr >= 0):
                why.append(
                    f"the learning rate at step {t} of its schedule is {lr:g}, and a learning "
                    "rate must be finite and >= 0 (check the schedule's end value and "
                    "length; a skipped step does not advance it, so every further step "
                    "would be refused too)")
        return (
            f"fused step: call {call} of this step function was refused: {'; '.join(why)}. "
            "That step was skipped as a whole (the params and opt_state it returned are bit "
            "for bit those it was given), and this call dispatched nothing: the params and "
            "opt_state passed to it are intact. Fix the batch or the learning-rate schedule "
            "(a tx with another schedule can keep this opt_state) and call again.")
