"""LoRA + AdaLomo: PyTorch (transformers + PEFT + lomo_torch) vs lomo_jax's fused step.

A tiny transformers LLaMA with a PEFT LoRA (r=4, alpha=8, on q_proj, v_proj,
down_proj; the base unfrozen) and a deterministic non-zero B, so the adapters
matter from step 0. PyTorch: ``lomo_torch.AdaLomo(peft_model, lr,
exclude=lambda n, p: "lora_" in n)`` updates the base in the backward and
``torch.optim.AdamW(adapters, weight_decay=0.0)`` steps after
``fused_backward``, 3 steps. JAX: the same start (base from
``convert.from_hf_model``, adapters by ``load_adapter`` of PEFT's initial
save) through ``lomo_jax.fused_train_step`` with
``lora.optimizer(base=lomo_jax.adalomo(lr), adapters=optax.adamw(...))``.

AdamW conventions matched: both compute :math:`\\theta \\leftarrow \\theta -
\\eta\\, \\hat m / (\\sqrt{\\hat v} + \\epsilon)` with bias-corrected moments and
``eps`` added outside the square root, after the bias correction (torch:
``denom = sqrt(v) / sqrt(1 - b2^t) + eps``; optax ``scale_by_adam``:
``m_hat / (sqrt(v_hat + eps_root) + eps)`` with ``eps_root=0``); b1=0.9,
b2=0.999, eps=1e-8 on both; weight decay 0 on both (the libraries' defaults
differ: torch 1e-2, optax 1e-4, so both are passed).

Checked: the losses, the final logits on a held-out batch (1e-4 relative,
fp32) and the final adapters (PEFT's names, 1e-4 relative); the run without
the adapters' AdamW step ends far (> 100x the tolerance) from it, so the
adapters' update is what the comparison sees.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
lomo_torch = pytest.importorskip("lomo_torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import lomo_jax  # noqa: E402
from lomo_jax.models import convert, llama, lora  # noqa: E402
from lomo_jax.models.peft_adapter import ADAPTER_WEIGHTS_NAME, load_adapter, save_adapter  # noqa: E402
from parity_tests.test_adaptive_clip_parity import _batches  # noqa: E402
from tests.jax.tiny_llama import hf_model  # noqa: E402

STEPS = 3
LR, ADAPTER_LR = 0.01, 0.01
ADAMW = dict(b1=0.9, b2=0.999, eps=1e-8)
TARGETS = ["q_proj", "v_proj", "down_proj"]
RTOL = 1e-4


def _peft_model(hf, seed=0):
    """``hf`` with a PEFT LoRA, B drawn non-zero, every parameter trainable."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _run_torch(model, batches, *, adapters_step=True):
    """3 LoRA + AdaLomo steps; returns the losses."""
    opt = lomo_torch.AdaLomo(model, lr=LR, exclude=lambda n, p: "lora_" in n)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    adamw = torch.optim.AdamW(adapters, lr=ADAPTER_LR, betas=(ADAMW["b1"], ADAMW["b2"]),
                              eps=ADAMW["eps"], weight_decay=0.0)
    losses = []
    for ids, mask in batches:
        loss = model(input_ids=ids, attention_mask=mask,
                     labels=ids.masked_fill(mask == 0, -100)).loss
        assert opt.fused_backward(loss, LR)
        if adapters_step:
            adamw.step()
        adamw.zero_grad()
        losses.append(loss.item())
    return losses


def _jax_batch(ids, mask):
    return {"input_ids": jnp.asarray(ids.numpy(), jnp.int32),
            "attention_mask": jnp.asarray(mask.numpy(), jnp.int32)}


def _run_jax(cfg, params, batches):
    tx = lora.optimizer(base=lomo_jax.adalomo(LR),
                        adapters=optax.adamw(ADAPTER_LR, **ADAMW, weight_decay=0.0))
    state = lomo_jax.fused_init(tx, params)
    step = lomo_jax.fused_train_step(llama.llama_layered_model(cfg), tx)
    losses = []
    for ids, mask in batches:
        params, state, metrics = step(params, state, _jax_batch(ids, mask))
        losses.append(float(metrics["loss"]))
    return params, losses


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.numpy()


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_lora_adalomo_matches_lomo_jax_fused_step(tmp_path):
    *batches, held_out = _batches()[:STEPS + 1]  # 3 steps, one batch held out
    cfg, params = convert.from_hf_model(hf_model(seed=0))  # the base, before PEFT wraps it
    model = _peft_model(hf_model(seed=0))
    model.save_pretrained(str(tmp_path / "initial"))
    cfg, params = load_adapter(str(tmp_path / "initial"), cfg, params)

    losses_t = _run_torch(model, batches)
    params, losses_j = _run_jax(cfg, params, batches)

    np.testing.assert_allclose(losses_j, losses_t, rtol=RTOL)
    logits_t = _logits(model, *held_out)
    logits_j = np.asarray(jax.jit(functools.partial(llama.llama_logits, cfg))(
        params, _jax_batch(*held_out)))
    assert _rel(logits_j, logits_t) <= RTOL
    np.testing.assert_allclose(logits_j, logits_t, rtol=RTOL, atol=RTOL * np.abs(logits_t).max())
    adapters_t = {k: v.detach().numpy() for k, v in peft.get_peft_model_state_dict(model).items()}
    save_adapter(cfg, params, str(tmp_path / "final"))
    adapters_j = load_file(str(tmp_path / "final" / ADAPTER_WEIGHTS_NAME))
    assert set(adapters_j) == set(adapters_t) and len(adapters_t) == 2 * 3 * cfg.num_hidden_layers
    for k, v in adapters_t.items():
        assert _rel(adapters_j[k], v) <= RTOL, k

    # the adapters' update is what is compared: without AdamW's step the run
    # ends > 100x the tolerance away (measured: logits 0.49 relative; the
    # agreement above: losses 2e-7, logits 4e-6, adapters 3e-6)
    frozen = _peft_model(hf_model(seed=0))
    _run_torch(frozen, batches, adapters_step=False)
    assert _rel(_logits(frozen, *held_out), logits_t) > 100 * RTOL
