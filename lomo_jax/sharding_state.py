r"""Shardings of the optimizer state that follow the parameters' shardings,
axis by axis, found by probing ``tx.init`` with one parameter axis grown at a
time. Public as :func:`lomo_jax.sharding.state_shardings`.

Example::

    s_sh = state_shardings(tx, params, param_shardings(params, mesh))
"""

from __future__ import annotations

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lomo_jax._layout import abstract as _shape_tree, check_keys as _check_params
from lomo_jax._layout import spec_axes
from lomo_jax.fused import FusedState, fused_init
from lomo_jax._per_layer import PerLayerState
from lomo_jax.sharding_mesh import mesh_of

__all__ = ["state_shardings"]


def _bump_axis(params, k: int):
    """``params`` with axis ``k`` of every leaf of rank > k one longer."""

    def bump(x):
        if len(x.shape) <= k:
            return x
        shape = list(x.shape)
        shape[k] += 1
        return jax.ShapeDtypeStruct(tuple(shape), x.dtype)

    return jax.tree.map(bump, params)


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def _param_shaped(node, param_def) -> bool:
    """``node`` has the structure of the parameters, some leaves perhaps
    ``optax.MaskedNode`` (the leaves another transform of an
    ``optax.multi_transform``/``optax.masked`` owns, e.g. a LoRA optimizer's
    base weights in its adapters' state)."""
    return jax.tree.structure(node, is_leaf=_is_masked) == param_def


def _owned(state, param_def):
    """Flatten ``state`` so that every subtree with the structure of the
    parameters (``mu``, ``v_row``, ... of an optax state) is one leaf."""
    nodes, node_def = jax.tree_util.tree_flatten(
        [state], is_leaf=lambda node: _param_shaped(node, param_def)
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
        if not _param_shaped(node, param_def):
            # Not parameter-shaped (counts, scales, ...): replicated.
            out.append(jax.tree.map(lambda _: replicated, node))
            continue
        probe_leaves = [
            None if pn is None else jax.tree.leaves(pn[i], is_leaf=_is_masked)
            for pn in probe_nodes
        ]
        leaves = []
        node_leaves = jax.tree.leaves(node, is_leaf=_is_masked)
        for j, (leaf, p, spec) in enumerate(zip(node_leaves, p_leaves, s_leaves)):
            if _is_masked(leaf):  # another transform's leaf: no array, no sharding
                leaves.append(leaf)
                continue
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
    ``v_col`` like the columns, unambiguously). Subtrees of an
    ``optax.multi_transform`` or ``optax.masked`` state, where the leaves
    another transform owns are ``optax.MaskedNode``, are matched the same way
    (e.g. AdaLomo's statistics of the base weights in
    ``lomo_jax.models.lora.optimizer(base=lomo_jax.adalomo(..), adapters=..)``
    follow the base weights). All other leaves (step counts,
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
    mesh = mesh_of(params_shardings)
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
