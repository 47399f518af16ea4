"""The main job: fine-tune a small pretrained LLaMA with the fused AdaLomo step, on the CPU.

    python examples/finetune_llama.py                      # ~1.5 min on 2 CPU cores
    python examples/finetune_llama.py --model DIR          # your local transformers checkpoint
    python examples/finetune_llama.py --optimizer adamw    # the baseline, for comparison
    python examples/finetune_llama.py --tiny               # a few seconds (what CI runs)
    python examples/finetune_llama.py --data examples/data/finetune.jsonl \
        --eval-data examples/data/eval.jsonl --epochs 1    # your JSONL data, packed

What it does:

1. loads ``--model DIR`` (default ``examples/data/pretrained``, a 0.9M-parameter
   LLaMA that ships with the project, made by ``examples/data/make_pretrained.py``
   from the *pretraining part* of ``examples/data/corpus.txt``: its stories and
   notes) and its tokenizer (or ``--tokenizer DIR2``);
2. fine-tunes it on the corpus's *target slice*, the arithmetic sentences
   ("Seven plus five is twelve."), which the checkpoint never saw, with
   ``lomo_jax.fused_train_step``: layers run in a ``lax.scan``, and the
   backward scan updates each layer the moment its gradient is known, so only
   one layer's gradient is ever alive. A tqdm bar shows the loss and tokens/s;
3. reports the loss on held-out target sentences (one in eight distinct
   sentences, never trained on) before and after, throughput and wall time,
   and the step's memory from XLA's compiled ``memory_analysis()`` beside
   ``jax.value_and_grad`` with plain gradients (SGD) and with ``optax.adamw``;
4. writes ``OUT/loss_and_memory.png``, ``OUT/finetune_report.json`` and a
   transformers checkpoint in ``OUT`` (``--out``, default
   ``runs/finetune_llama``) with the tokenizer and ``generation_config.json``,
   that ``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads. Every
   file is renamed into place once written whole, so a run killed while
   writing leaves each file of ``OUT`` the previous run's or this one's.

``--data FILE`` fine-tunes on a JSONL file instead (``{"text"}``,
``{"prompt", "completion"}`` or ``{"messages"}`` records, see ``lomo_jax.data``):
examples are packed into rows of ``--seq-len`` with ``segment_ids`` (one shape,
one compile; the report's ``packing_efficiency`` is real tokens / row tokens),
and ``--epochs N`` runs ``ceil(N * rows / batch-size)`` steps. The held-out loss
printed is still the corpus's held-out arithmetic sentences, and says so: it is
not a loss on ``--data``'s kind of text; ``--eval-data`` gives that.
``--eval-data FILE`` is scored before and after: its ``{"prompt", "choices",
"answer"}`` records give the multiple-choice accuracy, the others the loss on
their completion tokens (``lomo_jax.models.scoring``). A bad record stops the
job before training with ``FILE:LINE`` and what is wrong.

Defaults follow the optimizers' authors: AdaLomo normalises each update itself
and runs without global gradient-norm clipping; LOMO (and AdamW) clip at 1.0
(``--clip-grad-norm`` sets it, 0 turns it off). The learning rate warms up
linearly over ``--warmup-steps`` (default a tenth of the steps) and then
follows ``--schedule`` (cosine by default; linear; constant), the decaying
ones down to a tenth of ``--lr`` at the last step.

``--checkpoint-every N`` saves, every N steps, the parameters, the optimizer state
(with the stochastic-rounding key), the step, the data position and the losses so
far into ``OUT/checkpoints/`` (``lomo_jax.checkpoint.Checkpointer``: orbax,
atomic, the 2 latest kept). ``--resume`` continues from the latest one there: a
run killed at any moment (SIGKILL included) and resumed ends with the weights of
an uninterrupted run, bit for bit; the report's ``resumed_from_step`` says where
it picked up (null for a fresh run). A resume whose flags would change the math
(``RESUME_FLAGS``) is refused naming the flag; ``--resume`` with no checkpoint
there starts fresh (and says so), so a restart script can always pass it. A
fresh run with ``--checkpoint-every`` refuses an ``OUT`` that has checkpoints.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import re
import signal
import time
from pathlib import Path


class _NoTorchNotice(logging.Filter):
    """Drop transformers' "PyTorch was not found" notice (this job never needs torch);
    every other transformers message passes."""

    def filter(self, record):
        msg = record.getMessage()
        return not ("PyTorch was not found" in msg or msg.startswith("None of PyTorch"))


logging.getLogger("transformers").addFilter(_NoTorchNotice())  # before transformers is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lomo_jax  # noqa: E402
from lomo_jax import aot, checkpoint, data  # noqa: E402
from lomo_jax.models import convert, generate, llama, scoring  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
CORPUS = DATA / "corpus.txt"
PRETRAINED = DATA / "pretrained"
DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
MIB = 1024**2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TARGET_LINE = re.compile(r"[A-Z][a-z]+ (plus|minus) [a-z]+ is [a-z]+\.")
CAVEAT = ("At this toy size, and in bf16 on a CPU, these compiled-memory figures say little: "
          "activations dominate, and XLA:CPU makes f32 copies of bf16 weights around matmuls "
          "(GPUs don't). For real figures: python benchmarks/memory.py --target rtx4090 "
          "(compiles for a GPU target; no GPU needed).")
# the flags a resumed run must share with the checkpoint's run (they change the math)
RESUME_FLAGS = ("model", "tokenizer", "data", "optimizer", "steps", "epochs", "schedule",
                "warmup_steps", "lr", "clip_grad_norm", "dtype", "rounding", "batch_size",
                "microbatches", "seq_len", "seed", "device")
KILL_AFTER_STEP = "LOMO_EXAMPLES_KILL_AFTER_STEP"  # tests: SIGKILL this run after that step


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR", default=str(PRETRAINED),
                   help="local transformers checkpoint to fine-tune: config.json + safetensors "
                   "(default: the shipped examples/data/pretrained)")
    p.add_argument("--tokenizer", metavar="DIR2", default=None,
                   help="where the model's tokenizer is, if not in --model DIR")
    p.add_argument("--optimizer", choices=["adalomo", "lomo", "adamw"], default="adalomo",
                   help="adalomo/lomo: the fused step; adamw: jax.value_and_grad + optax.adamw")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 100; 6 with --tiny)")
    p.add_argument("--data", metavar="FILE", default=None,
                   help="JSONL fine-tuning data ({\"text\"}, {\"prompt\", \"completion\"} or "
                   "{\"messages\"} records), packed into rows (default: the corpus's "
                   "arithmetic sentences). The held-out loss printed stays the corpus's (so "
                   "labelled); pass --eval-data for a loss on data like yours")
    p.add_argument("--epochs", type=float, default=None, metavar="N",
                   help="with --data: N passes over its packed rows, instead of --steps")
    p.add_argument("--eval-data", metavar="FILE", default=None,
                   help="JSONL eval data scored before and after: {\"prompt\", \"choices\", "
                   "\"answer\"} records give the accuracy, the others the held-out loss")
    p.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine",
                   help="learning rate after the warmup: cosine or linear decay to lr/10 "
                   "at the last step, or constant (default cosine)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup from 0 to --lr (default: a tenth of the steps, at least 1)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 3e-2 adalomo, 3e-2 lomo, 3e-3 adamw)")
    p.add_argument("--clip-grad-norm", type=float, default=None,
                   help="global gradient-norm clipping (LOMO's two passes); 0 turns it off "
                   "(default: off for adalomo, as its authors run it; 1.0 for lomo and adamw)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="parameter dtype (fp16 turns on dynamic loss scaling)")
    p.add_argument("--rounding", choices=["stochastic", "nearest"], default=None,
                   help="how updates are rounded into bf16/fp16 parameters (default: stochastic "
                   "for bf16/fp16 with adalomo/lomo, so small updates still count; nearest "
                   "to compare; examples/torch_finetune.py takes the same flag and default)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--microbatches", type=int, default=1, metavar="M",
                   help="gradient accumulation inside the fused step: each layer runs on "
                   "batch-size / M rows at a time, one update per step (adalomo/lomo)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--out", default="runs/finetune_llama", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="save a checkpoint into OUT/checkpoints every N steps (0: never)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in OUT/checkpoints (same flags)")
    p.add_argument("--device", choices=["cpu", "gpu", "tpu", "auto"], default="cpu",
                   help="where to train (default cpu, so the run is the same everywhere; "
                   "auto: JAX's default backend)")
    p.add_argument("--no-memory-report", action="store_true",
                   help="skip compiling the SGD/AdamW baselines for the memory comparison")
    p.add_argument("--tiny", action="store_true", default=bool(os.environ.get("LOMO_EXAMPLES_TINY")),
                   help="a few short steps (also: LOMO_EXAMPLES_TINY=1)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p, args):
    if args.lr is None:
        args.lr = 3e-3 if args.optimizer == "adamw" else 3e-2
    if args.tiny:
        args.batch_size, args.seq_len = 4, 32
    if args.clip_grad_norm is None:  # AdaLomo's authors train it without clipping
        args.clip_grad_norm = 0.0 if args.optimizer == "adalomo" else 1.0
    if args.checkpoint_every < 0:
        p.error(f"--checkpoint-every must be >= 0 (0: never), got {args.checkpoint_every}")
    if args.clip_grad_norm < 0:
        p.error(f"--clip-grad-norm must be >= 0 (0: off), got {args.clip_grad_norm}")
    check_data_args(p, args)
    if args.steps is None and args.epochs is None:
        args.steps = 6 if args.tiny else 100
    if (args.steps is not None and args.steps < 1) or args.batch_size < 1 or args.seq_len < 2:
        p.error("--steps, --batch-size must be >= 1 and --seq-len >= 2")
    if args.steps is not None and schedule_problem(args):
        p.error(schedule_problem(args))
    if args.microbatches < 1 or args.batch_size % args.microbatches:
        p.error(f"--microbatches must be >= 1 and divide --batch-size ({args.batch_size}), "
                f"got {args.microbatches}")
    if args.microbatches > 1 and args.optimizer == "adamw":
        p.error("--microbatches is the fused step's; use --optimizer adalomo or lomo")
    if not args.lr > 0:
        p.error(f"--lr must be positive, got {args.lr}")
    if args.optimizer == "adamw" and args.dtype == "fp16":
        p.error("--optimizer adamw has no loss scaling here; use --dtype fp32 or bf16 with it")
    if args.rounding is None:  # the fused step's stochastic rounding for bf16/fp16
        fused_low = args.dtype != "fp32" and args.optimizer != "adamw"
        args.rounding = "stochastic" if fused_low else "nearest"
    if args.rounding == "stochastic" and args.optimizer == "adamw":
        p.error("--rounding stochastic is the fused step's; use --optimizer adalomo or lomo")
    problem = model_dir_problem(args.model, args.tokenizer)
    if problem:
        p.error(problem)


def check_data_args(p, args):
    """``--data``/``--eval-data``/``--epochs``: the files exist, ``--epochs`` needs ``--data``
    and excludes ``--steps``."""
    for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if path is not None and not Path(path).is_file():
            p.error(f"{flag} {path}: no such file")
    if args.epochs is not None:
        if args.data is None:
            p.error("--epochs counts passes over --data FILE; without --data use --steps")
        if args.steps is not None:
            p.error("give --steps or --epochs, not both")
        if not args.epochs > 0:
            p.error(f"--epochs must be positive, got {args.epochs}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        p.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")


def schedule_problem(args):
    """Why ``--warmup-steps`` does not fit in ``args.steps`` steps, or None."""
    if args.warmup_steps is not None and args.warmup_steps >= args.steps:
        return (f"--warmup-steps {args.warmup_steps} must be fewer than the {args.steps} "
                "training steps")
    return None


def make_schedule(kind, lr, steps, warmup=None):
    """Linear warmup from 0 over ``warmup`` steps (default ``max(1, steps // 10)``), then
    ``kind``: ``cosine``/``linear`` decay to ``lr / 10`` at the last step, or ``constant``."""
    warmup = max(1, steps // 10) if warmup is None else warmup
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr / 10)
    rest = max(1, steps - warmup)
    after = (optax.constant_schedule(lr) if kind == "constant"
             else optax.linear_schedule(lr, lr / 10, rest))
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def has_tokenizer(path):
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def model_dir_problem(model, tokenizer):
    """Why ``--model``/``--tokenizer`` cannot be used (checked before anything is loaded), or None."""
    d = Path(model)
    if not d.is_dir():
        return f"--model {model}: no such directory"
    if not (d / "config.json").is_file() or not any(d.glob("*.safetensors")):
        return f"--model {model}: needs config.json and *.safetensors weights (a save_pretrained directory)"
    if tokenizer is not None and not has_tokenizer(tokenizer):
        return f"--tokenizer {tokenizer}: no {' or '.join(TOKENIZER_FILES)} there"
    if tokenizer is None and not has_tokenizer(d):
        return (f"--model {model} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); pass the "
                "one the model was trained with as --tokenizer DIR2 (a new tokenizer would not "
                "match its embeddings)")
    return None


# ---------------------------------------------------------------- data -----

def corpus_parts(text=None):
    """The corpus split by kind of line: ``pretrain`` (stories and notes: what the shipped
    checkpoint learned from), ``target`` (the arithmetic sentences the job fine-tunes on)
    and ``held_out`` (every occurrence of one in eight distinct arithmetic sentences:
    trained on by neither)."""
    lines = (CORPUS.read_text() if text is None else text).splitlines(keepends=True)
    target = [s for s in lines if TARGET_LINE.fullmatch(s.strip())]
    held = set(sorted(set(target))[::8])
    return {"pretrain": "".join(s for s in lines if not TARGET_LINE.fullmatch(s.strip())),
            "target": "".join(s for s in target if s not in held),
            "held_out": "".join(s for s in target if s in held)}


def train_tokenizer(text, vocab_size):
    """A byte-level BPE trained on ``text`` (what the shipped checkpoint's tokenizer is)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


def load_tokenizer(args):
    """The tokenizer the model was trained with: ``--tokenizer`` or the one in ``--model``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(args.tokenizer or args.model)


def make_windows(tokenizer, text, seq_len, vocab_size):
    """``text`` as token windows ``[n, seq_len]`` (the tail that does not fill one is dropped)."""
    ids = np.asarray(tokenizer(text)["input_ids"], np.int32)
    if ids.max() >= vocab_size:
        raise ValueError(f"tokenizer produces id {ids.max()} but the model's vocab_size is "
                         f"{vocab_size}; pass the model's own tokenizer (--tokenizer)")
    n = len(ids) // seq_len
    if n < 1:
        raise ValueError(f"{len(ids)} tokens do not fill one window of --seq-len {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


def batches(train, batch_size, seed, start=0):
    """Endless shuffled batches ``{"input_ids": [B, T]}`` (labels = inputs, shifted inside),
    from the ``start``-th on: the order depends on ``seed`` alone, so a resumed run
    draws the batches an uninterrupted one would."""
    if len(train) < batch_size:
        raise ValueError(f"{len(train)} training windows do not fill a batch of {batch_size}")
    rng = np.random.default_rng(seed)
    drawn = 0
    while True:
        order = rng.permutation(len(train))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            drawn += 1
            if drawn > start:
                yield {"input_ids": jnp.asarray(train[order[i:i + batch_size]])}


# --------------------------------------------------------------- model -----

def load_model(args):
    dtype = DTYPES[args.dtype]
    return convert.load_pretrained(args.model, dtype=dtype, config_dtype=dtype)


def n_params(params):
    return sum(x.size for x in jax.tree.leaves(params))


# ---------------------------------------------------------- the steps ------

def transform(name, schedule):
    if name == "adalomo":
        return lomo_jax.adalomo(schedule, weight_decay=0.0)
    if name == "lomo":
        return lomo_jax.lomo(schedule)
    return optax.adamw(schedule, weight_decay=0.01)


def unfused_step(lm, tx, clip):
    """``jax.value_and_grad`` of the whole model, then ``tx``: every gradient
    is alive at once (the baseline the fused step is measured against)."""
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: lm.loss(p, batch, remat=True))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss}

    return jax.jit(step, donate_argnums=(0, 1)), tx.init


def build_step(args, lm, schedule):
    tx = transform(args.optimizer, schedule)
    clip = args.clip_grad_norm or None
    if args.optimizer == "adamw":
        step, init = unfused_step(lm, tx, clip)
        return step, init
    step = lomo_jax.fused_train_step(lm, tx, clip_grad_norm=clip, rounding=args.rounding,
                                     microbatches=args.microbatches)
    key = jax.random.key(args.seed)
    return step, lambda p: lomo_jax.fused_init(tx, p, rng=key)


def compile_step(step, init, params, batch):
    """Compile ``step`` ahead of time on abstract shapes (nothing allocated)."""
    shapes = aot.abstract(params, None)
    return step.lower(shapes, jax.eval_shape(init, shapes), aot.abstract(batch, None)).compile()


def step_bytes(compiled):
    """``(total, temp)`` bytes of one compiled step from XLA's ``memory_analysis()``:
    total = arguments + outputs + temporaries - outputs aliased to donated inputs."""
    m = aot.MemoryFigures.of(compiled)
    return m.total, m.temporaries


def memory_report(args, lm, params, batch, schedule, compiled):
    """Compiled memory of the fused steps against whole-model gradients
    (``compiled``: the training step already compiled for ``args.optimizer``)."""
    clip = args.clip_grad_norm or None
    rows = {}
    for label, name in (("fused AdaLomo", "adalomo"), ("fused LOMO", "lomo")):
        if name == args.optimizer:
            rows[label] = step_bytes(compiled)
            continue
        tx = transform(name, schedule)
        step = lomo_jax.fused_train_step(lm, tx, clip_grad_norm=clip,
                                         microbatches=args.microbatches)
        init = lambda p, tx=tx: lomo_jax.fused_init(tx, p)  # noqa: E731
        rows[label] = step_bytes(compile_step(step, init, params, batch))
    for label, name, tx in (("value_and_grad + SGD", "sgd", optax.sgd(schedule)),
                            ("value_and_grad + AdamW", "adamw", transform("adamw", schedule))):
        if name == args.optimizer:
            rows[label] = step_bytes(compiled)
            continue
        step, init = unfused_step(lm, tx, clip)
        rows[label] = step_bytes(compile_step(step, init, params, batch))
    return rows


# ---------------------------------------------------------------- main -----

def evaluate(lm, params, held_out, batch_size, max_batches=8):
    """Mean loss on up to ``max_batches`` full held-out batches (one compile)."""
    loss_fn = jax.jit(lm.loss)
    n = min(max_batches, max(1, len(held_out) // batch_size))
    rows = np.resize(held_out, (n * batch_size, held_out.shape[1]))  # repeats if too few
    return float(np.mean([loss_fn(params, {"input_ids": jnp.asarray(b)})
                          for b in np.split(rows, n)]))


def describe_batch(args):
    text = f"batch {args.batch_size} x {args.seq_len}"
    if args.microbatches > 1:
        text += (f" in {args.microbatches} micro-batches of {args.batch_size // args.microbatches}"
                 " (fused steps)")
    return text


def sample_prompt(held_out_text: str) -> tuple:
    """``(prompt, sentence)``: the first held-out sentence and its start up to
    and including "is" ("Two minus one is"), whose answer the model never saw."""
    sentence = held_out_text.splitlines()[0].strip()
    head, sep, _ = sentence.partition(" is ")
    return (head + " is" if sep else " ".join(sentence.split()[:3])), sentence


def complete(cfg, params, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    """The greedy continuation of ``prompt`` up to its first line break
    (``lomo_jax.models.generate``, KV cache)."""
    ids = jnp.asarray([tokenizer(prompt)["input_ids"]], jnp.int32)
    new = generate(cfg, params, ids, max_new_tokens=max_new_tokens)
    return tokenizer.decode(np.asarray(new[0]).tolist()).split("\n")[0]


def plot_eval(a, evals):
    """``--eval-data``'s completion loss (dotted lines) and accuracy (in the legend) before
    and after, from the ``(before, after)`` figures of :func:`measure`."""
    for figures, when, color in zip(evals, ("before", "after"), ("C3", "C2")):
        if figures["eval_loss"] is not None:
            a.axhline(figures["eval_loss"], ls=":", lw=1.5, color=color,
                      label=f"eval loss {when}: {figures['eval_loss']:.3f}")
    if evals[0]["accuracy"] is not None:
        a.plot([], [], " ", label=f"choice accuracy: {evals[0]['accuracy']:.3f} before -> "
               f"{evals[1]['accuracy']:.3f} after")


def plot(path, losses, memory, title, held_out, evals=None,
         held_out_name="held-out loss"):
    """Training loss with the held-out ``(before, after)`` losses as lines (and the eval
    data's, see :func:`plot_eval`); the memory bars labelled with their MiB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if memory else 1, figsize=(12 if memory else 6, 4), squeeze=False)
    a = axes[0, 0]
    a.plot(np.arange(1, len(losses) + 1), losses, lw=1, label="training loss")
    for value, when, color in zip(held_out, ("before", "after"), ("C3", "C2")):
        a.axhline(value, ls="--", lw=1, color=color,
                  label=f"{held_out_name} {when}: {value:.3f}")
    if evals is not None:
        plot_eval(a, evals)
    a.set(xlabel="step", ylabel="loss", title=title)
    a.legend()
    if memory:
        b, names = axes[0, 1], list(memory)
        mib = [memory[n][0] / MIB for n in names]
        bars = b.barh(names, mib, color=["C2" if n.startswith("fused") else "C7" for n in names])
        b.bar_label(bars, labels=[f"{v:.2f} MiB" for v in mib], padding=3)
        b.set_xlim(0, 1.3 * max(mib))
        b.set(xlabel="MiB (XLA memory_analysis: args + out + temp - alias)",
              title="memory of one training step (see the caveat printed)")
        b.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def select_device(args):
    if args.device == "auto":
        return jax.default_backend().upper()
    device = jax.devices(args.device)[0]
    jax.config.update("jax_default_device", device)
    return str(device).upper()


def load_all(args):
    """Tokenizer, model and the target slice as ``(train, held_out)`` token windows."""
    tokenizer = load_tokenizer(args)
    cfg, params = load_model(args)
    parts = corpus_parts()
    train, held_out = (make_windows(tokenizer, parts[k], args.seq_len, cfg.vocab_size)
                       for k in ("target", "held_out"))
    return tokenizer, cfg, params, train, held_out, sample_prompt(parts["held_out"])


def load_jsonl(args, tokenizer, cfg):
    """``(train, packing, eval_data)`` from ``--data`` and ``--eval-data`` (each None when not
    given): ``train`` endless packed batches, ``packing`` its ``data.packing_report``. Sets
    ``args.steps`` from ``--epochs``. A bad record, or a bad step count, stops the job here
    (exit status 1, the reason on stderr) before anything is trained."""
    train = packing = eval_data = None
    try:
        if args.data is not None:
            tokenized = data.load(args.data, tokenizer, args.seq_len, vocab_size=cfg.vocab_size)
            packing = data.packing_report(tokenized, args.batch_size, seed=args.seed)
            train = data.packed_batches(tokenized, args.batch_size, seed=args.seed)
        if args.eval_data is not None:
            eval_data = data.load_eval(args.eval_data, tokenizer, args.seq_len,
                                       vocab_size=cfg.vocab_size)
    except data.DataError as e:
        raise SystemExit(f"error: {e}") from None
    if args.epochs is not None:
        args.steps = max(1, math.ceil(args.epochs * packing["rows"] / args.batch_size))
    if schedule_problem(args):
        raise SystemExit(f"error: {schedule_problem(args)}")
    return train, packing, eval_data


def trained_tokens(batch):
    """Tokens of ``batch`` with a loss: labels not -100 after the first column (every row's
    first token is predicted from nothing); all of them after the first without labels."""
    if batch.get("labels") is None:
        b, t = batch["input_ids"].shape
        return b * (t - 1)
    return int(np.sum(np.asarray(batch["labels"])[:, 1:] != data.IGNORE_INDEX))


def train_loop(args, step, params, opt_state, data, start=0, prior=None, save=None):
    """Steps ``start + 1 .. args.steps`` with a progress bar, then ``save(k, params, opt_state,
    totals)`` after each step ``k``; returns the new params and the run's figures (the
    totals include ``prior``'s, those of the steps before a resume)."""
    from tqdm import tqdm

    totals = {"train_losses": [], "tokens": 0, "skipped_steps": 0, "trained_tokens": 0}
    totals.update(prior or {})
    totals["train_losses"] = list(totals["train_losses"])
    tokens, seconds = 0, 0.0
    bar = tqdm(range(start, args.steps), desc=f"{args.optimizer}", unit="step",
               initial=start, total=args.steps, dynamic_ncols=True)
    t0 = time.perf_counter()
    for i in bar:
        batch = next(data)
        totals["trained_tokens"] += trained_tokens(batch)
        params, opt_state, metrics = step(params, opt_state, batch)
        loss = float(metrics["loss"])  # waits for the step
        totals["skipped_steps"] += int(metrics.get("skipped", False))
        totals["train_losses"].append(loss)
        tokens += batch["input_ids"].size
        totals["tokens"] += batch["input_ids"].size
        seconds = time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / seconds:,.0f}")
        if save is not None:  # before the next step donates params and opt_state
            save(i + 1, params, opt_state, totals)
        kill_hook(i + 1)
    bar.close()
    if not all(math.isfinite(x) for x in totals["train_losses"]):
        raise SystemExit("training diverged (non-finite loss); try a lower --lr")
    return params, {**totals, "train_seconds": seconds,
                    "tokens_per_s": tokens / seconds if seconds else 0.0}


def kill_hook(k):
    """SIGKILL this process after step ``k`` if ``$LOMO_EXAMPLES_KILL_AFTER_STEP`` is ``k``
    (the kill/resume test's real kill at a chosen moment)."""
    if os.environ.get(KILL_AFTER_STEP) == str(k):
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------- checkpoints -----

def checkpoint_dir(args):
    return Path(args.out).resolve() / "checkpoints"  # orbax wants an absolute path


def run_flags(args):
    """The ``RESUME_FLAGS`` as given (before ``--epochs`` sets ``steps``), paths resolved."""
    flags = {k: getattr(args, k) for k in RESUME_FLAGS}
    for k in ("model", "tokenizer", "data"):
        if flags[k] is not None:
            flags[k] = str(Path(flags[k]).resolve())
    return flags


def flags_problem(saved, now):
    """The first flag that differs between the checkpointed run and this one, or None."""
    for k in RESUME_FLAGS:
        if saved.get(k) != now[k]:
            return (f"--{k.replace('_', '-')} was {saved.get(k)!r} in the checkpointed run, "
                    f"now {now[k]!r}")
    return None


def find_resume(args, flags):
    """``(step, metadata)`` of the checkpoint ``--resume`` continues from, or None (a fresh
    run). Refuses (exit status 1, before anything is loaded) a resume with other
    ``RESUME_FLAGS``, and a fresh ``--checkpoint-every`` run into an ``OUT`` with
    checkpoints (its saves would collide with theirs)."""
    where = checkpoint_dir(args)
    step = checkpoint.latest_step(where) if where.is_dir() else None
    if step is None:
        if args.resume:
            print(f"--resume: no checkpoint in {where}; starting from step 0")
        return None
    if not args.resume:
        if args.checkpoint_every:
            raise SystemExit(f"error: {where} has checkpoints (latest: step {step}); pass "
                             "--resume to continue that run, or remove them to start afresh")
        return None
    with checkpoint.Checkpointer(where, max_to_keep=None, read_only=True) as ckpt:
        meta = ckpt.metadata(step)
    problem = flags_problem(meta["flags"], flags)
    if problem:
        raise SystemExit(f"error: --resume from {where}/{step}: {problem}; resume with the "
                         "flags of that run, or use another --out")
    return step, meta


def make_saver(args, flags, packed):
    """``(save, close)``: ``save(k, params, opt_state, totals)`` writes a checkpoint when ``k``
    is a multiple of ``--checkpoint-every`` (synchronously: on disk before the next step
    donates the arrays), with the data position, the totals and the flags."""
    if not args.checkpoint_every:
        return None, lambda: None
    ckpt = checkpoint.Checkpointer(checkpoint_dir(args), max_to_keep=2)

    def save(k, params, opt_state, totals):
        if k % args.checkpoint_every:
            return
        position = packed.get_state() if packed is not None else {"corpus_batches": k}
        ckpt.save(k, {"params": params, "opt_state": opt_state},
                  metadata={"step": k, "data": position, "flags": flags, **totals})

    return save, ckpt.close


def data_iterator(args, train, packed, resume):
    """The training batches, from the checkpoint's data position when resuming."""
    position = resume[1]["data"] if resume else None
    if packed is None:
        start = position["corpus_batches"] if position else 0
        return batches(train, args.batch_size, args.seed, start=start)
    if position is not None:
        packed.set_state(position)
    return map(lambda b: jax.tree.map(jnp.asarray, b), packed)


def run_training(args, step, params, opt_state, data_it, packed, flags, resume):
    """:func:`train_loop` from step 0, or from the checkpoint ``resume`` (its params,
    optimizer state and totals restored), checkpointing as ``--checkpoint-every`` says."""
    start, prior = 0, None
    if resume is not None:
        start, meta = resume
        with checkpoint.Checkpointer(checkpoint_dir(args), max_to_keep=None,
                                     read_only=True) as ckpt:
            state, _ = ckpt.restore({"params": params, "opt_state": opt_state}, start)
        params, opt_state = state["params"], state["opt_state"]
        prior = {k: meta[k] for k in ("train_losses", "tokens", "skipped_steps",
                                      "trained_tokens")}
        print(f"--resume: continuing from the checkpoint of step {start}")
    save, close = make_saver(args, flags, packed)
    try:
        params, run = train_loop(args, step, params, opt_state, data_it, start, prior, save)
    finally:
        close()
    return params, {**run, "resumed_from_step": start if resume is not None else None}


def print_memory(args, memory):
    print("\nmemory of one training step (XLA compiled memory_analysis, "
          f"{describe_batch(args)}, {args.dtype}):")
    base = memory["value_and_grad + AdamW"][0]
    for name, (total, temp) in memory.items():
        print(f"  {name:<26} {total / MIB:9.2f} MiB total  ({temp / MIB:8.2f} MiB "
              f"temporaries)  {total / base:5.2f}x AdamW")
    print(CAVEAT)


def save_checkpoint(args, out, params, cfg):
    """The fine-tuned weights in a checkpoint like ``--model``'s: its ``config.json`` (token
    ids kept) and its ``generation_config.json`` (which ``cfg`` carries); ``save_pretrained``
    renames each file into place once written, the weights' index last."""
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(args.model, local_files_only=True)
    convert.save_pretrained(params, cfg, str(out), hf_config=hf_config)


def write_results(out, tokenizer, report, draw):
    """The tokenizer, the plot (``draw(path)``) and the report, written into a staging
    directory and renamed into ``out`` (``convert.write_atomically``): a run killed (or
    failing) while writing leaves each file the previous run's or this one's. Returns
    the plot's and the report's paths."""
    png, report_json = out / "loss_and_memory.png", out / "finetune_report.json"
    with convert.write_atomically(str(out)) as tmp:
        tokenizer.save_pretrained(tmp)
        draw(Path(tmp, png.name))
        Path(tmp, report_json.name).write_text(json.dumps(report, indent=2))
    return png, report_json


def measure(cfg, lm, params, tokenizer, held_out, eval_data, prompt, batch_size):
    """The figures taken before and after training: the corpus's held-out ``loss``, a greedy
    ``sample`` of ``prompt`` and, with ``--eval-data``, ``eval_loss`` and ``accuracy``
    (``lomo_jax.models.scoring``; None for a part the file does not have)."""
    figures = {"loss": evaluate(lm, params, held_out, batch_size),
               "sample": complete(cfg, params, tokenizer, prompt),
               "eval_loss": None, "accuracy": None}
    if eval_data is not None:
        scored = scoring.evaluate(cfg, params, tokenizer, eval_data, batch_size=batch_size)
        figures["eval_loss"], figures["accuracy"] = scored["loss"], scored["accuracy"]
    return figures


def describe_data(args, train, held_out, packing):
    if packing is None:
        return (f"the corpus's arithmetic sentences, {train.size:,} tokens "
                f"({held_out.size:,} held out)")
    return (f"{args.data}, {packing['examples']} examples ({packing['truncated_examples']} "
            f"cut to --seq-len), {packing['rows']} packed rows "
            f"({packing['packing_efficiency']:.0%} tokens, the rest padding)")


def held_out_label(args):
    """What the held-out loss is a loss of: the corpus's held-out arithmetic sentences, which
    are not ``--data``'s (``--eval-data`` scores that kind of text)."""
    if args.data is None:
        return "held-out loss"
    return "held-out loss on the shipped corpus's arithmetic sentences (not --data's)"


def print_results(args, before, after, run, prompt, sentence, t_compile):
    skipped = run["skipped_steps"]
    print(f"\n{held_out_label(args)}: {before['loss']:.3f} before -> {after['loss']:.3f} after "
          f"{args.steps} steps" + (f" ({skipped} fp16 overflow steps skipped)" if skipped else ""))
    if before["eval_loss"] is not None:
        print(f"{args.eval_data}: completion loss {before['eval_loss']:.3f} before -> "
              f"{after['eval_loss']:.3f} after")
    if before["accuracy"] is not None:
        print(f"{args.eval_data}: multiple-choice accuracy {before['accuracy']:.3f} before -> "
              f"{after['accuracy']:.3f} after")
    print(f"greedy completion of the held-out {prompt!r} ({sentence!r}):\n"
          f"  before: {before['sample']!r}\n  after:  {after['sample']!r}")
    print(f"throughput: {run['tokens_per_s']:,.0f} tokens/s over {run['train_seconds']:.1f} s "
          f"(the step was compiled ahead of time in {t_compile:.1f} s)")


def make_report(args, before, after, run, prompt, packing, memory, t_compile, t_start):
    packed = packing or {}
    return {"args": vars(args), "loss_before": before["loss"], "loss_after": after["loss"],
            "eval_loss_before": before["eval_loss"], "eval_loss_after": after["eval_loss"],
            "choice_accuracy_before": before["accuracy"],
            "choice_accuracy_after": after["accuracy"],
            "truncated_examples": packed.get("truncated_examples", 0),
            "packing_efficiency": packed.get("packing_efficiency"), "packing": packing,
            "sample_prompt": prompt, "sample_before": before["sample"],
            "sample_after": after["sample"], **run,
            "compile_seconds": t_compile, "wall_seconds": time.perf_counter() - t_start,
            "memory_bytes": {k: v[0] for k, v in memory.items()}}


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)  # fails here, before loading anything, on a bad --model/--tokenizer
    flags = run_flags(args)
    resume = find_resume(args, flags)  # and here on a resume with other flags
    where = select_device(args)
    out = Path(args.out)
    tokenizer, cfg, params, train, held_out, (prompt, sentence) = load_all(args)
    packed, packing, eval_data = load_jsonl(args, tokenizer, cfg)  # fails here on bad data
    if eval_data is not None and eval_data.choices:
        item = eval_data.choices[0]
        prompt, sentence = item["prompt"], item["prompt"] + item["choices"][item["answer"]]
    out.mkdir(parents=True, exist_ok=True)
    lm = llama.llama_layered_model(cfg)
    print(f"model: {args.model}, {n_params(params) / 1e6:.2f}M parameters, "
          f"{cfg.num_hidden_layers} layers, {args.dtype} ({args.rounding} rounding); "
          f"fine-tuning data: {describe_data(args, train, held_out, packing)}; "
          f"optimizer: {args.optimizer}, {where}; {describe_batch(args)}")

    schedule = make_schedule(args.schedule, args.lr, args.steps, args.warmup_steps)
    step, init = build_step(args, lm, schedule)
    data_it = data_iterator(args, train, packed, resume)
    batch = next(data_it)  # compiled for, then trained on first
    t_compile = time.perf_counter()
    step = compile_step(step, init, params, batch)  # compiled once, used for training too
    t_compile = time.perf_counter() - t_compile
    opt_state = init(params)

    before = measure(cfg, lm, params, tokenizer, held_out, eval_data, prompt, args.batch_size)
    memory = {} if args.no_memory_report else memory_report(args, lm, params, batch, schedule, step)
    params, run = run_training(args, step, params, opt_state, itertools.chain([batch], data_it),
                               packed, flags, resume)
    after = measure(cfg, lm, params, tokenizer, held_out, eval_data, prompt, args.batch_size)

    print_results(args, before, after, run, prompt, sentence, t_compile)
    if memory:
        print_memory(args, memory)

    save_checkpoint(args, out, params, cfg)
    report = make_report(args, before, after, run, prompt, packing, memory, t_compile, t_start)
    title = f"{args.optimizer}, {cfg.num_hidden_layers} layers, {args.dtype}"
    png, report_json = write_results(out, tokenizer, report, lambda path: plot(
        path, run["train_losses"], memory, title, (before["loss"], after["loss"]),
        (before, after), "corpus held-out loss" if args.data else "held-out loss"))
    print(f"\nwrote {png}, {report_json} and a transformers checkpoint in "
          f"{out}/ (AutoModelForCausalLM.from_pretrained loads it); "
          f"{report['wall_seconds']:.0f} s wall in all")
    return before["loss"], after["loss"]


if __name__ == "__main__":
    main()
