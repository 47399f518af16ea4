"""Fine-tune a small Llama with lomo_torch's AdaLomo (PyTorch + transformers).

    python examples/torch_finetune.py                  # 1M-parameter Llama, 300 steps (~1 CPU-minute)
    python examples/torch_finetune.py --trainer        # the same through transformers' Trainer
    python examples/torch_finetune.py --tiny           # a few seconds (what CI runs)
    python examples/torch_finetune.py --model DIR      # a local causal-LM checkpoint + tokenizer
    python examples/torch_finetune.py --dtype fp16     # (default on CUDA: bf16, or fp16)
    python examples/torch_finetune.py --data examples/data/finetune.jsonl   # JSONL records

Needs torch, transformers and tokenizers; ``--trainer`` also accelerate. JAX is
never imported.

The plain loop is LOMO's two backward passes per step: ``grad_norm(loss)``
(the global gradient norm, for clipping; also the fp16 overflow check), then
``fused_backward(loss, lr)``, which updates each parameter inside backward
the moment its gradient is complete, so no full set of gradients and no
optimizer step ever exist. ``--trainer`` runs the same fine-tune with
``lomo_torch.trainer.LomoTrainer``, a ``transformers.Trainer`` subclass.

``--data`` is a text file (one document a line; default
``examples/data/corpus.txt``: the documents are joined by the EOS token and cut
into ``--seq-len`` blocks, on a ``LlamaForCausalLM`` built from a
``LlamaConfig`` and a byte-level BPE trained on the file in a second; nothing
is downloaded), or a ``.jsonl`` file of ``{"text"}``, ``{"prompt",
"completion"}`` or ``{"messages"}`` records, read by ``lomo_jax.records`` with
the JAX job's rules (``examples/finetune_llama.py --data``): the same token ids
and the same labels (``-100`` on prompts and on non-assistant turns), so the
two frameworks fine-tune on the same data. JSONL examples are right-padded
per batch (label ``-100``, ``attention_mask`` 0) and fine-tune ``--model``
(default the shipped ``examples/data/pretrained``); a tenth of them (the last)
is held out for the loss printed before and after.

``--dtype auto`` is bf16 (or fp16) on CUDA, fp32 on CPU; fp16 turns on
AdaLomo's dynamic loss scaling. ``--rounding`` is the JAX job's flag with the
JAX job's default: updates are rounded into bf16/fp16 parameters
stochastically (lomo_torch's ``stochastic_rounding=True``, seeded from
``--seed``), so updates smaller than half a bf16 step still count; ``nearest``
to compare; fp32 parameters are not rounded. The fine-tuned model and its
tokenizer are saved into ``--out`` (default ``runs/torch_finetune``) with
``save_pretrained``, each file renamed into place once written whole;
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads them.
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
from lomo_jax import records  # JAX-free: the JSONL rules of lomo_jax.data
from lomo_jax._files import write_atomically  # JAX-free too

DATA = Path(__file__).resolve().parent / "data"
CORPUS = DATA / "corpus.txt"
PRETRAINED = DATA / "pretrained"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainer", action="store_true", help="train with LomoTrainer (transformers.Trainer)")
    p.add_argument("--model", metavar="DIR", help="local checkpoint dir (model + tokenizer) instead of a "
                   "new Llama (default with a .jsonl --data: the shipped examples/data/pretrained)")
    p.add_argument("--data", type=Path, default=CORPUS,
                   help="a text file, one document per line, or a .jsonl file of {\"text\"}, "
                   "{\"prompt\", \"completion\"} or {\"messages\"} records (lomo_jax.records)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="parameter dtype (auto: bf16/fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--rounding", choices=["stochastic", "nearest"], default=None,
                   help="how updates are rounded into bf16/fp16 parameters (default, as in the "
                   "JAX job: stochastic for bf16/fp16, so small updates still count; nearest "
                   "to compare)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="block length; longer JSONL examples are cut")
    p.add_argument("--lr", type=float, default=1e-2, help="AdaLomo lr (relative to each parameter's RMS)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/torch_finetune"),
                   help="where the fine-tuned model and tokenizer are saved (save_pretrained)")
    p.add_argument("--tiny", action="store_true", default=bool(os.environ.get("LOMO_EXAMPLES_TINY")),
                   help="a tiny model for a few steps (also: LOMO_EXAMPLES_TINY=1)")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch_size, args.seq_len = 30, 8, 32
    if not args.data.is_file():
        p.error(f"--data {args.data}: no such file")
    return args


def is_jsonl(path: Path) -> bool:
    return path.suffix == ".jsonl"


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def pick_rounding(name, dtype: torch.dtype) -> str:
    """``--rounding``, by default ``stochastic`` for bf16/fp16 parameters (the JAX job's rule)."""
    if name is not None:
        return name
    return "nearest" if dtype == torch.float32 else "stochastic"


# ------------------------------------------------------------------ tokenizer
def train_bpe(lines, vocab_size):
    """A byte-level BPE trained on the corpus itself (about a second, offline),
    as a transformers tokenizer (so it saves with the model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def hf_tokenizer(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tok.eos_token_id is None:
        raise SystemExit(f"the tokenizer in {model_dir} has no eos token to separate documents")
    return tok


def make_blocks(tok, lines, seq_len):
    """Documents joined by <eos>, cut into (n, seq_len) blocks."""
    ids = [t for doc in tok(lines, add_special_tokens=False)["input_ids"]
           for t in (*doc, tok.eos_token_id)]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def collate(features, pad_id):
    """``{"input_ids", "labels"}`` features (1-D, any lengths) as one right-padded batch
    ``{"input_ids", "labels", "attention_mask"}`` ``[B, T]``: padding gets id ``pad_id``,
    label ``-100`` and mask 0 (blocks of equal length get no padding)."""
    width = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": torch.full((len(features), width), pad_id),
             "labels": torch.full((len(features), width), records.IGNORE_INDEX),
             "attention_mask": torch.zeros((len(features), width), dtype=torch.long)}
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        batch["input_ids"][row, :n] = torch.as_tensor(f["input_ids"])
        batch["labels"][row, :n] = torch.as_tensor(f["labels"])
        batch["attention_mask"][row, :n] = 1
    return batch


def text_features(tok, lines, split, seq_len):
    """``(train, held_out)`` features of a text file: ``seq_len`` blocks, labels = inputs."""
    blocks = [make_blocks(tok, part, seq_len) for part in (lines[:split], lines[split:])]
    train, held_out = ([{"input_ids": b, "labels": b} for b in rows] for rows in blocks)
    return train, held_out[:64]


def jsonl_features(path, tok, seq_len, vocab_size):
    """``(train, held_out)`` features of a JSONL file, tokenized by ``lomo_jax.records``
    (a bad record stops the run naming FILE:LINE); the last tenth is held out."""
    try:
        data = records.load(path, tok, seq_len, vocab_size=vocab_size)
    except records.DataError as e:
        raise SystemExit(f"error: {e}") from None
    if len(data.examples) < 2:
        raise SystemExit(f"error: {path}: {len(data.examples)} example(s); need 2 or more "
                         "(one to train on, one held out)")
    if data.truncated:
        print(f"{data.truncated} example(s) cut to --seq-len {seq_len} ({data.dropped} dropped)")
    features = [{"input_ids": torch.from_numpy(ex.input_ids).long(),
                 "labels": torch.from_numpy(ex.labels).long()} for ex in data.examples]
    split = min(len(features) * 9 // 10, len(features) - 1)
    return features[:split], features[split:]


def sample_prompt(tok, held_out, jsonl):
    """Prompt ids for a greedy sample: a held-out example up to its first trained token."""
    if not jsonl:
        return tok(["Six plus two is"], add_special_tokens=False)["input_ids"][0]
    labels = held_out[0]["labels"]
    first = int(torch.nonzero(labels != records.IGNORE_INDEX)[0])
    return held_out[0]["input_ids"][:max(1, first)].tolist()


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
def eval_loss(model, features, batch_size, pad_id):
    model.eval()
    total = 0.0
    for i in range(0, len(features), batch_size):
        part = features[i:i + batch_size]
        batch = {k: v.to(model.device) for k, v in collate(part, pad_id).items()}
        total += model(**batch).loss.float().item() * len(part)
    model.train()
    return total / len(features)


# ----------------------------------------------------------------- training
def train_loop(model, train, args, pad_id):
    """The plain loop: grad_norm + fused_backward, an LR schedule on the optimizer."""
    opt = lomo_torch.AdaLomo(model, lr=args.lr, clip_grad_norm=args.clip_grad_norm or None,
                             weight_decay=args.weight_decay,
                             stochastic_rounding=args.rounding == "stochastic", seed=args.seed)
    sched = get_cosine_schedule_with_warmup(opt, max(1, args.steps // 10), args.steps)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    # grad_norm is needed to clip by norm, and in fp16 (it is the overflow check).
    two_pass = opt.clip_grad_norm is not None or model.dtype == torch.float16
    skipped = 0
    model.train()
    bar = tqdm(range(args.steps), desc="AdaLomo", mininterval=0.5)
    for step in bar:
        idx = order[(torch.arange(args.batch_size) + step * args.batch_size) % len(order)]
        batch = collate([train[i] for i in idx.tolist()], pad_id)
        loss = model(**{k: v.to(model.device) for k, v in batch.items()}).loss
        if two_pass:
            opt.grad_norm(loss)          # pass 1: global norm -> clip coefficient (+ fp16 overflow check)
        lr = sched.get_last_lr()[0]
        skipped += not opt.fused_backward(loss, lr)  # pass 2: each parameter updated inside backward
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
    if skipped:
        print(f"{skipped} step(s) skipped on fp16 overflow (loss scale now {opt.loss_scaler.loss_scale:g})")
    return opt


def train_trainer(model, train, args, pad_id):
    """The same fine-tune through transformers' Trainer: one import changed."""
    from transformers import TrainingArguments

    from lomo_torch.trainer import LomoTrainer as Trainer

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, optim="adalomo", learning_rate=args.lr, weight_decay=args.weight_decay,
            max_grad_norm=args.clip_grad_norm, max_steps=args.steps,
            optim_args=f"stochastic_rounding={args.rounding == 'stochastic'}",
            per_device_train_batch_size=args.batch_size, lr_scheduler_type="cosine",
            warmup_steps=max(1, args.steps // 10), logging_steps=max(1, args.steps // 5),
            save_strategy="no", report_to="none", seed=args.seed,
            use_cpu=model.device.type == "cpu", dataloader_pin_memory=False)
        trainer = Trainer(model=model, args=targs, train_dataset=train,
                          data_collator=lambda features: collate(features, pad_id))
        trainer.train()
    return trainer.lomo_optimizer


def load_everything(args, device, dtype):
    """``(tokenizer, model, train, held_out)`` for ``--data`` (see the module docstring)."""
    jsonl = is_jsonl(args.data)
    if jsonl:
        args.model = args.model or str(PRETRAINED)
        tok = hf_tokenizer(args.model)
        model = build_model(args, len(tok), tok.eos_token_id, dtype, device)
        train, held_out = jsonl_features(args.data, tok, args.seq_len, model.config.vocab_size)
        return tok, model, train, held_out
    lines = [ln for ln in args.data.read_text(encoding="utf-8").splitlines() if ln.strip()]
    split = len(lines) * 9 // 10
    if args.tiny:
        lines, split = lines[:400], 360
    tok = hf_tokenizer(args.model) if args.model else train_bpe(lines[:split], 384 if args.tiny else 1024)
    model = build_model(args, len(tok), tok.eos_token_id, dtype, device)
    train, held_out = text_features(tok, lines, split, args.seq_len)
    return tok, model, train, held_out


def save(model, tok, out):
    """``save_pretrained`` of the model and the tokenizer, staged and renamed into ``out``
    (the weights last): a run killed while saving leaves each file the previous run's or
    this one's."""
    with write_atomically(str(out), last=("model.safetensors.index.json",
                                          "model.safetensors")) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def run(argv=None):
    """Train, report and save; returns ``{"before", "after", "model", "tokenizer", "out"}``."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # a tiny model is much faster on one thread (no sync overhead)
    dtype = pick_dtype(args.dtype, device)
    args.rounding = pick_rounding(args.rounding, dtype)
    tok, model, train, held_out = load_everything(args, device, dtype)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}: {n_params / 1e6:.2f}M parameters, {dtype} on {device} "
          f"({args.rounding} rounding); {len(train)} training "
          + ("examples" if is_jsonl(args.data) else f"blocks of {args.seq_len} tokens")
          + f" from {args.data}")

    before = eval_loss(model, held_out, args.batch_size, pad_id)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    opt = (train_trainer if args.trainer else train_loop)(model, train, args, pad_id)
    seconds = time.perf_counter() - start
    after = eval_loss(model, held_out, args.batch_size, pad_id)

    print(f"{opt!r}")
    if opt.loss_scaler is not None:
        print(f"fp16 dynamic loss scale now {opt.loss_scaler.loss_scale:g}")
    print(f"{args.steps} steps in {seconds:.1f} s" + (
        f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device.type == "cuda" else ""))
    prompt = torch.tensor([sample_prompt(tok, held_out, is_jsonl(args.data))], device=device)
    sample = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=pad_id)
    print(f"sample: {tok.decode(sample[0].tolist())!r}")
    print(f"held-out loss: {before:.4f} -> {after:.4f} (perplexity {math.exp(before):.1f} -> {math.exp(after):.1f})")
    if not after < before:
        raise SystemExit("the held-out loss did not go down")
    save(model, tok, args.out)
    print(f"saved the fine-tuned model and tokenizer in {args.out}/ "
          "(AutoModelForCausalLM.from_pretrained loads it)")
    return {"before": before, "after": after, "model": model, "tokenizer": tok, "out": args.out}


def main(argv=None):
    result = run(argv)
    return result["before"], result["after"]


if __name__ == "__main__":
    main()
