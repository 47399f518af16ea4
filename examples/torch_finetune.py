"""Fine-tune a small Llama with lomo_torch's AdaLomo (PyTorch + transformers).

    python examples/torch_finetune.py                  # 1M-parameter Llama, 300 steps (~1 CPU-minute)
    python examples/torch_finetune.py --trainer        # the same through transformers' Trainer
    python examples/torch_finetune.py --tiny           # a few seconds (what CI runs)
    python examples/torch_finetune.py --model DIR      # a local causal-LM checkpoint + tokenizer
    python examples/torch_finetune.py --dtype fp16     # (default on CUDA: bf16, or fp16)

Needs torch, transformers and tokenizers; ``--trainer`` also accelerate.

The plain loop is LOMO's two backward passes per step: ``grad_norm(loss)``
(the global gradient norm, for clipping; also the fp16 overflow check), then
``fused_backward(loss, lr)``, which updates each parameter inside backward
the moment its gradient is complete, so no full set of gradients and no
optimizer step ever exist. ``--trainer`` runs the same fine-tune with
``lomo_torch.trainer.LomoTrainer``, a ``transformers.Trainer`` subclass.

The model is a ``LlamaForCausalLM`` built from a ``LlamaConfig`` and a
byte-level BPE tokenizer trained on examples/data/corpus.txt in a second;
nothing is downloaded. ``--dtype auto`` is bf16 (or fp16) on CUDA, fp32 on
CPU; fp16 turns on AdaLomo's dynamic loss scaling.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

import lomo_torch

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainer", action="store_true", help="train with LomoTrainer (transformers.Trainer)")
    p.add_argument("--model", metavar="DIR", help="local checkpoint dir (model + tokenizer) instead of a new Llama")
    p.add_argument("--data", type=Path, default=CORPUS, help="a text file, one document per line")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="parameter dtype (auto: bf16/fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2, help="AdaLomo lr (relative to each parameter's RMS)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", default=bool(os.environ.get("LOMO_EXAMPLES_TINY")),
                   help="a tiny model for a few steps (also: LOMO_EXAMPLES_TINY=1)")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch_size, args.seq_len = 30, 8, 32
    return args


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# ------------------------------------------------------------------ tokenizer
def train_bpe(lines, vocab_size):
    """A byte-level BPE trained on the corpus itself (about a second, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eos = tok.token_to_id("<eos>")
    return ((lambda batch: [e.ids for e in tok.encode_batch(batch)]), tok.decode,
            tok.get_vocab_size(), eos)


def hf_tokenizer(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tok.eos_token_id is None:
        raise SystemExit(f"the tokenizer in {model_dir} has no eos token to separate documents")
    return ((lambda batch: tok(batch, add_special_tokens=False)["input_ids"]), tok.decode,
            len(tok), tok.eos_token_id)


def make_blocks(encode, lines, eos, seq_len):
    """Documents joined by <eos>, cut into (n, seq_len) blocks."""
    ids = [t for doc in encode(lines) for t in (*doc, eos)]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


# ---------------------------------------------------------------------- model
def build_model(args, vocab_size, eos, dtype, device):
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, local_files_only=True)
        return model.to(device)
    d, layers, heads = (64, 2, 2) if args.tiny else (128, 4, 4)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=d, intermediate_size=int(d * 8 / 3), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=args.seq_len,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


@torch.no_grad()
def eval_loss(model, blocks, batch_size):
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), batch_size):
        b = blocks[i:i + batch_size].to(model.device)
        total += model(input_ids=b, labels=b).loss.float().item() * len(b)
    model.train()
    return total / len(blocks)


# ----------------------------------------------------------------- training
def train_loop(model, train, args):
    """The plain loop: grad_norm + fused_backward, an LR schedule on the optimizer."""
    opt = lomo_torch.AdaLomo(model, lr=args.lr, clip_grad_norm=args.clip_grad_norm or None,
                             weight_decay=args.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, max(1, args.steps // 10), args.steps)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    # grad_norm is needed to clip by norm, and in fp16 (it is the overflow check).
    two_pass = opt.clip_grad_norm is not None or model.dtype == torch.float16
    skipped = 0
    model.train()
    bar = tqdm(range(args.steps), desc="AdaLomo", mininterval=0.5)
    for step in bar:
        idx = order[(torch.arange(args.batch_size) + step * args.batch_size) % len(order)]
        batch = train[idx].to(model.device)
        loss = model(input_ids=batch, labels=batch).loss
        if two_pass:
            opt.grad_norm(loss)          # pass 1: global norm -> clip coefficient (+ fp16 overflow check)
        lr = sched.get_last_lr()[0]
        skipped += not opt.fused_backward(loss, lr)  # pass 2: each parameter updated inside backward
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
    if skipped:
        print(f"{skipped} step(s) skipped on fp16 overflow (loss scale now {opt.loss_scaler.loss_scale:g})")
    return opt


def train_trainer(model, train, args):
    """The same fine-tune through transformers' Trainer: one import changed."""
    from transformers import TrainingArguments

    from lomo_torch.trainer import LomoTrainer as Trainer

    dataset = [{"input_ids": row, "labels": row} for row in train]
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, optim="adalomo", learning_rate=args.lr, weight_decay=args.weight_decay,
            max_grad_norm=args.clip_grad_norm, max_steps=args.steps,
            per_device_train_batch_size=args.batch_size, lr_scheduler_type="cosine",
            warmup_steps=max(1, args.steps // 10), logging_steps=max(1, args.steps // 5),
            save_strategy="no", report_to="none", seed=args.seed,
            use_cpu=model.device.type == "cpu", dataloader_pin_memory=False)
        trainer = Trainer(model=model, args=targs, train_dataset=dataset)
        trainer.train()
    return trainer.lomo_optimizer


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # a tiny model is much faster on one thread (no sync overhead)
    dtype = pick_dtype(args.dtype, device)

    lines = [ln for ln in args.data.read_text(encoding="utf-8").splitlines() if ln.strip()]
    split = len(lines) * 9 // 10
    if args.tiny:
        lines, split = lines[:400], 360
    if args.model:
        encode, decode, vocab_size, eos = hf_tokenizer(args.model)
    else:
        encode, decode, vocab_size, eos = train_bpe(lines[:split], 384 if args.tiny else 1024)
    train = make_blocks(encode, lines[:split], eos, args.seq_len)
    held_out = make_blocks(encode, lines[split:], eos, args.seq_len)[:64]

    model = build_model(args, vocab_size, eos, dtype, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}: {n_params / 1e6:.2f}M parameters, {dtype} on {device}; "
          f"{len(train)} training blocks of {args.seq_len} tokens")

    before = eval_loss(model, held_out, args.batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    opt = (train_trainer if args.trainer else train_loop)(model, train, args)
    seconds = time.perf_counter() - start
    after = eval_loss(model, held_out, args.batch_size)

    print(f"{opt!r}")
    if opt.loss_scaler is not None:
        print(f"fp16 dynamic loss scale now {opt.loss_scaler.loss_scale:g}")
    print(f"{args.steps} steps in {seconds:.1f} s" + (
        f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device.type == "cuda" else ""))
    prompt = torch.tensor([encode(["Six plus two is"])[0]], device=device)
    sample = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=eos)
    print(f"sample: {decode(sample[0].tolist())!r}")
    print(f"held-out loss: {before:.4f} -> {after:.4f} (perplexity {math.exp(before):.1f} -> {math.exp(after):.1f})")
    if not after < before:
        raise SystemExit("the held-out loss did not go down")
    return before, after


if __name__ == "__main__":
    main()
