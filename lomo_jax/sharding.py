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

import math
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lomo_jax._layout import abstract as _shape_tree, check_keys as _check_params
from lomo_jax._layout import spec_axes, spec_entry
from lomo_jax.fused import FusedState, fused_init
from lomo_jax.per_layer import PerLayerState
from lomo_jax._placement import LayerPlacement, layer_placement  # noqa: F401 (public here)

__all__ = [
    "FusedShardings",
    "LayerPlacement",
    "abstract_like",
    "batch_sharding",
    "fused_shardings",
    "layer_placement",
    "param_shardings",
    "state_shardings",
]

AxisNames = Union[str, Sequence[str]]

# Leaves (per layer, for params["layers"]) with fewer elements are replicated:
# splitting a norm scale saves nothing and costs a collective.
DEFAULT_MIN_SIZE = 2**14


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


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


def _axes_tuple(axes: AxisNames, what: str) -> tuple:
    if isinstance(axes, str):
        return (axes,)
    axes = tuple(axes)
    if not axes or not all(isinstance(a, str) for a in axes):
        raise TypeError(f"{what} must be a mesh axis name or a non-empty sequence of them, got {axes!r}.")
    return axes


def _check_mesh(mesh, axes: tuple, what: str) -> int:
    """Check that ``axes`` are Auto axes of ``mesh``; return their total size."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(
            f"{what}: mesh has no axis {', '.join(map(repr, missing))}; its axes are "
            f"{tuple(mesh.axis_names)}."
        )
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    explicit = [a for a in axes if types[a] != AxisType.Auto]
    if explicit:
        raise ValueError(
            f"{what}: mesh axes {explicit} are {[types[a].name for a in explicit]}; the "
            "fused step is partitioned by the compiler and needs Auto axes. Build the "
            "mesh with jax.make_mesh(shape, names, "
            "axis_types=(jax.sharding.AxisType.Auto,) * len(names))."
        )
    return math.prod(mesh.shape[a] for a in axes)


def _mesh_of(shardings) -> Mesh:
    meshes = {
        s.mesh for s in jax.tree.leaves(shardings) if isinstance(s, NamedSharding)
    }
    if len(meshes) != 1:
        raise ValueError(
            "expected a pytree of NamedSharding on one mesh; found "
            f"{len(meshes)} meshes."
        )
    return meshes.pop()


# --------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------


def _leaf_spec(shape, skip_leading: bool, n: int, min_size: int, entry,
               rule: str = "largest") -> P:
    """Split one axis over ``entry`` (``n`` devices): among the axes ``n`` divides
    (never a leading layer axis), the ``"largest"``, the ``"smallest"`` or the
    ``"first"`` (most major) one; replicated if small or none divides."""
    shape = tuple(shape)
    start = 1 if skip_leading else 0
    per_unit = math.prod(shape[start:]) if len(shape) > start else 1
    if n == 1 or per_unit < max(min_size, 1):
        return P()
    axes = [a for a in range(start, len(shape)) if shape[a] % n == 0 and shape[a] >= n]
    if not axes:
        return P()
    pick = {"largest": lambda: max(axes, key=lambda a: (shape[a], -a)),
            "smallest": lambda: min(axes, key=lambda a: (shape[a], a)),
            "first": lambda: axes[0]}[rule]
    spec = [None] * len(shape)
    spec[pick()] = entry
    return P(*spec)


def param_shardings(
    params,
    mesh: Mesh,
    *,
    fsdp_axis: AxisNames = "fsdp",
    min_size: int = DEFAULT_MIN_SIZE,
):
    r"""FSDP shardings of ``{"embed", "layers", "head"}`` parameters.

    Each leaf is split over ``fsdp_axis`` along one axis whose size the axis
    size :math:`n` divides, so every device holds :math:`1/n` of it:

    * ``params["layers"]``: the first (most major) such axis after the layer
      axis. The fused step all-gathers one layer's slice at a time along that
      axis; a minor axis makes XLA:GPU transpose the whole stack (a full copy
      of it) to make the gathered axis major.
    * the embedding and the head: the *smallest* such axis (the model dimension
      of a ``[V, D]`` embedding or ``[D, V]`` head), so a vocabulary chunk of the
      head (:mod:`lomo_jax.cross_entropy`) is a local slice, all-gathered chunk
      by chunk (a vocabulary split makes the partitioner gather the whole
      matrix for every chunk). The leading layer axis of ``params["layers"]``
    leaves is never split. A leaf is replicated if it has fewer than
    ``min_size`` elements (per layer, for ``params["layers"]``) or no divisible
    axis.

    Example::

        mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
        shardings = lomo_jax.sharding.param_shardings(params, mesh)
        params = jax.device_put(params, shardings)
        # a [L, 4096, 11008] kernel -> PartitionSpec(None, 'fsdp', None)

    Args:
      params: the parameters, as arrays or ``jax.ShapeDtypeStruct``\ s (only
        shapes are read).
      mesh: a mesh whose ``fsdp_axis`` axes have ``AxisType.Auto``.
      fsdp_axis: the mesh axis (or a tuple of axes, e.g. ``("data", "fsdp")``
        for ZeRO-3 over every device) to split parameters over.
      min_size: leaves with fewer elements (per layer) are replicated; ``0``
        splits every leaf that has a divisible axis.

    Returns:
      A pytree of :class:`~jax.sharding.NamedSharding` with the structure of
      ``params``.
    """
    _check_params(params)
    axes = _axes_tuple(fsdp_axis, "fsdp_axis")
    n = _check_mesh(mesh, axes, "param_shardings")
    entry = spec_entry(axes)

    def unit(tree, skip_leading, rule):
        return jax.tree.map(
            lambda x: NamedSharding(
                mesh, _leaf_spec(jnp.shape(x), skip_leading, n, int(min_size), entry, rule)
            ),
            tree,
        )

    return {
        "embed": unit(params["embed"], False, "smallest"),
        "layers": unit(params["layers"], True, "first"),
        "head": unit(params["head"], False, "smallest"),
    }


# --------------------------------------------------------------------------
# Optimizer state
# --------------------------------------------------------------------------


def _bump_axis(params, k: int):
    """``params`` with axis ``k`` of every leaf of rank > k one longer."""

    def bump(x):
        if len(x.shape) <= k:
            return x
        shape = list(x.shape)
        shape[k] += 1
        return jax.ShapeDtypeStruct(tuple(shape), x.dtype)

    return jax.tree.map(bump, params)


def _owned(state, param_def):
    """Flatten ``state`` so that every subtree with the structure of the
    parameters (``mu``, ``v_row``, ... of an optax state) is one leaf."""
    nodes, node_def = jax.tree_util.tree_flatten(
        [state], is_leaf=lambda node: jax.tree.structure(node) == param_def
    )
    return nodes, node_def


def _unit_shardings(state, probes, params, specs, mesh):
    """Shardings for one unit's optimizer state (embed, layers or head).

    ``probes[k]`` is the unit's state for parameters whose axis ``k`` is one
    longer (``None`` if ``tx.init`` could not build it); a state dimension that
    grows exactly when parameter axis ``k`` grows is a copy of that axis and
    gets its mesh axes.
    """
    replicated = NamedSharding(mesh, P())
    param_def = jax.tree.structure(params)
    p_leaves = jax.tree.leaves(params)
    s_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    nodes, node_def = _owned(state, param_def)
    probe_nodes = []
    for probe in probes:
        if probe is None:
            probe_nodes.append(None)
            continue
        pn, pdef = _owned(probe, param_def)
        probe_nodes.append(pn if pdef == node_def else None)

    out = []
    for i, node in enumerate(nodes):
        if jax.tree.structure(node) != param_def:
            # Not parameter-shaped (counts, scales, ...): replicated.
            out.append(jax.tree.map(lambda _: replicated, node))
            continue
        probe_leaves = [
            None if pn is None else jax.tree.leaves(pn[i]) for pn in probe_nodes
        ]
        leaves = []
        for j, (leaf, p, spec) in enumerate(zip(jax.tree.leaves(node), p_leaves, s_leaves)):
            grown = [None if pl is None else pl[j].shape for pl in probe_leaves]
            leaves.append(
                NamedSharding(mesh, _state_spec(leaf.shape, grown, p.shape, spec))
            )
        out.append(jax.tree.unflatten(param_def, leaves))
    return jax.tree.unflatten(node_def, out)[0]


def _state_spec(shape, grown, p_shape, p_spec: P) -> P:
    shape, p_shape = tuple(shape), tuple(p_shape)
    p_entries = tuple(p_spec) + (None,) * (len(p_shape) - len(p_spec))
    usable = all(
        g is not None and len(g) == len(shape) for g in grown
    ) and len(grown) >= len(p_shape)
    if not usable:
        # tx.init did not follow the probe: fall back to "same shape, same spec".
        return P(*p_entries) if shape == p_shape else P()
    spec, used = [], set()
    for d, size in enumerate(shape):
        ks = [k for k, g in enumerate(grown) if g[d] != size]
        entry = None
        if len(ks) == 1 and ks[0] < len(p_shape) and p_shape[ks[0]] == size:
            entry = p_entries[ks[0]]
            names = spec_axes(entry)
            if used.intersection(names):
                entry = None
            used.update(names)
        spec.append(entry)
    return P(*spec)


def state_shardings(
    tx: optax.GradientTransformation,
    params,
    params_shardings,
    **init_kwargs,
) -> FusedState:
    r"""Shardings of ``lomo_jax.fused_init(tx, params)`` that follow the parameters.

    The state is built abstractly (``jax.eval_shape``); inside it, every
    subtree with the structure of a parameter unit (optax keeps ``mu``,
    ``nu``, AdaLomo's ``v_row``/``v_col``/``v`` as such subtrees) is matched
    leaf by leaf with the parameters. A state dimension that is a copy of a
    parameter axis gets that axis's mesh axes; which axis it copies is found by
    rebuilding the state with one parameter axis at a time made one longer
    (so a square ``(m, m)`` kernel's ``v_row`` is split like ``m`` rows and its
    ``v_col`` like the columns, unambiguously). All other leaves (step counts,
    the loss scale, empty placeholders) are replicated. This works for any
    optax transform whose ``init`` builds its state from the parameter shapes
    (LOMO, AdaLomo, SGD, AdamW, Adafactor, chains of them). One limit: when
    ``init`` picks axes by comparing sizes (``optax.adafactor`` factors the two
    largest axes), growing one axis of a square kernel changes the pick, and
    that kernel's statistics come out replicated -- still correct, and they
    are small. Shardings never change results, only where data lives.

    Example::

        p_sh = lomo_jax.sharding.param_shardings(params, mesh)
        s_sh = lomo_jax.sharding.state_shardings(tx, params, p_sh)
        opt_state = jax.jit(lambda p: lomo_jax.fused_init(tx, p), out_shardings=s_sh)(params)

    Args:
      tx: the transform passed to :func:`lomo_jax.fused_init`.
      params: parameters (arrays or ``jax.ShapeDtypeStruct``).
      params_shardings: a pytree of ``NamedSharding`` on one mesh, e.g. from
        :func:`param_shardings`.
      **init_kwargs: keyword arguments of :func:`lomo_jax.fused_init`
        (``loss_scale``, ``skip_nonfinite``): they decide which optional fields
        the state has.

    Returns:
      A :class:`lomo_jax.FusedState` of ``NamedSharding`` with the structure of
      ``fused_init(tx, params, **init_kwargs)``.
    """
    _check_params(params)
    mesh = _mesh_of(params_shardings)
    params = _shape_tree(params)
    if jax.tree.structure(params) != jax.tree.structure(params_shardings):
        raise ValueError(
            "params_shardings must have the structure of params: "
            f"{jax.tree.structure(params_shardings)} vs {jax.tree.structure(params)}."
        )
    specs = jax.tree.map(lambda s: s.spec, params_shardings)

    def init(p):
        return jax.eval_shape(lambda q: fused_init(tx, q, **init_kwargs), p)

    state = init(params)
    rank = max((len(x.shape) for x in jax.tree.leaves(params)), default=0)
    probes = []
    for k in range(rank):
        try:
            probe = init(_bump_axis(params, k))
            if jax.tree.structure(probe) != jax.tree.structure(state):
                probe = None
        except Exception:  # noqa: BLE001 - tx.init refused the probe shapes
            probe = None
        probes.append(probe)

    def unit(name, get):
        return _unit_shardings(
            get(state),
            [None if pr is None else get(pr) for pr in probes],
            params[name],
            specs[name],
            mesh,
        )

    # Everything but the three units (loss scale, counters): replicated.
    replicated = NamedSharding(mesh, P())
    out = jax.tree.map(lambda _: replicated, state)
    return out._replace(
        embed=unit("embed", lambda s: s.embed),
        layers=PerLayerState(inner_state=unit("layers", lambda s: s.layers.inner_state)),
        head=unit("head", lambda s: s.head),
    )


# --------------------------------------------------------------------------
# Batch and bundles
# --------------------------------------------------------------------------


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
    axes = tuple(mesh.axis_names) if batch_axes is None else _axes_tuple(batch_axes, "batch_axes")
    _check_mesh(mesh, axes, "batch_sharding")
    return NamedSharding(mesh, P(spec_entry(axes)))


def fused_shardings(
    tx: optax.GradientTransformation,
    params,
    mesh: Mesh,
    *,
    fsdp_axis: AxisNames = "fsdp",
    batch_axes: Optional[AxisNames] = None,
    min_size: int = DEFAULT_MIN_SIZE,
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
      min_size: see :func:`param_shardings`.
      **init_kwargs: keyword arguments of :func:`lomo_jax.fused_init`
        (``loss_scale``, ``skip_nonfinite``), as used to build the state.

    Returns:
      :class:`FusedShardings` ``(params, opt_state, batch)``.
    """
    p_sh = param_shardings(params, mesh, fsdp_axis=fsdp_axis, min_size=min_size)
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



def __getattr__(name):
    """``llama_shardings`` lives with the model (:mod:`lomo_jax.models.sharding`);
    it is imported on first use so this module needs no model code (nor flax)."""
    if name == "llama_shardings":
        from lomo_jax.models.sharding import llama_shardings

        return llama_shardings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
