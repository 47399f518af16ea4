"""The main job's command line: its flags, their defaults and the checks that refuse a bad one
before anything is loaded."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import jax.numpy as jnp

from lomo_jax.models.lora_config import LORA_TARGETS

DESCRIPTION = "The main job: fine-tune a small pretrained LLaMA with the fused AdaLomo step, on the CPU."
DATA = Path(__file__).resolve().parents[1] / "data"
CORPUS = DATA / "corpus.txt"
PRETRAINED = DATA / "pretrained"
DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# the flags a resumed run must share with the checkpoint's run (they change the math)
RESUME_FLAGS = ("model", "tokenizer", "data", "optimizer", "steps", "epochs", "schedule",
                "warmup_steps", "lr", "clip", "clip_grad_norm", "adaptive_clip_warmup", "dtype",
                "rounding", "batch_size", "microbatches", "seq_len", "seed", "device",
                "lora", "lora_alpha", "lora_targets", "lora_only", "lora_lr")
CLIP_MODES = ("none", "global", "adaptive")
LOMO_DEFAULT_CLIP = "adaptive"  # set from benchmarks/stability.py (issue 31)
DEFAULT_CLIP = {"adalomo": "none", "lomo": LOMO_DEFAULT_CLIP, "adamw": "global"}
GLOBAL_CLIP_NORM = 1.0  # --clip global's threshold unless --clip-grad-norm says otherwise
DEFAULT_LORA_TARGETS = "q_proj,v_proj"
DEFAULT_LORA_LR = 3e-3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=DESCRIPTION,
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
    add_clip_args(p)
    add_lora_args(p)
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


def add_clip_args(p):
    """``--clip``, ``--clip-grad-norm`` and ``--adaptive-clip-warmup`` (see :func:`clip_problem`)."""
    p.add_argument("--clip", choices=CLIP_MODES, default=None,
                   help="gradient clipping: none; global (the whole gradient's norm, at "
                   "--clip-grad-norm: LOMO's two backward passes); adaptive (each tensor to "
                   "1.05 x the moving average of its own norm, in one pass). Default: none "
                   f"for adalomo, as its authors run it; {LOMO_DEFAULT_CLIP} for lomo; "
                   "global for adamw")
    p.add_argument("--clip-grad-norm", type=float, default=None, metavar="C",
                   help="the threshold of --clip global (default 1.0); given alone, C > 0 "
                   "means --clip global and 0 means --clip none, as before --clip existed")
    p.add_argument("--adaptive-clip-warmup", type=int, default=None, metavar="N",
                   help="--clip adaptive: the first N steps bound each tensor's norm by 1.0 "
                   "while its average forms (default: the learning rate's warmup steps, "
                   "at least 1)")


def add_lora_args(p):
    """``--lora RANK``, ``--lora-alpha``, ``--lora-targets``, ``--lora-only`` and ``--lora-lr``
    (see :func:`lora_problem`)."""
    p.add_argument("--lora", type=int, default=None, metavar="RANK",
                   help="train LoRA adapters of this rank beside the base weights: with "
                   "--lora-only the base is frozen (LoRA), else every base weight gets "
                   "--optimizer's fused update in the same backward (LoRA + LOMO). Writes "
                   "the merged model in OUT and the adapter (PEFT's format) in OUT/adapter")
    p.add_argument("--lora-alpha", type=float, default=None, metavar="ALPHA",
                   help="the adapters' output is scaled by ALPHA / RANK (default 2 x RANK, "
                   "a scale of 2, the common choice)")
    p.add_argument("--lora-targets", default=None, metavar="NAMES",
                   help="comma-separated projections to adapt, of "
                   f"{','.join(LORA_TARGETS)}, or 'all' (default {DEFAULT_LORA_TARGETS}: "
                   "PEFT's default for LLaMA, the LoRA paper's and the original LOMO "
                   "repository's LoRA + LOMO choice; with --lora-only, 'all' adapts more, "
                   "as QLoRA recommends)")
    p.add_argument("--lora-only", action="store_true",
                   help="freeze the base weights (no update, no optimizer state): only the "
                   "adapters train")
    p.add_argument("--lora-lr", type=float, default=None, metavar="LR",
                   help=f"the adapters' AdamW peak learning rate, on --schedule (default "
                   f"{DEFAULT_LORA_LR:g}: the job's AdamW rate for this small model, where it "
                   "beats 1e-3 (held-out 4.44 against 4.88 with --lora 8 --lora-only); LoRA "
                   "wants a rate at least full fine-tuning's: for 7B models 1e-4 to 5e-4, the "
                   "original LOMO repository's LoRA + LOMO rate)")


def lora_problem(args):
    """Fill in ``--lora-alpha``, ``--lora-targets`` (a sorted list of projection names) and
    ``--lora-lr`` for a ``--lora`` run, or say which LoRA flag is wrong or contradicts
    another. Without ``--lora`` the other LoRA flags are refused, and stay None/False."""
    given = [f for f, v in (("--lora-alpha", args.lora_alpha), ("--lora-targets",
             args.lora_targets), ("--lora-only", args.lora_only), ("--lora-lr", args.lora_lr))
             if v not in (None, False)]
    if args.lora is None:
        return f"{given[0]} is a LoRA flag: pass --lora RANK with it" if given else None
    if args.lora < 1:
        return f"--lora RANK must be >= 1, got {args.lora}"
    if args.optimizer == "adamw":
        return ("--lora trains through the fused step: --optimizer adalomo or lomo (the "
                "base's optimizer; with --lora-only the base is frozen)")
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora
    elif not args.lora_alpha > 0:
        return f"--lora-alpha must be positive, got {args.lora_alpha}"
    names = DEFAULT_LORA_TARGETS if args.lora_targets is None else args.lora_targets
    names = list(LORA_TARGETS) if names == "all" else [n.strip() for n in names.split(",")]
    unknown = [n for n in names if n not in LORA_TARGETS]
    if unknown or not names:
        return (f"--lora-targets {args.lora_targets}: unknown {unknown}; each must be one "
                f"of {','.join(LORA_TARGETS)}, or all")
    args.lora_targets = sorted(set(names))
    if args.lora_lr is None:
        args.lora_lr = DEFAULT_LORA_LR
    elif not args.lora_lr > 0:
        return f"--lora-lr must be positive, got {args.lora_lr}"
    return None


def check_args(p, args):
    if args.lr is None:
        args.lr = 3e-3 if args.optimizer == "adamw" else 3e-2
    if args.tiny:
        args.batch_size, args.seq_len = 4, 32
    if args.checkpoint_every < 0:
        p.error(f"--checkpoint-every must be >= 0 (0: never), got {args.checkpoint_every}")
    for problem in (clip_problem(args), lora_problem(args)):
        if problem:
            p.error(problem)
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


def clip_problem(args):
    """Set ``args.clip`` and ``args.clip_grad_norm`` (global clipping's threshold; 0.0 unless
    ``--clip global``) from the flags given, or say why they contradict each other."""
    norm, mode = args.clip_grad_norm, args.clip
    if norm is not None and norm < 0:
        return f"--clip-grad-norm must be >= 0 (0: off), got {norm}"
    if mode is None:  # --clip-grad-norm alone keeps its meaning from before --clip
        mode = DEFAULT_CLIP[args.optimizer] if norm is None else ("global" if norm else "none")
    elif mode == "global" and norm == 0:
        return "--clip global clips at --clip-grad-norm, which must be > 0 (got 0)"
    elif mode != "global" and norm:
        return (f"--clip {mode} and --clip-grad-norm {norm} contradict each other: "
                "--clip-grad-norm is the threshold of --clip global")
    warmup = args.adaptive_clip_warmup
    if warmup is not None and mode != "adaptive":
        return f"--adaptive-clip-warmup is --clip adaptive's; this run clips {mode!r}"
    if warmup is not None and warmup < 1:
        return f"--adaptive-clip-warmup must be >= 1, got {warmup}"
    args.clip = mode
    args.clip_grad_norm = (norm or GLOBAL_CLIP_NORM) if mode == "global" else 0.0
    return None


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
