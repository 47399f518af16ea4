r"""The fused LOMO training step: update every layer inside the backward scan.

LOMO updates a parameter the moment its gradient is known, so the gradients
of the whole model never exist at once. For a model written as ``embed -> L
identical layers -> head`` (every layer leaf stacked on a leading axis ``L``)
:func:`fused_train_step` builds one jitted step that does this with any
*leaf-wise* optax transform ``tx``:

.. math::
    h_0 = E(\theta_E, x), \quad h_{i+1} = F(\theta_i, h_i), \quad
    \ell = H(\theta_H, h_L)

forward scan keeping :math:`h_0 \dots h_{L-1}`; the head's VJP and update;
a reverse scan :math:`i = L-1, \dots, 0` of
:math:`(\bar\theta_i, \bar h_i) = \bar h_{i+1}^\top \partial F(\theta_i, h_i)`,
:math:`u_i, s_i \leftarrow \mathrm{tx.update}(\bar\theta_i, s_i, \theta_i)`,
:math:`\theta_i \leftarrow \theta_i + u_i` written in place; then the
embedding (plus the head's share when tied). At most one unit's gradient is
alive; the results equal ``jax.value_and_grad(model.loss)`` followed by
``tx`` on embed/head and ``lomo_jax.per_layer(tx)`` on the layers. With
``clip_grad_norm=c``, fp16 loss scaling or ``skip_nonfinite`` a first
backward pass computes :math:`\|g\|` and the update pass applies
:math:`g \cdot \min(1, c / (\|g\| + 10^{-6})) / S`. The design (memory
accounting, in-place writes, keys, guards) is ``docs/fused-design.md``.

Modules: :mod:`~lomo_jax.fused.model` (:class:`LayeredModel`),
:mod:`~lomo_jax.fused.state` (:class:`FusedState`, :func:`fused_init`),
:mod:`~lomo_jax.fused.keys`, :mod:`~lomo_jax.fused.stages` and
:mod:`~lomo_jax.fused.passes` (forward, head, layers, embedding; norm and
update passes), :mod:`~lomo_jax.fused.unit_update`, :mod:`~lomo_jax.fused.unit_view`
(a ``tx`` keyed to the whole tree, e.g. ``optax.multi_transform`` with a label
tree shaped like ``params``), :mod:`~lomo_jax.fused.stack`,
:mod:`~lomo_jax.fused.microbatch`, the checks (:mod:`~lomo_jax.fused.checks`,
:mod:`~lomo_jax.fused.layer_checks`, :mod:`~lomo_jax.fused.state_checks`,
:mod:`~lomo_jax.fused.input_checks`, :mod:`~lomo_jax.fused.donation`),
:mod:`~lomo_jax.fused.step` (one traced step) and
:mod:`~lomo_jax.fused.build` (:func:`fused_train_step`).

Example::

    import jax, jax.numpy as jnp, optax, lomo_jax

    def embed(p, batch):                      # -> h [B, T, D]
        return p["tok"][batch["ids"]]

    def layer(p, h, batch):                   # one layer's slice of params["layers"]
        return h + jax.nn.gelu(h @ p["w1"]) @ p["w2"]
    # or layer(p, h, batch, *, index, key) for alternating layers / dropout

    def head(p, h, batch, embed_params=None):  # tied: logits with the embedding
        logits = h @ embed_params["tok"].T
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["labels"]).mean()

    model = lomo_jax.LayeredModel(embed, layer, head, tied=True, num_layers=L)
    params = {"embed": {"tok": ...}, "layers": {"w1": [L, D, F], "w2": [L, F, D]},
              "head": {}}
    tx = lomo_jax.adalomo(1e-3)
    opt_state = lomo_jax.fused_init(tx, params)
    step = lomo_jax.fused_train_step(model, tx, clip_grad_norm=1.0)
    params, opt_state, metrics = step(params, opt_state, batch)   # donates both
    print(metrics["loss"], metrics["grad_norm"])
    # a layer taking key=: step(params, opt_state, batch, key=jax.random.key(n))
"""

from lomo_jax._loss_scale import LossScaleState
from lomo_jax.fused.build import fused_train_step
from lomo_jax.fused.keys import layer_key
from lomo_jax.fused.model import LayeredModel
from lomo_jax.fused.state import FusedState, fused_init

__all__ = [
    "FusedState",
    "LayeredModel",
    "LossScaleState",
    "fused_init",
    "fused_train_step",
    "layer_key",
]
