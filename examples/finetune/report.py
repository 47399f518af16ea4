"""What the main job reports: the held-out figures before and after, what it prints, the plot,
the report JSON and the fine-tuned checkpoint."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lomo_jax.models import convert, generate, scoring

from finetune.lora_mode import lora_report, split_for_export
from finetune.steps import adaptive_clip_warmup

MIB = 1024**2
CAVEAT = ("At this toy size, and in bf16 on a CPU, these compiled-memory figures say little: "
          "activations dominate, and XLA:CPU makes f32 copies of bf16 weights around matmuls "
          "(GPUs don't). For real figures: python benchmarks/memory.py --target rtx4090 "
          "(compiles for a GPU target; no GPU needed).")


@functools.partial(jax.jit, static_argnums=0)
def _held_out_loss(lm, params, batch):
    """``lm.loss``, compiled once per model (``lm`` static): for the figures before and
    after training alike."""
    return lm.loss(params, batch)


def evaluate(lm, params, held_out, batch_size, max_batches=8):
    """Mean loss on up to ``max_batches`` full held-out batches (one compile per ``lm``)."""
    n = min(max_batches, max(1, len(held_out) // batch_size))
    rows = np.resize(held_out, (n * batch_size, held_out.shape[1]))  # repeats if too few
    return float(np.mean([_held_out_loss(lm, params, {"input_ids": jnp.asarray(b)})
                          for b in np.split(rows, n)]))


def describe_clip(args):
    if args.clip == "global":
        return f"clip global at {args.clip_grad_norm:g} (two backward passes)"
    if args.clip == "adaptive":
        return f"clip adaptive (warm-up {adaptive_clip_warmup(args)} steps)"
    return "no clipping"


def describe_batch(args):
    text = f"batch {args.batch_size} x {args.seq_len}"
    if args.microbatches > 1:
        text += (f" in {args.microbatches} micro-batches of {args.batch_size // args.microbatches}"
                 " (fused steps)")
    return text


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
    renames each file into place once written, the weights' index last. A ``--lora`` model
    writes its adapter to ``out/adapter`` first and saves merged (``split_for_export``)."""
    import transformers

    cfg, params = split_for_export(args, out, cfg, params)
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


def make_report(args, before, after, run, prompt, packing, memory, t_compile, t_start,
                params=None):
    """The report JSON's fields (``mode`` and ``lora`` from ``lora_report(args, params)``)."""
    packed = packing or {}
    return {"args": vars(args), **lora_report(args, params),
            "loss_before": before["loss"], "loss_after": after["loss"],
            "eval_loss_before": before["eval_loss"], "eval_loss_after": after["eval_loss"],
            "choice_accuracy_before": before["accuracy"],
            "choice_accuracy_after": after["accuracy"],
            "truncated_examples": packed.get("truncated_examples", 0),
            "packing_efficiency": packed.get("packing_efficiency"), "packing": packing,
            "sample_prompt": prompt, "sample_before": before["sample"],
            "sample_after": after["sample"], **run,
            "compile_seconds": t_compile, "wall_seconds": time.perf_counter() - t_start,
            "memory_bytes": {k: v[0] for k, v in memory.items()}}
