"""Stochastic rounding: given the same random integers, lomo_jax and lomo_torch
round every value to the same bf16/fp16 bit pattern (subnormals, the largest
finite values, signed zeros, infinities and overflow included)."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from lomo_jax.rounding import stochastic_round as jax_round
from lomo_torch.rounding import stochastic_round as torch_round


# values beyond the largest finite bf16/fp16 are made on purpose (overflow cases)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

DTYPES = {"bf16": (jnp.bfloat16, torch.bfloat16, ml_dtypes.bfloat16),
          "fp16": (jnp.float16, torch.float16, np.float16)}


def values(np_dtype, n=20000, seed=0):
    rng = np.random.default_rng(seed)
    fi = ml_dtypes.finfo(np_dtype)
    lo, hi = np.log2(float(fi.smallest_subnormal)) - 2, np.log2(float(fi.max)) + 0.5
    x = np.exp2(rng.uniform(lo, hi, n)) * rng.choice([-1.0, 1.0], n)
    specials = [0.0, -0.0, np.inf, -np.inf, float(fi.max), -float(fi.max),
                float(fi.smallest_subnormal), float(fi.tiny), float(fi.max) * 1.001]
    return np.concatenate([x, specials]).astype(np.float32)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_same_bits_same_rounding(name):
    jdt, tdt, ndt = DTYPES[name]
    x = values(ndt)
    noise = np.random.default_rng(1).integers(0, 2**24, x.shape).astype(np.int32)
    a = np.asarray(jax_round(x, jdt, noise=noise)).view(np.uint16)
    b = torch_round(torch.from_numpy(x), tdt, torch.from_numpy(noise)).view(torch.int16).numpy()
    np.testing.assert_array_equal(a, b.view(np.uint16))
    # the noise decides: other integers change a large share of the results
    other = np.random.default_rng(2).integers(0, 2**24, x.shape).astype(np.int32)
    c = np.asarray(jax_round(x, jdt, noise=other)).view(np.uint16)
    assert (a != c).mean() > 0.2


def test_bf16_int16_noise_form():
    """lomo_torch's optimizers draw bf16's noise as int16 ``s`` (read as
    ``r = (s + 2^15) << 8``): that form rounds as lomo_jax does with that ``r``."""
    x = values(ml_dtypes.bfloat16)
    s16 = np.random.default_rng(3).integers(-(2**15), 2**15, x.shape).astype(np.int16)
    r = (s16.astype(np.int32) + 2**15) << 8
    a = np.asarray(jax_round(x, jnp.bfloat16, noise=r)).view(np.uint16)
    b = torch_round(torch.from_numpy(x), torch.bfloat16, torch.from_numpy(s16))
    np.testing.assert_array_equal(a, b.view(torch.int16).numpy().view(np.uint16))
