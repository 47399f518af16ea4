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
  (\theta_H, h_L)`; the head is updated at once;
* **layers**: a reverse ``lax.scan`` that, for :math:`i = L-1, \dots, 0`,
  recomputes layer :math:`i` and pulls :math:`\bar h_{i+1}` back through it
  (``jax.vjp``, optionally under ``jax.checkpoint(policy=remat_policy)``):
  :math:`(\bar\theta_i, \bar h_i) = \bar h_{i+1}^\top \partial F(\theta_i,
  h_i)`, then immediately
  :math:`u_i, s_i \leftarrow \mathrm{tx.update}(\bar\theta_i, s_i, \theta_i)`,
  :math:`\theta_i \leftarrow \theta_i + u_i`, written back into the stacked
  parameters and state *in place*; :math:`\bar\theta_i` dies here;
* **embedding**: :math:`\bar\theta_E = \bar h_0^\top \partial E`; with tied
  weights the head's cotangent for the embedding is added first and the
  embedding gets one update with the sum.

So at most one layer's gradient (plus the head's) is alive, and temporary
memory is inference's plus the ``L`` saved layer inputs plus about two layers'
parameters — independent of depth otherwise. The results are those of
``jax.value_and_grad`` on the whole model followed by ``tx`` on the
embedding and head and ``lomo_jax.per_layer(tx)`` on the layers.

**Global norm clipping** (``clip_grad_norm=c``) is LOMO's two passes: a first
backward computes :math:`\|g\|` without touching anything, the second updates
with :math:`g \cdot \min(1, c / (\|g\| + 10^{-6}))` (``lomo-optim``'s formula).
It cannot live inside ``tx``: a transform whose update for one leaf depends on
another leaf (``optax.clip_by_global_norm``, ``optax.apply_if_finite``,
``optax.MultiSteps``, ...) is refused when the step is built.

**fp16 parameters** get dynamic loss scaling (state in
:attr:`FusedState.loss_scale`): the loss cotangent is the scale :math:`S`,
gradients are unscaled in fp32; the first pass always runs, and a step whose
gradients overflow is skipped as a whole (``lax.cond``; every parameter and
state bit is unchanged) and halves :math:`S`; ``loss_scale_window`` clean steps
double it. For bf16/fp32, ``skip_nonfinite=True`` is the same skip without
the scale: a step whose loss or gradient norm (or the head's new values,
which is how a non-finite learning rate shows) is not finite is skipped as a
whole and counted in :attr:`FusedState.nonfinite_steps`.

**Donation.** The returned step donates ``params`` and ``opt_state``; passing
the same arrays again raises an error that names the deleted leaf and says to
use the returned values.

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

    def head(p, h, batch, embed_params=None):  # tied: logits with the embedding
        logits = h @ embed_params["tok"].T
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["labels"]).mean()

    model = lomo_jax.LayeredModel(embed, layer, head, tied=True)
    params = {"embed": {"tok": ...}, "layers": {"w1": [L, D, F], "w2": [L, F, D]},
              "head": {}}
    tx = lomo_jax.adalomo(1e-3)
    opt_state = lomo_jax.fused_init(tx, params)
    step = lomo_jax.fused_train_step(model, tx, clip_grad_norm=1.0)
    params, opt_state, metrics = step(params, opt_state, batch)   # donates both
    print(metrics["loss"], metrics["grad_norm"])
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from lomo_jax import _loss_scale
from lomo_jax._leafwise import cross_leaf_dependencies
from lomo_jax._loss_scale import LossScaleState
from lomo_jax.per_layer import PerLayerState, per_layer

__all__ = [
    "FusedState",
    "LayeredModel",
    "LossScaleState",
    "fused_init",
    "fused_train_step",
]

_KEYS = ("embed", "layers", "head")
_NORM_EPS = 1e-6  # lomo-optim: clip_coef = max_norm / (total_norm + 1e-6)


# --------------------------------------------------------------------------
# The model interface
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayeredModel:
    r"""A model as three pure functions over ``{"embed", "layers", "head"}``.

    * ``embed(params["embed"], batch) -> h``
    * ``layer(layer_params, h, batch) -> h`` where ``layer_params`` is one
      slice ``tree.map(lambda x: x[i], params["layers"])`` (every leaf of
      ``params["layers"]`` has a leading layer axis ``L``). It must return an
      activation with the same tree structure, shapes and dtypes as ``h``
      (``h`` may be any pytree of arrays).
    * ``head(params["head"], h, batch) -> loss`` (a real scalar; compute it in
      fp32 for fp16 models so the loss-scaled cotangent fits). With
      ``tied=True`` it is called as ``head(params["head"], h, batch,
      embed_params=params["embed"])`` and may reuse the embedding; the
      embedding then gets one update with the summed gradient.

    :meth:`loss` is the plain (unfused) composition, for inference/evaluation
    and as the reference the fused step is tested against.

    Example::

        model = lomo_jax.LayeredModel(embed, layer, head, tied=True)
        loss = model.loss(params, batch)
    """

    embed: Callable[..., Any]
    layer: Callable[..., Any]
    head: Callable[..., Any]
    tied: bool = False

    def __post_init__(self):
        for name in ("embed", "layer", "head"):
            if not callable(getattr(self, name)):
                raise TypeError(
                    f"LayeredModel.{name} must be a function, got "
                    f"{type(getattr(self, name)).__name__}."
                )
        if not isinstance(self.tied, bool):
            raise TypeError(f"LayeredModel.tied must be a bool, got {self.tied!r}.")

    def call_head(self, params, h, batch):
        """``head`` applied as the fused step applies it (passes the
        embedding when ``tied``)."""
        if self.tied:
            return self.head(params["head"], h, batch, embed_params=params["embed"])
        return self.head(params["head"], h, batch)

    def loss(self, params, batch, *, remat_policy=None, remat: bool = False):
        r"""The loss :math:`H(\theta_H, F_{L-1}(\dots F_0(E(\theta_E, x))))`.

        A ``lax.scan`` over the layers. With ``remat=True`` (or a
        ``remat_policy``) each layer is wrapped in ``jax.checkpoint`` so that
        ``jax.grad`` of it saves only the layer inputs (plus what the policy
        saves), which is the unfused counterpart of the fused step.
        """
        _split_params(params)
        layer = self.layer
        if remat or remat_policy is not None:
            layer = jax.checkpoint(layer, policy=remat_policy)

        def body(h, p):
            return layer(p, h, batch), None

        h = self.embed(params["embed"], batch)
        h, _ = lax.scan(body, h, params["layers"])
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
    """

    embed: Any
    layers: PerLayerState
    head: Any
    loss_scale: Optional[LossScaleState]
    nonfinite_steps: Optional[jax.Array] = None


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


def _path(prefix: str, path) -> str:
    return prefix + jax.tree_util.keystr(path)


def _describe(x) -> str:
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


def _split_params(params):
    """Check the parameter tree; return ``(L, embed, layers, head)``."""
    if not isinstance(params, Mapping) or set(params.keys()) != set(_KEYS):
        got = (
            sorted(map(str, params.keys()))
            if isinstance(params, Mapping)
            else type(params).__name__
        )
        raise ValueError(
            "params must be a dict with exactly the keys 'embed', 'layers' and "
            f"'head' (see lomo_jax.LayeredModel); got {got}."
        )
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dt = jnp.result_type(leaf)
        if not jnp.issubdtype(dt, jnp.floating):
            bad.append(f"{_path('params', path)} ({jnp.dtype(dt).name})")
    if bad:
        raise TypeError(
            "the fused step updates real floating-point parameters only; these "
            f"leaves are not: {', '.join(bad)}. Keep integer/complex arrays out "
            "of params (pass them in batch or close over them)."
        )
    sizes = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params["layers"])[0]:
        name = _path("params['layers']", path)
        if jnp.ndim(leaf) == 0:
            raise ValueError(
                f"{name} is a scalar; every leaf of params['layers'] needs a "
                "leading layer axis of size L."
            )
        sizes.append((name, jnp.shape(leaf)[0]))
    if not sizes:
        raise ValueError("params['layers'] has no arrays; there is nothing to scan over.")
    first_name, n_layers = sizes[0]
    for name, size in sizes[1:]:
        if size != n_layers:
            raise ValueError(
                "every leaf of params['layers'] needs the same leading layer axis: "
                f"{first_name} has {n_layers} but {name} has {size}."
            )
    if n_layers == 0:
        raise ValueError("params['layers'] has a layer axis of size 0.")
    return n_layers, params["embed"], params["layers"], params["head"]


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
        "gradient alive and defeats LOMO - use a larger batch instead."
    )


def _check_leafwise(tx, probe) -> None:
    """Refuse ``tx`` if its update of one leaf can depend on another leaf.

    A static data-flow analysis of ``tx.init``/``tx.update`` traced with
    ``jax.make_jaxpr`` on ``probe`` (see :mod:`lomo_jax._leafwise`), plus a
    check for ``optax.MultiStepsState`` (gradient accumulation) in the state.
    """
    state = jax.eval_shape(tx.init, probe)
    is_ms = lambda x: isinstance(x, optax.MultiStepsState)  # noqa: E731
    if any(is_ms(x) for x in jax.tree_util.tree_leaves(state, is_leaf=is_ms)):
        raise ValueError(_refusal("optax.MultiSteps accumulates whole-model gradients"))
    why = cross_leaf_dependencies(tx, probe)
    if why is not None:
        raise ValueError(
            _refusal(f"tx is not leaf-wise: {why} (e.g. optax.clip_by_global_norm)")
        )


def _check_leafwise_on(tx, embed, layer_slice, head) -> None:
    """The leaf-wise check on the real units tx is applied to (at trace time).

    Probes ``{"embed", "layer", "head"}`` together; if ``tx`` cannot take that
    combined tree (e.g. a ``multi_transform`` keyed to one unit's structure),
    each unit on its own; if it cannot take a unit, the real update will say so.
    """
    try:
        _check_leafwise(tx, {"embed": embed, "layer": layer_slice, "head": head})
        return
    except ValueError as e:
        if "fused_train_step:" in str(e):
            raise
    except Exception:  # noqa: BLE001 - tx cannot take the combined tree
        pass
    for unit in (embed, layer_slice, head):
        try:
            _check_leafwise(tx, unit)
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


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


# --------------------------------------------------------------------------
# Init
# --------------------------------------------------------------------------


def fused_init(
    tx: optax.GradientTransformation, params, *, loss_scale=None, skip_nonfinite: bool = False
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
    )


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


def _apply(tx, grads, state, params):
    """One ``tx.update`` + ``optax.apply_updates`` on one unit (embed, head or
    one layer). New state leaves are cast back to the dtypes they had, so the
    state keeps its type across steps (and can be written into the stack)."""
    updates, new_state = tx.update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    new_params = jax.tree.map(lambda n, o: n.astype(jnp.result_type(o)), new_params, params)
    new_state = jax.tree.map(
        lambda n, o: jnp.asarray(n).astype(jnp.result_type(o)), new_state, state
    )
    return new_params, new_state


def _index(tree, i):
    return jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, i, 0, keepdims=False), tree)


def _write(tree, value, i):
    return jax.tree.map(
        lambda x, v: lax.dynamic_update_index_in_dim(x, v.astype(x.dtype), i, 0),
        tree,
        value,
    )


def _check_activation(model, layer_slice, h, batch):
    out = jax.eval_shape(lambda p, hh: model.layer(p, hh, batch), layer_slice, h)
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


def _check_loss(loss):
    if jnp.shape(loss) != () or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
        raise ValueError(
            "model.head must return a real scalar loss; it returned "
            f"{_describe(jax.ShapeDtypeStruct(jnp.shape(loss), jnp.result_type(loss)))}"
            ". Reduce it (e.g. .mean()) inside head."
        )


_ARG_NAMES = ("params", "opt_state", "batch")


def _deleted_leaves(tree) -> bool:
    for x in jax.tree_util.tree_leaves(tree):
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            if x.is_deleted():
                return True
    return False


def _deleted_arg_error(name: str, tree) -> Exception:
    paths = [
        _path(name, path)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_deleted()
    ]
    shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    if name in ("params", "opt_state"):
        return RuntimeError(
            f"fused step: {shown} has been deleted: params/opt_state were donated to "
            "the previous step (their buffers now hold its outputs), so the arrays "
            "passed to it cannot be used again. Use the returned values "
            "(params, opt_state, metrics = step(params, opt_state, batch)); to keep "
            "an old copy (evaluation, checkpointing), copy it before the step, e.g. "
            "jax.tree.map(jnp.copy, params)."
        )
    return RuntimeError(
        f"fused step: {shown} has been deleted (donated to another jitted function "
        "or .delete()d); pass live arrays in batch."
    )


class _DonatingStep:
    """The jitted fused step; ``__call__`` first checks for donated arrays.

    JAX's own error for a deleted (donated) input is a generic "Array has been
    deleted"; this names the leaf and the fix. Everything else (``lower``,
    ``trace``, ``eval_shape``, ...) is the wrapped ``jax.jit`` function's.
    """

    def __init__(self, jitted):
        self._jitted = jitted
        self.__wrapped__ = jitted
        self.__doc__ = getattr(jitted, "__doc__", None)

    def __call__(self, *args, **kwargs):
        named = list(zip(_ARG_NAMES, args)) + [
            (k, v) for k, v in kwargs.items() if k in _ARG_NAMES
        ]
        for name, tree in named:
            if _deleted_leaves(tree):
                raise _deleted_arg_error(name, tree)
        return self._jitted(*args, **kwargs)

    def __getattr__(self, name):
        if name == "_jitted":  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self._jitted, name)

    def __repr__(self):
        return f"fused_train_step({self._jitted!r})"


def _checks_donated(build):
    """Wrap the jitted step that ``build`` returns in :class:`_DonatingStep`."""

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        return _DonatingStep(build(*args, **kwargs))

    return wrapper


@_checks_donated
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
):
    r"""Build the jitted fused LOMO step ``step(params, opt_state, batch)``.

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
      model: a :class:`LayeredModel`.
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
      min_loss_scale: the loss scale never goes below this.
      skip_nonfinite: the non-finite guard for any dtype (fp16 has it built
        in). The step is skipped as a whole - every parameter and state bit
        unchanged, as for an fp16 overflow - when the loss or the global
        gradient norm is not finite, or when the head's new parameters or
        state are not (checked before anything else is written: this is what
        catches a learning-rate schedule that returns NaN/inf, since every
        unit uses the same schedule value; a ``params["head"]`` without
        leaves gives no such check). It needs the two-pass norm (a second
        backward when not clipping anyway) and, while it runs, one extra
        copy of the head's parameters and state. ``opt_state`` must come
        from ``fused_init(tx, params, skip_nonfinite=True)``, which holds the
        cumulative counter. A skipped step does not advance ``tx``'s step
        count, so a schedule that is non-finite at some step skips every
        step from there on: watch ``metrics["nonfinite_steps"]``.
      shardings: ``None`` (default: ``jax.jit`` follows the inputs), or a
        ``(params, opt_state, batch)`` triple of shardings (pytree prefixes),
        e.g. :func:`lomo_jax.sharding.fused_shardings` for FSDP over a mesh.
        The step is then jitted with these as ``in_shardings`` and the same
        params/state shardings as ``out_shardings`` (metrics replicated), so
        every output keeps its donated input's sharding and is updated in
        place; inputs are resharded to them on the way in (e.g. a host batch
        is split over the data axes).

    Returns:
      ``step(params, opt_state, batch) -> (params, opt_state, metrics)``, a
      ``jax.jit`` function that donates ``params`` and ``opt_state`` (wrapped
      so that passing an already-donated array again raises an error naming
      it; ``.lower``/``.trace``/``.eval_shape`` are those of the jit
      function). ``metrics["loss"]`` is the fp32 loss before the update; with
      clipping, loss scaling or the guard also ``"grad_norm"`` (unclipped,
      unscaled); with loss scaling ``"loss_scale"`` (the scale used); with
      loss scaling or the guard ``"skipped"`` (bool); when ``opt_state`` has
      the counter, ``"nonfinite_steps"`` (its new value).
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
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}.")
    try:
        probe_ok = True
        jax.eval_shape(tx.init, _FAKE_PROBE)
    except Exception:  # tx cannot take this tree; checked on the real one later
        probe_ok = False
    if probe_ok:
        _check_leafwise(tx, _FAKE_PROBE)

    layer_fn = model.layer
    if remat_policy is not None:
        layer_fn = jax.checkpoint(layer_fn, policy=remat_policy)

    def step(params, opt_state, batch):
        n_layers, pe, pl, ph = _split_params(params)
        if not isinstance(opt_state, FusedState):
            raise TypeError(
                "opt_state must be the FusedState made by lomo_jax.fused_init(tx, params), "
                f"got {type(opt_state).__name__}."
            )
        scaling = opt_state.loss_scale is not None
        if _has_fp16(params) and not scaling:
            raise ValueError(
                "params contain float16 leaves but opt_state has no loss scale; "
                "create it with lomo_jax.fused_init(tx, params) on these params."
            )
        counting = opt_state.nonfinite_steps is not None
        if skip_nonfinite and not counting:
            raise ValueError(
                "fused_train_step(..., skip_nonfinite=True) counts skipped steps in "
                "opt_state.nonfinite_steps, which this opt_state lacks; create it with "
                "lomo_jax.fused_init(tx, params, skip_nonfinite=True)."
            )
        _check_leafwise_on(tx, _abstract(pe), _abstract(_index(pl, 0)), _abstract(ph))
        se, sl, sh = opt_state.embed, opt_state.layers.inner_state, opt_state.head
        two_pass = scaling or skip_nonfinite or clip_grad_norm is not None

        # ---- forward: keep each layer's input only -------------------------
        h0 = model.embed(pe, batch)
        _check_activation(model, _index(pl, 0), h0, batch)

        def fwd(h, p):
            return model.layer(p, h, batch), h

        h_last, hs = lax.scan(fwd, h0, pl)

        # ---- head ---------------------------------------------------------
        if model.tied:
            loss, head_vjp = jax.vjp(
                lambda p, h, e: model.head(p, h, batch, embed_params=e), ph, h_last, pe
            )
        else:
            loss, head_vjp = jax.vjp(lambda p, h: model.head(p, h, batch), ph, h_last)
        _check_loss(loss)
        scale = opt_state.loss_scale.scale if scaling else None
        seed = (scale if scaling else jnp.ones([], jnp.float32)).astype(loss.dtype)
        cts = head_vjp(seed)
        g_head, dh_last = cts[0], cts[1]
        g_embed_head = cts[2] if model.tied else None

        idx = jnp.arange(n_layers)

        def layer_vjp(p, h, dh):
            _, vjp = jax.vjp(lambda pp, hh: layer_fn(pp, hh, batch), p, h)
            return vjp(dh)

        def embed_grad(dh0):
            _, vjp = jax.vjp(lambda p: model.embed(p, batch), pe)
            (g,) = vjp(dh0)
            if model.tied:
                g = jax.tree.map(jnp.add, g, g_embed_head)
            return g

        metrics = {"loss": loss.astype(jnp.float32)}

        # ---- pass 1 (clipping / fp16): global norm, nothing updated --------
        factor = None
        finite = None
        if two_pass:
            inv = None if scale is None else 1.0 / scale

            def norm_body(carry, xs):
                dh, sq = carry
                h_i, i = xs
                g_i, dh_prev = layer_vjp(_index(pl, i), h_i, dh)
                return (dh_prev, sq + _sq_norm(g_i, inv)), None

            sq0 = _sq_norm(g_head, inv)
            (dh0, sq), _ = lax.scan(norm_body, (dh_last, sq0), (hs, idx), reverse=True)
            sq = sq + _sq_norm(embed_grad(dh0), inv)
            norm = jnp.sqrt(sq)
            metrics["grad_norm"] = norm
            factor = jnp.ones([], jnp.float32) if inv is None else inv
            if clip_grad_norm is not None:
                coef = jnp.minimum(1.0, clip_grad_norm / (norm + _NORM_EPS))
                factor = factor * coef
            finite = jnp.isfinite(sq)

        # ---- the update pass -----------------------------------------------
        def update_all(operands):
            pe, pl, ph, se, sl, sh = operands
            ph, sh = _apply(tx, _scale(g_head, factor), sh, ph)
            return update_rest((pe, pl, ph, se, sl, sh))

        def update_rest(operands):
            """Layers and embedding (the head is done)."""
            pe, pl, ph, se, sl, sh = operands

            def body(carry, xs):
                pl, sl, pend_p, pend_s, pend_i, dh = carry
                h_i, i = xs
                # Write back the previous layer's new slice first; every read
                # below is of the written stack, so XLA updates in place.
                pl = _write(pl, pend_p, pend_i)
                sl = _write(sl, pend_s, pend_i)
                p_i = _index(pl, i)
                g_i, dh_prev = layer_vjp(p_i, h_i, dh)
                p_new, s_new = _apply(tx, _scale(g_i, factor), _index(sl, i), p_i)
                return (pl, sl, p_new, s_new, i, dh_prev), None

            last = jnp.asarray(n_layers - 1, idx.dtype)
            init = (pl, sl, _index(pl, last), _index(sl, last), last, dh_last)
            (pl, sl, pend_p, pend_s, pend_i, dh0), _ = lax.scan(
                body, init, (hs, idx), reverse=True
            )
            pl = _write(pl, pend_p, pend_i)
            sl = _write(sl, pend_s, pend_i)
            pe, se = _apply(tx, _scale(embed_grad(dh0), factor), se, pe)
            return pe, pl, ph, se, sl, sh

        operands = (pe, pl, ph, se, sl, sh)
        skipped = None
        if skip_nonfinite:
            # The guard: loss, norm and the head's new values (which expose a
            # non-finite learning rate) are all known before anything is
            # written; the head's old values are kept for the skip branch.
            ph_new, sh_new = _apply(tx, _scale(g_head, factor), sh, ph)
            ok = finite & jnp.isfinite(loss) & _all_finite((ph_new, sh_new))

            def guarded_update(o):
                pe, pl, _, se, sl, _, ph_new, sh_new = o
                return update_rest((pe, pl, ph_new, se, sl, sh_new))

            pe, pl, ph, se, sl, sh = lax.cond(
                ok, guarded_update, lambda o: o[:6], operands + (ph_new, sh_new)
            )
            skipped = jnp.logical_not(ok)
        elif scaling:
            # Overflow is known before anything is touched: skip the whole pass.
            pe, pl, ph, se, sl, sh = lax.cond(finite, update_all, lambda o: o, operands)
            skipped = jnp.logical_not(finite)
        else:
            pe, pl, ph, se, sl, sh = update_all(operands)
        new_ls = None
        if scaling:
            new_ls = _loss_scale.update(
                opt_state.loss_scale, finite, int(loss_scale_window), min_loss_scale
            )
            metrics["loss_scale"] = scale
        if skipped is not None:
            metrics["skipped"] = skipped
        count = opt_state.nonfinite_steps
        if counting:
            if skipped is not None:
                count = count + skipped.astype(count.dtype)
            metrics["nonfinite_steps"] = count

        new_params = {"embed": pe, "layers": pl, "head": ph}
        new_state = FusedState(
            embed=se, layers=PerLayerState(inner_state=sl), head=sh, loss_scale=new_ls,
            nonfinite_steps=count,
        )
        return new_params, new_state, metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=(0, 1), keep_unused=True)
    try:
        p_sh, s_sh, b_sh = shardings
    except (TypeError, ValueError):
        raise TypeError(
            "shardings must be a (params, opt_state, batch) triple of shardings, e.g. "
            f"lomo_jax.sharding.fused_shardings(tx, params, mesh); got {shardings!r}."
        ) from None
    # out_shardings = in_shardings: outputs alias their donated inputs.
    return jax.jit(
        step,
        in_shardings=(p_sh, s_sh, b_sh),
        out_shardings=(p_sh, s_sh, None),
        donate_argnums=(0, 1),
        keep_unused=True,
    )
