r"""The fused step's optimizer state: :class:`FusedState` and :func:`fused_init`.

.. math::
    s = (\mathrm{tx.init}(\theta_E),\ \mathrm{vmap}(\mathrm{tx.init})(\Theta),\
         \mathrm{tx.init}(\theta_H),\ \text{loss scale},\ \text{skip count},\
         \text{rng})

Example::

    opt_state = lomo_jax.fused_init(lomo_jax.adalomo(1e-3), params)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from lomo_jax import _loss_scale
from lomo_jax._layout import split_params as _split_params
from lomo_jax._loss_scale import LossScaleState
from lomo_jax.fused.checks import check_tx
from lomo_jax.fused.unit_view import unit_transforms
from lomo_jax._per_layer import PerLayerState, per_layer


class FusedState(NamedTuple):
    """Optimizer state of the fused step (see :func:`fused_init`).

    A ``tx`` that cannot take a unit on its own (``optax.multi_transform`` with
    a label tree shaped like ``params``) is initialised on the unit's view of the
    whole tree instead (:mod:`lomo_jax.fused.unit_view`); every other ``tx`` gets
    exactly the state below.

    Attributes:
      embed: ``tx.init(params["embed"])``.
      layers: ``lomo_jax.per_layer(tx).init(params["layers"])``, i.e.
        ``PerLayerState(jax.vmap(tx.init)(params["layers"]))``: the state of
        every layer with a leading axis ``L`` (interchangeable with the state
        of the unfused ``per_layer(tx)``).
      head: ``tx.init(params["head"])``.
      loss_scale: :class:`LossScaleState` when dynamic loss scaling is on
        (fp16 parameters), else ``None``.
      nonfinite_steps: ``int32[]`` count of steps skipped because the loss,
        the gradient norm or the head's update was not finite (see
        ``fused_train_step(skip_nonfinite=True)``; fp16 overflow skips count
        too) when made by ``fused_init(..., skip_nonfinite=True)``, else
        ``None`` (the default, so four-field states keep working).
      rng: the PRNG key of stochastic rounding
        (``fused_train_step(..., rounding="stochastic")``), advanced every
        step, when made by ``fused_init(..., rng=key)``; else ``None``.
        Checkpointed with the rest of the state, so a resumed run draws the
        same bits.
    """

    embed: Any
    layers: PerLayerState
    head: Any
    loss_scale: Optional[LossScaleState]
    nonfinite_steps: Optional[jax.Array] = None
    rng: Optional[jax.Array] = None


def fused_init(
    tx: optax.GradientTransformation,
    params,
    *,
    loss_scale=None,
    skip_nonfinite: bool = False,
    rng: Optional[jax.Array] = None,
) -> FusedState:
    r"""Optimizer state for :func:`fused_train_step`.

    .. math::
        s = (\mathrm{tx.init}(\theta_E),\ \mathrm{vmap}(\mathrm{tx.init})(\Theta),\
             \mathrm{tx.init}(\theta_H),\ \text{loss scale})

    The layer state is exactly ``lomo_jax.per_layer(tx).init(params["layers"])``.

    Example::

        opt_state = lomo_jax.fused_init(lomo_jax.adalomo(1e-3), params)
        # abstractly, for a model too large to allocate here:
        state_shapes = jax.eval_shape(lambda p: lomo_jax.fused_init(tx, p), params_shapes)

    Args:
      tx: a leaf-wise optax transform (the same one passed to
        :func:`fused_train_step`); an ``optax.multi_transform`` may label
        ``params`` with a tree shaped like it (the labels of ``params["layers"]``,
        without the layer axis, apply to every layer).
      params: ``{"embed": ..., "layers": ..., "head": ...}``.
      loss_scale: initial dynamic loss scale. ``None`` (default): ``2**16``
        if any parameter is fp16, otherwise no loss scaling. A number turns
        loss scaling on with that initial scale whatever the dtypes.
      skip_nonfinite: add the skipped-step counter
        :attr:`FusedState.nonfinite_steps` (zero) that
        ``fused_train_step(..., skip_nonfinite=True)`` needs.
      rng: a PRNG key (``jax.random.key(seed)``) for
        ``fused_train_step(..., rounding="stochastic")``, kept in
        :attr:`FusedState.rng`.

    Returns:
      A :class:`FusedState`; committed to the parameters' device when they are
      committed to one (so the second step reuses the first step's program).

    Raises:
      ValueError: ``tx`` takes neither a unit nor the whole ``params`` (e.g. a
        label tree that does not match ``params``); names where they differ.
    """
    check_tx(tx)
    _split_params(params)
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}.")
    if loss_scale is None and has_fp16(params):
        loss_scale = _loss_scale.DEFAULT_INIT_SCALE
    ls = None if loss_scale is None else _loss_scale.init(float(loss_scale))
    txs = unit_transforms(tx, params)
    return _on_params_device(params, FusedState(
        embed=txs.embed.init(params["embed"]),
        layers=per_layer(txs.layers).init(params["layers"]),
        head=txs.head.init(params["head"]),
        loss_scale=ls,
        nonfinite_steps=jnp.zeros([], jnp.int32) if skip_nonfinite else None,
        rng=_check_rng(rng),
    ))


def _on_params_device(params, state: FusedState) -> FusedState:
    """``state`` with its uncommitted arrays (optax's step counts, the loss scale, the
    skip count, ``rng``) committed to the device that holds ``params``, when every
    committed parameter is on one device (``jax.device_put(params, device)``,
    ``convert.load_pretrained``). The step's outputs are committed there: a state left
    uncommitted would make the second step compile the whole program again."""
    leaves = jax.tree.leaves(params) + jax.tree.leaves(state)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):  # inside jit / eval_shape
        return state
    devices = {d for x in jax.tree.leaves(params)
               if isinstance(x, jax.Array) and x.committed for d in x.devices()}
    if len(devices) != 1:
        return state
    device = devices.pop()
    return jax.tree.map(lambda x: jax.device_put(x, device)
                        if isinstance(x, jax.Array) and not x.committed else x, state)


def _check_rng(rng):
    if rng is None:
        return None
    key = rng if isinstance(rng, jax.Array) else jnp.asarray(rng)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        ok = key.shape == ()
    else:
        ok = key.dtype == jnp.uint32 and key.shape == (2,)  # a raw jax.random.PRNGKey
    if not ok:
        raise TypeError(
            f"rng must be one PRNG key (jax.random.key(seed)), got {key.dtype}{list(key.shape)}.")
    return key


def has_fp16(params) -> bool:
    return any(
        jnp.result_type(x) == jnp.float16 for x in jax.tree_util.tree_leaves(params)
    )
