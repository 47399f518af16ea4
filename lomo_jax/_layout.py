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


def path_str(prefix: str, path) -> str:
    return prefix + jax.tree_util.keystr(path)


def describe(x) -> str:
    """``"float32[4, 3]"``."""
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


def abstract(tree):
    """``jax.ShapeDtypeStruct`` of every leaf (arrays or structs)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


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
