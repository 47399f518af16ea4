r"""One traced fused step: forward, the norm pass when needed (clipping, fp16
loss scaling, ``skip_nonfinite``), the update pass, and the new state.

.. math::
    c = \frac{1}{S} \min\Bigl(1, \frac{\text{clip}}{\|g\| + 10^{-6}}\Bigr), \quad
    \text{ok} = \text{finite}(\|g\|) \wedge \text{valid(input)}

Example: ``p, s, metrics, flags, rng = train_step(stages, config, p, s, opt_state)``.
"""

from __future__ import annotations

from typing import Optional, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from lomo_jax import _loss_scale
from lomo_jax._layout import Units
from lomo_jax.fused import passes
from lomo_jax.fused.input_checks import input_checks
from lomo_jax.fused.keys import step_keys
from lomo_jax.fused.stages import Stages
from lomo_jax.fused.state import FusedState
from lomo_jax.fused.unit_update import keep_if_not
from lomo_jax._per_layer import PerLayerState


_NORM_EPS = 1e-6  # lomo-optim: clip_coef = max_norm / (total_norm + 1e-6)


class StepConfig(NamedTuple):
    """The step's static options (see :func:`fused_train_step`)."""

    tx: optax.GradientTransformation
    clip_grad_norm: Optional[float]
    skip_nonfinite: bool
    loss_scale_window: int
    min_loss_scale: float
    rounding: str
    microbatches: int


class Flags(NamedTuple):
    """A step's bool scalars (``None`` where not computed): ``ok``, it was
    applied; ``finite``, its gradient norm was finite; ``valid``, its input
    passed :func:`input_checks` (a refused step also keeps the loss scale,
    the skip counter and the key)."""

    ok: Optional[jax.Array]
    finite: Optional[jax.Array]
    valid: Optional[jax.Array]


def train_step(stages: Stages, config: StepConfig, p: Units, s: Units, opt_state,
                draws=None):
    """Forward, the norm pass when needed, the update pass:
    ``(p, s, metrics, flags, rng)`` (:class:`Flags`; ``rng``: the advanced key,
    or ``None``). ``draws``: :func:`step_keys`' result if already drawn (for a
    key-taking layer), else drawn here for rounding."""
    valid, metrics = input_checks(stages.model, config.tx, stages.batch, s)
    scaling = opt_state.loss_scale is not None
    scale = opt_state.loss_scale.scale if scaling else None
    seed = scale if scaling else jnp.ones([], jnp.float32)
    two_pass = scaling or config.skip_nonfinite or config.clip_grad_norm is not None
    h_last, hs = stages.forward(p)
    factor = ok = finite = None
    if two_pass:
        inv = None if scale is None else 1.0 / scale
        sq = passes.norm_pass(stages, p, h_last, hs, seed, inv)
        # The update pass starts from h_L only once the norm is known, so XLA
        # can neither merge its head VJP with the norm pass's (holding the
        # head's gradient across the layer scan) nor start it early. (Both
        # outputs are used: XLA drops a barrier operand whose output is not.)
        h_last, sq = lax.optimization_barrier((h_last, sq))
        norm = jnp.sqrt(sq)
        metrics["grad_norm"] = norm
        factor = jnp.ones([], jnp.float32) if inv is None else inv
        if config.clip_grad_norm is not None:
            factor = factor * jnp.minimum(1.0, config.clip_grad_norm / (norm + _NORM_EPS))
        finite = jnp.isfinite(sq)
        if scaling or config.skip_nonfinite:  # else clipping alone: never skipped
            ok = finite
    if valid is not None:
        ok = valid if ok is None else ok & valid
    rng, keys, _ = draws or step_keys(config.rounding, opt_state.rng, None, False)
    p, s, loss, ok = passes.update_pass(
        stages, p, s, h_last, hs, seed, factor, ok, guard=config.skip_nonfinite, keys=keys
    )
    metrics["loss"] = loss.astype(jnp.float32)
    return p, s, metrics, Flags(ok, finite, valid), rng


def pack(p: Units, s: Units, opt_state, metrics, flags: Flags, rng, config: StepConfig):
    """New params dict, new :class:`FusedState` (loss scale, skip counter) and metrics."""
    ok, valid = flags.ok, flags.valid
    new_ls = None
    if opt_state.loss_scale is not None:
        new_ls = _loss_scale.update(
            opt_state.loss_scale, flags.finite, config.loss_scale_window, config.min_loss_scale
        )
        new_ls = keep_if_not(valid, new_ls, opt_state.loss_scale)
        metrics["loss_scale"] = opt_state.loss_scale.scale
    if ok is not None:
        metrics["skipped"] = jnp.logical_not(ok)
    count = opt_state.nonfinite_steps
    if count is not None:
        if ok is not None:  # a refused step is not a non-finite one
            nonfinite = jnp.logical_not(ok) if valid is None else jnp.logical_not(ok) & valid
            count = count + nonfinite.astype(count.dtype)
        metrics["nonfinite_steps"] = count
    if rng is not None and opt_state.rng is not None:
        rng = keep_if_not(valid, rng, opt_state.rng)
    new_params = {"embed": p.embed, "layers": p.layers, "head": p.head}
    new_state = FusedState(
        embed=s.embed, layers=PerLayerState(inner_state=s.layers), head=s.head,
        loss_scale=new_ls, nonfinite_steps=count,
        rng=opt_state.rng if rng is None else rng,
    )
    return new_params, new_state, metrics
