"""Checks of :func:`~lomo_jax.fused.build.fused_train_step`'s arguments: its
options, and ``tx``, which must be an optax transform whose update of each leaf
depends on that leaf's gradient, state and value only (the data-flow analysis
is :mod:`lomo_jax._leafwise`'s), and no ``optax.MultiSteps``.

Example: ``check_leafwise(optax.chain(optax.clip_by_global_norm(1.0),
optax.sgd(0.1)), FAKE_PROBE)`` raises a ``ValueError`` that names the fix
(``fused_train_step(..., clip_grad_norm=1.0)``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from lomo_jax._leafwise import cross_leaf_dependencies


def check_tx(tx) -> None:
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(
            f"tx must be an optax GradientTransformation, got {type(tx).__name__}."
        )
    owner = getattr(tx.update, "__self__", None)
    if isinstance(tx, optax.MultiSteps) or isinstance(owner, optax.MultiSteps):
        raise ValueError(refusal("optax.MultiSteps accumulates whole-model gradients"))


def refusal(reason: str) -> str:
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


def check_leafwise(tx, probe, prefix: Optional[str] = "params") -> None:
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
        raise ValueError(refusal("optax.MultiSteps accumulates whole-model gradients"))
    why = cross_leaf_dependencies(tx, probe, prefix)
    if why is not None:
        where = " (found on a probe tree standing in for the parameters)" if prefix is None else ""
        raise ValueError(
            refusal(f"tx is not leaf-wise: {why}{where} (e.g. optax.clip_by_global_norm)")
        )


def check_leafwise_on(tx, embed, layer_slice, head) -> None:
    """The leaf-wise check on the real units tx is applied to (at trace time).

    Probes ``{"embed", "layers", "head"}`` (one layer's slice) together, its
    leaves named as the user's (``params['layers']['w1']``); if ``tx`` cannot
    take that combined tree (e.g. a ``multi_transform`` keyed to one unit's
    structure), each unit on its own; if it cannot take a unit, the real update
    will say so.
    """
    try:
        check_leafwise(tx, {"embed": embed, "layers": layer_slice, "head": head})
        return
    except ValueError as e:
        if "fused_train_step:" in str(e):
            raise
    except Exception:  # noqa: BLE001 - tx cannot take the combined tree
        pass
    for name, unit in (("embed", embed), ("layers", layer_slice), ("head", head)):
        try:
            check_leafwise(tx, unit, f"params['{name}']")
        except ValueError as e:
            if "fused_train_step:" in str(e):
                raise
        except Exception:  # noqa: BLE001
            pass


FAKE_PROBE = {
    "a": jax.ShapeDtypeStruct((4, 3), jnp.float32),
    "b": jax.ShapeDtypeStruct((5,), jnp.float32),
    "c": jax.ShapeDtypeStruct((2, 3, 4), jnp.float32),
}


def check_options(*, clip_grad_norm, loss_scale_window, min_loss_scale, skip_nonfinite,
                  rounding, microbatches, offload_saved_inputs) -> None:
    """The keyword options of :func:`~lomo_jax.fused.build.fused_train_step`:
    a clear error naming the first one that is wrong."""
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


def check_leafwise_on_probe(tx) -> None:
    """The leaf-wise check when the step is built, on :data:`FAKE_PROBE` (a
    ``tx`` that cannot take that tree is checked on the real one when the step
    is first traced, :func:`check_leafwise_on`)."""
    try:
        probe_ok = True
        jax.eval_shape(tx.init, FAKE_PROBE)
    except Exception:  # tx cannot take this tree; checked on the real one later
        probe_ok = False
    if probe_ok:
        check_leafwise(tx, FAKE_PROBE, prefix=None)
