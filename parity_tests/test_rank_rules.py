"""AdaLomo's rank rules agree between lomo_torch and lomo_jax for any shape.

0-D and 1-D parameters keep a full second moment; N-D (N >= 2) are factored
over their last two axes. Each parameter gets exact, known gradients through
the linear loss ``sum(p * g)`` (its gradient is ``g`` bit for bit in both
frameworks, loss scale included since it is a power of two), so the test
isolates the optimizer from any difference in forward arithmetic.
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lomo_jax
import lomo_torch


class OneParam(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.p = torch.nn.Parameter(value)

    def forward(self, g):
        return (self.p * g).sum()


def run_both(p0, grads, lrs, dtype_torch=torch.float32, dtype_jax=jnp.float32,
             optimizer="adalomo", **kw):
    model = OneParam(torch.from_numpy(p0.copy()).to(dtype_torch))
    torch_cls = {"adalomo": lomo_torch.AdaLomo, "lomo": lomo_torch.Lomo}[optimizer]
    opt = torch_cls(model, lr=lrs[0], **kw)
    for g, lr in zip(grads, lrs):
        opt.fused_backward(model(torch.from_numpy(g).to(dtype_torch)), lr)

    factory = {"adalomo": lomo_jax.adalomo, "lomo": lomo_jax.lomo}[optimizer]
    tx = factory(lambda count: jnp.asarray(lrs)[count], **kw)
    params = {"p": jnp.asarray(p0, dtype_jax)}
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update({"p": jnp.asarray(g, dtype_jax)}, state, params)
        params = optax.apply_updates(params, updates)
    return model.p.detach().to(torch.float32).numpy(), np.asarray(params["p"], np.float32)


shapes = st.lists(st.integers(1, 5), min_size=0, max_size=4).map(tuple)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1),
       weight_decay=st.sampled_from([0.0, 0.1]), clip=st.sampled_from([None, 0.5]))
def test_adalomo_any_rank_fp32(shape, seed, weight_decay, clip):
    rng = np.random.default_rng(seed)
    p0 = rng.normal(size=shape).astype(np.float32)
    grads = [rng.normal(size=shape).astype(np.float32) for _ in range(3)]
    ours_torch, ours_jax = run_both(p0, grads, (1e-2, 5e-3, 2e-3),
                                    weight_decay=weight_decay, clip_grad_value=clip)
    np.testing.assert_allclose(ours_jax, ours_torch, rtol=1e-5, atol=1e-7)


BF16_SPACING = 2.0**-7  # bf16 keeps 8 significant bits: the gap at 1.0 is 2**-7


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(2, 12), min_size=1, max_size=3).map(tuple),
       seed=st.integers(0, 2**31 - 1))
@example(shape=(2,), seed=513)  # once drawn in CI: one of two elements moved
def test_adalomo_bf16_within_one_rounding(shape, seed):
    """bf16 parameters and gradients, identical in both frameworks.

    Both upcast to fp32, do the same fp32 math (which may differ in its last
    fp32 bits: reductions are ordered differently) and round once to bf16. A
    last-bit fp32 difference can only flip that final rounding, so each step
    can differ by at most one bf16 spacing; over 3 steps we allow 2 spacings
    (measured relative to the value, the spacing of a bf16 number x is at most
    |x| * 2**-7) and require most elements to be bit-identical.
    """
    rng = np.random.default_rng(seed)
    p0 = rng.normal(size=shape).astype(np.float32)
    grads = [rng.normal(size=shape).astype(np.float32) for _ in range(3)]
    t, j = run_both(p0, grads, (5e-2, 4e-2, 3e-2), dtype_torch=torch.bfloat16,
                    dtype_jax=jnp.bfloat16, weight_decay=0.05)
    # the steps are large enough to move the bf16 values (else this is vacuous)
    assert np.mean(t != np.asarray(jnp.asarray(p0, jnp.bfloat16), np.float32)) >= 0.5
    np.testing.assert_array_less(np.abs(j - t), 2 * BF16_SPACING * np.abs(t) + 1e-30 + 1e-6)
    assert np.mean(j == t) >= 0.9


@settings(max_examples=10, deadline=None)
@given(shape=st.lists(st.integers(2, 12), min_size=1, max_size=3).map(tuple),
       seed=st.integers(0, 2**31 - 1))
def test_lomo_bf16_within_one_rounding(shape, seed):
    """LOMO with bf16 parameters, same justification as for AdaLomo above: fp32 math
    (``p (1 - lr wd) - lr g`` in torch, ``p + (-lr (g + wd p))`` in optax, so the last
    fp32 bit may differ), one bf16 rounding per step; 3 steps allow 2 spacings."""
    rng = np.random.default_rng(seed)
    p0 = rng.normal(size=shape).astype(np.float32)
    grads = [rng.normal(size=shape).astype(np.float32) for _ in range(3)]
    t, j = run_both(p0, grads, (5e-2, 4e-2, 3e-2), dtype_torch=torch.bfloat16,
                    dtype_jax=jnp.bfloat16, optimizer="lomo", weight_decay=0.05,
                    clip_grad_value=1.5)
    assert np.mean(t != np.asarray(jnp.asarray(p0, jnp.bfloat16), np.float32)) >= 0.5
    np.testing.assert_array_less(np.abs(j - t), 2 * BF16_SPACING * np.abs(t) + 1e-30 + 1e-6)
    assert np.mean(j == t) >= 0.9


@pytest.mark.parametrize("shape", [(), (5,), (4, 6), (2, 3, 4)])
def test_second_moment_statistics_match(shape):
    """Both keep the same statistics, with the same values, for every rank.

    An ``(m, n)`` weight keeps ``m + n`` fp32 floats (row and column means);
    a batch of matrices ``(..., m, n)`` keeps ``(..., m)`` and ``(..., n)``;
    0-D and 1-D keep a full second moment.
    """
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=shape).astype(np.float32)
    grads = [rng.normal(size=shape).astype(np.float32) for _ in range(3)]
    model = OneParam(torch.from_numpy(p0.copy()))
    opt = lomo_torch.AdaLomo(model, lr=1e-2)
    tx = lomo_jax.scale_by_adalomo()
    params = {"p": jnp.asarray(p0)}
    state = tx.init(params)
    for g in grads:
        opt.fused_backward(model(torch.from_numpy(g.copy())), 1e-2)
        _, state = tx.update({"p": jnp.asarray(g)}, state, params)
    torch_state = opt.state_dict()["state"]
    (stats,) = torch_state.values()
    if len(shape) >= 2:
        expected = {"exp_avg_sq_row": (state.v_row["p"], shape[:-1]),
                    "exp_avg_sq_col": (state.v_col["p"], shape[:-2] + shape[-1:])}
        assert state.v["p"].size == 0
    else:
        expected = {"exp_avg_sq": (state.v["p"], shape)}
        assert state.v_row["p"].size == 0 and state.v_col["p"].size == 0
    assert set(stats) == set(expected)
    for key, (jax_value, want_shape) in expected.items():
        assert tuple(stats[key].shape) == want_shape == jax_value.shape, key
        assert stats[key].dtype == torch.float32 and jax_value.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(jax_value), stats[key].numpy(), rtol=1e-6)
