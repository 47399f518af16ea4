"""Checks of ``opt_state`` (and the step's ``key``) against the params, at trace
time: a :class:`~lomo_jax.fused.state.FusedState` with the parts the options
need, and the structure, shapes and dtypes ``fused_init(tx, params)`` gives.

Example: an ``opt_state`` made for other params makes the step raise
``ValueError("opt_state.layers... is float32[2, 8], expected float32[3, 8]. ...")``.
"""

from __future__ import annotations

from typing import Optional

import jax

from lomo_jax._layout import Units, abstract as _abstract, describe as _describe
from lomo_jax._layout import path_str as _path
from lomo_jax.fused.model import LayeredModel
from lomo_jax.fused.state import FusedState, has_fp16
from lomo_jax._per_layer import per_layer
from lomo_jax.adaptive_clipping import AdaptiveClipState


def check_state(opt_state, params, skip_nonfinite: bool, rounding: str) -> None:
    if not isinstance(opt_state, FusedState):
        raise TypeError(
            "opt_state must be the FusedState made by lomo_jax.fused_init(tx, params), "
            f"got {type(opt_state).__name__}."
        )
    if has_fp16(params) and opt_state.loss_scale is None:
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


def check_one_clip(opt_state, clip_grad_norm: Optional[float]) -> None:
    """Global clipping (``clip_grad_norm``, two passes) and ``adaptive_clip`` in
    ``tx`` (one pass, per tensor) are two answers to one problem: refused together,
    as ``lomo_torch`` refuses ``Lomo(adaptive_clip=..., clip_grad_norm=...)``."""
    if clip_grad_norm is None:
        return
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, AdaptiveClipState))
    if any(isinstance(x, AdaptiveClipState) for x in nodes):
        raise ValueError(
            f"fused_train_step(..., clip_grad_norm={clip_grad_norm!r}) with "
            "lomo_jax.adaptive_clip in tx: adaptive_clip clips each tensor against its own "
            "norm history in one pass, clip_grad_norm clips the global norm with a second "
            "pass; choose one (clip_grad_norm=None, or drop adaptive_clip from tx).")


def check_state_fits(txs: Units, opt_state: FusedState, p: Units) -> None:
    """At trace time: the embed/layers/head parts of ``opt_state`` have the
    structure, shapes and dtypes that ``fused_init(tx, params)`` makes for these
    params (``jax.eval_shape``, nothing computed); else a ``ValueError`` naming
    the first leaf that differs. ``txs``: each unit's transform
    (:func:`lomo_jax.fused.unit_view.unit_transforms`)."""
    want = jax.eval_shape(lambda e, l, h: (txs.embed.init(e), per_layer(txs.layers).init(l),
                                           txs.head.init(h)),
                          *(_abstract(u) for u in p))
    got = (opt_state.embed, opt_state.layers, opt_state.head)
    for name, g, w in zip(("embed", "layers", "head"), got, want):
        diff = first_difference(f"opt_state.{name}", g, w)
        if diff:
            raise ValueError(
                f"{diff}. opt_state was made for other params: rebuild it with "
                "fused_init(tx, params) (with the same tx and the params passed to the step).")


def first_difference(prefix: str, got, want) -> Optional[str]:
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


def check_step_key(model: LayeredModel, key, opt_state) -> None:
    """A key for a layer that takes none, or no key anywhere for one that does, is an error."""
    if key is None and opt_state.rng is not None:
        return  # drawn from opt_state.rng if the layer needs one
    model.check_key(
        key, "the fused step",
        "pass step(params, opt_state, batch, key=k) with a new key every step (e.g. "
        "jax.random.fold_in(base_key, step_number)), or create the state with "
        "lomo_jax.fused_init(tx, params, rng=jax.random.key(seed)) so that every step "
        "draws one from opt_state.rng.")
