r"""LOMO and AdaLomo as optax gradient transformations.

Both rules work leaf by leaf: the update of one parameter depends only on that
parameter, its gradient and its own state. That is what lets the fused step
(:mod:`lomo_jax.fused`) apply them inside the backward pass, one layer at a
time, and it is why they compose with anything in optax.

The math runs in float32 whatever the parameter dtype; updates come back in
float32 and :func:`optax.apply_updates` rounds ``param + update`` once to the
parameter's dtype (bf16/fp16 parameters are never updated with a pre-rounded
update).

Global gradient-norm clipping, which LOMO does in a first backward pass, is
``optax.clip_by_global_norm`` in an ``optax.chain`` ahead of these transforms:
both multiply every gradient by :math:`\min(1, c / \|g\|)`, except that
``lomo-optim`` (and ``lomo_torch``, and the fused step's ``clip_grad_norm=``)
divide by :math:`\|g\| + 10^{-6}`, a relative difference of
:math:`10^{-6} / \|g\|` in the clipped gradient (the parity suite tests the
two against each other at 1e-5). One ordering difference to ``lomo-optim``
when *both* value and norm clipping are on: ``lomo-optim`` clamps the raw
gradient and then scales it by the norm coefficient; a chain scales first and
the transform clamps after.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import optax

from lomo_jax._layout import non_float_leaves

Array = jax.Array
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


def _check_float_params(tree, what: str) -> None:
    """Raise a TypeError naming every leaf that is not a real floating array."""
    bad = non_float_leaves(tree)
    if bad:
        raise TypeError(
            f"{what} can only update real floating-point parameters; these leaves are "
            f"not: {', '.join(bad)}. Freeze them (e.g. with optax.multi_transform and "
            "optax.set_to_zero) or convert them to a float dtype."
        )


def _check_positive(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}.")


def _check_learning_rate(learning_rate) -> None:
    """A constant must be finite and positive; a schedule is run eagerly at
    steps 0 and 1 and must give finite values there.

    Later steps are not probed (a schedule may be fine within its horizon and
    not beyond it); the fused step checks the rate of every step it applies
    (``learning_rate_at``, :func:`_exposing_learning_rate`) and refuses a
    negative or non-finite one. Used unfused (``tx.update`` in an optax loop),
    a later bad value is not caught. Traced values (``optax.inject_hyperparams``
    inside ``jit``) and schedules that cannot run eagerly are not checked.
    """
    if callable(learning_rate):
        for step in (0, 1):
            try:
                value = float(jnp.asarray(learning_rate(jnp.asarray(step, jnp.int32))))
            except Exception:  # noqa: BLE001 - traced or not eager-evaluable
                return
            if not math.isfinite(value):
                raise ValueError(
                    f"the learning_rate schedule returned {value} at step {step} (checked "
                    "eagerly at steps 0 and 1); it must give a finite learning rate at "
                    "every step. Check its arguments (e.g. a zero decay/warmup length, "
                    "or a division by the step count, which starts at 0)."
                )
        return
    if not isinstance(learning_rate, (int, float)):
        try:
            learning_rate = float(learning_rate)
        except Exception:  # noqa: BLE001 - a tracer (inject_hyperparams) or array
            return
    if not math.isfinite(learning_rate):
        raise ValueError(f"learning_rate must be a finite number, got {learning_rate!r}.")
    _check_positive("learning_rate", learning_rate, allow_none=False)


def _exposing_learning_rate(tx, learning_rate) -> optax.GradientTransformation:
    """``tx`` (a chain ending in ``scale_by_learning_rate(learning_rate)``) whose
    ``update`` carries ``learning_rate_at(state) -> (step, rate)``: the step count
    and the rate an update from ``state`` uses, so the fused step can refuse a
    step whose rate is negative or not finite before applying it (a schedule
    is checked eagerly at steps 0 and 1 only). A constant rate was checked when
    built: ``tx`` is returned as it is."""
    if not callable(learning_rate):
        return tx

    def update(updates, state, params=None, **extra_args):
        return tx.update(updates, state, params, **extra_args)

    def learning_rate_at(state):
        count = state[-1].count  # scale_by_schedule's: the count this update reads
        return count, jnp.asarray(learning_rate(count), jnp.float32)

    update.learning_rate_at = learning_rate_at
    return optax.GradientTransformationExtraArgs(tx.init, update)


def _rms(x: Array) -> Array:
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def scale_by_lomo(
    weight_decay: float = 0.0,
    clip_grad_value: Optional[float] = None,
) -> optax.GradientTransformation:
    r"""LOMO's rule without the learning rate.

    .. math::
        u = \mathrm{clip}(g, -c, c) + \lambda\, \theta

    where :math:`c` is ``clip_grad_value`` (no clipping when ``None``) and
    :math:`\lambda` is ``weight_decay``. Chained with
    ``optax.scale_by_learning_rate(lr)`` this gives LOMO's
    :math:`\theta \leftarrow (1 - \eta\lambda)\theta - \eta\,\mathrm{clip}(g)`.

    Example::

        tx = optax.chain(lomo_jax.scale_by_lomo(weight_decay=0.01),
                         optax.scale_by_learning_rate(1e-3))

    Args:
      weight_decay: decoupled weight decay :math:`\lambda` (``>= 0``).
      clip_grad_value: clamp each gradient entry to ``[-c, c]``; ``None`` = off.

    Returns:
      An ``optax.GradientTransformation`` with ``optax.EmptyState``. Its update
      needs ``params`` when ``weight_decay`` is not zero.
    """
    _check_positive("clip_grad_value", clip_grad_value)
    if isinstance(weight_decay, (int, float)) and weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
    use_decay = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)

    def init_fn(params):
        _check_float_params(params, "lomo")
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if use_decay and params is None:
            raise ValueError("lomo with weight_decay needs `params` in update().")

        def leaf(g, p):
            g = g.astype(jnp.float32)
            if clip_grad_value is not None:
                g = jnp.clip(g, -clip_grad_value, clip_grad_value)
            if use_decay:
                g = g + weight_decay * p.astype(jnp.float32)
            return g

        if use_decay:
            return jax.tree.map(leaf, updates, params), state
        return jax.tree.map(lambda g: leaf(g, None), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def lomo(
    learning_rate: ScalarOrSchedule,
    weight_decay: float = 0.0,
    clip_grad_value: Optional[float] = None,
) -> optax.GradientTransformation:
    r"""LOMO: plain SGD with value clipping and decoupled weight decay.

    .. math::
        \theta \leftarrow (1 - \eta_t \lambda)\,\theta - \eta_t\,\mathrm{clip}(g, -c, c)

    The same numbers as ``lomo_torch.Lomo`` / ``lomo_optim.Lomo``. LOMO's global
    norm clipping is ``optax.clip_by_global_norm`` ahead of it in a chain.

    Example::

        schedule = optax.linear_schedule(1e-3, 0.0, 1000)
        tx = optax.chain(optax.clip_by_global_norm(1.0), lomo_jax.lomo(schedule))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)

    Args:
      learning_rate: a float or an optax schedule :math:`\eta_t`.
      weight_decay: :math:`\lambda`.
      clip_grad_value: :math:`c`, or ``None``.
    """
    _check_learning_rate(learning_rate)
    return _exposing_learning_rate(optax.chain(
        scale_by_lomo(weight_decay=weight_decay, clip_grad_value=clip_grad_value),
        optax.scale_by_learning_rate(learning_rate),
    ), learning_rate)


class ScaleByAdaLomoState(NamedTuple):
    """State of :func:`scale_by_adalomo`.

    For a parameter of shape ``(..., m, n)`` (rank >= 2) ``v_row`` has shape
    ``(..., m)`` and ``v_col`` shape ``(..., n)`` and ``v`` is empty; for rank
    0 and 1, ``v`` has the parameter's shape and the others are empty. An
    ``(m, n)`` matrix therefore costs ``m + n`` floats. All statistics are fp32.
    """

    count: Array  # int32 scalar, number of updates taken
    v_row: optax.Updates
    v_col: optax.Updates
    v: optax.Updates


def _unzip(like, out, n: int):
    """``n`` trees shaped like ``like`` from ``out``, which has an ``n``-tuple at
    each of ``like``'s leaves (``jax.tree.transpose`` cannot do an empty tree)."""
    return tuple(jax.tree.map(lambda _, o, k=k: o[k], like, out) for k in range(n))


def _empty() -> Array:
    return jnp.zeros((0,), jnp.float32)


def _check_adalomo_args(eps, clip_threshold, clip_grad_value, weight_decay, decay_rate):
    """Refuse bad AdaLomo hyperparameters by name; return ``(eps1, eps2)``."""
    if len(eps) != 2:
        raise ValueError(f"eps must be a pair (eps1, eps2), got {eps!r}.")
    _check_positive("clip_threshold", clip_threshold, allow_none=False)
    _check_positive("clip_grad_value", clip_grad_value)
    if isinstance(weight_decay, (int, float)) and weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
    if isinstance(decay_rate, (int, float)) and decay_rate > 0:
        raise ValueError(
            f"decay_rate must be <= 0 (beta_t = 1 - t**decay_rate), got {decay_rate!r}; "
            "a positive rate makes beta_t negative from step 2 on. The default is -0.8."
        )
    return eps


def _adalomo_init(params) -> ScaleByAdaLomoState:
    """Zero statistics: ``v_row``/``v_col`` for rank >= 2, ``v`` for rank 0 and 1."""
    _check_float_params(params, "adalomo")

    def row(p):
        return jnp.zeros(p.shape[:-1], jnp.float32) if p.ndim >= 2 else _empty()

    def col(p):
        return jnp.zeros(p.shape[:-2] + p.shape[-1:], jnp.float32) if p.ndim >= 2 else _empty()

    def full(p):
        return jnp.zeros(p.shape, jnp.float32) if p.ndim < 2 else _empty()

    return ScaleByAdaLomoState(count=jnp.zeros([], jnp.int32), v_row=jax.tree.map(row, params),
                               v_col=jax.tree.map(col, params), v=jax.tree.map(full, params))


def _adalomo_leaf(g, p, vr, vc, v, beta, *, eps1, eps2, clip_threshold, clip_grad_value,
                  weight_decay):
    """One parameter's AdaLomo update and new statistics (the docstring's math;
    ``weight_decay=None``: none)."""
    g = g.astype(jnp.float32)
    p = p.astype(jnp.float32)
    if clip_grad_value is not None:
        g = jnp.clip(g, -clip_grad_value, clip_grad_value)
    sq = jnp.square(g) + eps1
    if g.ndim >= 2:
        vr = beta * vr + (1.0 - beta) * jnp.mean(sq, axis=-1)
        vc = beta * vc + (1.0 - beta) * jnp.mean(sq, axis=-2)
        r_factor = jax.lax.rsqrt(vr / jnp.mean(vr, axis=-1, keepdims=True))
        c_factor = jax.lax.rsqrt(vc)
        u = r_factor[..., :, None] * c_factor[..., None, :] * g
    else:
        v = beta * v + (1.0 - beta) * sq
        u = jax.lax.rsqrt(v) * g
    u = u / jnp.maximum(1.0, _rms(u) / clip_threshold)
    if weight_decay is not None:
        u = u + weight_decay * p
    u = jnp.maximum(eps2, _rms(p)) * u
    return u, vr, vc, v


def scale_by_adalomo(
    eps: Tuple[float, float] = (1e-30, 1e-3),
    clip_threshold: float = 1.0,
    decay_rate: float = -0.8,
    weight_decay: float = 0.0,
    clip_grad_value: Optional[float] = None,
) -> optax.GradientTransformation:
    r"""AdaLomo's rule without the learning rate (arXiv 2310.10195).

    With :math:`t` the step (from 1) and :math:`\beta_t = 1 - t^{\rho}`
    (``decay_rate`` :math:`\rho < 0`), for a gradient :math:`G \in R^{m\times n}`:

    .. math::
        S = G^2 + \epsilon_1, \quad
        r_t = \beta_t r_{t-1} + (1-\beta_t)\,\mathrm{mean}_{cols}(S), \quad
        c_t = \beta_t c_{t-1} + (1-\beta_t)\,\mathrm{mean}_{rows}(S)

        U = G \,/\, \sqrt{\hat V}, \quad \hat V = r_t c_t^\top / \mathrm{mean}(r_t), \qquad
        U \leftarrow U / \max(1, \mathrm{RMS}(U)/d)

        u = \max(\epsilon_2, \mathrm{RMS}(\theta))\,(U + \lambda\theta)

    Rank 0 and 1 parameters keep a full second moment :math:`v_t` instead of
    :math:`r_t, c_t`; rank :math:`N \ge 2` are factored over their last two
    axes (leading axes are batch axes of the statistics, but RMS is taken over
    the whole tensor: wrap the transform in :func:`lomo_jax.per_layer` for
    layer-stacked parameters). Chained with ``optax.scale_by_learning_rate``
    this is :math:`\theta \leftarrow \theta - \eta_t u`, which is
    ``lomo_torch.AdaLomo``'s update.

    Example::

        tx = optax.chain(lomo_jax.scale_by_adalomo(),
                         optax.scale_by_learning_rate(1e-3))

    Args:
      eps: :math:`(\epsilon_1, \epsilon_2)`: added to :math:`G^2`, and the
        smallest parameter RMS used for the step size.
      clip_threshold: :math:`d`, the RMS above which the update is rescaled.
      decay_rate: :math:`\rho \le 0`, the exponent of the second-moment decay.
      weight_decay: :math:`\lambda`, decoupled and scaled like the update.
      clip_grad_value: clamp each gradient entry to ``[-c, c]`` first.

    Returns:
      An ``optax.GradientTransformation`` whose update needs ``params``.

    Why not ``optax.scale_by_factored_rms``: it factors only axes of at least
    ``min_dim_size_to_factor`` and picks the two largest axes, where AdaLomo
    (and lomo-optim) factor the last two of every rank >= 2 tensor and
    normalise the row factor by its mean, so parity with lomo-optim would break.
    The last three steps equal ``optax.clip_by_block_rms(d)``,
    ``optax.add_decayed_weights(lambda)`` and ``optax.scale_by_param_block_rms(eps2)``;
    they stay inline so the state remains one :class:`ScaleByAdaLomoState`
    (a chain would change the structure of every saved ``opt_state``).
    """
    eps1, eps2 = _check_adalomo_args(eps, clip_threshold, clip_grad_value, weight_decay,
                                     decay_rate)
    leaf = functools.partial(
        _adalomo_leaf, eps1=eps1, eps2=eps2, clip_threshold=clip_threshold,
        clip_grad_value=clip_grad_value,
        weight_decay=None if isinstance(weight_decay, (int, float)) and weight_decay == 0
        else weight_decay)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "adalomo needs `params` in update(): its step size is lr * RMS(param)."
            )
        count = optax.safe_increment(state.count)
        beta = 1.0 - count.astype(jnp.float32)**decay_rate
        out = jax.tree.map(lambda g, p, vr, vc, v: leaf(g, p, vr, vc, v, beta),
                           updates, params, state.v_row, state.v_col, state.v)
        u, vr, vc, v = _unzip(updates, out, 4)
        return u, ScaleByAdaLomoState(count=count, v_row=vr, v_col=vc, v=v)

    return optax.GradientTransformation(_adalomo_init, update_fn)


def adalomo(
    learning_rate: ScalarOrSchedule,
    eps: Tuple[float, float] = (1e-30, 1e-3),
    clip_threshold: float = 1.0,
    decay_rate: float = -0.8,
    weight_decay: float = 0.0,
    clip_grad_value: Optional[float] = None,
) -> optax.GradientTransformation:
    r"""AdaLomo: LOMO with Adafactor-style factored second moments.

    :math:`\theta \leftarrow \theta - \eta_t \max(\epsilon_2, \mathrm{RMS}(\theta))
    (U + \lambda\theta)` with :math:`U` the clipped, factored-RMS-normalised
    gradient of :func:`scale_by_adalomo`. Same numbers as ``lomo_torch.AdaLomo``
    and ``lomo_optim.AdaLomo``; state for an ``(m, n)`` matrix is ``m + n``
    floats.

    Example::

        schedule = optax.cosine_decay_schedule(1e-3, 1000)
        tx = optax.chain(optax.clip_by_global_norm(1.0), lomo_jax.adalomo(schedule))
        opt_state = tx.init(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)

    For layer-stacked parameters (``nnx.scan``/``nn.scan``), use
    ``lomo_jax.per_layer(lomo_jax.adalomo(...))`` on the stacked subtree so
    statistics and RMS are per layer.
    """
    _check_learning_rate(learning_rate)
    return _exposing_learning_rate(optax.chain(
        scale_by_adalomo(
            eps=eps,
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            weight_decay=weight_decay,
            clip_grad_value=clip_grad_value,
        ),
        optax.scale_by_learning_rate(learning_rate),
    ), learning_rate)
