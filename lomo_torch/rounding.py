r"""Stochastic rounding of fp32 values into bf16/fp16 parameters (PyTorch).

The same rule, bit for bit, as ``lomo_jax.rounding`` (see there for the
math): :math:`x` goes to its upper neighbour with probability
:math:`p = (|x| - \lfloor |x| \rfloor) / (\lceil |x| \rceil - \lfloor |x| \rfloor)`,
decided by :math:`u = r / 2^{24} < p` for a uniform integer
:math:`r \in [0, 2^{24})`; unbiased, always one of the two neighbours, exact
values unchanged; magnitudes above the largest finite value, infinities and
NaN round to nearest. Given the same :math:`r`, ``lomo_torch`` and
``lomo_jax`` round identically.

Where the integers come from (:class:`RoundingNoise`): one ``torch.Generator``
per device, re-seeded for every parameter at every step from
``(seed, step, parameter index, shard)``. So the bits a parameter gets do not
depend on how many other parameters (or shards of different sizes) drew
before it: DDP replicas and FSDP2 ranks holding a replicated parameter draw
the same bits, shards of one parameter draw different ones, and a run resumed
from ``state_dict()`` (which carries the seed and the step) draws what the
uninterrupted run would have.

Example::

    from lomo_torch.rounding import stochastic_round
    r = torch.randint(0, 2**24, w.shape, dtype=torch.int32)
    p.copy_(stochastic_round(w, torch.bfloat16, r))     # w: the fp32 new value
"""

from __future__ import annotations

import torch

__all__ = ["NOISE_BITS", "RoundingNoise", "is_low_precision", "stochastic_round"]

NOISE_BITS = 24
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def is_low_precision(dtype: torch.dtype) -> bool:
    """bf16 and fp16: the dtypes stochastic rounding applies to."""
    return dtype in _LOW_PRECISION


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, noise: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32) rounded stochastically to ``dtype`` with the integers
    ``noise`` in ``[0, 2^24)`` (``x``'s shape). Other dtypes: a plain cast."""
    if not is_low_precision(dtype):
        return x.to(dtype)
    x = x.float()
    r = noise.to(torch.int32)
    if dtype == torch.bfloat16:
        rounded = _bf16_by_carry(x, r)
    else:
        rounded = _fp16_by_value(x, r)
    return _nearest_beyond_max(x, rounded, dtype)


def _bf16_by_carry(x, r):
    # Adding 2^16 - 1 - r16 to the dropped 16 bits carries into the kept ones (the
    # magnitude's next pattern) exactly when r16 < those bits: probability p. In
    # place on one fresh int32 buffer: this runs on every parameter every step.
    bits = r >> (NOISE_BITS - 16)
    bits.neg_().add_(0xFFFF).add_(x.view(torch.int32)).bitwise_right_shift_(16)
    return bits.to(torch.int16).view(torch.bfloat16)


def _fp16_by_value(x, r):
    x_bits = x.view(torch.int32)
    a_bits = x_bits & 0x7FFFFFFF  # |x|, by bits
    down_bits, round_up = _floor_by_value(a_bits.view(torch.float32), r, torch.float16)
    sign = (x_bits >> 16) & 0x8000
    pattern = (down_bits + round_up.to(torch.int32)) | sign
    return pattern.to(torch.int16).view(torch.float16)  # int16 wraps: the pattern's 16 bits


def _nearest_beyond_max(x, rounded, dtype):
    """Magnitudes above ``dtype``'s largest finite value, infinities and NaN: to
    nearest. On the CPU, where elementwise passes are the cost, only when ``x``
    holds one (one min/max pass); on an accelerator always (no host sync)."""
    big = torch.finfo(dtype).max
    if x.numel() == 0:
        return rounded
    if x.device.type == "cpu":
        lo, hi = torch.aminmax(x)
        if bool(lo >= -big) and bool(hi <= big):  # False for NaN
            return rounded
    return torch.where(x.abs() <= big, rounded, x.to(dtype))


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
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._generators = {}

    def draw(self, shape, device, step: int, index: int, shard: int = 0) -> torch.Tensor:
        """``int32`` integers in ``[0, 2^24)`` of ``shape`` on ``device`` for
        parameter ``index`` (its ``shard``) at optimizer step ``step``."""
        device = torch.device(device)
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        # int hashing is deterministic across processes (no hash randomisation)
        gen.manual_seed(hash((self.seed, int(step), int(index), int(shard))) & (2**63 - 1))
        # random_() on int32 is uniform on [0, 2^31): its top 24 bits
        return torch.empty(tuple(shape), dtype=torch.int32, device=device).random_(
            generator=gen).bitwise_right_shift_(31 - NOISE_BITS)
