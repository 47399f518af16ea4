"""LomoTrainer with a PEFT LoRA model: lora_only (base frozen) and LoRA + LOMO (base unfrozen)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lomo_torch  # noqa: E402
from transformers import Trainer, get_scheduler  # noqa: E402

from lomo_torch.trainer import LomoTrainer  # noqa: E402
from tests.torch.test_trainer import (BATCH, dataset, max_rel_diff, one_thread,  # noqa: E402,F401
                                      sequences, tiny_llama, training_args)

STEPS, LR = 3, 0.01
CLIP = 0.01  # below the base's and the adapters' gradient norms: both are clipped
LORA = lambda n, p: "lora_" in n  # noqa: E731


def lora_llama(base_frozen):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                          lora_dropout=0.0)
    model = peft.get_peft_model(tiny_llama(), cfg)
    torch.manual_seed(1)
    for n, p in model.named_parameters():  # a non-zero B: the adapters matter from step 0
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
        if not base_frozen:
            p.requires_grad_(True)
    return model


def args_for(tmp_path, **kw):
    base = dict(optim="adalomo", learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0,
                max_steps=STEPS, lr_scheduler_type="linear", warmup_steps=1)
    return training_args(tmp_path, **{**base, **kw})


def split(model):
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not LORA(n, p)}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if LORA(n, p)}
    return base, adapters


def moved(before, model):
    now = dict(model.named_parameters())
    return {n for n, t in before.items() if not torch.equal(now[n], t)}


def test_lora_only_trains_the_adapters_with_the_plain_trainer(tmp_path, caplog):
    """Base frozen: the Trainer's own AdamW trains the adapters (bitwise as a plain
    Trainer with optim="adamw_torch"), the base is bit-identical."""
    model = lora_llama(base_frozen=True)
    plain = copy.deepcopy(model)
    base, adapters = split(model)
    with caplog.at_level(logging.WARNING, logger="lomo_torch.trainer"):
        trainer = LomoTrainer(model=model, args=args_for(tmp_path),
                              train_dataset=dataset(sequences(STEPS * BATCH)))
    assert "lora_only" in caplog.text and "LOMO is not used" in caplog.text
    trainer.train()
    assert type(trainer.optimizer.optimizer) is torch.optim.AdamW
    assert moved(base, model) == set()
    assert moved(adapters, model) == set(adapters)
    assert trainer.state.global_step == STEPS
    with pytest.raises(RuntimeError, match="not created"):
        trainer.lomo_optimizer  # noqa: B018
    Trainer(model=plain, args=args_for(tmp_path, optim="adamw_torch"),
            train_dataset=dataset(sequences(STEPS * BATCH))).train()
    assert max_rel_diff(model, plain) == 0


def reference_loop(model, ids, max_grad_norm):
    """LoRA + LOMO by hand: AdaLomo(exclude=adapters), then the adapters clipped by
    their own norm and stepped by AdamW, as the trainer documents."""
    opt = lomo_torch.AdaLomo(model, lr=LR, clip_grad_norm=max_grad_norm, exclude=LORA)
    adapters = [p for n, p in model.named_parameters() if LORA(n, p)]
    adamw = torch.optim.AdamW(adapters, lr=LR, weight_decay=0.0)
    sched = get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=STEPS)
    model.train()
    for step in range(STEPS):
        batch = ids[step * BATCH:(step + 1) * BATCH]
        loss = model(input_ids=batch, labels=batch).loss
        assert opt.grad_norm(loss) > max_grad_norm
        lr = sched.get_last_lr()[0]
        assert opt.fused_backward(loss, lr)
        assert torch.nn.utils.clip_grad_norm_(adapters, max_grad_norm) > max_grad_norm
        adamw.param_groups[0]["lr"] = lr
        adamw.step()
        adamw.zero_grad()
        sched.step()
    return opt


def test_lora_plus_lomo_matches_a_hand_written_loop(tmp_path, caplog):
    """Base unfrozen: AdaLomo updates the base, AdamW the adapters; both move, and the
    model equals AdaLomo(exclude=...) + AdamW by hand (same schedule), bitwise."""
    ids = sequences(STEPS * BATCH)
    model = lora_llama(base_frozen=False)
    ref = copy.deepcopy(model)
    base, adapters = split(model)
    with caplog.at_level(logging.WARNING, logger="lomo_torch.trainer"):
        trainer = LomoTrainer(model=model, args=args_for(tmp_path, max_grad_norm=CLIP),
                              train_dataset=dataset(ids))
    assert "LoRA + LOMO" in caplog.text
    trainer.train()
    ref_opt = reference_loop(ref, ids, CLIP)
    opt = trainer.lomo_optimizer
    assert {n for n, _ in opt.excluded.named} == set(adapters)
    assert moved(base, model) == set(base) and moved(adapters, model) == set(adapters)
    assert max_rel_diff(model, ref) == 0  # bitwise
    sd = opt.state_dict()
    assert sd["state"].keys() == ref_opt.state_dict()["state"].keys()
    assert len(sd["adapter_optimizer"]["state"]) == len(adapters)
    opt.load_state_dict(sd)  # what a Trainer checkpoint restores
    with pytest.raises(ValueError, match="adapter_optimizer"):
        opt.load_state_dict({k: v for k, v in sd.items() if k != "adapter_optimizer"})


def test_a_given_optimizer_must_exclude_the_adapters(tmp_path):
    model = lora_llama(base_frozen=False)
    opt = lomo_torch.AdaLomo(model, lr=LR)
    with pytest.raises(ValueError, match="exclude=lambda n, p: 'lora_' in n"):
        LomoTrainer(model=model, args=args_for(tmp_path), optimizers=(opt, None),
                    train_dataset=dataset(sequences(BATCH)))


def test_lora_plus_lomo_skips_the_adapters_with_an_overflowed_step(tmp_path):
    """fp16 base, fp32 adapters: a step whose norm overflows changes neither the base
    nor the adapters (their AdamW does not step) and leaves no adapter gradient."""
    model = lora_llama(base_frozen=False)
    for n, p in model.named_parameters():
        if not LORA(n, p):
            p.data = p.data.half()
    base, adapters = split(model)
    args = args_for(tmp_path, max_steps=1, optim_args=f"loss_scale={2.0**60}")
    trainer = LomoTrainer(model=model, args=args, train_dataset=dataset(sequences(BATCH)))
    trainer.train()
    opt = trainer.lomo_optimizer
    assert opt.step_num == 0 and opt.loss_scaler.loss_scale < 2.0**60
    assert moved(base, model) == set() and moved(adapters, model) == set()
    assert all(p.grad is None for p in model.parameters())
    assert opt.adapter_optimizer.state_dict()["state"] == {}
