"""The main job's training loop and its checkpoints: ``--checkpoint-every`` and ``--resume``."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from lomo_jax import checkpoint

from finetune.arguments import RESUME_FLAGS
from finetune.corpus import batches, trained_tokens

KILL_AFTER_STEP = "LOMO_EXAMPLES_KILL_AFTER_STEP"  # tests: SIGKILL this run after that step
# the LoRA flags of a run without --lora (what a checkpoint saved before them means)
NO_LORA = {"lora": None, "lora_alpha": None, "lora_targets": None, "lora_only": False,
           "lora_lr": None}


def select_device(args):
    if args.device == "auto":
        return jax.default_backend().upper()
    device = jax.devices(args.device)[0]
    jax.config.update("jax_default_device", device)
    return str(device).upper()


def placed(params):
    """``params`` committed to the job's device (the compiled step's outputs are not, the
    loaded weights are): the held-out loss and the greedy sample before and after training
    then take the same arguments and compile once."""
    return jax.device_put(params, jax.config.jax_default_device or jax.devices()[0])


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
    if "clip" not in saved:  # a checkpoint from before --clip: --clip-grad-norm said it
        saved = {**saved, "clip": "global" if saved.get("clip_grad_norm") else "none",
                 "adaptive_clip_warmup": None}
    saved = {**NO_LORA, **saved}  # a checkpoint from before --lora: a run without it
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
