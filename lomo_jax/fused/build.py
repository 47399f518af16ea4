"""The step builder: :func:`fused_train_step` checks its options and ``tx``,
and returns the jitted, donating step that checks its arguments and state at
trace time and runs :func:`lomo_jax.fused.step.train_step`.

Example: ``step = lomo_jax.fused_train_step(model, tx, clip_grad_norm=1.0)``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import optax

from lomo_jax import _loss_scale, _placement
from lomo_jax._layout import Units, abstract as _abstract
from lomo_jax.fused.checks import check_leafwise_on, check_leafwise_on_probe, check_options
from lomo_jax.fused.checks import check_tx
from lomo_jax.fused.donation import jit_step
from lomo_jax.fused.microbatch import check_microbatches
from lomo_jax.fused.model import LayeredModel
from lomo_jax.fused.stack import slice_at
from lomo_jax.fused.stages import Stages
from lomo_jax.fused.state_checks import (check_one_clip, check_state, check_state_fits,
                                         check_step_key)
from lomo_jax.fused.keys import step_keys
from lomo_jax.fused.frozen import unit_masks
from lomo_jax.fused.unit_view import unit_transforms
from lomo_jax.fused.step import StepConfig, pack, train_step


def fused_train_step(
    model: LayeredModel,
    tx: optax.GradientTransformation,
    *,
    clip_grad_norm: Optional[float] = None,
    remat_policy: Optional[Callable[..., Any]] = None,
    loss_scale_window: int = 1000,
    min_loss_scale: float = 1.0,
    skip_nonfinite: bool = False,
    shardings: Optional[Any] = None,
    rounding: str = "nearest",
    microbatches: int = 1,
    offload_saved_inputs: bool = False,
):
    r"""Build the jitted fused LOMO step ``step(params, opt_state, batch, key=None)``.

    Per step (``docs/fused-design.md`` has the full derivation)::

        forward scan (keep h_0..h_{L-1}) -> head grad -> update head
        reverse scan i = L-1..0: vjp of layer i at h_i -> tx.update(g_i) -> write slice i
        embedding grad (+ head's, if tied) -> update embedding

    With ``clip_grad_norm=c`` (or fp16 loss scaling) a first reverse pass
    computes :math:`\|g\|_2` over all parameters (and whether it overflowed)
    without updating anything; the update pass then uses
    :math:`g \min(1, c / (\|g\| + 10^{-6})) / S` in fp32 (``S`` the loss
    scale, 1 without fp16). Results equal ``jax.value_and_grad(model.loss)``
    followed by ``tx`` on embed/head and ``lomo_jax.per_layer(tx)`` on layers.

    Example::

        tx = lomo_jax.lomo(1e-3, weight_decay=0.01)
        opt_state = lomo_jax.fused_init(tx, params)
        step = lomo_jax.fused_train_step(model, tx, clip_grad_norm=1.0,
                                         remat_policy=jax.checkpoint_policies.dots_saveable)
        for batch in data:
            params, opt_state, metrics = step(params, opt_state, batch)
        # memory, without allocating anything:
        step.lower(param_shapes, state_shapes, batch_shapes).compile().memory_analysis()

    Args:
      model: a :class:`LayeredModel` (its ``layer`` may take ``index`` and
        ``key``; its ``num_layers``, if set, is checked against the params).
      tx: any leaf-wise optax transform (``lomo_jax.lomo``, ``lomo_jax.adalomo``,
        ``optax.sgd``, ``optax.adamw``, ``optax.adafactor``, chains of such;
        ``optax.multi_transform`` of such, labelled by a function or by a tree
        shaped like ``params`` whose ``layers`` labels apply to every layer,
        :mod:`lomo_jax.fused.unit_view`).
        Transforms whose update of one leaf depends on another
        (``optax.clip_by_global_norm``, ``optax.apply_if_finite``,
        ``optax.MultiSteps``) raise ``ValueError`` here; the check is a static
        data-flow analysis of ``tx``'s jaxprs on a probe tree, repeated on the
        real parameter structure when the step is first traced.
      clip_grad_norm: global gradient-norm threshold, or ``None``.
      remat_policy: a ``jax.checkpoint`` policy for the per-layer recompute in
        the backward scan (``None``: recompute the layer once and keep all of
        its residuals while its vjp runs; the unfused counterpart is
        ``jax.checkpoint(layer)`` around the scanned layer).
      loss_scale_window: clean steps after which the fp16 loss scale doubles.
      min_loss_scale: the loss scale never goes below this; an overflow at it
        raises ``RuntimeError`` when the step is next called (the flag is read
        without waiting, so possibly a call later; see
        :mod:`lomo_jax._loss_scale` for the policy).
      skip_nonfinite: the non-finite guard for any dtype (fp16 has it built
        in). The step is skipped as a whole - every parameter and state bit
        unchanged, as for an fp16 overflow - when the loss or the global
        gradient norm is not finite, or when the head's new parameters or
        state are not (checked before anything else is written: this is what
        catches a learning-rate schedule that returns NaN/inf, since every
        unit uses the same schedule value; a ``params["head"]`` without
        leaves gives no such check). It needs the two-pass norm (a second
        backward when not clipping anyway). ``opt_state`` must come
        from ``fused_init(tx, params, skip_nonfinite=True)``, which holds the
        cumulative counter. A skipped step does not advance ``tx``'s step
        count, so a schedule that is non-finite at some step skips every
        step from there on: watch ``metrics["nonfinite_steps"]``.
      rounding: how new values are rounded into bf16/fp16 parameters:
        ``"nearest"`` (default, what a cast does) or ``"stochastic"`` (unbiased
        stochastic rounding, :mod:`lomo_jax.rounding`, so updates smaller than
        half a spacing still count in expectation). The random bits come from
        ``opt_state.rng`` (``fused_init(..., rng=jax.random.key(seed))``),
        split every step; each unit, each layer (its index folded in inside
        the scan) and each leaf draws its own. fp32 leaves are bit-identical
        either way.
      microbatches: gradient accumulation inside the layer scan. The batch's
        leading axis is split into ``M`` equal micro-batches (micro-batch
        ``k``: rows ``k, k+M, ...``; every batch leaf with a leading axis is
        split, scalars go to each; a size ``M`` does not divide is an error
        naming the leaf). The embedding and the head (chunked over the
        vocabulary) see the whole batch, so the loss is the whole batch's,
        token-weighted exactly as ``jax.value_and_grad`` on it gives; each
        layer runs on one micro-batch at a time, in the forward and in the
        backward, where its gradient is summed over the micro-batches in an
        fp32 accumulator and applied once. Memory, at a fixed total batch
        ``B``::

            temp(M) <= saved layer inputs(B) + one layer's working set(B / M)
                       + the head's VJP(B) + one layer's gradient in fp32

        (the head's VJP: its input, temporaries and outputs at the whole
        batch, which the micro-batches do not divide). The norm pass
        accumulates the same way, so clipping, fp16 loss scaling and
        ``skip_nonfinite`` see the summed gradient: one overflow anywhere
        skips the whole step.
      shardings: ``None`` (default: ``jax.jit`` follows the inputs), or a
        ``(params, opt_state, batch)`` triple of shardings (pytree prefixes),
        e.g. :func:`lomo_jax.sharding.fused_shardings` for FSDP over a mesh.
        The step is then jitted with these as ``in_shardings`` and the same
        params/state shardings as ``out_shardings`` (metrics replicated), so
        every output keeps its donated input's sharding and is updated in
        place; inputs are resharded to them on the way in (e.g. a host batch
        is split over the data axes). Inside, every layer call is placed as
        FSDP (:func:`lomo_jax.sharding.layer_placement`): the layer's slice
        all-gathered, its input and output split by the batch, every unit's
        gradient constrained to its stored split (reduce-scattered).
      offload_saved_inputs: keep the saved layer inputs ``h_0..h_{L-1}`` (the
        one activation per layer the step holds across its passes,
        ``L * B * T * D`` elements of the activation dtype, this device's share
        of the batch on a mesh) in pinned host memory instead of the
        accelerator's: each is copied out in the forward scan and back, one
        layer at a time, in each backward scan. Device memory drops by that
        much; the cost is ``L * B * T * D`` elements over the host link once
        out and once back per backward pass (two with clipping or loss
        scaling), which XLA overlaps with the layers' compute where it can.
        Results are bit-identical to ``False`` (a copy). Checked for XLA:GPU
        (deviceless compiles); XLA:CPU compiles the placement as a no-op.
        ``compiled.memory_analysis().host_temp_size_in_bytes`` (and
        :class:`lomo_jax.aot.MemoryFigures`' ``host_temporaries``) shows the
        host bytes.

    The step's ``key`` (a PRNG key, a new one every step) is for a
    ``model.layer`` that takes ``key`` (dropout); without ``key=`` it is drawn
    from ``opt_state.rng`` (``fused_init(..., rng=jax.random.key(seed))``).
    :mod:`lomo_jax.fused.keys` derives every key. A layer taking ``key`` with
    neither, or ``key=`` for a layer that takes none, is an error when the step
    is traced. So ``step(params, opt_state, batch, key=k)`` equals
    ``jax.value_and_grad(model.loss)(params, batch, key=k)`` + ``tx``.

    Returns:
      ``step(params, opt_state, batch, key=None) -> (params, opt_state,
      metrics)``, a ``jax.jit`` function that donates ``params`` and ``opt_state`` (wrapped
      so that passing an already-donated array again raises an error naming
      it; ``.lower``/``.trace``/``.eval_shape`` are those of the jit
      function). ``metrics["loss"]`` is the fp32 loss before the update; with
      clipping, loss scaling or the guard also ``"grad_norm"`` (unclipped,
      unscaled); with loss scaling ``"loss_scale"`` (the scale used); with
      loss scaling or the guard ``"skipped"`` (bool); when ``opt_state`` has
      the counter, ``"nonfinite_steps"`` (its new value). With input checks
      (``model.index_ranges``, a ``lomo``/``adalomo`` schedule): ``"refused"``
      (bool, the step was skipped for bad input and the next call raises; it
      also sets ``"skipped"``), ``"index_extremes"`` (``{key: [min, max]}`` of
      each ranged batch entry, ignored values aside) and ``"learning_rate"``
      / ``"learning_rate_step"`` (the rate used and its schedule step).
    """
    if not isinstance(model, LayeredModel):
        raise TypeError(
            f"model must be a lomo_jax.LayeredModel, got {type(model).__name__}."
        )
    check_tx(tx)
    check_options(clip_grad_norm=clip_grad_norm, loss_scale_window=loss_scale_window,
                  min_loss_scale=min_loss_scale, skip_nonfinite=skip_nonfinite,
                  rounding=rounding, microbatches=microbatches,
                  offload_saved_inputs=offload_saved_inputs)
    check_leafwise_on_probe(tx)

    layer_fn = model.call_layer
    if remat_policy is not None:
        layer_fn = jax.checkpoint(layer_fn, policy=remat_policy)
    config = StepConfig(
        tx=tx, clip_grad_norm=clip_grad_norm, skip_nonfinite=skip_nonfinite,
        loss_scale_window=int(loss_scale_window), min_loss_scale=min_loss_scale,
        rounding=rounding, microbatches=microbatches,
    )

    def step(params, opt_state, batch, key=None):
        n_layers, p = model.split(params)
        check_state(opt_state, params, skip_nonfinite, rounding)
        txs = unit_transforms(tx, params)
        check_state_fits(txs, opt_state, p)
        check_one_clip(opt_state, clip_grad_norm)
        check_step_key(model, key, opt_state)
        check_leafwise_on(tx, _abstract(p.embed), _abstract(slice_at(p.layers, 0)),
                           _abstract(p.head))
        if microbatches > 1:
            check_microbatches(batch, microbatches)
        # a key-taking layer needs its key before the forward; else (rounding
        # only) the split stays after the norm pass, where it always was
        draws = step_keys(rounding, opt_state.rng, key, True) if model.takes_key else None
        s = Units(opt_state.embed, opt_state.layers.inner_state, opt_state.head)
        stages = Stages(model, layer_fn, txs, batch, n_layers, microbatches,
                         None if draws is None else draws[2], _layer_placement(shardings, p),
                         offload_saved_inputs, frozen=unit_masks(txs, p, s))
        p, s, metrics, flags, rng = train_step(stages, config, p, s, opt_state, draws)
        return pack(p, s, opt_state, metrics, flags, rng, config)

    watch = _loss_scale.StepWatch(min_loss_scale, model.index_ranges)
    return jit_step(step, shardings, watch)


def _layer_placement(shardings, p: Units):
    """FSDP placement of the layers' work from the step's ``shardings`` (see
    :class:`lomo_jax.sharding.LayerPlacement`), or None without them."""
    if shardings is None:
        return None
    p_sh, _, b_sh = shardings
    return _placement.layer_placement(p_sh, b_sh, p._asdict())
