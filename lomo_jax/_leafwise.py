"""Decide whether an optax transform works leaf by leaf (private helper).

The fused step applies ``tx`` to the embedding, to every layer slice and to the
head *separately*, at different moments of the backward pass. That is only the
same optimiser as ``tx`` on the whole model if the update of one parameter leaf
never depends on another leaf. ``optax.clip_by_global_norm``,
``optax.apply_if_finite``, ``optax.skip_not_finite`` and friends break this.

The test is a static data-flow (taint) analysis of ``tx.init`` and
``tx.update`` traced to jaxprs with :func:`jax.make_jaxpr` on a probe tree.
Every gradient and parameter leaf of the probe is its own taint source; taints
flow through every equation (an output of a primitive carries the union of
its inputs' taints; ``jit``/``custom_jvp``/``custom_vjp``/``checkpoint`` calls,
``cond``, ``while`` and ``scan`` are followed inside, loops to a fixed point;
anything unknown is treated conservatively as "every output depends on every
input"). The optimiser state is iterated to a fixed point over steps, so a
dependency that goes through the state (``state_b <- g_a`` on one step,
``u_b <- state_b`` on the next) is found as well. ``tx`` is leaf-wise iff no
update leaf and no state leaf ends up with taints from two different leaves.

The analysis is structural, not numerical: ``clip_by_global_norm(1e9)`` is
refused even though it never clips on the probe's values, and nothing is
computed or allocated (abstract tracing only).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.extend import core as jcore

_EMPTY: frozenset = frozenset()


def _union(taints) -> frozenset:
    out = set()
    for t in taints:
        out |= t
    return frozenset(out)


def _closed(j):
    """The open Jaxpr of a Jaxpr or ClosedJaxpr (constants carry no taint)."""
    if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr
    return j


def _run(jaxpr, in_taints: Sequence[frozenset]) -> List[frozenset]:
    """Propagate taints through an (open) jaxpr; returns the outvars' taints."""
    jaxpr = _closed(jaxpr)
    env = {}

    def read(v):
        if isinstance(v, jcore.Literal):
            return _EMPTY
        return env.get(v, _EMPTY)

    for v in jaxpr.constvars:
        env[v] = _EMPTY
    if len(in_taints) != len(jaxpr.invars):
        # Should not happen; be conservative.
        every = _union(in_taints)
        return [every for _ in jaxpr.outvars]
    for v, t in zip(jaxpr.invars, in_taints):
        env[v] = t
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        outs = _eqn(eqn, ins)
        for v, t in zip(eqn.outvars, outs):
            env[v] = t
    return [read(v) for v in jaxpr.outvars]


def _fixed_point_loop(body, consts, carry, extra=lambda c: _EMPTY, max_iter=64):
    """Iterate ``carry <- carry | body(consts, carry)`` until it stops growing."""
    carry = list(carry)
    for _ in range(max_iter):
        outs = body(consts, carry)
        pred = extra(carry)
        new = [c | o | pred for c, o in zip(carry, outs[: len(carry)])]
        if new == carry:
            return carry, outs
        carry = new
    every = _union(list(consts) + carry)
    return [every for _ in carry], [every for _ in outs]


def _eqn(eqn, ins: List[frozenset]) -> List[frozenset]:
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    params = eqn.params
    every = _union(ins)

    if name == "cond":
        index, ops = ins[0], ins[1:]
        outs = [_EMPTY] * n_out
        for br in params["branches"]:
            res = _run(br, ops)
            outs = [o | r for o, r in zip(outs, res)]
        return [o | index for o in outs]

    if name == "while":
        cn, bn = params["cond_nconsts"], params["body_nconsts"]
        cconsts, bconsts, carry = ins[:cn], ins[cn : cn + bn], ins[cn + bn :]
        cond_j, body_j = params["cond_jaxpr"], params["body_jaxpr"]

        def body(consts, c):
            return _run(body_j, list(consts) + list(c))

        def pred(c):
            return _run(cond_j, list(cconsts) + list(c))[0]

        carry, _ = _fixed_point_loop(body, bconsts, carry, extra=pred)
        p = pred(carry)
        return [c | p for c in carry]

    if name == "scan":
        nc, ncarry = params["num_consts"], params["num_carry"]
        consts, carry, xs = ins[:nc], ins[nc : nc + ncarry], ins[nc + ncarry :]
        body_j = params["jaxpr"]

        def body(cs, c):
            return _run(body_j, list(cs) + list(c) + list(xs))

        carry, outs = _fixed_point_loop(body, consts, carry)
        ys = outs[ncarry:]
        return list(carry) + list(ys)

    subs = [
        v
        for v in params.values()
        if isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr))
    ]
    if not subs:
        # A plain primitive: every output may depend on every input.
        return [every] * n_out
    if len(subs) == 1:
        sub = _closed(subs[0])
        if len(sub.invars) == len(ins) and len(sub.outvars) == n_out:
            # A call-like primitive (jit, closed_call, custom_jvp_call,
            # custom_vjp_call, checkpoint/remat, ...): follow it inside.
            return _run(sub, ins)
    # Unknown higher-order primitive: conservative.
    return [every] * n_out


def cross_leaf_dependencies(
    tx: optax.GradientTransformation, probe_params: Any, prefix: Optional[str] = "params"
) -> Optional[str]:
    """Describe a cross-leaf dependency of ``tx`` on ``probe_params``, or None.

    Args:
      tx: the transform to analyse.
      probe_params: a pytree of arrays or ``jax.ShapeDtypeStruct`` (only shapes
        and dtypes are used). It needs at least two leaves to find anything.
      prefix: what the leaves are called: leaf ``['w']`` is named
        ``prefix + "['w']"`` (e.g. ``"params['layers']"`` names
        ``params['layers']['w']``); ``None`` for a stand-in tree the user never
        wrote, whose leaves are then not named.

    Returns:
      ``None`` if every update leaf and every state leaf depends on at most one
      parameter leaf (through gradients, parameters and the state, over any
      number of steps); otherwise a sentence naming the offending output, e.g.
      ``"the update of params['b'] depends on several parameter leaves
      (params['a'], params['b'])"``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(probe_params)
    paths = [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(probe_params)[0]
    ]
    n = len(leaves)
    if n < 2:
        return None
    abstract = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves]
    params = jax.tree_util.tree_unflatten(treedef, abstract)

    init_j = jax.make_jaxpr(tx.init)(params)
    state_shape = jax.eval_shape(tx.init, params)
    n_state = len(jax.tree_util.tree_leaves(state_shape))

    def upd(g, s, p):
        return tx.update(g, s, p)

    upd_j = jax.make_jaxpr(upd)(params, state_shape, params)
    n_upd = len(jax.tree_util.tree_leaves(jax.eval_shape(upd, params, state_shape, params)[0]))

    sources = [frozenset([i]) for i in range(n)]
    state_t = _run(init_j, sources)
    assert len(state_t) == n_state, (len(state_t), n_state)
    out_t = [_EMPTY] * n_upd
    for _ in range(64):
        outs = _run(upd_j, list(sources) + list(state_t) + list(sources))
        out_t = outs[:n_upd]
        new_state = [a | b for a, b in zip(state_t, outs[n_upd:])]
        if new_state == state_t:
            break
        state_t = new_state

    state_paths = [
        "state" + jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(state_shape)[0]
    ]
    return _describe_dependency(prefix, paths, state_paths, out_t, state_t)


def _describe_dependency(prefix, paths, state_paths, out_t, state_t) -> Optional[str]:
    """The sentence for the first update/state leaf tainted by two parameter
    leaves (named with ``prefix``, or anonymously when it is ``None``)."""
    upd_names = [f"the update of {prefix}{p}" for p in paths]
    for what, taints in ((upd_names, out_t), (state_paths, state_t)):
        for name, t in zip(what, taints):
            if len(t) < 2:
                continue
            if prefix is None:
                kind = "an update leaf" if what is upd_names else "a state leaf"
                return f"{kind} depends on {len(t)} parameter leaves"
            names = ", ".join(prefix + paths[i] for i in sorted(t))
            return f"{name} depends on several parameter leaves ({names})"
    return None
