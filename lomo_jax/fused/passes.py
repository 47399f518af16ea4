r"""The two backward passes of the fused step, built from its stages.

* norm pass: :math:`\|g\|^2 = \sum_u \|\bar\theta_u / S\|^2`, nothing updated;
* update pass: head, then layers :math:`i = L-1, \dots, 0` in a reverse scan,
  then the embedding, each updated with :math:`\bar\theta \cdot c` as soon as
  its gradient exists (``c`` the clip coefficient over the loss scale).

The layer scan carries the new slice of layer :math:`i` and writes it at the
*start* of iteration :math:`i-1`, before any read of the stack, so XLA writes
it in place (``docs/fused-design.md``).

Example: ``p, s, loss, ok = update_pass(stages, p, s, h_last, hs, seed, None, None,
guard=False)``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from lomo_jax._layout import Units
from lomo_jax.fused.frozen import trainable
from lomo_jax.fused.stack import slice_at, write_at, write_at_if
from lomo_jax.fused.stages import Stages
from lomo_jax.fused.unit_update import all_finite, apply_unit, keep_if_not, scaled, sq_norm


def norm_pass(stages: Stages, p: Units, h_last, hs, seed, inv_scale):
    """``||g||^2`` over all parameters, gradients unscaled by ``inv_scale``."""
    _, g_head, dh = stages.head_grads(p, h_last, seed)
    sq = sq_norm(g_head, inv_scale)

    def body(carry, xs):
        dh, sq = carry
        h_i, i = xs
        g_i, dh_prev = stages.layer_grads(slice_at(p.layers, i), stages.from_saved(h_i), dh, i)
        return (dh_prev, sq + sq_norm(g_i, inv_scale)), None

    dh = stages.cotangent_to_layers(dh)
    (dh0, sq), _ = lax.scan(body, (dh, sq), (hs, stages.idx), reverse=True)
    g_embed = stages.embed_grads(p, h_last, stages.cotangent_from_layers(dh0), seed)
    return sq + sq_norm(g_embed, inv_scale)


def update_pass(stages: Stages, p: Units, s: Units, h_last, hs, seed, factor, ok, guard: bool,
                keys: Optional[Units] = None):
    """Head, then the layers in a reverse scan, then the embedding; each
    unit is updated as soon as its gradient exists and the gradient dies.

    ``factor`` scales every gradient (clip coefficient / loss scale) or is
    ``None``; ``ok`` (``None`` or a bool scalar) keeps the old values
    everywhere where False (:func:`apply_unit`'s ``keep``), so a skipped step
    leaves every bit unchanged. With
    ``guard`` the head's new values must be finite too (checked before
    anything else is written). ``keys``: the stochastic-rounding keys of
    the three units (layer ``i`` folds ``i`` into its unit's key), or
    ``None`` for round-to-nearest. Returns ``(params, state, loss, ok)``.
    """
    keys = keys or Units(None, None, None)
    loss, g_head, dh_last = stages.head_grads(p, h_last, seed)
    if guard:  # ok needs the head's new values: they are selected
        head_new = apply_unit(stages.txs.head, scaled(g_head, factor), s.head, p.head, keys.head,
                              frozen=stages.mask("head"))
        ok = ok & jnp.isfinite(loss) & all_finite(head_new)
        ph, sh = keep_if_not(ok, head_new, (p.head, s.head))
    else:
        ph, sh = apply_unit(stages.txs.head, scaled(g_head, factor), s.head, p.head, keys.head, ok,
                            keep_state="cond", frozen=stages.mask("head"))
    # Everything after this point waits for the head's update (so its
    # gradient dies before the layer scan), and layer L-1's slice is read
    # only now (not hoisted to the start of the step).
    ph, sh, dh_last, pl, sl = lax.optimization_barrier((ph, sh, dh_last, p.layers, s.layers))
    pl, sl, dh0 = update_layers(stages, pl, sl, hs, stages.cotangent_to_layers(dh_last), factor,
                                      ok, keys.layers)
    g_embed = stages.embed_grads(p, h_last, stages.cotangent_from_layers(dh0), seed)  # old head
    pe, se = apply_unit(stages.txs.embed, scaled(g_embed, factor), s.embed, p.embed, keys.embed, ok,
                        frozen=stages.mask("embed"))
    return Units(pe, pl, ph), Units(se, sl, sh), loss, ok


def update_layers(stages: Stages, pl, sl, hs, dh_last, factor, ok, key=None):
    """The reverse scan ``i = L-1..0``: gradient of layer ``i``, ``tx`` on it,
    its new slice carried and written at the start of the next iteration
    (before any read of the stack, so XLA writes in place;
    ``docs/fused-design.md``). Frozen leaves are neither carried nor written."""
    frozen = stages.mask("layers")

    def body(carry, xs):
        pl, sl, pend_p, pend_s, pend_i, dh = carry
        h_i, i = xs
        pl, sl = write_at(pl, pend_p, pend_i), write_at_if(ok, sl, pend_s, pend_i)
        p_i, s_i = slice_at(pl, i), slice_at(sl, i)
        g_i, dh_prev = stages.layer_grads(p_i, stages.from_saved(h_i), dh, i)
        key_i = None if key is None else jax.random.fold_in(key, i)
        p_new, s_new = apply_unit(stages.txs.layers, scaled(g_i, factor), s_i, p_i, key_i, ok,
                                  keep_state="caller", frozen=frozen)
        return (pl, sl, trainable(p_new, frozen), s_new, i, dh_prev), None

    last = jnp.asarray(stages.n_layers - 1, stages.idx.dtype)
    init = (pl, sl, trainable(slice_at(pl, last), frozen), slice_at(sl, last), last, dh_last)
    (pl, sl, pend_p, pend_s, pend_i, dh0), _ = lax.scan(
        body, init, (hs, stages.idx), reverse=True
    )
    return write_at(pl, pend_p, pend_i), write_at_if(ok, sl, pend_s, pend_i), dh0
