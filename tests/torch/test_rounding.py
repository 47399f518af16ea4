"""lomo_torch.rounding and stochastic_rounding=True in Lomo / AdaLomo."""

import copy
import math

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

import lomo_torch
from lomo_torch.rounding import RoundingNoise, stochastic_round, stochastic_round_into


# values beyond the largest finite bf16/fp16 are made on purpose (overflow cases)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

DTYPES = {"bf16": (torch.bfloat16, ml_dtypes.bfloat16), "fp16": (torch.float16, np.float16)}


def neighbours(x, np_dtype):
    """(floor, ceil) of float32 ``x`` in ``np_dtype`` (numpy/ml_dtypes nextafter)."""
    near = x.astype(np_dtype)
    inf = np.array(np.inf, np_dtype)
    f32 = near.astype(np.float32)
    return (np.where(f32 > x, np.nextafter(near, -inf), near),
            np.where(f32 < x, np.nextafter(near, inf), near))


def samples(np_dtype, n=4000, seed=0):
    rng = np.random.default_rng(seed)
    fi = ml_dtypes.finfo(np_dtype)
    lo, hi = np.log2(float(fi.smallest_subnormal)), np.log2(float(fi.max))
    x = np.exp2(rng.uniform(lo, hi, n)) * rng.choice([-1.0, 1.0], n)
    return np.concatenate([x, [float(fi.max) * 0.9999, float(fi.smallest_subnormal) * 0.7,
                               1.0 + 2.0**-12]]).astype(np.float32)


def draw(x, n_or_shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**24, n_or_shape, generator=g, dtype=torch.int32)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_neighbours_and_unbiased(name):
    tdt, ndt = DTYPES[name]
    x = samples(ndt)
    floor, ceil = neighbours(x, ndt)
    out = stochastic_round(torch.from_numpy(x), tdt, draw(x, x.shape)).float().numpy()
    assert np.all((out == floor.astype(np.float32)) | (out == ceil.astype(np.float32)))
    # unbiased: 20000 draws of 64 values, within 5 standard errors
    x = x[:64]
    floor, ceil = (a.astype(np.float64) for a in neighbours(x, ndt))
    n = 20000
    xs = torch.from_numpy(x).expand(n, -1)
    mean = stochastic_round(xs, tdt, draw(x, (n, 64), seed=1)).double().mean(0).numpy()
    spacing = np.where(ceil > floor, ceil - floor, 1.0)
    p = (x - floor) / spacing
    sigma = spacing * np.sqrt(np.maximum(p * (1 - p), 1e-12) / n)
    assert np.all(np.abs(mean - x) <= 5 * sigma + 1e-7 * np.abs(x))


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_special_values(name):
    tdt, ndt = DTYPES[name]
    fi = torch.finfo(tdt)
    exact = torch.tensor([0.0, -0.0, 1.0, fi.max, fi.smallest_normal])
    assert torch.equal(stochastic_round(exact, tdt, draw(exact, (5,))).float().view(torch.int32),
                       exact.view(torch.int32))
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), fi.max * 1.01])
    out = stochastic_round(special, tdt, draw(special, (4,))).float()
    torch.testing.assert_close(out, special.to(tdt).float(), equal_nan=True, rtol=0, atol=0)
    # finite in fp32 beyond the largest finite value (to nearest: the max, never inf),
    # and NaNs whose bits a carry would wrap into the sign: 64 copies, 64 draws each
    spacing = float(fi.max) - float(np.nextafter(ndt(fi.max), ndt(0)))
    beyond = torch.tensor([fi.max + 0.49 * spacing, -(fi.max + 0.49 * spacing)])
    nans = torch.tensor([0x7FFFFFFF, -1], dtype=torch.int32).view(torch.float32)
    edge = torch.cat([beyond, nans]).repeat(64)
    out = stochastic_round(edge, tdt, draw(edge, edge.shape)).float()
    torch.testing.assert_close(out, edge.to(tdt).float(), equal_nan=True, rtol=0, atol=0)
    # an empty tensor (an FSDP2 shard of a parameter with fewer rows than ranks)
    empty = torch.empty(0, 4)
    assert stochastic_round(empty, tdt, draw(empty, (0, 4))).shape == (0, 4)


@pytest.mark.parametrize("form", [torch.int32, torch.int16])
def test_noise_is_reproducible_per_step_parameter_and_shard(form):
    noise = RoundingNoise(seed=3)
    a = noise.draw((4, 5), "cpu", step=7, index=2, dtype=form)
    assert a.dtype == form and a.shape == (4, 5)
    assert torch.equal(a, RoundingNoise(seed=3).draw((4, 5), "cpu", step=7, index=2, dtype=form))
    for other in (dict(step=8, index=2), dict(step=7, index=3), dict(step=7, index=2, shard=1),
                  dict(step=7, index=2, shard=(0, 1))):
        assert not torch.equal(a, noise.draw((4, 5), "cpu", dtype=form, **other)), other
    assert not torch.equal(a, RoundingNoise(seed=4).draw((4, 5), "cpu", step=7, index=2, dtype=form))


def test_noise_is_pinned():
    """The integers a (seed, step, parameter, shard) gets are part of a checkpoint's
    meaning (resume draws them again): a change of generator or key must show here."""
    assert RoundingNoise(seed=3).draw((6,), "cpu", step=7, index=2, dtype=torch.int16).tolist() \
        == PINNED_INT16
    assert RoundingNoise(seed=3).draw((3,), "cpu", step=7, index=2, shard=(1, 0)).tolist() \
        == PINNED_INT32


# torch.Generator (CPU: mt19937) seeded with _mix(seed, step, index, *shard)
PINNED_INT16 = [31540, 1934, -20817, 9614, 20208, -18828]
PINNED_INT32 = [13111368, 15499039, 6383782]


def test_lomo_torch_is_pure_python():
    """No compiled code in lomo_torch: bf16 stochastic rounding is torch ops on any
    device (no C source, no built extension beside the modules)."""
    import pathlib

    root = pathlib.Path(lomo_torch.__file__).parent
    compiled = [f.name for f in root.rglob("*")
                if f.suffix in (".c", ".cc", ".cpp", ".h", ".so", ".pyd")]
    assert not compiled, compiled


@pytest.mark.parametrize("form", [torch.int32, torch.int16])
def test_noise_is_uniform(form):
    """Every integer of the range is equally likely: the mean and the share of each
    top-bit pattern within 5 standard errors (a generator that wasted bits -- int32
    ``random_()`` gives 31 -- or mis-split a word would fail)."""
    lo, hi = (0, 2**24) if form == torch.int32 else (-(2**15), 2**15)
    r = RoundingNoise(seed=0).draw((1 << 18,), "cpu", step=1, index=0, dtype=form).double()
    n = r.numel()
    assert lo <= r.min() and r.max() < hi
    mean, sd = (lo + hi - 1) / 2, (hi - lo) / 12**0.5
    assert abs(r.mean().item() - mean) < 5 * sd / n**0.5
    top = ((r - lo) * 8 // (hi - lo)).long()  # which eighth of the range
    share = torch.bincount(top, minlength=8).double() / n
    assert torch.all((share - 1 / 8).abs() < 5 * (1 / 8 * 7 / 8 / n) ** 0.5), share


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_round_into_equals_round(name):
    """The optimizers' in-place path stores what stochastic_round returns, bit for
    bit: ordinary values (in place), and values beyond the largest finite one and
    NaN (its fallback); for bf16 with both noise forms."""
    tdt, ndt = DTYPES[name]
    fi = torch.finfo(tdt)
    x = torch.from_numpy(samples(ndt))
    odd = torch.tensor([float("nan"), fi.max * 1.001, -float("inf"), 0.0])
    forms = [torch.int32] + ([torch.int16] if tdt == torch.bfloat16 else [])
    for values in (x, torch.cat([x, odd])):
        for form in forms:
            noise = RoundingNoise(seed=1).draw(values.shape, "cpu", step=0, index=0, dtype=form)
            want = stochastic_round(values, tdt, noise)
            out = torch.empty(values.shape, dtype=tdt)
            got = stochastic_round_into(out, values.clone(), noise)
            assert got is out
            assert torch.equal(out.view(torch.int16), want.view(torch.int16)), (name, form)
        # the optimizers' call: the draw and the rounding in one (bf16: the int16 form)
        form = torch.int16 if tdt == torch.bfloat16 else torch.int32
        for shape in (values.shape, (2, values.numel() // 2), (0, 3)):
            v = values[: math.prod(shape)].reshape(shape)
            want = stochastic_round(v, tdt, RoundingNoise(seed=1).draw(shape, "cpu", 5, 3, (1, 2),
                                                                       dtype=form))
            out = torch.empty(shape, dtype=tdt)
            assert RoundingNoise(seed=1).round_into(out, v.clone(), 5, 3, (1, 2)) is out
            assert torch.equal(out.view(torch.int16), want.view(torch.int16)), (name, shape)
            if len(shape) == 2:  # strided (transposed) storage for the value and the parameter
                out = torch.empty(shape[::-1], dtype=tdt).t()
                RoundingNoise(seed=1).round_into(out, v.t().contiguous().t(), 5, 3, (1, 2))
                assert torch.equal(out.view(torch.int16), want.view(torch.int16)), (name, "t")


def test_round_into_carries_exactly_at_each_elements_threshold():
    """bf16 ``round_into`` at its decision boundary, for every element position:
    each value's low 16 bits are set to its own drawn threshold ``r = s + 2^15``
    (stays: up needs low bits > r) or to ``r + 1`` (goes up). An addend off by one
    in any lane of the 64-bit words, or a noise word misaligned with its element,
    moves these values (random values meet the boundary once in 65536)."""
    shape, step, index, shard = (8, 131), 5, 3, (1, 2)
    s = RoundingNoise(seed=1).draw(shape, "cpu", step, index, shard, dtype=torch.int16)
    r = s.to(torch.int32) + 2**15  # in [0, 2^16)
    signs = torch.where(torch.arange(s.numel()).reshape(shape) % 3 == 0, -1, 1)
    high = (torch.tensor(0.75, dtype=torch.bfloat16) * signs).to(torch.bfloat16)
    high = high.view(torch.int16).to(torch.int32) << 16
    for low, moves in ((r, False), ((r + 1).clamp(max=2**16 - 1), r < 2**16 - 1)):
        x = (high | low).view(torch.float32)
        out = RoundingNoise(seed=1).round_into(torch.empty(shape, dtype=torch.bfloat16),
                                               x.clone(), step, index, shard)
        moved = out.view(torch.int16).to(torch.int32) != high >> 16
        assert torch.equal(moved, moves if torch.is_tensor(moves)
                           else torch.full(shape, moves)), int((moved != moves).sum())


@pytest.mark.parametrize("inplace", [False, True])
def test_bf16_rule_is_exact_over_every_noise_value(inplace):
    """Exhaustively, over all 2**16 int16 noise values: a value whose low 16 bits
    are ``k`` rounds up for exactly ``k`` of them (``u < p`` with ``p = k / 2**16``,
    strict), so exact bf16 values (``k = 0``) never move; an off-by-one in the
    carry moves them for one noise value in 65536 and fails here."""
    noise = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    for base in (1.0, -3.0, 2.0**-100):
        hi = torch.tensor(base, dtype=torch.bfloat16).view(torch.int16).to(torch.int32)
        for k in (0, 1, 2**15, 2**16 - 1):
            x = torch.full(noise.shape, 0, dtype=torch.int32).add_((hi << 16) | k)
            x = x.view(torch.float32)
            if inplace:
                out = stochastic_round_into(torch.empty(x.shape, dtype=torch.bfloat16),
                                            x.clone(), noise)
            else:
                out = stochastic_round(x, torch.bfloat16, noise)
            ups = int((out.view(torch.int16).to(torch.int32) != hi).sum())
            assert ups == k, (base, k, ups)


def test_bf16_rule_is_add_and_truncate():
    """bf16's rule on finite values is torchao's ``_fp32_to_bf16_sr``: add 16 random
    bits (here the addend ``t = 2^15 - 1 - s`` of the int16 noise ``s``) to the fp32
    bit pattern and truncate the low 16 bits; the in-place path stores the same."""
    x = torch.from_numpy(samples(ml_dtypes.bfloat16))
    s = RoundingNoise(seed=4).draw(x.shape, "cpu", step=1, index=0, dtype=torch.int16)
    t = 2**15 - 1 - s.to(torch.int32)
    want = ((x.view(torch.int32) + t) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    assert torch.equal(stochastic_round(x, torch.bfloat16, s).view(torch.int16),
                       want.view(torch.int16))
    out = stochastic_round_into(torch.empty(x.shape, dtype=torch.bfloat16), x.clone(), s)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))


def test_int16_noise_is_bf16_only():
    with pytest.raises(ValueError, match="int16 noise.*bfloat16"):
        stochastic_round(torch.ones(3), torch.float16, torch.zeros(3, dtype=torch.int16))
    with pytest.raises(ValueError, match="dtype must be"):
        RoundingNoise(0).draw((3,), "cpu", step=0, index=0, dtype=torch.int64)


# --------------------------------------------------------------------------
# In the optimizers
# --------------------------------------------------------------------------


def model_and_data(dtype, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 8)).to(dtype)
    x = torch.randn(32, 64).to(dtype)
    y = torch.randint(0, 8, (32,))
    return model, x, y


def train(model, opt, x, y, steps, lr=1e-4):
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.grad_norm(loss)
        opt.fused_backward(loss, lr)


@pytest.mark.parametrize("cls", [lomo_torch.Lomo, lomo_torch.AdaLomo])
def test_fp32_parameters_are_untouched_by_the_option(cls):
    a, x, y = model_and_data(torch.float32)
    b = copy.deepcopy(a)
    train(a, cls(a, lr=1e-3, clip_grad_norm=1.0), x, y, 3, lr=1e-3)
    train(b, cls(b, lr=1e-3, clip_grad_norm=1.0, stochastic_rounding=True, seed=0), x, y, 3, lr=1e-3)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [lomo_torch.Lomo, lomo_torch.AdaLomo])
def test_empty_bf16_parameter_with_stochastic_rounding(cls):
    """A zero-element bf16 parameter beside the others: the step runs (it drew
    from an empty word array before, which cannot be viewed as int16) and the
    other parameters move."""
    model, x, y = model_and_data(torch.bfloat16)
    model.register_parameter("empty", nn.Parameter(torch.zeros(0, 3, dtype=torch.bfloat16)))
    before = [p.detach().clone() for p in model.parameters()]
    train(model, cls(model, lr=1e-2, stochastic_rounding=True, seed=0), x, y, 1, lr=1e-2)
    assert model.empty.shape == (0, 3) and model.empty.dtype == torch.bfloat16
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    for form in (torch.int16, torch.int32):
        r = RoundingNoise(0).draw((0, 3), "cpu", 1, 2, dtype=form)
        assert r.shape == (0, 3) and r.dtype == form


@pytest.mark.parametrize("cls", [lomo_torch.Lomo, lomo_torch.AdaLomo])
def test_bf16_updates_count_in_expectation(cls):
    """At a fine-tuning lr the intended fp32 change of a bf16 weight is far below half a
    spacing: nearest drops nearly all of it, stochastic rounding applies it on average.
    Measured on the first layer after one step, as the mean over its 8192 weights of
    (new - old) against the same mean of the fp32 update."""
    lr = 1e-5 if cls is lomo_torch.AdaLomo else 2e-3
    results = {}
    for sr in (False, True):
        model, x, y = model_and_data(torch.bfloat16)
        w0 = model[0].weight.detach().float().clone()
        opt = cls(model, lr=lr, stochastic_rounding=sr, seed=1)
        ref = copy.deepcopy(model).float()
        ref_opt = cls(ref, lr=lr)  # fp32 copy of the same weights: the intended update
        for m, o in ((model, opt), (ref, ref_opt)):
            o.fused_backward(nn.functional.cross_entropy(m(x.to(next(m.parameters()).dtype)).float(), y), lr)
        applied = (model[0].weight.float() - w0).abs().sum().item()
        intended = (ref[0].weight - w0).abs().sum().item()
        signed = ((model[0].weight.float() - w0) * (ref[0].weight - w0).sign()).sum().item()
        results[sr] = (applied / intended, signed / intended)
    assert results[False][1] < 0.5, results  # nearest loses most of the update
    assert 0.8 < results[True][1] < 1.2, results  # stochastic keeps it in expectation


@pytest.mark.parametrize("cls", [lomo_torch.Lomo, lomo_torch.AdaLomo])
def test_resume_is_bit_exact(cls):
    model, x, y = model_and_data(torch.bfloat16)
    straight = copy.deepcopy(model)
    train(straight, cls(straight, lr=1e-4, stochastic_rounding=True, seed=5), x, y, 4)

    opt = cls(model, lr=1e-4, stochastic_rounding=True, seed=5)
    train(model, opt, x, y, 2)
    state, weights = opt.state_dict(), copy.deepcopy(model.state_dict())
    resumed, _, _ = model_and_data(torch.bfloat16, seed=1)  # other weights, overwritten
    resumed.load_state_dict(weights)
    opt2 = cls(resumed, lr=1e-4, stochastic_rounding=True, seed=99)  # seed comes from the state
    opt2.load_state_dict(state)
    train(resumed, opt2, x, y, 2)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    # and the seed matters: another seed gives other bits
    other, _, _ = model_and_data(torch.bfloat16)
    train(other, cls(other, lr=1e-4, stochastic_rounding=True, seed=6), x, y, 4)
    assert any(not torch.equal(p, q) for p, q in zip(straight.parameters(), other.parameters()))


def test_arguments_are_checked():
    model, _, _ = model_and_data(torch.bfloat16)
    with pytest.raises(TypeError, match="stochastic_rounding"):
        lomo_torch.Lomo(model, stochastic_rounding="yes")
    with pytest.raises(TypeError, match="seed"):
        lomo_torch.AdaLomo(model, stochastic_rounding=True, seed=1.5)
    assert "stochastic_rounding=True" in repr(lomo_torch.AdaLomo(model, stochastic_rounding=True))
