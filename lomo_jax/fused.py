r"""The fused LOMO training step: update every layer inside the backward scan.

LOMO's point is that a parameter can be updated the moment its gradient is
known, so the gradients of the whole model never exist at once. For a model
written as ``embed -> L identical layers -> head`` (``nnx.scan`` / ``nn.scan``
style, every layer leaf stacked on a leading axis of size ``L``) this module
builds one jitted step that does exactly that, with any *leaf-wise* optax
transform:

.. math::
    h_0 = E(\theta_E, x), \quad h_{i+1} = F(\theta_i, h_i), \quad
    \ell = H(\theta_H, h_L)

* **forward**: a ``lax.scan`` over the layers that keeps only each layer's
  input :math:`h_i` (``L`` activations; no other residuals);
* **head**: :math:`(\bar\theta_H, \bar h_L) = \partial \ell / \partial
  (\theta_H, h_L)`; the head is updated at once and its gradient dies before
  the layer scan starts;
* **layers**: a reverse ``lax.scan`` that, for :math:`i = L-1, \dots, 0`,
  recomputes layer :math:`i` and pulls :math:`\bar h_{i+1}` back through it
  (``jax.vjp``, optionally under ``jax.checkpoint(policy=remat_policy)``):
  :math:`(\bar\theta_i, \bar h_i) = \bar h_{i+1}^\top \partial F(\theta_i,
  h_i)`, then immediately
  :math:`u_i, s_i \leftarrow \mathrm{tx.update}(\bar\theta_i, s_i, \theta_i)`,
  :math:`\theta_i \leftarrow \theta_i + u_i`, written back into the stacked
  parameters and state *in place*; :math:`\bar\theta_i` dies here;
* **embedding**: :math:`\bar\theta_E = \bar h_0^\top \partial E`; with tied
  weights the head's share of the embedding's gradient is recomputed here (a
  second VJP of the head at :math:`h_L`, with the head's old parameters) and
  added, so the summed gradient exists once, when it is applied.

So at most one unit's gradient is alive, and temporary memory is inference's
plus the ``L`` saved layer inputs plus the larger of the largest gradient and
two layers' parameters (the layer being differentiated and its new values
waiting to be written) — independent of depth otherwise. The results are
those of ``jax.value_and_grad`` on the whole model followed by ``tx`` on the
embedding and head and ``lomo_jax.per_layer(tx)`` on the layers.

In code the step is a few named stages (:class:`_Stages`): ``forward``,
``head_grads``, ``layer_grads``, ``embed_grads``, the ``norm_pass`` and the
``update_pass`` built from them, and the guard (``ok``) that every write goes
through. Parameters and state travel as :class:`~lomo_jax._layout.Units`
``(embed, layers, head)``.

**Order in memory, not only in math.** XLA schedules freely, so where the
data flow alone would let it hold a large buffer longer than needed, the
step uses ``lax.optimization_barrier`` to pin the order: the layer scan
starts only after the head's update (so the head's gradient, ``[D, V]``, is
dead by then); the update pass's head VJP waits for the norm pass's result
(else XLA merges it with the norm pass's identical VJP and holds that
gradient across the norm pass). The models' own building blocks do the rest:
:func:`lomo_jax.cross_entropy.linear_cross_entropy` never builds ``[B, T,
V]`` logits, :func:`lomo_jax.embedding.embedding_lookup`'s gradient is a
gather XLA fuses into its consumer, and
:func:`lomo_jax.grad_order.param_grads_first` finishes a sub-block's weight
gradients before the next sub-block's backward.

**Global norm clipping** (``clip_grad_norm=c``) is LOMO's two passes: a first
backward computes :math:`\|g\|` without touching anything, the second updates
with :math:`g \cdot \min(1, c / (\|g\| + 10^{-6}))` (``lomo-optim``'s formula).
It cannot live inside ``tx``: a transform whose update for one leaf depends on
another leaf (``optax.clip_by_global_norm``, ``optax.apply_if_finite``,
``optax.MultiSteps``, ...) is refused when the step is built.

**fp16 parameters** get dynamic loss scaling (state in
:attr:`FusedState.loss_scale`): the loss cotangent is the scale :math:`S`,
gradients are unscaled in fp32; the first pass always runs, and a step whose
gradients overflow is skipped as a whole (every write selects the old value,
so every parameter and state bit is unchanged) and halves :math:`S`;
``loss_scale_window`` clean steps double it; an overflow with :math:`S` at
``min_loss_scale`` raises (:mod:`lomo_jax._loss_scale` states the policy).
With two passes the update pass recomputes the head's VJP rather than
holding its gradient across the norm pass. For bf16/fp32,
``skip_nonfinite=True`` is the same skip without the scale: a step whose
loss or gradient norm (or the head's new values, which is how a non-finite
learning rate shows) is not finite is skipped as a whole and counted in
:attr:`FusedState.nonfinite_steps`.

**bf16/fp16 without a master copy.** Every new value is rounded into the
parameter's dtype once per step; ``rounding="stochastic"`` makes that rounding
unbiased (:mod:`lomo_jax.rounding`), with its key in :attr:`FusedState.rng`.

**Layer index and keys.** ``layer`` may take keyword arguments ``index``
(its position :math:`i`, an ``int32`` scalar) and/or ``key`` (dropout):
layer :math:`i` gets :math:`k_i = \mathrm{fold\_in}(k, i)` and, with
micro-batches, micro-batch :math:`m` gets :math:`\mathrm{fold\_in}(k_i, m)`,
in the forward and in each recompute of the backward scans (so the dropout
masks agree). The step key :math:`k` is ``step(params, opt_state, batch,
key=k)``, else :math:`\mathrm{fold\_in}(k', 3)` with
:math:`(r, k') = \mathrm{split}(\text{opt\_state.rng})` (stochastic rounding
folds 0, 1, 2 into the same :math:`k'`); ``model.loss(params, batch, key=k)``
derives the same keys, so it is the reference. A layer without these
parameters is called ``layer(p, h, batch)`` and the traced program is the
same as before they existed.

**Layer axis.** Every leaf of ``params["layers"]`` needs a leading layer axis
``L`` (blocks stacked with ``nnx.vmap``, or ``jax.vmap`` of the init);
``LayeredModel(..., num_layers=L)`` checks it, and an error in the first
trace of ``layer`` is re-raised with the slice's shapes and that hint.

**Donation.** The returned step donates ``params`` and ``opt_state``; passing
the same arrays again raises an error that names the deleted leaf and says to
use the returned values; one array passed twice (two params leaves, or a
params leaf also in the batch) is refused naming both paths.

**Bad input** is never applied. Checked while tracing: ``opt_state`` must have
the structure, shapes and dtypes ``fused_init(tx, params)`` gives these params
(else an error naming the first leaf that differs). Checked inside the step,
as reductions to a few scalars (no host sync): the batch's integer entries
named by ``LayeredModel(index_ranges=...)`` (token ids, labels) must lie in
their range, and the learning rate each unit's update uses (``lomo`` /
``adalomo`` with a schedule) must be finite and >= 0. A step that fails is
skipped as a whole (like an fp16 overflow: every parameter and state bit,
the loss scale, the skip counter and the key unchanged), reported in
``metrics["refused"]``, and the next call raises, naming the key, the value
and the size (or the rate and its schedule step), without waiting
(:class:`lomo_jax._loss_scale.StepWatch`).

**In place, measured.** ``step`` donates ``params`` and ``opt_state`` and
every output aliases its donated input (``compiled.memory_analysis()
.alias_size_in_bytes`` equals the bytes of params + state), with no copy of a
stacked array. This needs care: the reverse scan keeps the stacked parameters
and state in its *carry* and writes slice :math:`i` with
``dynamic_update_slice``, and XLA only does that write in place if every read
of the stack in the iteration is ordered before it. Some reads are not: the
read of :math:`W_{2,i}` for :math:`\bar h_i = \bar h_{i+1} W_{2,i}^\top`
does not feed :math:`W_{2,i}`'s own update, and XLA's fusion may pull a state
read into another leaf's write. A first prototype that wrote slice :math:`i`
at the end of its own iteration compiled to two full copies per iteration of
a stacked weight (``copy(f32[L,1024,256])``, one stacked array per param/state
leaf with AdamW); ``lax.optimization_barrier`` does not survive to XLA's copy
insertion on CPU. So the new slice of layer :math:`i` is carried (one layer's
parameters and state in the carry) and written at the *start* of the next
iteration, before any read: every read of the stack then consumes the written
buffer, the loop-carried buffer's only user is the write, and no copy is
needed. The tests check the compiled HLO for stacked copies.

**Precision and ordering.** Gradients reach ``tx`` in the parameter dtype
when nothing rescales them, and in fp32 (scaled by the clip coefficient and
divided by the loss scale) with clipping or fp16. Value clipping inside
``tx`` (``lomo(clip_grad_value=...)``) then clamps the *norm-scaled*
gradient, as ``optax.chain(clip_by_global_norm, lomo(...))`` does;
``lomo-optim`` clamps first and scales after. New optimiser-state leaves are
cast back to the dtype ``tx.init`` gave them.

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

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from lomo_jax import _loss_scale, _placement
from lomo_jax import embedding as _ids
from lomo_jax._layout import Units, abstract as _abstract, describe as _describe
from lomo_jax._layout import STACKED_HINT, check_stacked as _check_stacked
from lomo_jax._layout import path_str as _path, split_params as _split_params
from lomo_jax._leafwise import cross_leaf_dependencies
from lomo_jax._loss_scale import LossScaleState
from lomo_jax.per_layer import PerLayerState, per_layer
from lomo_jax.rounding import apply_updates

__all__ = [
    "FusedState",
    "LayeredModel",
    "LossScaleState",
    "fused_init",
    "fused_train_step",
    "layer_key",
]

_NORM_EPS = 1e-6  # lomo-optim: clip_coef = max_norm / (total_norm + 1e-6)


# --------------------------------------------------------------------------
# The model interface
# --------------------------------------------------------------------------


_LAYER_KWARGS = ("index", "key")


def _layer_kwargs(fn) -> frozenset:
    """Which of ``index``/``key`` ``fn`` accepts as keywords (``**kwargs``: both)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature (a C callable): three arguments
        return frozenset()
    if any(q.kind is q.VAR_KEYWORD for q in params):
        return frozenset(_LAYER_KWARGS)
    keyword = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return frozenset(q.name for q in params if q.name in _LAYER_KWARGS and q.kind in keyword)


def layer_key(step_key, index, micro=None):
    r"""The key layer ``index`` gets: :math:`k_i = \mathrm{fold\_in}(k, i)`, and with
    micro-batches :math:`\mathrm{fold\_in}(k_i, m)` for micro-batch ``m``.

    Example: ``layer_key(jax.random.key(0), 2)`` is what layer 2 of
    ``model.loss(params, batch, key=jax.random.key(0))`` receives.
    """
    key = jax.random.fold_in(step_key, index)
    return key if micro is None else jax.random.fold_in(key, micro)


@dataclasses.dataclass(frozen=True)
class LayeredModel:
    r"""A model as three pure functions over ``{"embed", "layers", "head"}``.

    * ``embed(params["embed"], batch) -> h``
    * ``layer(layer_params, h, batch) -> h`` where ``layer_params`` is one
      slice ``tree.map(lambda x: x[i], params["layers"])`` (every leaf of
      ``params["layers"]`` has a leading layer axis ``L``). It must return an
      activation with the same tree structure, shapes and dtypes as ``h``
      (``h`` may be any pytree of arrays). It may also take keyword arguments
      ``index`` and/or ``key`` (``layer(p, h, batch, *, index, key)``, or
      ``**kwargs`` for both; found once with ``inspect.signature``, and only
      those it takes are passed):

      - ``index``: the layer's position ``i``, an ``int32`` scalar (traced),
        e.g. for Gemma-2-style alternating layers (``lax.cond``/``jnp.where``
        on ``index % 2``);
      - ``key``: layer ``i``'s PRNG key for this step,
        ``jax.random.fold_in(step_key, i)`` (:func:`layer_key`), e.g. for
        dropout. The fused step recomputes a layer in its backward scans with
        the same key as its forward, so the masks agree. ``step_key`` is the
        ``key=`` given to :meth:`loss` or to the fused step (see
        :func:`fused_train_step` for where it comes from otherwise).

    * ``head(params["head"], h, batch) -> loss`` (a real scalar; for fp16
      models better computed in fp32, though an fp16 loss works: its
      loss-scale seed is capped at ``2**15`` and the rest applied in fp32). With
      ``tied=True`` it is called as ``head(params["head"], h, batch,
      embed_params=params["embed"])`` and may reuse the embedding; the
      embedding then gets one update with the summed gradient.

    ``num_layers``: if given, the leading axis of every ``params["layers"]``
    leaf must equal it (a block that was not stacked fails early, naming the
    leaf); if not, a ``params["layers"]`` whose leaves are all 1-D is refused
    as almost surely unstacked (pass ``num_layers`` to allow it).

    ``index_ranges``: ``{batch key: IndexRange(size, ignore=None) or size}``
    for the integer batch entries that index a table (token ids, labels;
    :class:`lomo_jax.embedding.IndexRange`), e.g. ``{"input_ids": V,
    "labels": IndexRange(V, ignore=-100)}`` (what
    :func:`lomo_jax.models.layered_model` gives). A generic model cannot know
    which entries these are, so nothing is checked without it. With it, the
    fused step skips a step whose batch holds a value outside its range (every
    parameter and state bit unchanged) and raises on the next call, naming the
    key, the value and the size; :meth:`loss` raises at once on concrete
    (non-traced) batches and returns NaN under ``jit``. Keys absent from (or
    ``None`` in) the batch are not checked.

    :meth:`loss` is the plain (unfused) composition, for inference/evaluation
    and as the reference the fused step is tested against.

    Example::

        def layer(p, h, batch, *, index, key):       # dropout, odd layers differ
            keep = jax.random.bernoulli(key, 0.9, h.shape)
            h = jnp.where(keep, h / 0.9, 0.0)
            return jnp.where(index % 2 == 0, h @ p["w"], h)

        model = lomo_jax.LayeredModel(embed, layer, head, tied=True, num_layers=L)
        loss = model.loss(params, batch, key=jax.random.key(0))
    """

    embed: Callable[..., Any]
    layer: Callable[..., Any]
    head: Callable[..., Any]
    tied: bool = False
    num_layers: Optional[int] = None
    index_ranges: Any = None
    _layer_kw: frozenset = dataclasses.field(
        default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("embed", "layer", "head"):
            if not callable(getattr(self, name)):
                raise TypeError(
                    f"LayeredModel.{name} must be a function, got "
                    f"{type(getattr(self, name)).__name__}."
                )
        if not isinstance(self.tied, bool):
            raise TypeError(f"LayeredModel.tied must be a bool, got {self.tied!r}.")
        n = self.num_layers
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"LayeredModel.num_layers must be a positive int or None, got {n!r}.")
        object.__setattr__(self, "_layer_kw", _layer_kwargs(self.layer))
        object.__setattr__(self, "index_ranges", _ids.index_ranges(self.index_ranges))

    @property
    def takes_key(self) -> bool:
        """``layer`` accepts ``key=`` (it needs one PRNG key per layer and step)."""
        return "key" in self._layer_kw

    @property
    def takes_index(self) -> bool:
        """``layer`` accepts ``index=`` (its position in the stack)."""
        return "index" in self._layer_kw

    def call_layer(self, p_i, h, batch, index=None, key=None):
        """``layer(p_i, h, batch)`` plus the ``index``/``key`` it takes (the
        only way the fused step and :meth:`loss` call a layer)."""
        kw = {}
        if self.takes_index:
            kw["index"] = index
        if self.takes_key:
            if key is None:
                raise ValueError(
                    "model.layer takes a key but none was given (call_layer(..., key=k)).")
            kw["key"] = key
        return self.layer(p_i, h, batch, **kw)

    def call_head(self, params, h, batch):
        """``head`` applied as the fused step applies it (passes the
        embedding when ``tied``)."""
        if self.tied:
            return self.head(params["head"], h, batch, embed_params=params["embed"])
        return self.head(params["head"], h, batch)

    def split(self, params) -> tuple[int, Units]:
        """``(L, Units(embed, layers, head))`` after checking the layout and the
        layer axis (``num_layers``, see the class docstring)."""
        n_layers, units = _split_params(params)
        _check_stacked(units.layers, n_layers, self.num_layers)
        return n_layers, units

    def check_key(self, key, where: str, fix: str) -> None:
        """A key for a layer that takes none, or none for one that needs it, is an error."""
        if key is not None and not self.takes_key:
            raise ValueError(
                f"{where} was given key=... but model.layer takes no `key` argument, so "
                "the key would be silently ignored; drop key=..., or give the layer a "
                "keyword argument key (layer(p, h, batch, *, key)).")
        if key is None and self.takes_key:
            raise ValueError(
                f"model.layer takes a `key` argument (e.g. for dropout) but {where} has no "
                f"key: {fix}")

    def loss(self, params, batch, *, key=None, remat_policy=None, remat: bool = False):
        r"""The loss :math:`H(\theta_H, F_{L-1}(\dots F_0(E(\theta_E, x))))`.

        A ``lax.scan`` over the layers; layer ``i`` gets ``index=i`` and
        ``key=jax.random.fold_in(key, i)`` if it takes them (``key`` is required
        then, and refused otherwise). With ``remat=True`` (or a
        ``remat_policy``) each layer is wrapped in ``jax.checkpoint`` so that
        ``jax.grad`` of it saves only the layer inputs (plus what the policy
        saves), which is the unfused counterpart of the fused step.

        Example: ``jax.value_and_grad(model.loss)(params, batch, key=k)``
        followed by ``tx`` gives what ``step(params, opt_state, batch, key=k)``
        does.
        """
        if _deleted_leaves(params):
            raise _deleted_arg_error("params", params, where="LayeredModel.loss")
        n_layers, _ = self.split(params)
        self.check_key(key, "model.loss", "pass model.loss(params, batch, key=k).")
        nan_if_bad = _ids.check_indices(batch, self.index_ranges, "LayeredModel.loss")
        layer = self.call_layer
        if remat or remat_policy is not None:
            layer = jax.checkpoint(layer, policy=remat_policy)
        numbered = self.takes_index or self.takes_key

        def body(h, xs):
            p, i = xs if numbered else (xs, None)
            k = None if key is None else layer_key(key, i)
            return layer(p, h, batch, i, k), None

        xs = params["layers"]
        if numbered:
            xs = (xs, jnp.arange(n_layers, dtype=jnp.int32))
        h = _ids.nan_unless(nan_if_bad, self.embed(params["embed"], batch))  # NaN if bad
        h, _ = lax.scan(body, h, xs)
        return self.call_head(params, h, batch)


class FusedState(NamedTuple):
    """Optimizer state of the fused step (see :func:`fused_init`).

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


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


def _has_fp16(params) -> bool:
    return any(
        jnp.result_type(x) == jnp.float16 for x in jax.tree_util.tree_leaves(params)
    )


def _check_tx(tx) -> None:
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(
            f"tx must be an optax GradientTransformation, got {type(tx).__name__}."
        )
    owner = getattr(tx.update, "__self__", None)
    if isinstance(tx, optax.MultiSteps) or isinstance(owner, optax.MultiSteps):
        raise ValueError(_refusal("optax.MultiSteps accumulates whole-model gradients"))


def _refusal(reason: str) -> str:
    return (
        f"fused_train_step: {reason}. The fused step applies tx to one layer at a "
        "time inside the backward pass, so tx must update every parameter from "
        "its own gradient and state only. For LOMO's global gradient-norm "
        "clipping use fused_train_step(..., clip_grad_norm=max_norm) instead of "
        "optax.clip_by_global_norm in the chain; fp16 overflow skipping is "
        "built in (dynamic loss scaling), so apply_if_finite/skip_not_finite "
        "are not needed; gradient accumulation (MultiSteps) keeps every "
        "gradient alive and defeats LOMO - use fused_train_step(..., "
        "microbatches=M) instead, which accumulates one layer at a time."
    )


def _check_leafwise(tx, probe, prefix: Optional[str] = "params") -> None:
    """Refuse ``tx`` if its update of one leaf can depend on another leaf.

    A static data-flow analysis of ``tx.init``/``tx.update`` traced with
    ``jax.make_jaxpr`` on ``probe`` (see :mod:`lomo_jax._leafwise`), plus a
    check for ``optax.MultiStepsState`` (gradient accumulation) in the state.
    ``prefix`` names the probe's leaves in the error (``None``: the build-time
    stand-in tree, whose leaves the user never wrote, so none are named).
    """
    state = jax.eval_shape(tx.init, probe)
    is_ms = lambda x: isinstance(x, optax.MultiStepsState)  # noqa: E731
    if any(is_ms(x) for x in jax.tree_util.tree_leaves(state, is_leaf=is_ms)):
        raise ValueError(_refusal("optax.MultiSteps accumulates whole-model gradients"))
    why = cross_leaf_dependencies(tx, probe, prefix)
    if why is not None:
        where = " (found on a probe tree standing in for the parameters)" if prefix is None else ""
        raise ValueError(
            _refusal(f"tx is not leaf-wise: {why}{where} (e.g. optax.clip_by_global_norm)")
        )


def _check_leafwise_on(tx, embed, layer_slice, head) -> None:
    """The leaf-wise check on the real units tx is applied to (at trace time).

    Probes ``{"embed", "layers", "head"}`` (one layer's slice) together, its
    leaves named as the user's (``params['layers']['w1']``); if ``tx`` cannot
    take that combined tree (e.g. a ``multi_transform`` keyed to one unit's
    structure), each unit on its own; if it cannot take a unit, the real update
    will say so.
    """
    try:
        _check_leafwise(tx, {"embed": embed, "layers": layer_slice, "head": head})
        return
    except ValueError as e:
        if "fused_train_step:" in str(e):
            raise
    except Exception:  # noqa: BLE001 - tx cannot take the combined tree
        pass
    for name, unit in (("embed", embed), ("layers", layer_slice), ("head", head)):
        try:
            _check_leafwise(tx, unit, f"params['{name}']")
        except ValueError as e:
            if "fused_train_step:" in str(e):
                raise
        except Exception:  # noqa: BLE001
            pass


_FAKE_PROBE = {
    "a": jax.ShapeDtypeStruct((4, 3), jnp.float32),
    "b": jax.ShapeDtypeStruct((5,), jnp.float32),
    "c": jax.ShapeDtypeStruct((2, 3, 4), jnp.float32),
}


# --------------------------------------------------------------------------
# Init
# --------------------------------------------------------------------------


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
        :func:`fused_train_step`).
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
      A :class:`FusedState`.
    """
    _check_tx(tx)
    _split_params(params)
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}.")
    if loss_scale is None and _has_fp16(params):
        loss_scale = _loss_scale.DEFAULT_INIT_SCALE
    ls = None if loss_scale is None else _loss_scale.init(float(loss_scale))
    return FusedState(
        embed=tx.init(params["embed"]),
        layers=per_layer(tx).init(params["layers"]),
        head=tx.init(params["head"]),
        loss_scale=ls,
        nonfinite_steps=jnp.zeros([], jnp.int32) if skip_nonfinite else None,
        rng=_check_rng(rng),
    )


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


# --------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------


def _sq_norm(tree, factor=None):
    total = jnp.zeros([], jnp.float32)
    for g in jax.tree_util.tree_leaves(tree):
        g = g.astype(jnp.float32)
        if factor is not None:
            g = g * factor
        total = total + jnp.sum(jnp.square(g))
    return total


def _all_finite(tree):
    """A bool scalar: every floating element of ``tree`` is finite."""
    ok = jnp.ones([], jnp.bool_)
    for x in jax.tree_util.tree_leaves(tree):
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(x))
    return ok


def _scale(tree, factor):
    """Gradients handed to tx: unchanged, or scaled in fp32 by ``factor``."""
    if factor is None:
        return tree
    return jax.tree.map(lambda g: g.astype(jnp.float32) * factor, tree)


def _apply(tx, grads, state, params, key=None, keep=None, keep_state="select"):
    """One ``tx.update`` + ``apply_updates`` on one unit (embed, head or one
    layer); with a ``key``, bf16/fp16 leaves are rounded stochastically
    (:func:`lomo_jax.rounding.apply_updates`). New state leaves are cast back
    to the dtypes they had, so the state keeps its type across steps (and can
    be written into the stack).

    ``keep`` (a bool scalar, or None): where False the result is ``params`` and
    ``state`` bit for bit (a skipped step). The parameters get the update
    ``-0.0`` instead of theirs (``p + (-0.0)`` is ``p`` for every ``p``, also
    rounded stochastically), which XLA fuses into the update: a select would
    hold the old parameters next to the new (a layer's worth on XLA:GPU). The
    state, by ``keep_state``: ``"select"``; ``"cond"``, chosen by a
    ``lax.cond`` (the head's: XLA:CPU does not fuse that select into the
    update and holds the new state next to the old); ``"caller"``, returned
    as is, for the caller to write only where ``keep`` (the layer scan,
    :func:`_write_if`). Each measured, ``tests/jax/test_fused_memory.py``.
    """
    updates, new_state = tx.update(grads, state, params)
    if keep is not None:
        updates = jax.tree.map(
            lambda u: jnp.where(keep, u, jnp.asarray(-0.0, jnp.result_type(u))), updates)
    new_params = apply_updates(params, updates, rng=key)
    new_params = jax.tree.map(lambda n, o: n.astype(jnp.result_type(o)), new_params, params)
    new_state = jax.tree.map(
        lambda n, o: jnp.asarray(n).astype(jnp.result_type(o)), new_state, state
    )
    if keep is None or keep_state == "caller":
        return new_params, new_state
    if keep_state == "cond":
        return new_params, lax.cond(keep, lambda: new_state, lambda: state)
    return new_params, _keep_if_not(keep, new_state, state)


def _to_micro(tree, m: int):
    """``[B, ...] -> [B/M, M, ...]`` (a reshape, no copy): micro-batch ``k`` is
    ``[:, k]``, rows ``k, k+M, k+2M, ...`` (strided, so a batch split over
    devices splits every micro-batch alike). A scalar goes to every
    micro-batch: ``[M]``."""

    def split(x):
        x = jnp.asarray(x)
        if x.ndim == 0:
            return jnp.broadcast_to(x, (m,))
        return x.reshape((x.shape[0] // m, m) + x.shape[1:])

    return jax.tree.map(split, tree)


def _from_micro(tree):
    """The inverse of :func:`_to_micro` (a scalar comes back from micro-batch 0)."""
    return jax.tree.map(lambda x: x[0] if x.ndim == 1 else x.reshape((-1,) + x.shape[2:]), tree)


def _micro_axis(x) -> int:
    return 0 if jnp.ndim(x) == 1 else 1


def _pick(tree, k):
    """Micro-batch ``k`` of a tree in :func:`_to_micro` layout."""
    return _index(tree, k, _micro_axis)


def _put(tree, value, k):
    """``tree`` with micro-batch ``k`` replaced by ``value`` (in place)."""
    return _write(tree, value, k, _micro_axis)


def _check_microbatches(batch, m: int) -> None:
    for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = jnp.shape(x)
        if shape and shape[0] % m:
            raise ValueError(
                f"fused_train_step(..., microbatches={m}): {_path('batch', path)} has "
                f"{shape[0]} rows on its leading (batch) axis (shape {list(shape)}), which "
                f"{m} equal micro-batches cannot split; make it a multiple of {m}. (Every "
                "batch leaf with a leading axis is split along it; scalars go to every "
                "micro-batch.)")


def _index(tree, i, axis=lambda x: 0):
    """Entry ``i`` along each leaf's ``axis(leaf)`` (default: the layer axis)."""
    return jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, i, axis(x), keepdims=False), tree)


def _write(tree, value, i, axis=lambda x: 0):
    """``tree`` with entry ``i`` along ``axis(leaf)`` replaced by ``value`` (in place)."""
    return jax.tree.map(
        lambda x, v: lax.dynamic_update_index_in_dim(x, v.astype(x.dtype), i, axis(x)),
        tree,
        value,
    )


def _check_activation(model, layer_slice, h, batch, n_layers, key=None):
    """The first (abstract) trace of ``model.layer``, on layer 0's slice: it must
    map ``h`` to the same structure/shapes/dtypes; if it raises, the error is
    re-raised with the slice's shapes and the stacking hint (:func:`_layer_failed`)."""
    fn = lambda p, hh, i, k: model.call_layer(p, hh, batch, i, k)  # noqa: E731
    try:
        out = jax.eval_shape(fn, layer_slice, h, jnp.zeros([], jnp.int32), key)
    except Exception as e:  # noqa: BLE001 - re-raised, chained, with context
        raise _layer_failed(e, layer_slice, h, n_layers, batch) from e
    h_abs = _abstract(h)
    ok = jax.tree.structure(out) == jax.tree.structure(h_abs) and all(
        a.shape == b.shape and a.dtype == b.dtype
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(h_abs))
    )
    if not ok:
        fmt = lambda t: jax.tree.map(_describe, t)  # noqa: E731
        raise ValueError(
            "model.layer must return an activation with the same structure, "
            "shape and dtype as its input (it is carried through lax.scan); it "
            f"maps {fmt(h_abs)} to {fmt(out)}."
        )


def _layer_failed(e: Exception, layer_slice, h, n_layers: int, batch=None) -> Exception:
    """``e`` (raised inside the user's layer) with the slice's, ``h``'s and the
    batch's shapes and two hints (stacking, the batch's shapes): same type when
    it is a builtin exception (the nearest builtin base otherwise, e.g.
    ``TypeError`` for JAX's concretization errors)."""
    fmt = lambda t: jax.tree.map(_describe, _abstract(t))  # noqa: E731
    try:
        shown = fmt(batch)
    except Exception:  # noqa: BLE001 - a batch with non-array leaves
        shown = type(batch).__name__
    msg = (f"model.layer failed on one slice of params['layers'] (L = {n_layers}, slice "
           f"shapes: {fmt(layer_slice)}, h: {fmt(h)}, batch: {shown}): "
           f"{type(e).__name__}: {e}\n"
           f"{STACKED_HINT} (LayeredModel(..., num_layers=L) checks the layer axis.) "
           "If the slice is right, check the batch's shapes against what the layer "
           "expects (e.g. token ids [B, T] with a batch axis, not [T]).")
    base = next(c for c in type(e).__mro__ if c.__module__ == "builtins")
    try:
        return base(msg)
    except Exception:  # noqa: BLE001 - a builtin that takes other arguments
        return ValueError(msg)


def _check_loss(loss):
    if jnp.shape(loss) != () or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
        raise ValueError(
            "model.head must return a real scalar loss; it returned "
            f"{_describe(jax.ShapeDtypeStruct(jnp.shape(loss), jnp.result_type(loss)))}"
            ". Reduce it (e.g. .mean()) inside head."
        )


class _StepConfig(NamedTuple):
    """The step's static options (see :func:`fused_train_step`)."""

    tx: optax.GradientTransformation
    clip_grad_norm: Optional[float]
    skip_nonfinite: bool
    loss_scale_window: int
    min_loss_scale: float
    rounding: str
    microbatches: int


class _Stages:
    r"""The pieces of one traced step: forward, head, layer and embedding
    gradients, and the norm and update passes built from them.

    ``seed`` is the cotangent of the loss (the fp16 loss scale, or 1).
    ``layer_key``: the step key the layers' keys are folded from (``None`` when
    the layer takes no key). ``layer_fn`` is ``model.call_layer``, possibly
    under ``jax.checkpoint``, for the backward scans' recompute.
    """

    def __init__(self, model: LayeredModel, layer_fn, tx, batch, n_layers: int,
                 microbatches: int = 1, layer_key=None, placement=None,
                 offload: bool = False):
        self.model, self.layer_fn, self.tx = model, layer_fn, tx
        self.offload = offload  # the saved layer inputs live in pinned host memory
        self.placement = placement  # _placement.LayerPlacement on a mesh, else None
        self.batch, self.n_layers = batch, n_layers
        self.idx = jnp.arange(n_layers, dtype=jnp.int32)
        self.m = microbatches
        self.layer_key = layer_key
        # the forward scan needs the layer index only if the layer uses it
        self.numbered = model.takes_index or model.takes_key
        # the layers' view of the batch: [B/M, M, ...], micro-batch k = rows k, k+M, ...
        self.micro = _to_micro(batch, microbatches) if microbatches > 1 else None

    def to_layers(self, h):
        """An activation of the whole batch in the layout the layer scan uses."""
        return h if self.m == 1 else _to_micro(h, self.m)

    def from_layers(self, h):
        return h if self.m == 1 else _from_micro(h)

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

    def unit_grads(self, g, unit: str):
        """The embedding's or head's gradient constrained to that unit's stored
        sharding (built in this device's shard on a mesh)."""
        place = self.placement
        return _placement.constrain(g, None if place is None else getattr(place, unit))

    def split_grads(self, g):
        """A layer's gradient constrained to the layer's stored sharding (so it is
        reduce-scattered and ``tx`` runs on this device's shard)."""
        return _placement.constrain(g, None if self.placement is None else self.placement.split)

    # ---- forward ---------------------------------------------------------

    def forward(self, p: Units):
        """``h_L`` (whole batch) and the stacked layer inputs ``h_0..h_{L-1}``
        (in the layers' layout; nothing else is kept)."""
        h0 = self.to_layers(self.model.embed(p.embed, self.batch))
        zero, slice0 = jnp.zeros([], jnp.int32), _index(p.layers, 0)
        first = (h0, self.batch) if self.m == 1 else (_pick(h0, 0), _pick(self.micro, 0))
        _check_activation(self.model, slice0, *first, self.n_layers, self.key(zero, zero))

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
            return _put(h, self.call(p_i, _pick(h, k), _pick(self.micro, k), i, k), k), None

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
        _check_loss(loss)
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
            batch_k = _pick(self.micro, k)
            _, vjp = jax.vjp(lambda pp, hh: self.call(pp, hh, batch_k, i, k, self.layer_fn, False),
                             p_full, _pick(h_i, k))
            g_k, dh_prev = vjp(_pick(dh, k))
            acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, self.split_grads(g_k))
            return (acc, _put(dh, dh_prev, k)), None

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

    # ---- pass 1: the global norm, nothing updated ------------------------

    def norm_pass(self, p: Units, h_last, hs, seed, inv_scale):
        """``||g||^2`` over all parameters, gradients unscaled by ``inv_scale``."""
        _, g_head, dh = self.head_grads(p, h_last, seed)
        sq = _sq_norm(g_head, inv_scale)

        def body(carry, xs):
            dh, sq = carry
            h_i, i = xs
            g_i, dh_prev = self.layer_grads(_index(p.layers, i), self.from_saved(h_i), dh, i)
            return (dh_prev, sq + _sq_norm(g_i, inv_scale)), None

        dh = self.cotangent_to_layers(dh)
        (dh0, sq), _ = lax.scan(body, (dh, sq), (hs, self.idx), reverse=True)
        g_embed = self.embed_grads(p, h_last, self.cotangent_from_layers(dh0), seed)
        return sq + _sq_norm(g_embed, inv_scale)

    # ---- pass 2: update every unit ---------------------------------------

    def update_pass(self, p: Units, s: Units, h_last, hs, seed, factor, ok, guard: bool,
                    keys: Optional[Units] = None):
        """Head, then the layers in a reverse scan, then the embedding; each
        unit is updated as soon as its gradient exists and the gradient dies.

        ``factor`` scales every gradient (clip coefficient / loss scale) or is
        ``None``; ``ok`` (``None`` or a bool scalar) keeps the old values
        everywhere where False (:func:`_apply`'s ``keep``), so a skipped step
        leaves every bit unchanged. With
        ``guard`` the head's new values must be finite too (checked before
        anything else is written). ``keys``: the stochastic-rounding keys of
        the three units (layer ``i`` folds ``i`` into its unit's key), or
        ``None`` for round-to-nearest. Returns ``(params, state, loss, ok)``.
        """
        keys = keys or Units(None, None, None)
        loss, g_head, dh_last = self.head_grads(p, h_last, seed)
        if guard:  # ok needs the head's new values: they are selected
            head_new = _apply(self.tx, _scale(g_head, factor), s.head, p.head, keys.head)
            ok = ok & jnp.isfinite(loss) & _all_finite(head_new)
            ph, sh = _keep_if_not(ok, head_new, (p.head, s.head))
        else:
            ph, sh = _apply(self.tx, _scale(g_head, factor), s.head, p.head, keys.head, ok,
                            keep_state="cond")
        # Everything after this point waits for the head's update (so its
        # gradient dies before the layer scan), and layer L-1's slice is read
        # only now (not hoisted to the start of the step).
        ph, sh, dh_last, pl, sl = lax.optimization_barrier((ph, sh, dh_last, p.layers, s.layers))
        pl, sl, dh0 = self._update_layers(pl, sl, hs, self.cotangent_to_layers(dh_last), factor,
                                          ok, keys.layers)
        g_embed = self.embed_grads(p, h_last, self.cotangent_from_layers(dh0), seed)  # old head
        pe, se = _apply(self.tx, _scale(g_embed, factor), s.embed, p.embed, keys.embed, ok)
        return Units(pe, pl, ph), Units(se, sl, sh), loss, ok

    def _update_layers(self, pl, sl, hs, dh_last, factor, ok, key=None):
        """The reverse scan ``i = L-1..0``: gradient of layer ``i``, ``tx`` on it,
        its new slice carried and written at the start of the next iteration
        (before any read of the stack, so XLA writes in place; see the module
        docstring)."""

        def body(carry, xs):
            pl, sl, pend_p, pend_s, pend_i, dh = carry
            h_i, i = xs
            pl, sl = _write(pl, pend_p, pend_i), _write_if(ok, sl, pend_s, pend_i)
            p_i, s_i = _index(pl, i), _index(sl, i)
            g_i, dh_prev = self.layer_grads(p_i, self.from_saved(h_i), dh, i)
            key_i = None if key is None else jax.random.fold_in(key, i)
            p_new, s_new = _apply(self.tx, _scale(g_i, factor), s_i, p_i, key_i, ok,
                                  keep_state="caller")
            return (pl, sl, p_new, s_new, i, dh_prev), None

        last = jnp.asarray(self.n_layers - 1, self.idx.dtype)
        init = (pl, sl, _index(pl, last), _index(sl, last), last, dh_last)
        (pl, sl, pend_p, pend_s, pend_i, dh0), _ = lax.scan(
            body, init, (hs, self.idx), reverse=True
        )
        return _write(pl, pend_p, pend_i), _write_if(ok, sl, pend_s, pend_i), dh0


def _write_if(ok, tree, value, i):
    """:func:`_write` where ``ok`` (a bool scalar; ``None``: always), else ``tree``
    unchanged: a scatter to row ``i``, or to row ``L`` (out of range, dropped).
    For a skipped step's layer state: XLA:GPU holds a select's old operand
    (about 2 MiB more for AdaLomo at 2048 wide), XLA:CPU a select at the write
    (a layer's AdamW state); this costs neither (``tests/jax/test_fused_memory.py``)."""
    if ok is None:
        return _write(tree, value, i)

    def leaf(x, v):
        row = jnp.where(ok, i, x.shape[0])
        return x.at[row].set(v.astype(x.dtype), mode="drop")

    return jax.tree.map(leaf, tree, value)


def _keep_if_not(ok, new, old):
    """``new`` where ``ok`` (a bool scalar), else ``old`` bit for bit; ``new`` if ``ok`` is None."""
    if ok is None:
        return new
    return jax.tree.map(lambda n, o: lax.select(ok, n, o), new, old)


def _step_keys(rounding: str, rng, key, takes_key: bool):
    r"""``(new rng, rounding keys, layers' step key)`` for one step.

    ``opt_state.rng`` is split when something draws from it:
    :math:`(r', k) = \mathrm{split}(r)`; stochastic rounding of unit ``u``
    (embed, layers, head) uses :math:`\mathrm{fold\_in}(k, u)`, ``u = 0, 1, 2``;
    a layer taking ``key`` without ``key=`` given uses :math:`\mathrm{fold\_in}(k, 3)`
    as its step key (so the rounding streams are those of a keyless layer).
    A given ``key`` is the layers' step key itself. ``None`` for what is unused.
    """
    draw = takes_key and key is None
    if rounding != "stochastic" and not draw:
        return None, None, key
    rng, step_key = jax.random.split(rng)
    keys = None
    if rounding == "stochastic":
        keys = Units(*(jax.random.fold_in(step_key, u) for u in range(3)))
    return rng, keys, jax.random.fold_in(step_key, 3) if draw else key


def _train_step(stages: _Stages, config: _StepConfig, p: Units, s: Units, opt_state,
                draws=None):
    """Forward, the norm pass when needed, the update pass:
    ``(p, s, metrics, flags, rng)`` (:class:`_Flags`; ``rng``: the advanced key,
    or ``None``). ``draws``: :func:`_step_keys`' result if already drawn (for a
    key-taking layer), else drawn here for rounding."""
    valid, metrics = _input_checks(stages.model, config.tx, stages.batch, s)
    scaling = opt_state.loss_scale is not None
    scale = opt_state.loss_scale.scale if scaling else None
    seed = scale if scaling else jnp.ones([], jnp.float32)
    two_pass = scaling or config.skip_nonfinite or config.clip_grad_norm is not None
    h_last, hs = stages.forward(p)
    factor = ok = finite = None
    if two_pass:
        inv = None if scale is None else 1.0 / scale
        sq = stages.norm_pass(p, h_last, hs, seed, inv)
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
    rng, keys, _ = draws or _step_keys(config.rounding, opt_state.rng, None, False)
    p, s, loss, ok = stages.update_pass(
        p, s, h_last, hs, seed, factor, ok, guard=config.skip_nonfinite, keys=keys
    )
    metrics["loss"] = loss.astype(jnp.float32)
    return p, s, metrics, _Flags(ok, finite, valid), rng


class _Flags(NamedTuple):
    """A step's bool scalars (``None`` where not computed): ``ok``, it was
    applied; ``finite``, its gradient norm was finite; ``valid``, its input
    passed :func:`_input_checks` (a refused step also keeps the loss scale,
    the skip counter and the key)."""

    ok: Optional[jax.Array]
    finite: Optional[jax.Array]
    valid: Optional[jax.Array]


def _input_checks(model: LayeredModel, tx, batch, s: Units):
    """``(valid, metrics)``: a bool scalar, the batch's indices are inside
    ``model.index_ranges`` and the learning rate every unit's update will use
    is finite and >= 0 (``None`` when neither is checkable); the metrics hold
    ``refused`` and the values :class:`lomo_jax._loss_scale.StepWatch` reports.
    Reductions to a few scalars: the ids' min/max, one rate per layer."""
    metrics, checks = {}, []
    extremes = _ids.index_extremes(batch, model.index_ranges)
    if extremes:
        metrics["index_extremes"] = extremes
        checks.append(_ids.extremes_ok(extremes, model.index_ranges))
    rates = _learning_rates(tx, s)
    if rates is not None:
        metrics["learning_rate_step"], metrics["learning_rate"], lr_ok = rates
        checks.append(lr_ok)
    if not checks:
        return None, metrics
    valid = checks[0] if len(checks) == 1 else checks[0] & checks[1]
    metrics["refused"] = jnp.logical_not(valid)
    return valid, metrics


def _learning_rates(tx, s: Units):
    """``(step, rate, ok)`` from ``tx.update.learning_rate_at(state) -> (step,
    rate)`` (``lomo``/``adalomo`` with a schedule, :mod:`lomo_jax.transforms`),
    evaluated on the state each unit's update reads (every layer's too): ``ok``,
    all are finite and >= 0; ``step``/``rate``, the first bad one (else the
    embedding's). ``None`` for a ``tx`` without it."""
    at = getattr(tx.update, "learning_rate_at", None)
    if at is None:
        return None
    parts = [at(s.embed), jax.vmap(at)(s.layers), at(s.head)]
    steps = jnp.concatenate([jnp.reshape(t, (-1,)).astype(jnp.int32) for t, _ in parts])
    rates = jnp.concatenate([jnp.reshape(r, (-1,)).astype(jnp.float32) for _, r in parts])
    bad = jnp.logical_not(jnp.isfinite(rates) & (rates >= 0))
    first = jnp.argmax(bad)
    return steps[first], rates[first], jnp.logical_not(jnp.any(bad))


def _pack(p: Units, s: Units, opt_state, metrics, flags: _Flags, rng, config: _StepConfig):
    """New params dict, new :class:`FusedState` (loss scale, skip counter) and metrics."""
    ok, valid = flags.ok, flags.valid
    new_ls = None
    if opt_state.loss_scale is not None:
        new_ls = _loss_scale.update(
            opt_state.loss_scale, flags.finite, config.loss_scale_window, config.min_loss_scale
        )
        new_ls = _keep_if_not(valid, new_ls, opt_state.loss_scale)
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
        rng = _keep_if_not(valid, rng, opt_state.rng)
    new_params = {"embed": p.embed, "layers": p.layers, "head": p.head}
    new_state = FusedState(
        embed=s.embed, layers=PerLayerState(inner_state=s.layers), head=s.head,
        loss_scale=new_ls, nonfinite_steps=count,
        rng=opt_state.rng if rng is None else rng,
    )
    return new_params, new_state, metrics


def _check_state(opt_state, params, skip_nonfinite: bool, rounding: str) -> None:
    if not isinstance(opt_state, FusedState):
        raise TypeError(
            "opt_state must be the FusedState made by lomo_jax.fused_init(tx, params), "
            f"got {type(opt_state).__name__}."
        )
    if _has_fp16(params) and opt_state.loss_scale is None:
        raise ValueError(
            "params contain float16 leaves but opt_state has no loss scale; "
            "create it with lomo_jax.fused_init(tx, params) on these params."
        )
    if skip_nonfinite and opt_state.nonfinite_steps is None:
        raise ValueError(
            "fused_train_step(..., skip_nonfinite=True) counts skipped steps in "
            "opt_state.nonfinite_steps, which this opt_state lacks; create it with "
            "lomo_jax.fused_init(tx, params, skip_nonfinite=True)."
        )
    if rounding == "stochastic" and opt_state.rng is None:
        raise ValueError(
            "fused_train_step(..., rounding='stochastic') draws its random bits from "
            "opt_state.rng, which this opt_state lacks; create it with "
            "lomo_jax.fused_init(tx, params, rng=jax.random.key(seed))."
        )


def _check_state_fits(tx, opt_state: FusedState, p: Units) -> None:
    """At trace time: the embed/layers/head parts of ``opt_state`` have the
    structure, shapes and dtypes that ``fused_init(tx, params)`` makes for these
    params (``jax.eval_shape``, nothing computed); else a ``ValueError`` naming
    the first leaf that differs."""
    want = jax.eval_shape(lambda e, l, h: (tx.init(e), per_layer(tx).init(l), tx.init(h)),
                          *(_abstract(u) for u in p))
    got = (opt_state.embed, opt_state.layers, opt_state.head)
    for name, g, w in zip(("embed", "layers", "head"), got, want):
        diff = _first_difference(f"opt_state.{name}", g, w)
        if diff:
            raise ValueError(
                f"{diff}. opt_state was made for other params: rebuild it with "
                "fused_init(tx, params) (with the same tx and the params passed to the step).")


def _first_difference(prefix: str, got, want) -> Optional[str]:
    """The first leaf where ``got`` and ``want`` (pytrees of arrays/structs)
    differ in path, shape or dtype, as a sentence; ``None`` if they agree."""
    g = jax.tree_util.tree_flatten_with_path(_abstract(got))[0]
    w = jax.tree_util.tree_flatten_with_path(want)[0]
    for (gp, gx), (wp, wx) in zip(g, w):
        gname, wname = _path(prefix, gp), _path(prefix, wp)
        if gname != wname:
            return f"{gname} is where {wname} ({_describe(wx)}) was expected"
        if gx.shape != wx.shape or gx.dtype != wx.dtype:
            return f"{gname} is {_describe(gx)}, expected {_describe(wx)}"
    if len(g) != len(w):
        extra, whose = (g, "has") if len(g) > len(w) else (w, "lacks")
        return f"{prefix} {whose} the leaf {_path(prefix, extra[min(len(g), len(w))][0])}"
    got_def, want_def = jax.tree.structure(got), jax.tree.structure(want)
    if got_def != want_def:
        return f"{prefix} has the structure {got_def}, expected {want_def}"
    return None


_ARG_NAMES = ("params", "opt_state", "batch")


def _deleted_leaves(tree) -> bool:
    for x in jax.tree_util.tree_leaves(tree):
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            if x.is_deleted():
                return True
    return False


def _deleted_arg_error(name: str, tree, where: str = "fused step") -> Exception:
    """The error for donated (deleted) arrays in argument ``name``, naming up to
    three leaves, e.g. ``params['layers']['w1'] has been deleted``."""
    paths = [
        _path(name, path)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_deleted()
    ]
    shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    shown += " has been deleted" if len(paths) == 1 else " have been deleted"
    if where != "fused step":
        return RuntimeError(
            f"{where}: {shown}: these params were donated to a fused step (their "
            "buffers now hold its outputs). Use the params the step returned "
            "(params, opt_state, metrics = step(params, opt_state, batch)), or copy "
            "them before the step, e.g. old = jax.tree.map(jnp.copy, params).")
    if name in ("params", "opt_state"):
        return RuntimeError(
            f"fused step: {shown}: params/opt_state were donated to "
            "the previous step (their buffers now hold its outputs), so the arrays "
            "passed to it cannot be used again. Use the returned values "
            "(params, opt_state, metrics = step(params, opt_state, batch)); to keep "
            "an old copy (evaluation, checkpointing), copy it before the step, e.g. "
            "jax.tree.map(jnp.copy, params)."
        )
    return RuntimeError(
        f"fused step: {shown} (donated to another jitted function "
        "or .delete()d); pass live arrays in batch."
    )


def _check_donated_once(named) -> None:
    """Refuse an array that is passed twice when one of its uses is donated
    (``params``/``opt_state``): XLA would fail naming a flattened argument."""
    seen = {}
    for name, tree in named:
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
                continue
            here = (name, _path(name, path))
            first = seen.setdefault(id(x), here)
            if first != here and not first[0] == name == "batch":  # batch is not donated
                raise ValueError(
                    f"fused step: {here[1]} is the same array as {first[1]}, and params and "
                    "opt_state are donated to the step (their buffers are reused for its "
                    "outputs), so no buffer of theirs can be passed twice. Pass a copy for "
                    "one of them (jnp.copy(x)), or keep one leaf and share it inside the "
                    "model (e.g. LayeredModel(..., tied=True) for a tied embedding).")


class _DonatingStep:
    """The jitted fused step; ``__call__`` first checks for donated arrays, for
    an array passed twice where one use is donated, and for an earlier step
    that cannot be skipped again (an fp16 overflow at the minimum loss scale,
    a refused input: :class:`lomo_jax._loss_scale.StepWatch`, which never waits).

    JAX's own errors for a deleted (donated) input ("Array has been deleted")
    and for a buffer donated twice (a flattened argument index) name no leaf;
    these name the leaves and the fix. Everything else (``lower``, ``trace``,
    ``eval_shape``, ...) is the wrapped ``jax.jit`` function's.
    """

    def __init__(self, jitted, watch: _loss_scale.StepWatch, keyed=None):
        self._jitted = jitted
        self._watch = watch
        self._keyed = keyed  # sharded: jit refuses kwargs with in_shardings
        self.__wrapped__ = jitted
        self.__doc__ = getattr(jitted, "__doc__", None)

    def __call__(self, *args, **kwargs):
        named = list(zip(_ARG_NAMES, args)) + [
            (k, v) for k, v in kwargs.items() if k in _ARG_NAMES
        ]
        for name, tree in named:
            if _deleted_leaves(tree):
                raise _deleted_arg_error(name, tree)
        _check_donated_once(named)
        self._watch.check()
        fn = self._jitted
        if self._keyed is not None:  # key=k (or a 4th argument) positionally
            key = kwargs.pop("key", args[3] if len(args) > 3 else None)
            if key is not None:
                fn, args = self._keyed, args[:3] + (key,)
            args = args[:4]
        out = fn(*args, **kwargs)
        self._watch.see(out[2])
        return out

    def __getattr__(self, name):
        if name == "_jitted":  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self._jitted, name)

    def __repr__(self):
        return f"fused_train_step({self._jitted!r})"


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

    Per step (see the module docstring for the full derivation)::

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
        ``optax.sgd``, ``optax.adamw``, ``optax.adafactor``, chains of such).
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
    ``model.layer`` that takes ``key`` (dropout): layer ``i`` gets
    ``jax.random.fold_in(key, i)``, micro-batch ``m`` of it
    ``jax.random.fold_in(jax.random.fold_in(key, i), m)``, the same in the
    forward and in every backward recompute. Without ``key=`` it is drawn from
    ``opt_state.rng`` (``fused_init(..., rng=jax.random.key(seed))``), which
    then advances every step: ``fold_in(split(rng)[1], 3)`` (rounding uses 0, 1,
    2 of the same split). A layer taking ``key`` with neither, or ``key=`` for a
    layer that takes none, is an error when the step is traced. So
    ``step(params, opt_state, batch, key=k)`` equals
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
    _check_tx(tx)
    if clip_grad_norm is not None and not clip_grad_norm > 0:
        raise ValueError(f"clip_grad_norm must be positive or None, got {clip_grad_norm!r}.")
    if int(loss_scale_window) < 1:
        raise ValueError(f"loss_scale_window must be >= 1, got {loss_scale_window!r}.")
    if not min_loss_scale > 0:
        raise ValueError(f"min_loss_scale must be positive, got {min_loss_scale!r}.")
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}.")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}.")
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches must be a positive int, got {microbatches!r}.")
    if not isinstance(offload_saved_inputs, bool):
        raise TypeError(f"offload_saved_inputs must be a bool, got {offload_saved_inputs!r}.")
    if offload_saved_inputs and not hasattr(getattr(jax, "memory", None), "Space"):
        raise RuntimeError("offload_saved_inputs=True needs jax.memory.Space (memory spaces "
                           f"inside jit), which jax {jax.__version__} lacks: upgrade jax.")
    try:
        probe_ok = True
        jax.eval_shape(tx.init, _FAKE_PROBE)
    except Exception:  # tx cannot take this tree; checked on the real one later
        probe_ok = False
    if probe_ok:
        _check_leafwise(tx, _FAKE_PROBE, prefix=None)

    layer_fn = model.call_layer
    if remat_policy is not None:
        layer_fn = jax.checkpoint(layer_fn, policy=remat_policy)
    config = _StepConfig(
        tx=tx, clip_grad_norm=clip_grad_norm, skip_nonfinite=skip_nonfinite,
        loss_scale_window=int(loss_scale_window), min_loss_scale=min_loss_scale,
        rounding=rounding, microbatches=microbatches,
    )

    def step(params, opt_state, batch, key=None):
        n_layers, p = model.split(params)
        _check_state(opt_state, params, skip_nonfinite, rounding)
        _check_state_fits(tx, opt_state, p)
        _check_step_key(model, key, opt_state)
        _check_leafwise_on(tx, _abstract(p.embed), _abstract(_index(p.layers, 0)),
                           _abstract(p.head))
        if microbatches > 1:
            _check_microbatches(batch, microbatches)
        # a key-taking layer needs its key before the forward; else (rounding
        # only) the split stays after the norm pass, where it always was
        draws = _step_keys(rounding, opt_state.rng, key, True) if model.takes_key else None
        stages = _Stages(model, layer_fn, tx, batch, n_layers, microbatches,
                         None if draws is None else draws[2], _layer_placement(shardings, p),
                         offload_saved_inputs)
        s = Units(opt_state.embed, opt_state.layers.inner_state, opt_state.head)
        p, s, metrics, flags, rng = _train_step(stages, config, p, s, opt_state, draws)
        return _pack(p, s, opt_state, metrics, flags, rng, config)

    watch = _loss_scale.StepWatch(min_loss_scale, model.index_ranges)
    return _jit_step(step, shardings, watch)


def _layer_placement(shardings, p: Units):
    """FSDP placement of the layers' work from the step's ``shardings`` (see
    :class:`lomo_jax.sharding.LayerPlacement`), or None without them."""
    if shardings is None:
        return None
    p_sh, _, b_sh = shardings
    return _placement.layer_placement(p_sh, b_sh, p._asdict())


def _check_step_key(model: LayeredModel, key, opt_state) -> None:
    """A key for a layer that takes none, or no key anywhere for one that does, is an error."""
    if key is None and opt_state.rng is not None:
        return  # drawn from opt_state.rng if the layer needs one
    model.check_key(
        key, "the fused step",
        "pass step(params, opt_state, batch, key=k) with a new key every step (e.g. "
        "jax.random.fold_in(base_key, step_number)), or create the state with "
        "lomo_jax.fused_init(tx, params, rng=jax.random.key(seed)) so that every step "
        "draws one from opt_state.rng.")


def _jit_step(step, shardings, watch) -> _DonatingStep:
    """``jax.jit`` of ``step`` donating params and opt_state; with ``shardings``
    as in/out shardings (outputs alias their donated inputs), plus a second jit
    taking ``key`` positionally (jit refuses keyword arguments there)."""
    if shardings is None:
        return _DonatingStep(jax.jit(step, donate_argnums=(0, 1), keep_unused=True), watch)
    try:
        p_sh, s_sh, b_sh = shardings
    except (TypeError, ValueError):
        raise TypeError(
            "shardings must be a (params, opt_state, batch) triple of shardings, e.g. "
            f"lomo_jax.sharding.fused_shardings(tx, params, mesh); got {shardings!r}."
        ) from None
    jit = lambda in_sh: jax.jit(  # noqa: E731
        step, in_shardings=in_sh, out_shardings=(p_sh, s_sh, None),
        donate_argnums=(0, 1), keep_unused=True)
    return _DonatingStep(jit((p_sh, s_sh, b_sh)), watch, keyed=jit((p_sh, s_sh, b_sh, None)))
