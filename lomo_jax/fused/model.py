r"""The model interface of the fused step: :class:`LayeredModel`, a model as
``embed -> L identical layers -> head``.

.. math::
    h_0 = E(\theta_E, x), \quad h_{i+1} = F(\theta_i, h_i), \quad
    \ell = H(\theta_H, h_L)

Example::

    model = lomo_jax.LayeredModel(embed, layer, head, tied=True, num_layers=L)
    loss = model.loss(params, batch)
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from lomo_jax import embedding as _ids
from lomo_jax._layout import Units, check_stacked as _check_stacked
from lomo_jax._layout import split_params as _split_params
from lomo_jax.fused.donation import deleted_arg_error, deleted_leaves
from lomo_jax.fused.keys import layer_key


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
        if deleted_leaves(params):
            raise deleted_arg_error("params", params, where="LayeredModel.loss")
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
