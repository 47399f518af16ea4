r"""Shard the fused step over a device mesh: FSDP (ZeRO-3) for LOMO/AdaLomo.

The fused step (:func:`lomo_jax.fused_train_step`) is plain ``jax.jit`` code,
so it runs on a :class:`jax.sharding.Mesh` by giving its inputs
:class:`~jax.sharding.NamedSharding`\ s; XLA's SPMD partitioner (Shardy)
inserts the collectives. This module builds those shardings:

* **parameters** (:func:`param_shardings`): every leaf large enough is split
  over the ``fsdp`` mesh axis along one axis that the axis size divides (for
  layers the most major, for the embedding and head the model dimension) --
  never the leading layer axis of ``params["layers"]`` (the backward scan
  reads and writes one layer at a time, so every device must hold a slice of
  every layer). Small or indivisible leaves (norm scales, biases) are
  replicated.
* **inside the step** (:func:`layer_placement`): each layer's slice is
  all-gathered before it runs, its input and output stay split by the batch,
  and its gradient is constrained back to the stored split -- FSDP proper,
  whatever the partitioner's cost model would pick.
* **optimizer state** (:func:`state_shardings`): a state leaf that belongs to a
  parameter follows that parameter's sharding axis by axis: momenta of the
  parameter's shape get the parameter's spec; AdaLomo's/Adafactor's factored
  statistics get the spec of the parameter axes they keep (``v_row`` of a
  ``(L, m, n)`` kernel is ``(L, m)`` and is split like the ``m`` axis, ``v_col``
  like ``n``); step counts, loss scale and other leaves are replicated.
* **batch** (:func:`batch_sharding`): the leading (batch) axis of every batch
  array is split over the data axes -- by default every mesh axis, i.e. over
  ``("data", "fsdp")``, which is FSDP proper: each device computes on its own
  slice of the batch and all-gathers one layer's parameters at a time.

**Nothing changes in the math.** The sharded step computes the same function
as the single-device one; reductions over a sharded axis -- AdaLomo's row and
column means of :math:`G^2`, :math:`\mathrm{RMS}(U)` and
:math:`\mathrm{RMS}(\theta)`, the global gradient norm of
``clip_grad_norm`` -- become partial reductions plus an all-reduce, inserted
by XLA. The tests check the sharded step against the single-device step to
``1e-5`` relative on 8 (host-platform) devices.

**In place.** Pass the shardings to the step
(``fused_train_step(..., shardings=...)``): it is then jitted with
``in_shardings``/``out_shardings`` equal to them, so each output has exactly
the sharding of its donated input and is written into it
(``compiled.memory_analysis().alias_size_in_bytes`` = the per-device bytes of
params + state). Without them ``jit`` follows the committed inputs, but the
partitioner may return some outputs with other shardings, which breaks
donation and changes the next step's layout.

**Meshes must use ``Auto`` axes.** ``jax.make_mesh`` makes ``Explicit`` axes
by default (sharding in types); the model code (gathers, einsums) is written
for the compiler-propagated ``Auto`` mode, so build the mesh with
``axis_types=(jax.sharding.AxisType.Auto,) * n``. The helpers here raise on an
``Explicit`` axis they would use.

Example (one host, 8 devices; ``params`` may be arrays or
``jax.ShapeDtypeStruct``\ s)::

    import jax, jax.numpy as jnp, lomo_jax
    from jax.sharding import AxisType
    from lomo_jax import sharding as lsh
    from lomo_jax.models import llama, sharding as msh

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    tx = lomo_jax.adalomo(1e-3)
    sh = msh.llama_shardings(cfg, mesh, tx)            # FusedShardings(params, opt_state, batch)

    # create params and state directly sharded (never whole on one device):
    params = jax.jit(lambda: llama.init_params(cfg, 0), out_shardings=sh.params)()
    opt_state = jax.jit(lambda p: lomo_jax.fused_init(tx, p),
                        out_shardings=sh.opt_state)(params)

    step = lomo_jax.fused_train_step(llama.llama_layered_model(cfg), tx,
                                     clip_grad_norm=1.0, shardings=sh)
    for batch in data:                                 # numpy or jax arrays, [B, ...]
        params, opt_state, metrics = step(params, opt_state, batch)

    # per-device memory without allocating anything (see benchmarks/scaling.py):
    p = lsh.abstract_like(sh.params, llama.param_shapes(cfg))
    s = lsh.abstract_like(sh.opt_state, jax.eval_shape(lambda q: lomo_jax.fused_init(tx, q), p))
    b = lsh.abstract_like(sh.batch, {"input_ids": jax.ShapeDtypeStruct((8, 512), jnp.int32)})
    step.lower(p, s, b).compile().memory_analysis()    # per device

**Multi-host.** Call ``jax.distributed.initialize()`` on every process first;
``jax.devices()`` is then the global device list, a mesh over it and the
shardings above are global, and params/state are created sharded with
``jax.jit(..., out_shardings=...)`` as above. Each process feeds its own rows
of the global batch with
``jax.make_array_from_process_local_data(sh.batch, local_batch)`` (the batch
sharding splits rows over all devices, so each process's rows are contiguous
when the data axes are the mesh's leading axes). Only this single-host path
is tested here.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lomo_jax._layout import spec_entry
from lomo_jax._placement import LayerPlacement, layer_placement  # noqa: F401 (public here)
from lomo_jax.sharding_mesh import AxisNames, axes_tuple, check_mesh
from lomo_jax.sharding_params import DEFAULT_ADAPTER_MIN_SIZE, DEFAULT_MIN_SIZE, param_shardings
from lomo_jax.sharding_state import state_shardings

__all__ = [
    "FusedShardings",
    "LayerPlacement",
    "abstract_like",
    "batch_sharding",
    "fused_shardings",
    "layer_placement",
    "llama_shardings",
    "model_shardings",
    "param_shapes_of",
    "param_shardings",
    "state_shardings",
]


class FusedShardings(NamedTuple):
    """The shardings of the fused step's arguments ``(params, opt_state, batch)``.

    Attributes:
      params: a pytree of :class:`~jax.sharding.NamedSharding` with the
        structure of ``params``.
      opt_state: a :class:`lomo_jax.FusedState` of ``NamedSharding`` (its
        optional fields -- loss scale, counters -- replicated, or ``None``).
      batch: one ``NamedSharding`` splitting the leading axis, for every batch
        leaf (a tree prefix of any batch pytree of arrays of rank >= 1).

    It is a ``(params, opt_state, batch)`` tuple, so it can be passed as
    ``jax.jit(..., in_shardings=tuple(sh))``, to ``jax.device_put`` field by
    field, or as ``fused_train_step(..., shardings=sh)``.
    """

    params: Any
    opt_state: Any
    batch: NamedSharding



def batch_sharding(mesh: Mesh, batch_axes: Optional[AxisNames] = None) -> NamedSharding:
    r"""Split the leading (batch) axis of every batch array over ``batch_axes``.

    ``batch_axes=None`` (default) uses every mesh axis, in mesh order: with a
    ``("data", "fsdp")`` mesh each device gets ``B / (data * fsdp)`` rows,
    which is FSDP (the ``fsdp`` devices do not repeat each other's work). Pass
    ``"data"`` to split over the data axis only (the ``fsdp`` devices then
    compute on the same rows; parameters and state are still split).

    Example::

        batch = jax.device_put(batch, lomo_jax.sharding.batch_sharding(mesh))

    Returns:
      ``NamedSharding(mesh, PartitionSpec(batch_axes))``: a prefix sharding for
      any pytree of arrays of rank >= 1 whose leading axis is divisible by the
      product of the axis sizes.
    """
    axes = tuple(mesh.axis_names) if batch_axes is None else axes_tuple(batch_axes, "batch_axes")
    check_mesh(mesh, axes, "batch_sharding")
    return NamedSharding(mesh, P(spec_entry(axes)))


def fused_shardings(
    tx: optax.GradientTransformation,
    params,
    mesh: Mesh,
    *,
    fsdp_axis: AxisNames = "fsdp",
    batch_axes: Optional[AxisNames] = None,
    min_size: int = DEFAULT_MIN_SIZE,
    adapter_min_size: int = DEFAULT_ADAPTER_MIN_SIZE,
    **init_kwargs,
) -> FusedShardings:
    r"""All shardings of the fused step for ``{"embed", "layers", "head"}`` params.

    :func:`param_shardings` + :func:`state_shardings` + :func:`batch_sharding`.

    Example::

        mesh = jax.make_mesh((2, 4), ("data", "fsdp"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
        sh = lomo_jax.sharding.fused_shardings(tx, params, mesh)
        params = jax.device_put(params, sh.params)
        opt_state = jax.jit(lambda p: lomo_jax.fused_init(tx, p),
                            out_shardings=sh.opt_state)(params)
        step = lomo_jax.fused_train_step(model, tx, shardings=sh)
        params, opt_state, metrics = step(params, opt_state, batch)

    Args:
      tx: the optimizer (its state layout decides the state shardings).
      params: parameters or their ``jax.ShapeDtypeStruct``\ s.
      mesh: a mesh with ``Auto`` axes.
      fsdp_axis: mesh axis (or axes) parameters and state are split over.
      batch_axes: mesh axes the batch is split over (``None``: all of them).
      min_size, adapter_min_size: see :func:`param_shardings` (LoRA adapters
        are replicated below ``adapter_min_size`` elements a layer).
      **init_kwargs: keyword arguments of :func:`lomo_jax.fused_init`
        (``loss_scale``, ``skip_nonfinite``), as used to build the state.

    Returns:
      :class:`FusedShardings` ``(params, opt_state, batch)``.
    """
    p_sh = param_shardings(params, mesh, fsdp_axis=fsdp_axis, min_size=min_size,
                           adapter_min_size=adapter_min_size)
    return FusedShardings(
        params=p_sh,
        opt_state=state_shardings(tx, params, p_sh, **init_kwargs),
        batch=batch_sharding(mesh, batch_axes),
    )


def abstract_like(shardings, tree):
    """``jax.ShapeDtypeStruct``\\ s of ``tree`` carrying ``shardings`` (a
    pytree of the same structure, or one sharding for every leaf), for
    ``step.lower(...)`` / memory analysis without allocating anything.

    Example::

        sh = lomo_jax.sharding.fused_shardings(tx, llama.param_shapes(cfg), mesh)
        p = lomo_jax.sharding.abstract_like(sh.params, llama.param_shapes(cfg))
        s = lomo_jax.sharding.abstract_like(
            sh.opt_state, jax.eval_shape(lambda q: lomo_jax.fused_init(tx, q), p))
    """
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=shardings),
            tree,
        )
    return jax.tree.map(
        lambda s, x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=s),
        shardings,
        tree,
    )




@functools.singledispatch
def param_shapes_of(config_or_params):
    """The parameter shapes of a model config; parameters (arrays or
    ``jax.ShapeDtypeStruct``\\ s) are returned as they are.

    A model family registers its config type, so this module needs no model
    code: :mod:`lomo_jax.models` does
    ``param_shapes_of.register(LlamaConfig, llama.param_shapes)``.

    Example::

        shapes = lomo_jax.sharding.param_shapes_of(cfg)   # == llama.param_shapes(cfg)
    """
    return config_or_params


def model_shardings(
    config_or_params,
    mesh: Mesh,
    tx: optax.GradientTransformation,
    *,
    fsdp_axis: AxisNames = "fsdp",
    batch_axes: Optional[AxisNames] = None,
    min_size: int = DEFAULT_MIN_SIZE,
    adapter_min_size: int = DEFAULT_ADAPTER_MIN_SIZE,
    **init_kwargs,
) -> FusedShardings:
    r"""FSDP shardings of the fused step for a model config or its parameters.

    ``config_or_params`` is a config of a registered family (e.g. a
    :class:`~lomo_jax.models.llama.LlamaConfig`: shapes from
    :func:`param_shapes_of`, nothing is allocated) or ``{"embed", "layers",
    "head"}`` parameters. With the default rule every layer kernel is split
    along its first axis after the layer axis (``D`` of ``[L, D, F]`` MLP and
    attention kernels, ``F`` of the down projection), the embedding and LM
    head along ``D`` (see :func:`param_shardings`); norm scales are replicated
    (below ``min_size``), and so are LoRA adapters (``cfg.lora``) below
    ``adapter_min_size`` elements a layer.

    Example::

        mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
        sh = lomo_jax.sharding.model_shardings(cfg, mesh, tx)
        params = jax.jit(lambda: llama.init_params(cfg, 0), out_shardings=sh.params)()

    Returns:
      :class:`FusedShardings`, as :func:`fused_shardings`.
    """
    return fused_shardings(tx, param_shapes_of(config_or_params), mesh, fsdp_axis=fsdp_axis,
                           batch_axes=batch_axes, min_size=min_size,
                           adapter_min_size=adapter_min_size, **init_kwargs)


#: The LLaMA-family name of :func:`model_shardings` (also
#: :func:`lomo_jax.models.sharding.llama_shardings`).
llama_shardings = model_shardings
