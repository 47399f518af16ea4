"""fp16 dynamic loss scaling of the fused step: the policy's edges.

The halving on overflow, the bit-for-bit skip and the doubling after a window
of clean steps are tested on the whole step in ``test_fused.py``
(``test_fp16_overflow_skips_bit_for_bit_and_scale_adapts``,
``test_fp16_loss_scale_grows_after_window_of_clean_steps``); here: the floor,
the error at the floor, and an fp16 loss under the default scale.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lomo_jax
from lomo_jax import _loss_scale
from lomo_jax.fused import LayeredModel, fused_init, fused_train_step
from tests.jax.builders import (
    assert_one_rounding_from, bits, copy_tree, embed, head, layer, make_batch,
    make_params, reference_step, tied_head,
)


def test_halving_stops_at_the_minimum_and_clean_steps_reset_nothing_below_it():
    state = _loss_scale.init(4.0)
    overflow, clean = jnp.asarray(False), jnp.asarray(True)
    scales = []
    for finite in (overflow, overflow, overflow, clean, clean):
        state = _loss_scale.update(state, finite, window=2, min_scale=1.5)
        scales.append(float(state.scale))
    assert scales == [2.0, 1.5, 1.5, 1.5, 3.0]


def _gain_head(p, h, batch):
    """``head`` times ``batch["gain"]``: a large gain overflows the fp16 backward
    whatever the loss scale (the cotangent of h exceeds 65504 at scale 1)."""
    return head(p, h, batch) * batch["gain"]


def _overflowing_run(loss_scale):
    """(step, fp16 params, state at ``loss_scale``, a batch that overflows at any scale)."""
    model, tx = LayeredModel(embed, layer, _gain_head), lomo_jax.lomo(1e-2)
    params = make_params(dtype=jnp.float16)
    state = fused_init(tx, params, loss_scale=loss_scale)
    step = fused_train_step(model, tx, min_loss_scale=1.0)
    return step, params, state, dict(make_batch(0), gain=jnp.float32(1e6))


def _run_to_the_floor():
    step, params, state, bad = _overflowing_run(2.0)
    before = bits(params)
    params, state, m = step(params, state, bad)  # overflow at 2: skip, halve to 1
    assert bool(m["skipped"]) and float(state.loss_scale.scale) == 1.0
    jax.block_until_ready(m)
    params, state, m = step(params, state, bad)  # overflow at 1: skipped, then reported
    assert bool(m["skipped"]) and bits(params) == before
    jax.block_until_ready(m)
    return step, params, state


def test_overflow_at_the_minimum_scale_raises_and_dispatches_nothing():
    step, params, state = _run_to_the_floor()
    clean = dict(make_batch(1), gain=jnp.float32(1.0))
    with pytest.raises(RuntimeError) as info:
        step(params, state, clean)
    msg = str(info.value)
    for part in ("overflowed", "minimum (1, min_loss_scale=1)", "learning rate",
                 "inf/NaN", "bf16"):
        assert part in msg, (part, msg)
    # Nothing was dispatched: the arrays are alive, and the run can go on.
    assert not any(x.is_deleted() for x in jax.tree.leaves((params, state)))
    params, state, m = step(params, state, clean)
    assert not bool(m["skipped"])


def test_overflow_above_the_minimum_does_not_raise():
    step, params, state, bad = _overflowing_run(4.0)
    for _ in range(2):  # at 4, then at 2: both skipped, neither at the floor
        params, state, m = step(params, state, bad)
        jax.block_until_ready(m)
        assert bool(m["skipped"])
    params, state, m = step(params, state, dict(bad, gain=jnp.float32(1.0)))
    assert not bool(m["skipped"]) and float(m["loss_scale"]) == 1.0


def test_min_loss_scale_must_be_positive():
    model = LayeredModel(embed, layer, head)
    with pytest.raises(ValueError, match="min_loss_scale must be positive, got 0"):
        fused_train_step(model, lomo_jax.lomo(1e-2), min_loss_scale=0)


def _fp16_head(p, h, batch):
    return head(p, h, batch).astype(jnp.float16)


def _fp16_tied_head(p, h, batch, embed_params=None):
    return tied_head(p, h, batch, embed_params=embed_params).astype(jnp.float16)


@pytest.mark.parametrize("tied", [False, True])
def test_fp16_loss_with_the_default_scale(tied):
    """An fp16 loss cannot hold the 2**16 seed (fp16's largest value is 65504).
    The step must still go through with finite gradients, within one fp16
    rounding of value_and_grad of ``2**16 * loss`` computed with the same head
    in fp32 (by linearity, the seed 2**15 times 2 is the same gradient).

    The unscaled fp16 gradient is no one-rounding reference: its small entries
    underflow (off by 1.8 roundings on ``w1`` here), which is what scaling is for.
    """
    fp32_head, fp16_head = (tied_head, _fp16_tied_head) if tied else (head, _fp16_head)
    model = LayeredModel(embed, layer, fp16_head, tied=tied)
    tx = lomo_jax.lomo(1e-1)
    params = make_params(dtype=jnp.float16, tied=tied)
    if tied:  # keep the tied logits small enough that 2**16 does not overflow them
        params["embed"]["tok"] = params["embed"]["tok"] * 0.3
    state = fused_init(tx, params)
    assert float(state.loss_scale.scale) == 2.0**16
    old, old_state = copy_tree(params), copy_tree(state._replace(loss_scale=None))
    batch = make_batch(0)
    ref = reference_step(LayeredModel(embed, layer, fp32_head, tied=tied), tx, 0.5,
                         loss_scale=2.0**16)
    _, _, ref_m = ref(old, old_state, batch)
    params, state, m = fused_train_step(model, tx, clip_grad_norm=0.5)(params, state, batch)
    assert not bool(m["skipped"]) and float(m["loss_scale"]) == 2.0**16, m
    np.testing.assert_allclose(m["grad_norm"], ref_m["grad_norm"], rtol=1e-3)
    assert_one_rounding_from(old, params, ref_m["updates"], jnp.float16)


def test_loss_seed_splits_only_where_the_dtype_needs_it():
    seed = jnp.float32(2.0**16)
    s, r = _loss_scale.loss_seed(seed, jnp.float16)
    assert s.dtype == jnp.float16 and float(s) == 2.0**15 and float(r) == 2.0
    for dtype in (jnp.float32, jnp.bfloat16):
        s, r = _loss_scale.loss_seed(seed, dtype)
        assert r is None and s.dtype == dtype and float(s) == 2.0**16
