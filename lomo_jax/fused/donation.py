"""The jitted step donates ``params`` and ``opt_state``: its wrapper names the
leaf of a donated (deleted) array passed again, refuses one array passed twice
where one use is donated, and raises for an earlier step that cannot be skipped
again (:class:`lomo_jax._loss_scale.StepWatch`, which never waits).

Example::

    params, opt_state, metrics = step(params, opt_state, batch)
    step(old_params, opt_state, batch)   # RuntimeError: params['layers']['w1'] has been deleted ...
"""

from __future__ import annotations

import jax

from lomo_jax import _loss_scale
from lomo_jax._layout import path_str as _path


ARG_NAMES = ("params", "opt_state", "batch")


def deleted_leaves(tree) -> bool:
    for x in jax.tree_util.tree_leaves(tree):
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            if x.is_deleted():
                return True
    return False


def deleted_arg_error(name: str, tree, where: str = "fused step") -> Exception:
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


def check_donated_once(named) -> None:
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


class DonatingStep:
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
        named = list(zip(ARG_NAMES, args)) + [
            (k, v) for k, v in kwargs.items() if k in ARG_NAMES
        ]
        for name, tree in named:
            if deleted_leaves(tree):
                raise deleted_arg_error(name, tree)
        check_donated_once(named)
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


def jit_step(step, shardings, watch) -> DonatingStep:
    """``jax.jit`` of ``step`` donating params and opt_state; with ``shardings``
    as in/out shardings (outputs alias their donated inputs), plus a second jit
    taking ``key`` positionally (jit refuses keyword arguments there)."""
    if shardings is None:
        return DonatingStep(jax.jit(step, donate_argnums=(0, 1), keep_unused=True), watch)
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
    return DonatingStep(jit((p_sh, s_sh, b_sh)), watch, keyed=jit((p_sh, s_sh, b_sh, None)))
