"""The plain-dict parameters of :class:`~lomo_jax.models.nnx_module.LlamaForCausalLM`.

The fused step and the converters use ``{"embed", "layers", "head"}``::

    {"embed":  {"embedding": [V, D]},
     "layers": {<the decoder layer's Params, each with a leading [L] axis>},
     "head":   {"norm": [D], "lm_head": [D, V]}}        # no "lm_head" when tied

This is :func:`lomo_jax.nnx.split_params` of the model (parts
``embed_tokens``, ``layers``, ``norm`` and ``lm_head``) with the head's two
one-leaf modules flattened to their arrays; writing back is
:func:`lomo_jax.nnx.update`. One bridge serves every NNX model of lomo_jax.

Example::

    params = module_to_params(model)           # the model's own arrays, no copy
    update_module(model, params)               # write (trained) params back
    model = params_to_module(cfg, params)      # a model holding params, no random init
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lomo_jax import nnx as lomo_nnx
from lomo_jax.models.config import LlamaConfig
from lomo_jax.models.nnx_module import LlamaForCausalLM

__all__ = ["check_params", "init_params", "module_to_params", "param_shapes",
           "params_to_module", "update_module"]

# head entry of the plain dict -> (NNX sub-module, its one Param)
_HEAD_PARAMS = {"norm": ("norm", "scale"), "lm_head": ("lm_head", "kernel")}


def _parts(config: LlamaConfig) -> dict:
    """The model's parts for :func:`lomo_jax.nnx.split_params` / ``update``."""
    head = ("norm",) if config.tie_word_embeddings else ("norm", "lm_head")
    return {"embed": "embed_tokens", "blocks": "layers", "head": head}


def _params_layout(config: LlamaConfig, pure) -> dict:
    """The pure dict of ``nnx.state(model, nnx.Param)`` (or of its gradient) ->
    the plain-dict parameters."""
    head = {k: pure[m][leaf] for k, (m, leaf) in _HEAD_PARAMS.items()
            if m in _parts(config)["head"]}
    return {"embed": pure["embed_tokens"], "layers": pure["layers"], "head": head}


def _module_layout(params) -> dict:
    """Plain-dict params -> the parts of :func:`lomo_jax.nnx.update`."""
    head = {m: {leaf: params["head"][k]} for k, (m, leaf) in _HEAD_PARAMS.items()
            if k in params["head"]}
    return {"embed": params["embed"], "layers": params["layers"], "head": head}


def module_to_params(model: LlamaForCausalLM) -> dict:
    """The plain-dict parameters ``{"embed", "layers", "head"}`` of an NNX
    model (the arrays themselves, not copies)."""
    parts = lomo_nnx.split_params(model, **_parts(model.config))
    return _params_layout(model.config, {"embed_tokens": parts["embed"],
                                         "layers": parts["layers"], **parts["head"]})


@functools.lru_cache(maxsize=64)
def _abstract_params(config: LlamaConfig) -> dict:
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    return module_to_params(model)


def param_shapes(config: LlamaConfig) -> dict:
    """``jax.ShapeDtypeStruct`` tree of the plain-dict parameters (nothing allocated)."""
    return jax.tree.map(lambda x: x, _abstract_params(config))


def init_params(config: LlamaConfig, rng=0) -> dict:
    """Freshly initialized plain-dict parameters (``rng``: int seed or key)."""
    return module_to_params(LlamaForCausalLM(config, rngs=nnx.Rngs(rng)))


def check_params(config: LlamaConfig, params, what: str = "params") -> None:
    """Raise ``ValueError`` naming every missing/unexpected key or wrong shape."""
    want = _abstract_params(config)
    w = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    try:
        g = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    except Exception as e:  # pragma: no cover - exotic inputs
        raise ValueError(f"{what} is not a pytree of arrays: {e}") from e
    ks = jax.tree_util.keystr
    missing = [ks(p) for p in w if p not in g]
    extra = [ks(p) for p in g if p not in w]
    bad = [
        f"{what}{ks(p)}: got shape {tuple(jnp.shape(g[p]))}, expected {tuple(w[p].shape)}"
        for p in w
        if p in g and tuple(jnp.shape(g[p])) != tuple(w[p].shape)
    ]
    msgs = []
    if missing:
        msgs.append(f"missing {', '.join(what + m for m in missing)}")
    if extra:
        msgs.append(f"unexpected {', '.join(what + m for m in extra)}")
    msgs.extend(bad)
    if msgs:
        raise ValueError("parameters do not match the config: " + "; ".join(msgs))


def update_module(model: LlamaForCausalLM, params) -> LlamaForCausalLM:
    """Write plain-dict ``params`` into ``model`` in place (shapes checked);
    returns ``model``."""
    check_params(model.config, params)
    lomo_nnx.update(model, _module_layout(params), **_parts(model.config))
    return model


def params_to_module(config: LlamaConfig, params) -> LlamaForCausalLM:
    """An NNX :class:`LlamaForCausalLM` holding ``params`` (no random init is
    run: the module is built abstractly and then filled)."""
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    return update_module(model, params)
