"""The main job: fine-tune a small LLaMA with the fused AdaLomo step, on the CPU.

    python examples/finetune_llama.py                      # ~2 min on 2 CPU cores
    python examples/finetune_llama.py --model DIR          # a local transformers checkpoint
    python examples/finetune_llama.py --optimizer adamw    # the baseline, for comparison
    python examples/finetune_llama.py --tiny               # a few seconds (what CI runs)

What it does:

1. reads ``examples/data/corpus.txt`` (300 KB of self-written text that ships
   with the project) and trains a byte-level BPE tokenizer on it offline (or
   uses the tokenizer saved in ``--model DIR``);
2. builds a small LLaMA (``lomo_jax.models.llama``) from a config, or loads
   ``--model DIR`` (a ``save_pretrained`` directory of safetensors files);
3. fine-tunes it with ``lomo_jax.fused_train_step``: layers run in a
   ``lax.scan``, and the backward scan updates each layer the moment its
   gradient is known, so only one layer's gradient is ever alive. A tqdm bar
   shows the loss and tokens/s;
4. reports the held-out loss before and after, and the step's memory from
   XLA's compiled ``memory_analysis()`` beside ``jax.value_and_grad`` with
   plain gradients (SGD) and with ``optax.adamw``;
5. writes ``OUT/loss_and_memory.png`` and a transformers checkpoint in ``OUT``
   (``--out``, default ``runs/finetune_llama``) that
   ``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lomo_jax
from lomo_jax import aot
from lomo_jax.models import convert, llama

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"
DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
MIB = 1024**2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR", help="local transformers checkpoint to fine-tune "
                   "(default: a small LLaMA built from a config, randomly initialised)")
    p.add_argument("--optimizer", choices=["adalomo", "lomo", "adamw"], default="adalomo",
                   help="adalomo/lomo: the fused step; adamw: jax.value_and_grad + optax.adamw")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 150; 6 with --tiny)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 3e-2 adalomo, 3e-2 lomo, 3e-3 adamw)")
    p.add_argument("--clip-grad-norm", type=float, default=1.0,
                   help="global gradient-norm clipping (LOMO's two passes); 0 turns it off")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="parameter dtype (fp16 turns on dynamic loss scaling)")
    p.add_argument("--rounding", choices=["stochastic", "nearest"], default=None,
                   help="how updates are rounded into bf16/fp16 parameters (default: stochastic "
                   "for bf16/fp16 with adalomo/lomo, so small updates still count; nearest "
                   "to compare)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--microbatches", type=int, default=1, metavar="M",
                   help="gradient accumulation inside the fused step: each layer runs on "
                   "batch-size / M rows at a time, one update per step (adalomo/lomo)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary (new tokenizer)")
    p.add_argument("--out", default="runs/finetune_llama", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "gpu", "tpu", "auto"], default="cpu",
                   help="where to train (default cpu, so the run is the same everywhere; "
                   "auto: JAX's default backend)")
    p.add_argument("--no-memory-report", action="store_true",
                   help="skip compiling the SGD/AdamW baselines for the memory comparison")
    p.add_argument("--tiny", action="store_true", default=bool(os.environ.get("LOMO_EXAMPLES_TINY")),
                   help="a few steps of a tiny model (also: LOMO_EXAMPLES_TINY=1)")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 3e-3 if args.optimizer == "adamw" else 3e-2
    if args.tiny:
        args.batch_size, args.seq_len, args.vocab_size = 4, 32, 300
    if args.steps is None:
        args.steps = 6 if args.tiny else 150
    if args.steps < 1 or args.batch_size < 1 or args.seq_len < 2:
        p.error("--steps, --batch-size must be >= 1 and --seq-len >= 2")
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
    return args


# ---------------------------------------------------------------- data -----

def load_tokenizer(args):
    """The checkpoint's tokenizer, or a byte-level BPE trained on the corpus."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if args.model and any((Path(args.model) / f).exists()
                          for f in ("tokenizer.json", "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(args.model)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([str(CORPUS)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def make_windows(tokenizer, seq_len, vocab_size):
    """Token windows of ``seq_len`` from the corpus: 95% train, 5% held out."""
    ids = np.asarray(tokenizer(CORPUS.read_text())["input_ids"], np.int32)
    if ids.max() >= vocab_size:
        raise ValueError(f"tokenizer produces id {ids.max()} but the model's vocab_size is "
                         f"{vocab_size}; pass a matching --model tokenizer")
    n = len(ids) // seq_len
    windows = ids[: n * seq_len].reshape(n, seq_len)
    n_eval = max(1, n // 20)
    return windows[:-n_eval], windows[-n_eval:]


def batches(train, batch_size, seed):
    """Endless shuffled batches ``{"input_ids": [B, T]}`` (labels = inputs, shifted inside)."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(train))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield {"input_ids": jnp.asarray(train[order[i:i + batch_size]])}


# --------------------------------------------------------------- model -----

def load_model(args, vocab_size):
    dtype = DTYPES[args.dtype]
    if args.model:
        cfg, params = convert.load_pretrained(args.model, dtype=dtype, config_dtype=dtype)
        return cfg, params
    size = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2) if args.tiny else
            dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4))
    cfg = llama.LlamaConfig(vocab_size=vocab_size, max_position_embeddings=args.seq_len,
                            tie_word_embeddings=True, dtype=dtype, param_dtype=dtype, **size)
    return cfg, llama.init_params(cfg, args.seed)


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


def plot(path, losses, memory, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if memory else 1, figsize=(11 if memory else 6, 4), squeeze=False)
    a = axes[0, 0]
    a.plot(np.arange(1, len(losses) + 1), losses, lw=1)
    a.set(xlabel="step", ylabel="training loss", title=title)
    if memory:
        b, names = axes[0, 1], list(memory)
        b.barh(names, [memory[n][0] / MIB for n in names],
               color=["C2" if n.startswith("fused") else "C7" for n in names])
        b.set(xlabel="MiB (XLA memory_analysis: args + out + temp - alias)",
              title="memory of one training step")
        b.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    from tqdm import tqdm

    args = parse_args(argv)
    if args.device == "auto":
        where = jax.default_backend().upper()
    else:
        device = jax.devices(args.device)[0]
        jax.config.update("jax_default_device", device)
        where = str(device).upper()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(args)
    cfg, params = load_model(args, vocab_size=len(tokenizer))
    train, held_out = make_windows(tokenizer, args.seq_len, cfg.vocab_size)
    lm = llama.llama_layered_model(cfg)
    print(f"model: {n_params(params) / 1e6:.2f}M parameters, {cfg.num_hidden_layers} layers, "
          f"{args.dtype} ({args.rounding} rounding); data: {train.size:,} training tokens, "
          f"vocab {len(tokenizer)}; optimizer: {args.optimizer}, {where}; "
          f"{describe_batch(args)}")

    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 10),
                                                  args.steps, end_value=args.lr / 10)
    step, init = build_step(args, lm, schedule)
    data = batches(train, args.batch_size, args.seed)
    batch = next(data)
    t_compile = time.perf_counter()
    step = compile_step(step, init, params, batch)  # compiled once, used for training too
    t_compile = time.perf_counter() - t_compile
    opt_state = init(params)

    loss_before = evaluate(lm, params, held_out, args.batch_size)
    memory = {} if args.no_memory_report else memory_report(args, lm, params, batch, schedule, step)

    losses, tokens, skipped = [], 0, 0
    bar = tqdm(range(args.steps), desc=f"{args.optimizer}", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    for _ in bar:
        params, opt_state, metrics = step(params, opt_state, batch)
        loss = float(metrics["loss"])  # waits for the step
        skipped += int(metrics.get("skipped", False))
        losses.append(loss)
        tokens += batch["input_ids"].size
        seconds = time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / seconds:,.0f}")
        batch = next(data)
    bar.close()
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit("training diverged (non-finite loss); try a lower --lr")
    loss_after = evaluate(lm, params, held_out, args.batch_size)

    print(f"\nheld-out loss: {loss_before:.3f} before -> {loss_after:.3f} after "
          f"{args.steps} steps" + (f" ({skipped} fp16 overflow steps skipped)" if skipped else ""))
    print(f"throughput: {tokens / seconds:,.0f} tokens/s over {seconds:.1f} s "
          f"(the step was compiled ahead of time in {t_compile:.1f} s)")
    if memory:
        print("\nmemory of one training step (XLA compiled memory_analysis, "
              f"{describe_batch(args)}, {args.dtype}):")
        base = memory["value_and_grad + AdamW"][0]
        for name, (total, temp) in memory.items():
            print(f"  {name:<26} {total / MIB:9.2f} MiB total  ({temp / MIB:8.2f} MiB "
                  f"temporaries)  {total / base:5.2f}x AdamW")

    png = out / "loss_and_memory.png"
    plot(png, losses, memory, f"{args.optimizer}, {cfg.num_hidden_layers} layers, {args.dtype}")
    convert.save_pretrained(params, cfg, str(out))
    tokenizer.save_pretrained(str(out))
    (out / "finetune_report.json").write_text(json.dumps({
        "args": vars(args), "loss_before": loss_before, "loss_after": loss_after,
        "train_losses": losses, "memory_bytes": {k: v[0] for k, v in memory.items()},
    }, indent=2))
    print(f"\nwrote {png} and a transformers checkpoint in {out}/ "
          "(AutoModelForCausalLM.from_pretrained loads it)")
    return loss_before, loss_after


if __name__ == "__main__":
    main()
