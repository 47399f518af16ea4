"""LomoTrainer (lomo_torch.trainer) against the hand-written grad_norm/fused_backward loop."""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it; a missing one fails (conftest)

from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments, get_scheduler  # noqa: E402

import lomo_torch  # noqa: E402
from lomo_torch.trainer import LomoTrainer, create_lomo_optimizer, lomo_trainer  # noqa: E402
from tests.once_per_run import once_per_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VOCAB, SEQ, BATCH = 48, 16, 4


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is several times faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed=0):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def sequences(n, seed=1):
    """Arithmetic progressions mod VOCAB: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(SEQ)) % VOCAB


def dataset(ids):
    return [{"input_ids": row, "labels": row} for row in ids]


def training_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), optim="adalomo", learning_rate=0.05, weight_decay=0.01,
                max_grad_norm=1.0, max_steps=6, per_device_train_batch_size=BATCH,
                lr_scheduler_type="linear", warmup_steps=2, train_sampling_strategy="sequential",
                report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
                seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def reference_loop(model, ids, optim, lr, weight_decay, max_grad_norm, steps, warmup, fp16=False):
    """What a user writes by hand: same batches in order, the same linear schedule.

    In fp16 grad_norm runs every step (the overflow check) and a skipped step
    does not advance the schedule. Returns (optimizer, norms, skipped steps).
    """
    cls = lomo_torch.AdaLomo if optim == "adalomo" else lomo_torch.Lomo
    clip = max_grad_norm if max_grad_norm > 0 else None
    opt = cls(model, lr=lr, weight_decay=weight_decay, clip_grad_norm=clip)
    sched = get_scheduler("linear", opt, num_warmup_steps=warmup, num_training_steps=steps)
    model.train()
    norms, skipped = [], 0
    for step in range(steps):
        batch = ids[step * BATCH:(step + 1) * BATCH]
        loss = model(input_ids=batch, labels=batch).loss
        if clip is not None or fp16:
            norms.append(opt.grad_norm(loss).item())
        if opt.fused_backward(loss, sched.get_last_lr()[0]):
            sched.step()
        else:
            assert fp16
            skipped += 1
    return opt, norms, skipped


def max_rel_diff(a, b):
    worst = 0.0
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb
        worst = max(worst, ((pa - pb).abs().max() / pb.abs().max().clamp_min(1e-12)).item())
    return worst


@pytest.mark.parametrize("optim", ["adalomo", "lomo"])
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clip", "noclip"])
def test_trainer_matches_hand_written_loop(tmp_path, optim, max_grad_norm):
    ids = sequences(6 * BATCH)
    model = tiny_llama()
    ref = copy.deepcopy(model)
    start = copy.deepcopy(model)

    args = training_args(tmp_path, optim=optim, max_grad_norm=max_grad_norm)
    trainer = LomoTrainer(model=model, args=args, train_dataset=dataset(ids))
    trainer.train()
    ref_opt, ref_norms, _ = reference_loop(ref, ids, optim, 0.05, 0.01, max_grad_norm, steps=6, warmup=2)

    opt = trainer.lomo_optimizer
    assert type(opt) is type(ref_opt)
    assert opt.step_num == ref_opt.step_num == 6
    assert opt.clip_grad_norm == (1.0 if max_grad_norm else None)
    assert opt.weight_decay == 0.01
    assert max_rel_diff(model, ref) <= 1e-6
    assert max_rel_diff(model, start) > 1e-3  # it did train
    # The optimizer state (AdaLomo's factored moments) agrees too.
    for (name, st), (ref_name, ref_st) in zip(opt.state_dict()["state"].items(),
                                              ref_opt.state_dict()["state"].items(), strict=True):
        assert name == ref_name
        for key in st:
            torch.testing.assert_close(st[key], ref_st[key], rtol=1e-6, atol=0)
    # The lr schedule reached the optimizer: warmup from 0, then linear decay.
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["learning_rate"] for h in logs] == pytest.approx([0.0, 0.025, 0.05, 0.0375, 0.025, 0.0125])
    # The logged grad_norm is grad_norm(loss)'s global norm (absent without clipping).
    if max_grad_norm:
        assert [h["grad_norm"] for h in logs] == pytest.approx(ref_norms, rel=1e-5)
    else:
        assert all(h.get("grad_norm") is None for h in logs)


@pytest.mark.filterwarnings("ignore:Lomo. fp16 detected:UserWarning")
def test_fp16_parameters_use_dynamic_loss_scaling(tmp_path):
    """A model in float16: the optimizer's loss scaler, skipped steps hold the lr schedule back."""
    ids = sequences(8 * BATCH)
    model, ref = tiny_llama().half(), tiny_llama().half()
    # Lomo without clipping: fp16 alone must make LomoTrainer run the grad_norm pass.
    # init_scale 2**24 overflows fp16 at first, so the first steps are skipped.
    args = training_args(tmp_path, optim="lomo", max_grad_norm=0.0, max_steps=8, warmup_steps=0,
                         learning_rate=0.5)
    opt = lomo_torch.Lomo(model, lr=0.5, loss_scale_args={"init_scale": 2.0**24})
    trainer = LomoTrainer(model=model, args=args, train_dataset=dataset(ids), optimizers=(opt, None))
    trainer.train()

    ref_opt = lomo_torch.Lomo(ref, lr=0.5, loss_scale_args={"init_scale": 2.0**24})
    sched = get_scheduler("linear", ref_opt, num_warmup_steps=0, num_training_steps=8)
    skipped = 0
    for step in range(8):
        batch = ids[step * BATCH:(step + 1) * BATCH]
        loss = ref(input_ids=batch, labels=batch).loss
        ref_opt.grad_norm(loss)
        if ref_opt.fused_backward(loss, sched.get_last_lr()[0]):
            sched.step()
        else:
            skipped += 1

    assert opt.loss_scaler is not None and opt.clip_grad_norm == 1.0
    assert 0 < skipped < 8 and opt.step_num == ref_opt.step_num == 8 - skipped
    assert opt.loss_scaler.loss_scale == ref_opt.loss_scaler.loss_scale < 2.0**24
    assert trainer.lr_scheduler.last_epoch == sched.last_epoch == 8 - skipped
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert max_rel_diff(model, ref) == 0.0


def test_loss_decreases_over_20_steps(tmp_path):
    ids = sequences(20 * BATCH)
    model = tiny_llama()
    held_out = sequences(32, seed=2)

    def loss_on(ids):
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    before = loss_on(held_out)
    args = training_args(tmp_path, max_steps=20, learning_rate=0.1, warmup_steps=0,
                         lr_scheduler_type="constant")
    trainer = LomoTrainer(model=model, args=args, train_dataset=dataset(ids))
    out = trainer.train()
    after = loss_on(held_out)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert out.global_step == 20 and len(losses) == 20
    assert after < before - 0.3, (before, after)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses


def test_resume_from_checkpoint_is_exact(tmp_path):
    """Trainer checkpoints save and restore lomo_torch's state_dict: resuming changes nothing."""
    ids = sequences(6 * BATCH)
    straight, interrupted, resumed = tiny_llama(), tiny_llama(), tiny_llama()
    LomoTrainer(model=straight, args=training_args(tmp_path / "a"), train_dataset=dataset(ids)).train()
    LomoTrainer(model=interrupted, args=training_args(tmp_path / "b", save_strategy="steps", save_steps=3),
                train_dataset=dataset(ids)).train()
    ckpt = tmp_path / "b" / "out" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").exists()
    trainer = LomoTrainer(model=resumed, args=training_args(tmp_path / "c", save_steps=3),
                          train_dataset=dataset(ids))
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.lomo_optimizer.step_num == 6
    assert max_rel_diff(resumed, straight) <= 1e-6


def test_user_supplied_optimizer_and_scheduler(tmp_path):
    """optimizers=(lomo_torch optimizer, scheduler) is used as given."""
    ids = sequences(6 * BATCH)
    model, ref = tiny_llama(), tiny_llama()
    opt = lomo_torch.Lomo(model, lr=0.05, clip_grad_norm=1.0, weight_decay=0.01)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=6)
    args = training_args(tmp_path, optim="adalomo", learning_rate=123.0)  # ignored: opt is given
    trainer = LomoTrainer(model=model, args=args, train_dataset=dataset(ids), optimizers=(opt, sched))
    trainer.train()
    assert trainer.lomo_optimizer is opt and opt.step_num == 6
    reference_loop(ref, ids, "lomo", 0.05, 0.01, 1.0, steps=6, warmup=2)
    assert max_rel_diff(model, ref) <= 1e-6


def test_gradient_accumulation_is_refused(tmp_path):
    args = training_args(tmp_path, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="(?s)gradient_accumulation_steps=1.*cannot be accumulated.*"
                       "gradient_checkpointing_enable.*microbatches=M"):
        LomoTrainer(model=tiny_llama(), args=args, train_dataset=dataset(sequences(8)))


def test_bad_configurations_are_refused(tmp_path):
    model, ds = tiny_llama(), dataset(sequences(8))
    with pytest.raises(ValueError, match="optim='adalomo'.*got optim='adamw_torch"):
        LomoTrainer(model=model, args=training_args(tmp_path, optim="adamw_torch"), train_dataset=ds)
    with pytest.raises(ValueError, match="'beta1=0.9' is not one of"):
        LomoTrainer(model=model, args=training_args(tmp_path, optim_args="beta1=0.9"), train_dataset=ds)
    with pytest.raises(ValueError, match="fp16=True.*load the model in float16"):
        LomoTrainer(model=model, args=training_args(tmp_path, fp16=True), train_dataset=ds)
    with pytest.raises(TypeError, match="needs a lomo_torch optimizer"):
        LomoTrainer(model=model, args=training_args(tmp_path), train_dataset=ds,
                    optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))


def test_optim_args_reach_the_optimizer(tmp_path):
    args = training_args(tmp_path, max_grad_norm=0.5, weight_decay=0.0,
                         optim_args="clip_threshold=2.0, decay_rate=-0.5,loss_scale=64,eps1=1e-4")
    opt = create_lomo_optimizer(tiny_llama(), args)
    assert isinstance(opt, lomo_torch.AdaLomo)
    assert (opt.clip_threshold, opt.decay_rate, opt.loss_scale) == (2.0, -0.5, 64.0)
    assert opt.eps == (1e-30, 1e-4) and opt.clip_grad_norm == 0.5 and opt.weight_decay == 0.0
    assert not opt.stochastic_rounding
    opt.remove_hooks()
    for optim in ("adalomo", "lomo"):
        args = training_args(tmp_path, optim=optim, seed=123, optim_args="stochastic_rounding=True")
        opt = create_lomo_optimizer(tiny_llama(), args)
        assert opt.stochastic_rounding and opt.state_dict()["rounding_seed"] == 123
        opt.remove_hooks()
    with pytest.raises(ValueError, match="is not True or False"):
        create_lomo_optimizer(tiny_llama(), training_args(tmp_path, optim_args="stochastic_rounding=2"))


def test_import_lomo_torch_does_not_import_transformers():
    code = "import sys, lomo_torch; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_example_trainer_mode_runs_tiny(capsys, tmp_path):
    """examples/torch_finetune.py --trainer (tests/test_examples.py runs the plain loop);
    its model is saved into tmp_path, not into the checkout."""
    spec = importlib.util.spec_from_file_location("torch_finetune", ROOT / "examples" / "torch_finetune.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    before, after = example.main(["--tiny", "--trainer", "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "config.json").exists()
    assert after < before
    assert "held-out loss" in capsys.readouterr().out


class CountingTrainer(transformers.Trainer):
    """A Trainer subclass with its own compute_loss (as trl's SFTTrainer has)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_calls = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.loss_calls += 1
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def test_lomo_trainer_of_a_trainer_subclass(tmp_path):
    """The explicit opt-in for any Trainer subclass: its compute_loss, lomo_torch's update."""
    cls = lomo_trainer(CountingTrainer)
    assert cls is lomo_trainer(CountingTrainer) and cls.__name__ == "LomoCountingTrainer"
    assert issubclass(cls, CountingTrainer) and lomo_trainer(transformers.Trainer) is LomoTrainer
    assert lomo_trainer(cls) is cls
    with pytest.raises(TypeError, match="takes a transformers.Trainer subclass"):
        lomo_trainer(torch.optim.SGD)

    ids = sequences(6 * BATCH)
    model, ref = tiny_llama(), tiny_llama()
    trainer = cls(model=model, args=training_args(tmp_path), train_dataset=dataset(ids))
    trainer.train()
    assert trainer.loss_calls == 6 and isinstance(trainer.lomo_optimizer, lomo_torch.AdaLomo)
    reference_loop(ref, ids, "adalomo", 0.05, 0.01, 1.0, steps=6, warmup=2)
    assert max_rel_diff(model, ref) <= 1e-6  # as LomoTrainer: weight decay and clipping applied


def two_pass_notes(caplog):
    return [r for r in caplog.records
            if r.name == "lomo_torch.trainer" and "two backward passes" in r.getMessage()]


def test_two_backward_passes_are_said_once(tmp_path, caplog):
    """max_grad_norm > 0 costs a second backward pass per step: the log says so once per
    trainer (also for a given optimizer, adopted at __init__ and again by train()),
    and not at all without clipping."""
    ds = dataset(sequences(2 * BATCH))
    with caplog.at_level(logging.WARNING, logger="lomo_torch.trainer"):
        LomoTrainer(model=tiny_llama(), args=training_args(tmp_path, max_steps=2),
                    train_dataset=ds).train()
        notes = two_pass_notes(caplog)
        assert len(notes) == 1, notes
        assert "clip_grad_norm=1.0" in notes[0].getMessage()
        assert "Set max_grad_norm=0 for one pass" in notes[0].getMessage()

        caplog.clear()
        model = tiny_llama()
        opt = lomo_torch.Lomo(model, lr=0.05, clip_grad_norm=0.5)
        LomoTrainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=ds,
                    optimizers=(opt, None)).train()
        notes = two_pass_notes(caplog)
        assert len(notes) == 1 and "clip_grad_norm=0.5" in notes[0].getMessage(), notes

        caplog.clear()
        LomoTrainer(model=tiny_llama(), args=training_args(tmp_path, max_steps=2, max_grad_norm=0.0),
                    train_dataset=ds).train()
        assert two_pass_notes(caplog) == []


DDP_STEPS, DDP_CLIP = 3, 0.5  # the gradient norm is 0.76-0.87: clipping acts


def ddp_worker(out_dir):
    """One rank of test_ddp_two_processes_equal_one_process (:func:`ddp_run`, under torchrun)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    out_dir = Path(out_dir)
    model = tiny_llama()
    args = training_args(out_dir, max_steps=DDP_STEPS, max_grad_norm=DDP_CLIP,
                         per_device_train_batch_size=BATCH // 2)
    trainer = LomoTrainer(model=model, args=args, train_dataset=dataset(sequences(DDP_STEPS * BATCH)))
    trainer.train()
    opt = trainer.lomo_optimizer
    torch.save({"world": dist.get_world_size(),
                "ddp": isinstance(opt.model, torch.nn.parallel.DistributedDataParallel),
                "step": opt.step_num,
                "norms": [h["grad_norm"] for h in trainer.state.log_history if "loss" in h],
                "params": {n: p.detach().clone() for n, p in model.named_parameters()}},
               out_dir / f"{trainer.args.process_index}.pt")


NEEDS_GLOO = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo")


def ddp_run(tmp_path_factory) -> Path:
    """The directory of one torchrun of this file on 2 CPU processes (gloo), made once
    per test run: each rank runs :func:`ddp_worker`, then
    ``tests/torch/test_trainer_peft.py``'s ``lora_lomo_ddp_worker`` and
    ``lora_lomo_fsdp2_worker`` (one launch, the imports paid once), and saves its
    results there."""
    def launch(out):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node=2", __file__, str(out)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    return once_per_run(tmp_path_factory, "torch_ddp", launch)[0]


@NEEDS_GLOO
def test_ddp_two_processes_equal_one_process(tmp_path_factory):
    """torchrun, 2 CPU processes (gloo), each half of every batch == one process on the
    whole batch: AdaLomo with clipping and weight decay, 3 steps. The optimizer is built on
    accelerate's DDP wrapper, so it averages every gradient over the ranks (on a bare
    model each rank would step on its own half and the replicas would part)."""
    out = ddp_run(tmp_path_factory)
    ranks = [torch.load(out / f"{r}.pt", weights_only=True) for r in range(2)]
    ids = sequences(DDP_STEPS * BATCH)
    ref, start = tiny_llama(), tiny_llama()
    _, ref_norms, _ = reference_loop(ref, ids, "adalomo", 0.05, 0.01, DDP_CLIP, steps=DDP_STEPS,
                                  warmup=2)
    assert min(ref_norms) > DDP_CLIP  # the clip coefficient is < 1: clipping is exercised
    for r in ranks:
        assert r["world"] == 2 and r["ddp"] and r["step"] == DDP_STEPS
        # The norm is the rank-averaged gradient's: the full batch's, up to fp32 summation order.
        assert r["norms"] == pytest.approx(ref_norms, rel=1e-5)
    for name, expected in ref.named_parameters():
        got = ranks[0]["params"][name]
        assert torch.equal(got, ranks[1]["params"][name]), name  # replicas stay identical
        # The two halves' mean gradient equals the full batch's up to fp32 summation
        # order (~1e-7); a half-batch step or a missing average is off by > 1e-2.
        diff = ((got - expected).abs().max() / expected.abs().max()).item()
        assert diff <= 1e-5, (name, diff)
    assert max_rel_diff(ref, start) > 1e-3


if __name__ == "__main__":  # a rank of ddp_run
    from tests.torch.test_trainer_peft import lora_lomo_ddp_worker, lora_lomo_fsdp2_worker

    ddp_worker(sys.argv[1])
    lora_lomo_ddp_worker(sys.argv[1])
    lora_lomo_fsdp2_worker(sys.argv[1])
