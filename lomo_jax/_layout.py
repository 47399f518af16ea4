"""The ``{"embed", "layers", "head"}`` parameter layout shared by the fused step
and its shardings: the three units as a NamedTuple, the layout check, and
abstract (shape-only) copies of trees."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

KEYS = ("embed", "layers", "head")


class Units(NamedTuple):
    """One value per unit the fused step updates: the embedding, the stacked
    layers (every leaf with a leading axis ``L``) and the head."""

    embed: Any
    layers: Any
    head: Any


def check_keys(params) -> None:
    """``params`` must be a mapping with exactly the keys :data:`KEYS`."""
    if not isinstance(params, Mapping) or set(params.keys()) != set(KEYS):
        got = (
            sorted(map(str, params.keys()))
            if isinstance(params, Mapping)
            else type(params).__name__
        )
        raise ValueError(
            "params must be a dict with exactly the keys 'embed', 'layers' and "
            f"'head' (see lomo_jax.LayeredModel); got {got}."
        )


def spec_entry(axes: tuple):
    """One ``PartitionSpec`` entry for mesh ``axes``: the name alone, or the tuple."""
    return axes[0] if len(axes) == 1 else axes


def spec_axes(entry) -> tuple:
    """The mesh axis names of one ``PartitionSpec`` entry (``None``: none)."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def path_str(prefix: str, path) -> str:
    return prefix + jax.tree_util.keystr(path)


def describe(x) -> str:
    """``"float32[4, 3]"``."""
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


def abstract(tree):
    """``jax.ShapeDtypeStruct`` of every leaf (arrays or structs)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def abstract_slice(tree):
    """``jax.ShapeDtypeStruct`` of one entry along every leaf's leading (layer) axis."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), tree)


def non_float_leaves(tree, prefix: str = "") -> list[str]:
    """``"path (dtype)"`` of every leaf of ``tree`` that is not a real float array."""
    return [
        f"{path_str(prefix, path)} ({jnp.dtype(jnp.result_type(leaf)).name})"
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
    ]


def split_params(params) -> tuple[int, Units]:
    """Check the parameter tree; return ``(L, Units(embed, layers, head))``."""
    check_keys(params)
    bad = non_float_leaves(params, "params")
    if bad:
        raise TypeError(
            "the fused step updates real floating-point parameters only; these "
            f"leaves are not: {', '.join(bad)}. Keep integer/complex arrays out "
            "of params (pass them in batch or close over them)."
        )
    sizes = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params["layers"])[0]:
        name = path_str("params['layers']", path)
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
    return n_layers, Units(params["embed"], params["layers"], params["head"])


STACKED_HINT = (
    "Are the blocks stacked with nnx.vmap (or jax.vmap of the init) so that every "
    "leaf of params['layers'] has a leading layer axis?"
)
_LAYERS = "params['layers']"


def check_stacked(layers, n_layers: int, num_layers=None) -> None:
    """Is the leading axis of ``params["layers"]`` (size ``n_layers``) a layer axis?

    With ``num_layers`` every leaf's leading axis must equal it (the error names
    the leaf and its shape). Without, the one cheap tell of an unstacked block is
    refused: every leaf 1-D (``LayerNorm(d)`` alone: ``L`` would be ``d`` and each
    "layer" a scalar, silently). A stacked model has a 2-D leaf for any vector or
    matrix in its layers (``[L, d]`` scales, ``[L, d, d]`` kernels); a stack whose
    layers hold only scalars passes with ``num_layers=L``. An unstacked block
    with a matrix (``[d]`` + ``[d, d]``) passes here and is caught when its first
    trace fails (the fused step's ``_check_activation`` names this hint then).

    Example: ``{"s": [8]}`` raises; ``{"s": [8]}`` with ``num_layers=8`` passes.
    """
    leaves = jax.tree_util.tree_flatten_with_path(layers)[0]
    if num_layers is not None:
        for path, leaf in leaves:
            if jnp.shape(leaf)[0] != num_layers:
                raise ValueError(
                    f"{path_str(_LAYERS, path)} has shape {list(jnp.shape(leaf))}: its "
                    f"leading (layer) axis is not num_layers = {num_layers}. {STACKED_HINT}")
    elif all(jnp.ndim(leaf) == 1 for _, leaf in leaves):
        names = ", ".join(f"{path_str(_LAYERS, p)} {list(jnp.shape(x))}" for p, x in leaves[:3])
        raise ValueError(
            f"every leaf of params['layers'] is 1-D ({names}{', ...' if len(leaves) > 3 else ''}),"
            f" so L would be {n_layers} and each layer would get only scalars: this looks "
            f"like one block that was not stacked. {STACKED_HINT} (If every layer really "
            "has only scalar parameters, pass LayeredModel(..., num_layers=L).)")
