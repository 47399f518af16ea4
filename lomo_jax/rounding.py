r"""Stochastic rounding of fp32 values into bf16/fp16 parameters.

With bf16 or fp16 parameters and no fp32 master copy (LOMO's premise), every
update is rounded into the parameter's precision; round-to-nearest drops any
update smaller than half a spacing, so at fine-tuning learning rates most
weights never move. Stochastic rounding rounds :math:`x` to its upper
neighbour with probability equal to the remainder's share of the spacing:

.. math::
    \lfloor x \rfloor \le x < \lceil x \rceil, \qquad
    p = \frac{|x| - \lfloor |x| \rfloor}{\lceil |x| \rceil - \lfloor |x| \rfloor}, \qquad
    \mathrm{SR}(x) = \mathrm{sign}(x) \cdot
    \begin{cases} \lceil |x| \rceil & u < p \\ \lfloor |x| \rfloor & \text{else} \end{cases}

with :math:`u = r / 2^{24}` for a uniform integer :math:`r \in [0, 2^{24})`.
So :math:`\mathbb{E}[\mathrm{SR}(x)] = x` (exactly, for bf16 always and for
fp16 wherever :math:`p` has at most 24 bits, i.e. except deep in fp16's
subnormal range), the result is always one of the two neighbours, an exactly
representable value is returned unchanged, and it costs no memory.
Magnitudes above the largest finite value, infinities and NaN are rounded to
nearest, as a plain cast would (so an overflow still shows as ``inf``).

The neighbours come from the bit pattern (the next magnitude is the next
pattern): for bf16, the top 16 bits of the fp32 pattern are the floor and
the low 16 bits are :math:`2^{16} p`, all integer arithmetic; for fp16, the
floor comes from round-to-nearest and :math:`p` from an exact fp32
division. ``lomo_torch.rounding`` does the same: given the same :math:`r`,
both frameworks round identically (``parity_tests``). (bf16 uses only the top
16 bits of :math:`r`, so :math:`p` is exact.)

The integers :math:`r` of one array come from its key: two 32-bit seeds drawn
with ``jax.random``, then a 32-bit integer hash of each element's index and
the seeds (a few integer operations per element; drawing every element from
threefry would cost more than the rest of an optimizer step on a CPU). The
index is the element's global one, so the bits do not depend on how the
array is sharded.

Example::

    import jax, lomo_jax

    params = lomo_jax.apply_updates(params, updates, rng=jax.random.key(0))
    y = lomo_jax.rounding.stochastic_round(x_f32, jnp.bfloat16, jax.random.key(1))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax

__all__ = ["apply_updates", "is_low_precision", "stochastic_round"]

NOISE_BITS = 24
_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_low_precision(dtype) -> bool:
    """bf16 and fp16: the dtypes stochastic rounding applies to."""
    return jnp.dtype(dtype) in _LOW_PRECISION


def stochastic_round(x, dtype, key=None, *, noise=None) -> jax.Array:
    """Round ``x`` (computed in fp32) stochastically to ``dtype``.

    Args:
      x: values; cast to fp32 first.
      dtype: ``bfloat16`` or ``float16`` (any other dtype: a plain cast).
      key: a PRNG key for the random integers, or
      noise: the integers :math:`r \\in [0, 2^{24})` themselves (``x``'s shape),
        e.g. to reproduce another implementation's draws.

    Returns:
      ``x`` rounded to ``dtype``, each element to one of its two neighbours.
    """
    dtype = jnp.dtype(dtype)
    if not is_low_precision(dtype):
        return jnp.asarray(x).astype(dtype)
    x = jnp.asarray(x).astype(jnp.float32)
    if noise is None:
        if key is None:
            raise ValueError("stochastic_round needs a PRNG key or the noise integers.")
        noise = _draw(key, x.shape)
    r = jnp.asarray(noise).astype(jnp.uint32)
    x_bits = lax.bitcast_convert_type(x, jnp.uint32)
    a_bits = x_bits & 0x7FFFFFFF  # |x|, by bits: no flush-to-zero of subnormals
    if dtype == jnp.bfloat16:
        down_bits, round_up = _bf16_floor(a_bits, r)
    else:
        down_bits, round_up = _floor_by_value(lax.bitcast_convert_type(a_bits, jnp.float32), r, dtype)
    sign = (x_bits >> 16).astype(jnp.uint16) & 0x8000
    rounded = lax.bitcast_convert_type((down_bits + round_up.astype(jnp.uint16)) | sign, dtype)
    finite = lax.bitcast_convert_type(a_bits, jnp.float32) <= jnp.finfo(dtype).max
    return jnp.where(finite, rounded, x.astype(dtype))


def _draw(key, shape):
    """Uniform integers in ``[0, 2^24)``, one per element of ``shape``.

    Two 32-bit seeds come from ``jax.random`` (the key's own generator); each
    element's integer is a 32-bit hash of its flat index and the seeds
    (``lowbias32`` twice: a bijection with full avalanche), whose top 24 bits
    are kept. That costs a handful of integer operations per element, where
    drawing every element from threefry costs ~100 (the whole cost of
    stochastic rounding on a CPU, measured in ``benchmarks/precision.py``).
    """
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    size = 1
    for d in shape:
        size *= int(d)
    index = lax.iota(jnp.uint32, size).reshape(shape)
    return _lowbias32(_lowbias32(index + seeds[0]) ^ seeds[1]) >> (32 - NOISE_BITS)


def _lowbias32(x):
    """A 32-bit integer mixer (C. Wellons' ``lowbias32``): a bijection whose output
    bits each depend on every input bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _bf16_floor(a_bits, r):
    """bf16 is fp32's top 16 bits: the floor of ``|x|`` is the truncated pattern
    and ``p`` is the dropped 16 bits over 2^16 (integers: exact)."""
    return (a_bits >> 16).astype(jnp.uint16), (r >> (NOISE_BITS - 16)) < (a_bits & 0xFFFF)


def _floor_by_value(a, r, dtype):
    """fp16: the floor from round-to-nearest (one pattern lower if that went up);
    ``p = (a - floor) / (next - floor)``, exact in fp32 (the spacing is a power
    of two, fp16's subnormals are fp32 normals)."""
    near = a.astype(dtype)
    bits = lax.bitcast_convert_type(near, jnp.uint16)
    bits = jnp.where(near.astype(jnp.float32) > a, bits - 1, bits)
    down = lax.bitcast_convert_type(bits, dtype).astype(jnp.float32)
    up = lax.bitcast_convert_type(bits + 1, dtype).astype(jnp.float32)
    u = r.astype(jnp.float32) * (2.0**-NOISE_BITS)
    return bits, u < (a - down) / (up - down)


def apply_updates(params: optax.Params, updates: optax.Updates, *, rng=None) -> optax.Params:
    """``params + updates``, each leaf back in its dtype.

    ``rng=None``: exactly ``optax.apply_updates``. With a PRNG key, ``param +
    update`` is computed in fp32 and rounded stochastically into every bf16 /
    fp16 leaf (leaf ``j`` of the flattened tree draws with
    ``jax.random.fold_in(rng, j)``); other leaves are ``optax.apply_updates``'
    bit for bit.

    Example::

        updates, opt_state = tx.update(grads, opt_state, params)
        key, step_key = jax.random.split(key)
        params = lomo_jax.apply_updates(params, updates, rng=step_key)
    """
    if rng is None:
        return optax.apply_updates(params, updates)
    leaves, treedef = jax.tree.flatten(params)
    u_leaves = treedef.flatten_up_to(updates)
    out = []
    for j, (p, u) in enumerate(zip(leaves, u_leaves)):
        if is_low_precision(jnp.result_type(p)) and u is not None:
            new = jnp.asarray(p).astype(jnp.float32) + jnp.asarray(u).astype(jnp.float32)
            out.append(stochastic_round(new, jnp.result_type(p), jax.random.fold_in(rng, j)))
        else:
            out.append(optax.apply_updates(p, u))
    return jax.tree.unflatten(treedef, out)

