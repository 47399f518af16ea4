r"""The stages of one traced fused step: the forward scan and the gradients of
the three units (head, one layer, embedding), with the micro-batch layout, the
FSDP placement and the host offload of the saved layer inputs.

.. math::
    (\bar\theta_H, \bar h_L) = \bar\ell\,\partial H, \quad
    (\bar\theta_i, \bar h_i) = \bar h_{i+1}^\top \partial F(\theta_i, h_i), \quad
    \bar\theta_E = \bar h_0^\top \partial E\ (+\ \text{the head's share if tied})

The norm and update passes built from them are :mod:`lomo_jax.fused.passes`.

Example: ``h_last, hs = Stages(model, model.call_layer, unit_transforms(tx, params), batch,
L).forward(p)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lomo_jax import _loss_scale, _placement
from lomo_jax._layout import Units
from lomo_jax.fused.frozen import trainable
from lomo_jax.fused.keys import layer_key
from lomo_jax.fused.layer_checks import check_activation, check_loss
from lomo_jax.fused.microbatch import from_micro, pick, put, to_micro
from lomo_jax.fused.model import LayeredModel
from lomo_jax.fused.stack import slice_at


class Stages:
    r"""The pieces of one traced step: forward, head, layer and embedding
    gradients (the norm and update passes built from them are
    :mod:`lomo_jax.fused.passes`).

    ``txs``: the transform of each unit (``Units``, from
    :func:`lomo_jax.fused.unit_view.unit_transforms`).
    ``seed`` is the cotangent of the loss (the fp16 loss scale, or 1).
    ``layer_key``: the step key the layers' keys are folded from (``None`` when
    the layer takes no key). ``layer_fn`` is ``model.call_layer``, possibly
    under ``jax.checkpoint``, for the backward scans' recompute. ``frozen``:
    ``Units`` of bool masks (:func:`lomo_jax.fused.frozen.unit_masks`) or None;
    the gradients returned hold ``optax.MaskedNode()`` at frozen leaves, whose
    gradients so never exist (XLA drops them).
    """

    def __init__(self, model: LayeredModel, layer_fn, txs: Units, batch, n_layers: int,
                 microbatches: int = 1, layer_key=None, placement=None,
                 offload: bool = False, frozen=None):
        self.model, self.layer_fn, self.txs = model, layer_fn, txs
        self.frozen = frozen
        self.offload = offload  # the saved layer inputs live in pinned host memory
        self.placement = placement  # _placement.LayerPlacement on a mesh, else None
        self.batch, self.n_layers = batch, n_layers
        self.idx = jnp.arange(n_layers, dtype=jnp.int32)
        self.m = microbatches
        self.layer_key = layer_key
        # the forward scan needs the layer index only if the layer uses it
        self.numbered = model.takes_index or model.takes_key
        # the layers' view of the batch: [B/M, M, ...], micro-batch k = rows k, k+M, ...
        self.micro = to_micro(batch, microbatches) if microbatches > 1 else None

    def to_layers(self, h):
        """An activation of the whole batch in the layout the layer scan uses."""
        return h if self.m == 1 else to_micro(h, self.m)

    def from_layers(self, h):
        return h if self.m == 1 else from_micro(h)

    def cotangent_to_layers(self, dh):
        """The cotangent of the whole batch's ``h`` in the layers' layout: the
        transpose of :meth:`from_layers` (a scalar activation, shared by the
        micro-batches, gets its cotangent once)."""
        if self.m == 1:
            return dh
        like = jax.eval_shape(self.to_layers, dh)
        return jax.linear_transpose(self.from_layers, like)(dh)[0]

    def cotangent_from_layers(self, dh):
        """The transpose of :meth:`to_layers` (a shared scalar's cotangents add up)."""
        if self.m == 1:
            return dh
        like = jax.eval_shape(self.from_layers, dh)
        return jax.linear_transpose(self.to_layers, like)(dh)[0]

    def to_saved(self, h):
        """A layer input as kept for the backward scans: moved to pinned host
        memory with ``offload``, else as it is."""
        return jax.device_put(h, jax.memory.Space.Host) if self.offload else h

    def from_saved(self, h_i):
        """A saved layer input back in device memory for its recompute."""
        return jax.device_put(h_i, jax.memory.Space.Device) if self.offload else h_i

    def key(self, i, k=None):
        """Layer ``i``'s key (micro-batch ``k``'s with micro-batches), or None."""
        if self.layer_key is None:
            return None
        return layer_key(self.layer_key, i, None if self.m == 1 else k)

    def call(self, p_i, h, batch, i, k=None, fn=None, gather=True):
        """Layer ``i`` (on micro-batch ``k``) with its index and key; ``fn``
        defaults to the un-rematerialised ``model.call_layer``."""
        index = i if self.model.takes_index else None  # no unused input to a checkpoint
        place = self.placement
        if gather:
            p_i = self.gathered(p_i)
        h = _placement.constrain_activation(h, place)
        out = (fn or self.model.call_layer)(p_i, h, batch, index, self.key(i, k))
        return _placement.constrain_activation(out, place)

    def gathered(self, p_i):
        """A layer's slice all-gathered for computing (FSDP), as placed on a mesh."""
        return _placement.constrain(p_i, None if self.placement is None else self.placement.gathered)

    def mask(self, unit: str):
        """The frozen-leaf mask of ``unit`` ("embed", "layers", "head"), or None."""
        return None if self.frozen is None else getattr(self.frozen, unit)

    def unit_grads(self, g, unit: str):
        """The embedding's or head's gradient constrained to that unit's stored
        sharding (built in this device's shard on a mesh), frozen leaves masked."""
        place = self.placement
        g = _placement.constrain(g, None if place is None else getattr(place, unit))
        return trainable(g, self.mask(unit))

    def split_grads(self, g):
        """A layer's gradient constrained to the layer's stored sharding (so it is
        reduce-scattered and ``tx`` runs on this device's shard), frozen leaves masked."""
        g = _placement.constrain(g, None if self.placement is None else self.placement.split)
        return trainable(g, self.mask("layers"))

    # ---- forward ---------------------------------------------------------

    def forward(self, p: Units):
        """``h_L`` (whole batch) and the stacked layer inputs ``h_0..h_{L-1}``
        (in the layers' layout; nothing else is kept)."""
        h0 = self.to_layers(self.model.embed(p.embed, self.batch))
        zero, slice0 = jnp.zeros([], jnp.int32), slice_at(p.layers, 0)
        first = (h0, self.batch) if self.m == 1 else (pick(h0, 0), pick(self.micro, 0))
        check_activation(self.model, slice0, *first, self.n_layers, self.key(zero, zero))

        def body(h, xs):
            p_i, i = xs if self.numbered else (xs, None)
            return self._layer_on_each(p_i, h, i), self.to_saved(h)

        xs = (p.layers, self.idx) if self.numbered else p.layers
        h_last, hs = lax.scan(body, h0, xs)
        return self.from_layers(h_last), hs

    def _layer_on_each(self, p_i, h, i):
        """One layer on the whole batch: on each micro-batch in turn, in place."""
        if self.m == 1:
            return self.call(p_i, h, self.batch, i)

        def micro(h, k):
            return put(h, self.call(p_i, pick(h, k), pick(self.micro, k), i, k), k), None

        return lax.scan(micro, h, jnp.arange(self.m, dtype=jnp.int32))[0]

    # ---- gradients of the three units --------------------------------------

    def head_grads(self, p: Units, h_last, seed):
        """``(loss, g_head, dh_L)``: the head's VJP at ``h_L`` (a tied embedding is
        held constant here; its share comes in :meth:`embed_grads`)."""
        def f(ph, h):
            if self.model.tied:
                return self.model.head(ph, h, self.batch, embed_params=p.embed)
            return self.model.head(ph, h, self.batch)

        loss, vjp = jax.vjp(f, p.head, h_last)
        check_loss(loss)
        seed, rest = _loss_scale.loss_seed(seed, loss.dtype)  # an fp16 loss holds < 2**16
        g_head, dh_last = _loss_scale.times(vjp(seed), rest)
        return loss, self.unit_grads(g_head, "head"), dh_last

    def layer_grads(self, p_i, h_i, dh, i):
        """``(g_i, dh_i)``: recompute layer ``i`` at its saved input (with the
        forward's index and key), pull ``dh_{i+1}`` back.

        With micro-batches, one micro-batch at a time, the parameter gradient
        summed over them in an fp32 accumulator of the layer's size (so the
        layer's working set is one micro-batch's).
        """
        if self.m == 1:
            # gathered outside the VJP, so the gradient is not constrained to the
            # gathered layout on its way out (and can be reduce-scattered)
            _, vjp = jax.vjp(lambda pp, hh: self.call(pp, hh, self.batch, i, fn=self.layer_fn,
                                                      gather=False), self.gathered(p_i), h_i)
            g, dh_prev = vjp(dh)
            return self.split_grads(g), dh_prev

        def micro(carry, k):
            acc, dh = carry
            batch_k = pick(self.micro, k)
            _, vjp = jax.vjp(lambda pp, hh: self.call(pp, hh, batch_k, i, k, self.layer_fn, False),
                             p_full, pick(h_i, k))
            g_k, dh_prev = vjp(pick(dh, k))
            acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, self.split_grads(g_k))
            return (acc, put(dh, dh_prev, k)), None

        p_full = self.gathered(p_i)
        acc = self.split_grads(jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), p_i))
        return lax.scan(micro, (acc, dh), jnp.arange(self.m, dtype=jnp.int32))[0]

    def embed_grads(self, p: Units, h_last, dh0, seed):
        """The embedding's gradient from ``dh_0``; with tied weights plus the
        head's share, recomputed here at ``h_L`` so that the summed gradient
        exists once, only when it is used."""
        _, vjp = jax.vjp(lambda pe: self.model.embed(pe, self.batch), p.embed)
        (g,) = vjp(_placement.constrain_activation(dh0, self.placement))
        if self.model.tied:
            loss, vjp_h = jax.vjp(
                lambda pe: self.model.head(p.head, h_last, self.batch, embed_params=pe), p.embed
            )
            seed, rest = _loss_scale.loss_seed(seed, loss.dtype)
            (g_h,) = _loss_scale.times(vjp_h(seed), rest)
            g = jax.tree.map(jnp.add, g, g_h)
        return self.unit_grads(g, "embed")
