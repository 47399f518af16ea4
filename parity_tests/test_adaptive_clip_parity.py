"""Adaptive per-tensor clipping: lomo_torch ``Lomo/AdaLomo(adaptive_clip=1.05)``
on a tiny transformers LLaMA vs lomo_jax's fused step with
``optax.chain(lomo_jax.adaptive_clip(...), lomo_jax.lomo/adalomo(...))``.

In the fused step each layer's slice of a stacked leaf is its own tensor with
its own norm average, as each layer's parameters are in torch. Warm-up is 2
steps (clipped to ``absolute``), and step ``SPIKE`` has its gradient scaled
x100 (torch: the loss; JAX: a scale transform in front of the clipping), so
the relative rule bites: a run without clipping differs by far more than the
tolerance. Losses and final weights agree to 1e-4 relative in fp32.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
lomo_torch = pytest.importorskip("lomo_torch")

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import lomo_jax  # noqa: E402
from lomo_jax.models import convert, llama  # noqa: E402
from tests.jax.tiny_llama import hf_model  # noqa: E402

STEPS, SPIKE = 6, 4
CLIP = dict(relative=1.05, decay=0.9, warmup_steps=2, absolute=1.0)
TORCH_CLIP = dict(adaptive_clip=1.05, adaptive_clip_decay=0.9, adaptive_clip_warmup_steps=2,
                  adaptive_clip_absolute=1.0)
RULES = {  # name: (torch class, its kwargs, lomo_jax rule)
    "lomo": ("Lomo", dict(lr=0.05, weight_decay=0.01), lambda: lomo_jax.lomo(0.05, weight_decay=0.01)),
    "adalomo": ("AdaLomo", dict(lr=0.01), lambda: lomo_jax.adalomo(0.01)),
}


def _batches(seed=1, b=3, t=12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(STEPS):
        ids = torch.randint(0, 128, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, : 1 + i % 4] = 0
        out.append((ids, mask))
    return out


def _run_torch(hf, opt, batches, lr):
    losses = []
    for t, (ids, mask) in enumerate(batches):
        loss = hf(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.fused_backward(loss * (100.0 if t == SPIKE else 1.0), lr)
        losses.append(loss.item())
    return losses


def _run_jax(cfg, params, rule, batches):
    spike = optax.scale_by_schedule(lambda count: jnp.where(count == SPIKE, 100.0, 1.0))
    tx = optax.chain(spike, lomo_jax.adaptive_clip(**CLIP), rule)
    state = lomo_jax.fused_init(tx, params)
    step = lomo_jax.fused_train_step(llama.llama_layered_model(cfg), tx)
    losses = []
    for ids, mask in batches:
        batch = {"input_ids": jnp.asarray(ids.numpy(), jnp.int32),
                 "attention_mask": jnp.asarray(mask.numpy(), jnp.int32)}
        params, state, metrics = step(params, state, batch)
        losses.append(float(metrics["loss"]))
    return params, losses


def _max_rel_diff(a, b):
    return max(float(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k])) for k in b)


@pytest.mark.parametrize("name", list(RULES))
def test_adaptive_clip_matches_lomo_jax_fused_step(name):
    cls_name, kw, rule = RULES[name]
    hf = hf_model(seed=0)
    unclipped = hf_model(seed=0)
    cfg, params = convert.from_hf_model(hf)
    batches = _batches()

    opt = getattr(lomo_torch, cls_name)(hf, **kw, **TORCH_CLIP)
    losses_t = _run_torch(hf, opt, batches, kw["lr"])
    params, losses_j = _run_jax(cfg, params, rule(), batches)

    np.testing.assert_allclose(losses_j, losses_t, rtol=1e-4)
    final_t = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    final_j = convert.params_to_hf(params, cfg, framework="np")
    assert set(final_j) == set(final_t)
    for k, v in final_t.items():
        np.testing.assert_allclose(final_j[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
    assert opt.adaptive_clipping.count == STEPS

    # the clipping bit: the same run without it lands far (> 50x the tolerance)
    # from both (measured: Lomo 1.9, AdaLomo 0.011, whose update is RMS-clipped)
    _run_torch(unclipped, getattr(lomo_torch, cls_name)(unclipped, **kw), batches, kw["lr"])
    free = {k: v.detach().numpy() for k, v in unclipped.state_dict().items()}
    assert _max_rel_diff(free, final_t) > 5e-3
