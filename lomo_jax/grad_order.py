r"""Parameter gradients of a sub-block before its input gradient, in the backward.

Inside the fused step's backward scan a layer's VJP runs as one unit, and XLA
tends to schedule the weight-gradient matmuls of every sub-block at the end of
the layer (nothing downstream waits for them), so the activations they read
(the MLP's ``[B, T, F]`` intermediates, say) stay alive through the backward of
the sub-blocks below. :func:`param_grads_first` wraps a sub-block
:math:`y = f(\theta, x, c)` so that its backward releases :math:`\bar x` only
together with :math:`\bar\theta`:

.. math::
    (\bar\theta, \bar x) = \mathrm{barrier}\big(\bar y^\top \partial_\theta f,\;
    \bar y^\top \partial_x f\big)

(``lax.optimization_barrier``): the sub-block's parameter gradients exist, and
its activations are dead, before the previous sub-block's backward starts.
Values are unchanged; only the schedule is. ``c`` are non-differentiable
context arrays (masks, rotary tables).

Example (a pre-norm transformer layer)::

    from lomo_jax.grad_order import param_grads_first

    def layer(p, h, batch):
        h = h + param_grads_first(attention_block)(p["attn"], h, (cos, sin, mask))
        return h + param_grads_first(mlp_block)(p["mlp"], h)
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
from jax import lax

__all__ = ["param_grads_first"]


def param_grads_first(f: Callable) -> Callable:
    """``f(params, x, context=()) -> y`` with the backward ordered as above.

    ``context`` is a pytree of arrays ``f`` reads but is not differentiated
    with respect to (its cotangent is zero).
    """

    @jax.custom_vjp
    def block(params, x, context):
        return f(params, x, *context)

    def fwd(params, x, context):
        return jax.vjp(lambda p, xx: f(p, xx, *context), params, x)

    def bwd(vjp, ct):
        d_params, d_x = lax.optimization_barrier(vjp(ct))
        return d_params, d_x, None

    block.defvjp(fwd, bwd)

    @functools.wraps(f)
    def wrapped(params, x, context=()):
        return block(params, x, tuple(context))

    return wrapped
