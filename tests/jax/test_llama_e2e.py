"""End to end: lomo_torch on a transformers LLaMA vs lomo_jax's fused step on
the Flax LLaMA, from the same converted weights on the same padded batches.

10 steps of AdaLomo (lomo_torch default loss_scale=2**10, exact in fp32) and of
Lomo with LOMO's two-pass global-norm clipping (``grad_norm(loss)`` then
``fused_backward(loss, lr)`` vs ``fused_train_step(..., clip_grad_norm=c)``).
Per-step losses and the final parameters agree to 1e-4 relative in fp32.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
lomo_torch = pytest.importorskip("lomo_torch")

import jax.numpy as jnp  # noqa: E402

import lomo_jax  # noqa: E402
from lomo_jax.models import convert, llama  # noqa: E402
from tests.jax.tiny_llama import hf_model  # noqa: E402

STEPS = 10

def _batches(seed, n=STEPS, b=3, t=12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, 128, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, : 1 + i % 4] = 0  # left padding
        mask[1, t - 1 - i % 3:] = 0  # right padding
        out.append((ids, mask))
    return out


def _run_torch(hf, opt, batches, lrs, two_pass):
    losses = []
    for (ids, mask), lr in zip(batches, lrs):
        loss = hf(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        if two_pass:
            opt.grad_norm(loss)
        opt.fused_backward(loss, lr)
        losses.append(loss.item())
    return losses


def _run_jax(cfg, params, tx, batches, clip_grad_norm=None):
    lm = llama.llama_layered_model(cfg)
    state = lomo_jax.fused_init(tx, params)
    step = lomo_jax.fused_train_step(lm, tx, clip_grad_norm=clip_grad_norm)
    losses, norms = [], []
    for ids, mask in batches:
        batch = {"input_ids": jnp.asarray(ids.numpy(), jnp.int32),
                 "attention_mask": jnp.asarray(mask.numpy(), jnp.int32)}
        params, state, metrics = step(params, state, batch)
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics.get("grad_norm", np.nan)))
    return params, losses, norms


def _compare(hf, cfg, params, losses_t, losses_j, start):
    np.testing.assert_allclose(losses_j, losses_t, rtol=1e-4)
    final_t = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    final_j = convert.params_to_hf(params, cfg, framework="np")
    assert set(final_j) == set(final_t)
    for k, v in final_t.items():
        assert not np.array_equal(v, start[k]), f"{k} did not move"
        np.testing.assert_allclose(final_j[k], v, rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_adalomo_matches_lomo_torch(tied):
    hf = hf_model(seed=0, tie_word_embeddings=tied)
    cfg, params = convert.from_hf_model(hf)
    start = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    batches = _batches(1)
    base_lr, wd = 1e-2, 0.01
    lrs = [base_lr * 0.9**t for t in range(STEPS)]

    opt = lomo_torch.AdaLomo(hf, lr=base_lr, weight_decay=wd)  # loss_scale=2**10 default
    losses_t = _run_torch(hf, opt, batches, lrs, two_pass=False)

    tx = lomo_jax.adalomo(lambda count: base_lr * 0.9**count, weight_decay=wd)
    params, losses_j, _ = _run_jax(cfg, params, tx, batches)
    _compare(hf, cfg, params, losses_t, losses_j, start)


def test_lomo_two_pass_clipping_matches_lomo_torch():
    hf = hf_model(seed=2)
    cfg, params = convert.from_hf_model(hf)
    start = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    batches = _batches(3)
    lr, wd, clip = 0.05, 0.01, 1.0
    lrs = [lr] * STEPS

    opt = lomo_torch.Lomo(hf, lr=lr, clip_grad_norm=clip, weight_decay=wd)
    losses_t = _run_torch(hf, opt, batches, lrs, two_pass=True)

    tx = lomo_jax.lomo(lr, weight_decay=wd)
    params, losses_j, norms = _run_jax(cfg, params, tx, batches, clip_grad_norm=clip)
    assert max(norms) > clip  # the clipping was active
    _compare(hf, cfg, params, losses_t, losses_j, start)
