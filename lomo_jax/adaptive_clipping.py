r"""Adaptive per-tensor gradient clipping (AdaGC), in one pass.

LOMO's global-norm clipping needs the norm of the whole gradient before the
first update, so it costs a second backward pass. AdaGC (Wang et al., 2025,
arXiv 2502.11034) clips each tensor against its *own* history instead, which
needs nothing but that tensor's gradient: it runs inside the fused step's one
backward pass, as any leaf-wise transform does.

For each tensor, with :math:`n_t = \|g_t\|_2` and one fp32 scalar of state
:math:`\gamma` (the smoothed norm of the clipped gradient):

.. math::

   h_t = \begin{cases}
       \min(1, \lambda_{abs} / n_t) & t < T_{warm} \\
       \min(1, \lambda_{rel}\,\gamma_{t-1} / n_t) & t \ge T_{warm}
   \end{cases}
   \qquad \hat g_t = h_t\, g_t

.. math::

   \gamma_t = \begin{cases}
       \min(\gamma_{t-1}, \|\hat g_t\|) & t < T_{warm} \quad (\gamma_{-1} = +\infty) \\
       \beta\,\gamma_{t-1} + (1 - \beta)\,\|\hat g_t\| & t \ge T_{warm}
   \end{cases}

The defaults :math:`\lambda_{rel} = 1.05` and :math:`\beta = 0.98` are the
paper's; the warm-up (steps clipped by an absolute threshold while the average
forms) lasts 100 steps here. AdaGC's warm-up clips the *global* norm (that needs the second pass again); here
:math:`\lambda_{abs}` bounds each tensor's own norm, and ``absolute=None``
leaves warm-up steps unclipped. Zero norms (a tensor with no gradient this
step) are not taken into the warm-up minimum, which would freeze the tensor;
a tensor with no non-zero gradient in warm-up starts its average at its first
non-zero norm, unclipped.

Example::

    tx = optax.chain(lomo_jax.adaptive_clip(), lomo_jax.lomo(1e-3))
    step = lomo_jax.fused_train_step(model, tx)      # one backward pass

``fused_train_step(..., clip_grad_norm=c)`` with ``adaptive_clip`` in ``tx``
raises ``ValueError``: one clipping rule a step (lomo_torch refuses
``Lomo(adaptive_clip=..., clip_grad_norm=...)`` alike).

In the fused step each layer's slice of a stacked leaf is its own tensor, so
the state holds one scalar per layer (as :func:`lomo_jax.per_layer` gives an
unfused loop).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


class AdaptiveClipState(NamedTuple):
    """``count``: steps taken (int32). ``norm_ema``: :math:`\\gamma` per leaf,
    fp32 scalars shaped like the params tree (``+inf`` before the first step)."""

    count: jax.Array
    norm_ema: Any


def _check_arguments(relative, decay, warmup_steps, absolute) -> None:
    if not (isinstance(relative, (int, float)) and math.isfinite(relative) and relative > 0):
        raise ValueError(f"adaptive_clip: relative must be a finite number > 0, got {relative!r}.")
    if not (isinstance(decay, (int, float)) and 0 <= decay < 1):
        raise ValueError(f"adaptive_clip: decay must lie in [0, 1), got {decay!r}.")
    if not (isinstance(warmup_steps, int) and warmup_steps >= 1):
        raise ValueError(
            f"adaptive_clip: warmup_steps must be an int >= 1 (the relative rule needs a "
            f"history), got {warmup_steps!r}.")
    if absolute is not None and not (
            isinstance(absolute, (int, float)) and math.isfinite(absolute) and absolute > 0):
        raise ValueError(f"adaptive_clip: absolute must be None or a finite number > 0, "
                         f"got {absolute!r}.")


def _clip_one(g, gamma, warm, relative, decay, absolute):
    """One tensor: the clipped gradient and its new :math:`\\gamma`."""
    g32 = g.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(g32)))
    limit = jnp.where(warm, jnp.inf if absolute is None else absolute, relative * gamma)
    scale = jnp.where(norm > limit, limit / jnp.where(norm > 0, norm, 1.0), 1.0)
    clipped = norm * scale
    seen = clipped > 0
    warm_gamma = jnp.where(seen, jnp.minimum(gamma, clipped), gamma)
    ema = jnp.where(jnp.isinf(gamma), jnp.where(seen, clipped, gamma),
                    decay * gamma + (1 - decay) * clipped)
    return (g32 * scale).astype(g.dtype), jnp.where(warm, warm_gamma, ema)


def adaptive_clip(relative: float = 1.05, decay: float = 0.98, warmup_steps: int = 100,
                  absolute: Optional[float] = 1.0) -> optax.GradientTransformation:
    """Clip each tensor's gradient to ``relative`` times a moving average of
    its own clipped norm (AdaGC; the rule is in the module docstring).

    Args:
      relative: :math:`\\lambda_{rel}`, the allowed growth over the average.
      decay: :math:`\\beta`, the average's decay per step.
      warmup_steps: steps clipped by ``absolute`` while the history forms.
      absolute: :math:`\\lambda_{abs}`, the per-tensor norm bound during
        warm-up (``None``: unclipped warm-up).

    Returns:
      A leaf-wise ``optax.GradientTransformation`` with
      :class:`AdaptiveClipState`; chain it in front of ``lomo``/``adalomo``.
    """
    _check_arguments(relative, decay, warmup_steps, absolute)

    def init_fn(params):
        # one buffer a leaf: the fused step donates the state, and a shared
        # buffer cannot be donated twice
        return AdaptiveClipState(
            count=jnp.zeros([], jnp.int32),
            norm_ema=jax.tree.map(lambda _: jnp.full([], jnp.inf, jnp.float32), params))

    def update_fn(updates, state, params=None):
        del params
        warm = state.count < warmup_steps
        grads, treedef = jax.tree.flatten(updates)
        gammas = treedef.flatten_up_to(state.norm_ema)
        pairs = [_clip_one(g, gamma, warm, relative, decay, absolute)
                 for g, gamma in zip(grads, gammas)]
        clipped = treedef.unflatten([p[0] for p in pairs])
        norm_ema = treedef.unflatten([p[1] for p in pairs])
        return clipped, AdaptiveClipState(optax.safe_increment(state.count), norm_ema)

    return optax.GradientTransformation(init_fn, update_fn)
