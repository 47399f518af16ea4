r"""The PRNG keys of one fused step, derived here and nowhere else.

The step's key :math:`k` is ``step(params, opt_state, batch, key=k)``; without
``key=`` (and whenever stochastic rounding draws bits) it comes from the
state: :math:`(r', k') = \mathrm{split}(\text{opt\_state.rng})`, ``r'`` the
new state key. From :math:`k'`:

* unit :math:`u` (embed 0, layers 1, head 2) rounds stochastically with
  :math:`\mathrm{fold\_in}(k', u)`, layer :math:`i` of the stack with
  :math:`\mathrm{fold\_in}(\mathrm{fold\_in}(k', 1), i)`;
* a layer taking ``key`` without ``key=`` given uses
  :math:`k = \mathrm{fold\_in}(k', 3)` (so the rounding streams are those of a
  keyless layer).

Layer :math:`i` then gets :math:`k_i = \mathrm{fold\_in}(k, i)` and, with
micro-batches, micro-batch :math:`m` gets :math:`\mathrm{fold\_in}(k_i, m)`,
in the forward and in every recompute of the backward scans, so dropout
masks agree; ``LayeredModel.loss(params, batch, key=k)`` derives the same.

Example::

    k2 = lomo_jax.layer_key(jax.random.key(0), 2)   # layer 2's key for step key 0
"""

from __future__ import annotations

import jax

from lomo_jax._layout import Units


def layer_key(step_key, index, micro=None):
    r"""The key layer ``index`` gets: :math:`k_i = \mathrm{fold\_in}(k, i)`, and with
    micro-batches :math:`\mathrm{fold\_in}(k_i, m)` for micro-batch ``m``.

    Example: ``layer_key(jax.random.key(0), 2)`` is what layer 2 of
    ``model.loss(params, batch, key=jax.random.key(0))`` receives.
    """
    key = jax.random.fold_in(step_key, index)
    return key if micro is None else jax.random.fold_in(key, micro)


def step_keys(rounding: str, rng, key, takes_key: bool):
    """``(new rng, rounding keys, layers' step key)`` for one step, as the module
    docstring derives them: ``rng`` is split only when stochastic rounding or a
    key-taking layer without ``key=`` draws from it; a given ``key`` is the
    layers' step key itself; ``None`` for what is unused.

    Example: ``rng, keys, k = step_keys("stochastic", opt_state.rng, None, False)``.
    """
    draw = takes_key and key is None
    if rounding != "stochastic" and not draw:
        return None, None, key
    rng, step_key = jax.random.split(rng)
    keys = None
    if rounding == "stochastic":
        keys = Units(*(jax.random.fold_in(step_key, u) for u in range(3)))
    return rng, keys, jax.random.fold_in(step_key, 3) if draw else key
