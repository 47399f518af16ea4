"""The fused step on a Flax NNX model: params out, params back, ``nnx.Optimizer``.

A model written as ``embedding -> L stacked blocks -> head`` in NNX (the
blocks made with ``nnx.split_rngs`` + ``nnx.vmap``, so every ``nnx.Param``
of the block has a leading layer axis) maps onto :class:`lomo_jax.LayeredModel`
with three small functions that receive *modules*, not param dicts:

* :func:`layered` -- ``params`` ``{"embed", "layers", "head"}`` and the
  ``LayeredModel``. One layer's block is rebuilt from its slice without
  allocating the stack; its RNG streams (``nnx.Dropout``'s ``dropout``
  stream) are reseeded from the per-layer ``key`` the fused step passes, so
  masks differ across layers and steps and the backward recompute sees the
  forward's mask. A block without RNG state needs no key.
* :func:`update` -- write (trained) params back into the module, in place.
* :func:`per_layer` -- ``lomo_jax.per_layer(tx)`` on the blocks and ``tx``
  elsewhere, for ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.

Parts are named by attribute path (``"blocks"``, ``"decoder.blocks"``); the
head is one path or a tuple of them (e.g. ``("norm", "out")``). Only
``nnx.Param`` state is handled; other state (BatchNorm statistics, caches)
is refused with its path, as is RNG state outside the blocks (only layers
get a per-step key). Static attributes such as ``Dropout.deterministic``
are those of the module when :func:`layered` is called (``model.train()``
first).

Example::

    parts = dict(embed="embed", blocks="blocks", head=("norm", "out"))
    params, model = lomo_jax.nnx.layered(
        lm, **parts,
        embed_fn=lambda embed, batch: embed(batch["tokens"][:, :-1]),
        layer_fn=lambda block, h, batch: block(h),
        head_fn=lambda head, h, batch: xent(head[1](head[0](h)), batch),
    )
    opt_state = lomo_jax.fused_init(tx, params, rng=jax.random.key(0))
    step = lomo_jax.fused_train_step(model, tx)
    params, opt_state, metrics = step(params, opt_state, batch)
    lomo_jax.nnx.update(lm, params, **parts)   # lm now holds the trained weights
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.nnx import traversals

from lomo_jax.fused import LayeredModel
from lomo_jax._per_layer import _layer_count
from lomo_jax._per_layer import per_layer as _per_layer

__all__ = ["layered", "module_builder", "per_layer", "split_params", "update"]

Head = Union[str, Sequence[str]]


def _sub(module, path: str):
    """The submodule at a dotted attribute path (digits index lists)."""
    node = module
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def _head_paths(head: Head) -> tuple:
    return (head,) if isinstance(head, str) else tuple(head)


def _check_state(sub, where: str, allow_rng: bool) -> None:
    """Refuse non-Param state (RNG state too unless ``allow_rng``), by path."""
    for path, var in nnx.to_flat_state(nnx.state(sub)):
        if isinstance(var, nnx.Param) or (allow_rng and isinstance(var, nnx.RngState)):
            continue
        name = ".".join([where, *map(str, path)])
        why = ("only the stacked blocks get a per-step PRNG key; move the dropout "
               "into the blocks or build it without rngs" if isinstance(var, nnx.RngState)
               else "lomo_jax.nnx handles nnx.Param state only")
        raise ValueError(f"lomo_jax.nnx: {name} is a {type(var).__name__}, not an "
                         f"nnx.Param: {why}.")


def _check_covered(module, prefixes) -> None:
    """Every Param of ``module`` lies under one of the parts (else it would not train)."""
    for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        names = tuple(map(str, path))
        if not any(names[:len(p)] == p for p in prefixes):
            raise ValueError(
                f"lomo_jax.nnx: parameter {'.'.join(names)} is in none of embed, blocks, "
                "head, so the fused step would not train it; name its module in one of them.")


def _pure(sub) -> dict:
    return nnx.to_pure_dict(nnx.state(sub, nnx.Param))


def split_params(module, *, embed: str, blocks: str, head: Head) -> dict:
    """``{"embed", "layers", "head"}`` pure dicts of the module's Params.

    The arrays are the module's own (no copy). ``params["head"]`` is the head
    module's dict, or ``{path: dict}`` when ``head`` is a tuple of paths.

    Example::

        params = lomo_jax.nnx.split_params(lm, embed="embed", blocks="blocks",
                                           head=("norm", "out"))
    """
    _check_state(_sub(module, embed), embed, allow_rng=False)
    _check_state(_sub(module, blocks), blocks, allow_rng=True)
    for p in _head_paths(head):
        _check_state(_sub(module, p), p, allow_rng=False)
    _check_covered(module, [tuple(p.split(".")) for p in (embed, blocks, *_head_paths(head))])
    heads = {p: _pure(_sub(module, p)) for p in _head_paths(head)}
    return {
        "embed": _pure(_sub(module, embed)),
        "layers": _pure(_sub(module, blocks)),
        "head": heads[head] if isinstance(head, str) else heads,
    }


def _abstract_vars(state, drop_axis: bool) -> list:
    """``(path, Variable)`` with abstract values (keeps no array alive)."""
    def shape(x):
        return jax.ShapeDtypeStruct(x.shape[1:] if drop_axis else x.shape, x.dtype)
    return [(path, var.copy(shape(var.get_value())))
            for path, var in nnx.to_flat_state(state)]


def module_builder(sub, drop_axis: bool = False) -> Callable:
    """``build(pure_params, key=None) -> module``: fresh Variables merged into
    ``sub``'s graphdef (``sub`` may be abstract, from ``nnx.eval_shape``; no
    array of it is kept). ``drop_axis``: the params are one slice of a stack.

    Params come from ``pure_params``; the ``j``-th RNG stream's key is
    ``fold_in(key, j)`` and its count restarts at 0, so a key fixes the masks.
    The one NNX <-> pure-dict bridge of lomo_jax: :func:`layered` and
    :mod:`lomo_jax.models` rebuild their modules with it.

    Example::

        build = lomo_jax.nnx.module_builder(layer.mlp)
        mlp = build({"gate_proj": {"kernel": w_g}, ...})   # an nnx.Module holding w_g
    """
    graphdef, state = nnx.split(sub)
    template = _abstract_vars(state, drop_axis)
    key_slot = {p: j for j, p in enumerate(p for p, v in template if isinstance(v, nnx.RngKey))}

    def value(path, var, pure, key):
        if isinstance(var, nnx.RngKey):
            return jax.random.fold_in(key, key_slot[path])
        if isinstance(var, nnx.RngCount):
            return jnp.zeros(var.get_value().shape, jnp.uint32)
        return pure[path]

    def build(pure_params, key=None):
        if key is not None and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)  # a raw jax.random.PRNGKey
        pure = traversals.flatten_mapping(pure_params)
        return nnx.merge(graphdef, nnx.from_flat_state(
            [(p, var.copy(value(p, var, pure, key))) for p, var in template]))

    build.has_rng = bool(key_slot)
    return build


def layered(module, *, embed: str, blocks: str, head: Head, embed_fn: Callable,
            layer_fn: Callable, head_fn: Callable, tied: bool = False):
    """``(params, LayeredModel)`` for an NNX ``embed -> stacked blocks -> head`` model.

    The functions receive modules rebuilt from the params being trained:
    ``embed_fn(embed_module, batch) -> h``, ``layer_fn(block, h, batch) -> h``
    (``block``: ONE layer, RNG streams reseeded from the fused step's per-layer
    ``key``; a ``layer_fn`` with an ``index`` parameter is also passed the
    layer's position, e.g. for alternating layers), ``head_fn(head, h, batch) -> loss`` (``head``: the module, or a
    tuple in the order of the ``head`` paths); with ``tied=True``,
    ``head_fn(head, h, batch, embed=embed_module)``.

    Example::

        params, model = lomo_jax.nnx.layered(
            lm, embed="embed", blocks="blocks", head="out",
            embed_fn=lambda e, batch: e(batch["x"]),
            layer_fn=lambda block, h, batch: block(h),
            head_fn=lambda out, h, batch: loss_fn(out(h), batch["y"]))
    """
    params = split_params(module, embed=embed, blocks=blocks, head=head)
    n_layers = _layer_count(params["layers"], f"lomo_jax.nnx.layered: blocks {blocks!r}")
    embed_of = module_builder(_sub(module, embed))
    block_of = module_builder(_sub(module, blocks), drop_axis=True)
    head_of = {p: module_builder(_sub(module, p)) for p in _head_paths(head)}

    def heads(p):
        return head_of[head](p) if isinstance(head, str) else tuple(
            head_of[k](p[k]) for k in head_of)

    def embed_u(p, batch):
        return embed_fn(embed_of(p), batch)

    layer = _layer(layer_fn, block_of, blocks)

    def head_u(p, h, batch, embed_params=None):
        if tied:
            return head_fn(heads(p), h, batch, embed=embed_of(embed_params))
        return head_fn(heads(p), h, batch)

    return params, LayeredModel(embed_u, layer, head_u, tied=tied, num_layers=n_layers)


def _layer(layer_fn: Callable, block_of: Callable, blocks: str) -> Callable:
    """``LayeredModel.layer`` with exactly the keywords it needs: ``key`` when the
    blocks hold RNG streams, ``index`` when ``layer_fn`` takes one."""
    numbered = "index" in inspect.signature(layer_fn).parameters

    def block(p, key):
        if not block_of.has_rng:
            return block_of(p)
        if key is None:
            raise ValueError(
                f"lomo_jax.nnx: the blocks {blocks!r} hold RNG streams (dropout), so each "
                "layer needs a key: step(params, opt_state, batch, key=k) or "
                "fused_init(..., rng=jax.random.key(seed)); model.loss(params, batch, key=k).")
        return block_of(p, key)

    def run(p, h, batch, index=None, key=None):
        extra = {"index": index} if numbered else {}
        return layer_fn(block(p, key), h, batch, **extra)

    if block_of.has_rng and numbered:
        return lambda p, h, batch, *, index, key=None: run(p, h, batch, index, key)
    if block_of.has_rng:
        return lambda p, h, batch, *, key=None: run(p, h, batch, key=key)
    if numbered:
        return lambda p, h, batch, *, index: run(p, h, batch, index)
    return lambda p, h, batch: run(p, h, batch)


def _assign(sub, pure, where: str) -> None:
    """Write one part's pure dict into ``sub``'s Params (shapes must match)."""
    state = nnx.state(sub, nnx.Param)
    new = traversals.flatten_mapping(pure)
    for path, var in nnx.to_flat_state(state):
        name = ".".join([where, *map(str, path)])
        if path not in new:
            raise ValueError(f"lomo_jax.nnx.update: params lack {name}.")
        if jnp.shape(new[path]) != var.get_value().shape:
            raise ValueError(f"lomo_jax.nnx.update: {name} has shape {jnp.shape(new[path])}, "
                             f"the module's is {var.get_value().shape}.")
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(sub, state)


def update(module, params: dict, *, embed: str, blocks: str, head: Head) -> None:
    """Write ``{"embed", "layers", "head"}`` params into ``module``, in place.

    The module then holds these arrays: a later fused step that donates
    ``params`` deletes them, so write back after training (or a copy).

    Example::

        lomo_jax.nnx.update(lm, params, embed="embed", blocks="blocks",
                            head=("norm", "out"))
        lm.eval(); logits = lm(tokens)
    """
    heads = {head: params["head"]} if isinstance(head, str) else {
        p: params["head"][p] for p in head}
    for where, pure in {embed: params["embed"], blocks: params["layers"], **heads}.items():
        _assign(_sub(module, where), pure, where)


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


def per_layer(tx: optax.GradientTransformation, blocks: str) -> optax.GradientTransformation:
    """``lomo_jax.per_layer(tx)`` on the params under ``blocks``, ``tx`` on the rest.

    For ``nnx.Optimizer(model, ..., wrt=nnx.Param)``, whose ``tx`` sees the
    whole model's state: AdaLomo's factored moments and update RMS must be
    per layer, not per stack. Clip outside it (the norm is global), as the
    fused step's ``clip_grad_norm`` does.

    Example::

        tx = optax.chain(optax.clip_by_global_norm(1.0),
                         lomo_jax.nnx.per_layer(lomo_jax.adalomo(1e-3), blocks="blocks"))
        optimizer = nnx.Optimizer(lm, tx, wrt=nnx.Param)
        optimizer.update(lm, grads)
    """
    prefix = tuple(blocks.split("."))

    def label(path, _):
        return "blocks" if tuple(map(_key_name, path[:len(prefix)])) == prefix else "rest"

    def labels(tree):
        return jax.tree_util.tree_map_with_path(
            label, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))

    return optax.multi_transform({"blocks": _per_layer(tx), "rest": tx}, labels)
