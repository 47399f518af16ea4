"""LomoTrainer with a PEFT LoRA model: lora_only (base frozen) and LoRA + LOMO (base unfrozen)."""

from __future__ import annotations

import copy
import logging
import shutil

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lomo_torch  # noqa: E402
import safetensors.torch  # noqa: E402
from transformers import Trainer, TrainerCallback, get_scheduler  # noqa: E402

from lomo_torch._trainer_peft import FULL_WEIGHTS_NAME, PeftAdapters  # noqa: E402
from lomo_torch.trainer import LomoTrainer  # noqa: E402
from tests.torch.helpers import owns_storage  # noqa: E402
from tests.torch.test_trainer import (BATCH, NEEDS_GLOO, dataset, ddp_run,  # noqa: E402,F401
                                      max_rel_diff, one_thread, sequences, tiny_llama,
                                      training_args)

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
    trainer.save_model(str(tmp_path / "saved"))  # lora_only: PEFT's adapter files only, as before
    assert (tmp_path / "saved" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "saved" / FULL_WEIGHTS_NAME).exists()


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


class StopAfterSave(TrainerCallback):
    """The run dies right after its first checkpoint."""

    def on_save(self, args, state, control, **kwargs):
        control.should_training_stop = True


def assert_same(a, b, where="state_dict"):
    """Nested state_dicts equal, tensors bitwise."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def resume_args(tmp_path, **kw):
    return args_for(tmp_path, max_steps=6, max_grad_norm=CLIP, **kw)


def test_lora_plus_lomo_resumes_from_a_checkpoint_exactly(tmp_path):
    """A LoRA + LOMO run checkpointed at step 3, resumed on a fresh model: the trained
    base, the adapters and both optimizers' states equal a straight run's, bitwise."""
    ids = sequences(6 * BATCH)
    straight, interrupted, resumed = (lora_llama(base_frozen=False) for _ in range(3))
    base, adapters = split(straight)
    done = LomoTrainer(model=straight, args=resume_args(tmp_path / "a"), train_dataset=dataset(ids))
    done.train()
    LomoTrainer(model=interrupted, args=resume_args(tmp_path / "b", save_strategy="steps", save_steps=3),
                train_dataset=dataset(ids), callbacks=[StopAfterSave()]).train()
    ckpt = tmp_path / "b" / "out" / "checkpoint-3"
    assert (ckpt / FULL_WEIGHTS_NAME).exists() and (ckpt / "adapter_model.safetensors").exists()
    trainer = LomoTrainer(model=resumed, args=resume_args(tmp_path / "c"), train_dataset=dataset(ids))
    trainer.train(resume_from_checkpoint=str(ckpt))
    opt = trainer.lomo_optimizer
    assert opt.step_num == 6
    adamw = opt.adapter_optimizer.state_dict()["state"]
    assert len(adamw) == len(adapters) and {int(s["step"]) for s in adamw.values()} == {6}
    assert moved(base, straight) == set(base) and moved(adapters, straight) == set(adapters)
    now, then = dict(resumed.named_parameters()), dict(straight.named_parameters())
    differ = {part: [n for n in names if not torch.equal(now[n], then[n])]
              for part, names in (("base", base), ("adapters", adapters))}
    assert differ == {"base": [], "adapters": []}  # the trained base restored, not the original
    assert_same(opt.state_dict(), done.lomo_optimizer.state_dict())
    # save_model writes the full model too: it loads into a fresh PEFT model
    done.save_model(str(tmp_path / "final"))
    fresh = lora_llama(base_frozen=False)
    safetensors.torch.load_model(fresh, str(tmp_path / "final" / FULL_WEIGHTS_NAME))
    assert max_rel_diff(fresh, straight) == 0
    # load_best_model_at_end's load: the best checkpoint's base too, not only its adapters
    best = LomoTrainer(model=fresh, args=resume_args(tmp_path / "d"), train_dataset=dataset(ids))
    best.state.best_model_checkpoint = str(ckpt)
    best._load_best_model()
    assert max_rel_diff(fresh, interrupted) == 0


def lora_lomo_ddp_worker(out_dir):
    """One rank of tests/torch/test_trainer.py's ``ddp_run``: the resume test above on 2
    processes (each half of every batch): a straight 6-step LoRA + LOMO run, one stopped
    after its checkpoint of step 3 (written by rank 0 alone) and its resume on fresh
    models; saves this rank's parameters and optimizer states."""
    import torch.distributed as dist
    from pathlib import Path

    out_dir, ids = Path(out_dir), sequences(6 * BATCH)
    kw = dict(per_device_train_batch_size=BATCH // 2)
    straight, interrupted, resumed = (lora_llama(base_frozen=False) for _ in range(3))
    initial = {n: p.detach().clone() for n, p in straight.named_parameters()}
    done = LomoTrainer(model=straight, args=resume_args(out_dir / "lora_a", **kw),
                       train_dataset=dataset(ids))
    done.train()
    LomoTrainer(model=interrupted, train_dataset=dataset(ids), callbacks=[StopAfterSave()],
                args=resume_args(out_dir / "lora_b", save_strategy="steps", save_steps=3,
                                 **kw)).train()
    dist.barrier()  # as a new launch would: the checkpoint is complete before the resume
    trainer = LomoTrainer(model=resumed, args=resume_args(out_dir / "lora_c", **kw),
                          train_dataset=dataset(ids))
    trainer.train(resume_from_checkpoint=str(out_dir / "lora_b" / "out" / "checkpoint-3"))
    params = lambda m: {n: p.detach().clone() for n, p in m.named_parameters()}  # noqa: E731
    torch.save({"world": dist.get_world_size(), "initial": initial,
                "straight": params(straight), "resumed": params(resumed),
                "straight_state": done.lomo_optimizer.state_dict(),
                "resumed_state": trainer.lomo_optimizer.state_dict()},
               out_dir / f"lora_{trainer.args.process_index}.pt")


def lora_lomo_loop(model, ids, rank=0, world=1):
    """LoRA + LOMO by hand, as docs/lora.md shows it: AdaLomo with norm clipping on the
    base (the adapters excluded), AdamW on the adapters after each fused_backward;
    rank ``rank`` of ``world`` takes its slice of every batch. Returns the norms and
    whether every adapter gradient owned its storage after each fused_backward (under
    FSDP2 a view of the reduce-scatter's flat buffer would keep the whole buffer alive)."""
    opt = lomo_torch.AdaLomo(model, lr=LR, clip_grad_norm=CLIP, exclude=LORA)
    adapters = [p for n, p in model.named_parameters() if LORA(n, p)]
    adamw = torch.optim.AdamW(adapters, lr=LR, weight_decay=0.0)
    norms, own = [], True
    for step in range(STEPS):
        batch = ids[step * BATCH:(step + 1) * BATCH].chunk(world)[rank]
        loss = model(input_ids=batch, labels=batch).loss
        norms.append(float(opt.grad_norm(loss)))
        opt.fused_backward(loss, LR)
        own &= all(owns_storage(p.grad) for p in adapters)
        adamw.step()
        adamw.zero_grad()
    return norms, own


def lora_lomo_fsdp2_worker(out_dir):
    """One rank of ``ddp_run`` (after :func:`lora_lomo_ddp_worker`): the PEFT model with
    its decoder layers and root under FSDP2 (``fully_shard``; every parameter, adapters
    included, a DTensor shard), :func:`lora_lomo_loop` on this rank's half of every
    batch; saves the norms and the whole parameters."""
    import torch.distributed as dist
    from pathlib import Path
    from torch.distributed.fsdp import fully_shard

    model = lora_llama(base_frozen=False)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    norms, own = lora_lomo_loop(model, sequences(STEPS * BATCH), dist.get_rank(),
                                dist.get_world_size())
    params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    torch.save({"norms": norms, "params": params, "own_storage": own,
                "sharded": sorted(n for n, p in model.named_parameters()
                                  if type(p).__name__ == "DTensor")},
               Path(out_dir) / f"lora_fsdp2_{dist.get_rank()}.pt")


@NEEDS_GLOO
def test_lora_plus_lomo_under_fsdp2_equals_one_process(tmp_path_factory):
    """FSDP2, 2 CPU processes, each half of every batch: LoRA + LOMO on a PEFT LLaMA (the
    adapters DTensor shards left to AdamW by exclude=, FSDP2 averaging their gradients)
    == one process on the whole batch, 3 steps: the clipped norms, the base and the
    adapters (the two halves' mean gradient is the batch's up to fp32 summation order,
    ~1e-7; a missing average or a lost adapter step is off by far more), and the
    adapters' gradients own their storage."""
    out = ddp_run(tmp_path_factory)
    ranks = [torch.load(out / f"lora_fsdp2_{r}.pt", weights_only=True) for r in range(2)]
    ref, start = lora_llama(base_frozen=False), lora_llama(base_frozen=False)
    norms, _ = lora_lomo_loop(ref, sequences(STEPS * BATCH))
    assert min(norms) > CLIP  # clipping acts
    names = {n for n, _ in ref.named_parameters()}
    for r in ranks:
        assert set(r["sharded"]) == names  # every parameter sharded, adapters included
        assert r["own_storage"]  # copies, not views of FSDP2's buffer
        assert r["norms"] == pytest.approx(norms, rel=1e-5)
        for name, expected in ref.named_parameters():
            got = r["params"][name]
            diff = ((got - expected).abs().max() / expected.abs().max()).item()
            assert diff <= 1e-5, (name, diff)
    moved = {n for n, p in start.named_parameters() if not torch.equal(p, dict(
        ref.named_parameters())[n])}
    assert moved == names  # base and adapters both trained


@NEEDS_GLOO
def test_lora_plus_lomo_resumes_exactly_on_two_processes(tmp_path_factory):
    """DDP, 2 CPU processes: the LoRA + LOMO resume (rank 0 writes the checkpoint, both
    ranks load it) ends each rank with the straight run's base, adapters and both
    optimizers' states, bitwise; the replicas agree; base and adapters trained."""
    out = ddp_run(tmp_path_factory)
    ranks = [torch.load(out / f"lora_{r}.pt", weights_only=False) for r in range(2)]
    for r in ranks:
        assert r["world"] == 2
        assert_same(r["resumed"], r["straight"], "params")
        assert_same(r["resumed_state"], r["straight_state"])
        assert r["resumed_state"]["adapter_optimizer"]["state"]  # AdamW stepped the adapters
    assert_same(ranks[0]["straight"], ranks[1]["straight"], "replicas")
    initial, trained = ranks[0]["initial"], ranks[0]["straight"]
    assert {n for n in initial if not torch.equal(initial[n], trained[n])} == set(initial)


def test_lora_plus_lomo_refuses_a_checkpoint_without_the_base(tmp_path):
    """An adapters-only checkpoint (the plain Trainer's) cannot resume LoRA + LOMO: the
    trained base would be lost. Refused before anything is loaded."""
    ids = sequences(2 * BATCH)
    trained = lora_llama(base_frozen=False)
    LomoTrainer(model=trained, train_dataset=dataset(ids),
                args=args_for(tmp_path / "b", save_strategy="steps", save_steps=2,
                              max_steps=2)).train()
    ckpt = tmp_path / "b" / "out" / "checkpoint-2"
    adapters_only = tmp_path / "adapters_only"
    shutil.copytree(ckpt, adapters_only)
    (adapters_only / FULL_WEIGHTS_NAME).unlink()
    model = lora_llama(base_frozen=False)
    before = copy.deepcopy(model)
    trainer = LomoTrainer(model=model, args=args_for(tmp_path / "c"), train_dataset=dataset(ids))
    with pytest.raises(ValueError, match=f"(?s)no {FULL_WEIGHTS_NAME}.*LoRA \\+ LOMO.*base"):
        trainer.train(resume_from_checkpoint=str(adapters_only))
    assert max_rel_diff(model, before) == 0 < max_rel_diff(trained, before)


def test_full_weights_of_another_model_are_refused(tmp_path):
    """Full weights saved from a PEFT model with other adapters do not load silently."""
    model = lora_llama(base_frozen=False)
    PeftAdapters.of(model).save_full(model, str(tmp_path))
    other = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    for p in other.parameters():
        p.requires_grad_(True)
    adapters = PeftAdapters.of(other)
    path = adapters.full_weights(str(tmp_path), "LomoTrainer")
    with pytest.raises(ValueError, match="does not match the model: missing .* unexpected"):
        adapters.load_full(other, path, "LomoTrainer")
