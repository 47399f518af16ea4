r"""Stochastic rounding of fp32 values into bf16/fp16 parameters (PyTorch).

The same rule, bit for bit, as ``lomo_jax.rounding`` (see there for the
math): :math:`x` goes to its upper neighbour with probability
:math:`p = (|x| - \lfloor |x| \rfloor) / (\lceil |x| \rceil - \lfloor |x| \rfloor)`,
decided by :math:`u = r / 2^{24} < p` for a uniform integer
:math:`r \in [0, 2^{24})`; unbiased, always one of the two neighbours, exact
values unchanged; magnitudes above the largest finite value, infinities and
NaN round to nearest. Given the same :math:`r`, ``lomo_torch`` and
``lomo_jax`` round identically.

Where the integers come from (:class:`RoundingNoise`): a ``torch.Generator``
on the tensor's own device (mt19937 on the CPU, Philox on CUDA), re-seeded for
every parameter at every step with a 64-bit key derived from ``(seed, step,
parameter index, shard)`` by :func:`_mix` (SplitMix64's finaliser folded over
the integers; unlike ``hash`` of a tuple it is the same on every Python and
process). So the bits a parameter gets do not depend on how many other
parameters (or shards of different sizes) drew before it: DDP replicas and
FSDP2 ranks holding a replicated parameter draw the same bits, shards of one
parameter draw different ones, and a run resumed from ``state_dict()`` (which
carries the seed and the step) draws what the uninterrupted run would have.
Every generated bit is used: bf16 takes 16 per element (all its rule reads;
the ``int16`` form of :func:`stochastic_round`), fp16 24, four or two
elements per 64-bit word. bf16's rule is then torch integer ops in the fp32
value's own storage (add the 16 noise bits to the int32 view, keep the high
half: the add-and-truncate of torchao's ``_fp32_to_bf16_sr``), on any device;
no compiled code.

Example::

    from lomo_torch.rounding import stochastic_round
    r = torch.randint(0, 2**24, w.shape, dtype=torch.int32)
    p.copy_(stochastic_round(w, torch.bfloat16, r))     # w: the fp32 new value
"""

from __future__ import annotations

import math

import torch

__all__ = ["NOISE_BITS", "RoundingNoise", "is_low_precision", "stochastic_round",
           "stochastic_round_into"]

NOISE_BITS = 24
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_LARGEST_FINITE = {dtype: torch.finfo(dtype).max for dtype in _LOW_PRECISION}


def is_low_precision(dtype: torch.dtype) -> bool:
    """bf16 and fp16: the dtypes stochastic rounding applies to."""
    return dtype in _LOW_PRECISION


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, noise: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32) rounded stochastically to ``dtype`` with the random integers
    ``noise`` (``x``'s shape): ``int32`` values :math:`r \\in [0, 2^{24})`, or
    for bf16 also ``int16`` values :math:`s`, read as
    :math:`r = (s + 2^{15}) \\cdot 2^8` -- bf16's rule reads only the top 16
    bits of :math:`r`, and this is the form :class:`RoundingNoise` draws them
    in for bf16 (no conversion pass). Other dtypes: a plain cast."""
    if not is_low_precision(dtype):
        return x.to(dtype)
    x = x.float()
    return _round(x, dtype, noise, _all_finite_in(x, dtype))


def _round(x, dtype, noise, finite: bool):
    """:func:`stochastic_round` of fp32 ``x`` into bf16/fp16, ``finite``: whether
    :func:`_all_finite_in` holds (then the round-to-nearest pass is skipped)."""
    if dtype == torch.bfloat16:
        rounded = _bf16_carry_(x.view(torch.int32).clone(), _int16_form(noise))
        rounded = rounded.to(torch.int16).view(torch.bfloat16)
    elif noise.dtype == torch.int16:
        raise ValueError(f"int16 noise carries 16 bits, enough for bfloat16 only; {dtype} "
                         f"needs int32 noise in [0, 2^{NOISE_BITS})")
    else:
        rounded = _fp16_by_value(x, noise.to(torch.int32))
    return rounded if finite else _nearest_beyond_max(x, rounded, dtype)


def _int16_form(noise):
    """bf16's noise as int16 ``s``: as given, or from 24-bit ``r``: ``(r >> 8) - 2^15``."""
    if noise.dtype == torch.int16:
        return noise
    return ((noise.to(torch.int32) >> (NOISE_BITS - 16)) - 2**15).to(torch.int16)


def stochastic_round_into(out: torch.Tensor, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Store ``stochastic_round(x, out.dtype, noise)`` in ``out``, bit for bit, and
    return ``out``. ``x`` is scratch: a contiguous fp32 tensor the caller no
    longer needs may be overwritten. The optimizers' path: for bf16 with
    ``int16`` noise on the CPU (where each elementwise pass is the cost) it
    works in ``x``'s own storage, three integer passes and the store, where
    :func:`stochastic_round` allocates; otherwise it is that function."""
    if not is_low_precision(out.dtype):
        return out.copy_(x)
    finite = _all_finite_in(x, out.dtype)
    if (finite and out.dtype == torch.bfloat16 and noise.dtype == torch.int16
            and x.dtype == torch.float32 and x.is_contiguous()):
        out.view(torch.int16).copy_(_bf16_carry_(x.view(torch.int32), noise))
        return out
    return out.copy_(_round(x.float(), out.dtype, noise, finite))


def _bf16_carry_(bits, s16):
    """bf16's rule on fp32 bit patterns ``bits`` (int32, overwritten): returns the
    rounded patterns in the high half, shifted down (exact in int16). ``bits + 2^16
    - 1 - r16`` carries into the high half (the magnitude's next pattern) exactly
    when the low 16 bits exceed ``r16 = s16 + 2^15``: with probability ``p``."""
    return bits.sub_(s16).add_(2**15 - 1).bitwise_right_shift_(16)


def _fp16_by_value(x, r):
    x_bits = x.view(torch.int32)
    a_bits = x_bits & 0x7FFFFFFF  # |x|, by bits
    down_bits, round_up = _floor_by_value(a_bits.view(torch.float32), r, torch.float16)
    sign = (x_bits >> 16) & 0x8000
    pattern = (down_bits + round_up.to(torch.int32)) | sign
    return pattern.to(torch.int16).view(torch.float16)  # int16 wraps: the pattern's 16 bits


def _nearest_beyond_max(x, rounded, dtype):
    """Magnitudes above ``dtype``'s largest finite value, infinities and NaN: to
    nearest (called only when :func:`_all_finite_in` cannot rule them out)."""
    big = _LARGEST_FINITE[dtype]
    return torch.where(x.abs() <= big, rounded, x.to(dtype))


def _all_finite_in(x, dtype) -> bool:
    """True where ``x`` is known to lie within ``dtype``'s finite range (no NaN):
    checked on the CPU (one min/max pass, where elementwise passes are the cost);
    on an accelerator False (unknown without a host sync)."""
    if x.numel() == 0:
        return True
    if not x.is_cpu:
        return False
    big = _LARGEST_FINITE[dtype]
    lo, hi = torch.aminmax(x)
    return -big <= lo.item() and hi.item() <= big  # False for NaN


def _floor_by_value(a, r, dtype):
    near = a.to(dtype)
    bits = near.view(torch.int16).to(torch.int32)
    bits = torch.where(near.float() > a, bits - 1, bits)
    down = bits.to(torch.int16).view(dtype).float()
    up = (bits + 1).to(torch.int16).view(dtype).float()
    u = r.float() * (2.0**-NOISE_BITS)
    return bits, u < (a - down) / (up - down)


class RoundingNoise:
    """Random integers for stochastic rounding, reproducible per (step, parameter, shard).

    Args:
      seed: the base seed (an ``int``).

    Example::

        noise = RoundingNoise(seed=0)
        noise.round_into(p.data, w, step=3, index=0)   # w: the fp32 new value (scratch)
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._generators = {}

    def _words(self, count: int, device: torch.device, key: int) -> torch.Tensor:
        """``count`` uniform 64-bit words (``int64``) on ``device`` determined by
        ``key``: that device's ``torch.Generator`` seeded with ``key``."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed(key)
        return torch.empty(count, dtype=torch.int64, device=device).random_(
            -(2**63), None, generator=gen)  # the full int64 range: 64 uniform bits

    def _key(self, step, index, shard):
        shard = tuple(shard) if isinstance(shard, (tuple, list)) else (shard,)
        return _mix(self.seed, step, index, *shard)

    def draw(self, shape, device, step: int, index: int, shard=0, *,
             dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """Integers of ``shape`` on ``device`` for parameter ``index`` (its ``shard``:
        an int or a tuple of mesh coordinates) at optimizer step ``step``: ``int32``
        in ``[0, 2^24)``, or ``int16`` (every value; bf16's form, see
        :func:`stochastic_round`)."""
        if dtype not in (torch.int16, torch.int32):
            raise ValueError(f"dtype must be torch.int16 or torch.int32, got {dtype}")
        n = math.prod(shape)
        if n == 0:  # nothing to draw (an empty word array cannot be viewed as int16)
            return torch.empty(tuple(shape), dtype=dtype, device=device)
        per_word = 64 // torch.iinfo(dtype).bits  # 4 (or 2) integers a 64-bit word
        words = self._words(-(-n // per_word), torch.device(device),
                            self._key(step, index, shard))
        r = words.view(dtype)[:n].view(tuple(shape))
        if dtype == torch.int16:
            return r
        return (r >> (32 - NOISE_BITS)).bitwise_and_(2**NOISE_BITS - 1)

    def round_into(self, out: torch.Tensor, x: torch.Tensor, step: int, index: int,
                   shard=0) -> torch.Tensor:
        """Store ``stochastic_round(x, out.dtype, noise)`` in ``out``, bit for bit, where
        ``noise = self.draw(x.shape, x.device, step, index, shard, dtype=form)``
        (``form``: ``int16`` for bf16, ``int32`` for fp16), and return ``out``.
        ``x`` (fp32, ``out``'s shape) is scratch, as in :func:`stochastic_round_into`."""
        form = torch.int16 if out.dtype == torch.bfloat16 else torch.int32
        noise = self.draw(x.shape, x.device, step, index, shard, dtype=form)
        return stochastic_round_into(out, x, noise)


_MASK64 = 2**64 - 1


def _mix(*values: int) -> int:
    """A 64-bit key from integers: SplitMix64's finaliser folded over them
    (defined here, so it is the same on every Python and process, unlike
    ``hash`` of a tuple)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h
