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

The job's parts live in ``examples/finetune/``: ``arguments`` (the flags and their
checks), ``corpus`` (data, tokenizer, model loading), ``steps`` (schedule, optimizer with
``--clip``, the compiled step, its memory), ``training`` (the loop, checkpoints, resume) and
``report`` (figures, printout, plot, report JSON, checkpoint); this file is the command
and re-exports their names.

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

``--clip {none,global,adaptive}`` protects the update from gradient spikes:
``global`` is LOMO's global-norm clipping at ``--clip-grad-norm`` (default 1.0),
which needs the whole gradient's norm before the first update and so costs the
fused step a second backward pass; ``adaptive`` chains ``lomo_jax.adaptive_clip``
(AdaGC: each tensor, each layer's slice of the stacked ones, clipped to 1.05
times a moving average of its own norm) in front of the optimizer, in the one
pass, its state in the optimizer state (so in the checkpoints); during its
warm-up (``--adaptive-clip-warmup``, default the learning rate's) each tensor's
norm is bounded by 1.0 while the average forms. Defaults follow the optimizers'
authors: AdaLomo normalises each update itself and runs unclipped (``none``);
LOMO: ``LOMO_DEFAULT_CLIP``; AdamW: ``global``. ``--clip-grad-norm C`` alone
keeps its old meaning (``global`` at C; 0: ``none``). The learning rate warms up
linearly over ``--warmup-steps`` (default a tenth of the steps) and then
follows ``--schedule`` (cosine by default; linear; constant), the decaying
ones down to a tenth of ``--lr`` at the last step.

``--lora RANK`` adds LoRA adapters (``lomo_jax.models.lora``; ``--lora-targets``, default
``q_proj,v_proj``, or ``all``; ``--lora-alpha``, default 2 x RANK) trained with AdamW at
``--lora-lr``: with ``--lora-only`` the base weights are frozen (no update, no optimizer
state: LoRA), else every base weight gets ``--optimizer``'s fused update in the same
backward (LoRA + LOMO). The run writes the merged model in ``OUT`` and the adapter in PEFT's
format in ``OUT/adapter`` (on ``--model`` with ``--lora-only``; LoRA + LOMO's adapter sits on
the base weights the run trained, which only the merged model holds); the report's ``mode``
says ``lomo``, ``lora`` or ``lora+lomo`` and its ``lora`` the rank, alpha and targets.

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

import itertools
import logging
import sys
import time
from pathlib import Path


class _NoTorchNotice(logging.Filter):
    """Drop transformers' "PyTorch was not found" notice (this job never needs torch);
    every other transformers message passes."""

    def filter(self, record):
        msg = record.getMessage()
        return not ("PyTorch was not found" in msg or msg.startswith("None of PyTorch"))


logging.getLogger("transformers").addFilter(_NoTorchNotice())  # before transformers is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/: the finetune package

from finetune.arguments import (  # noqa: E402,F401  (re-exported: tests use them)
    DATA, CORPUS, PRETRAINED, DTYPES, TOKENIZER_FILES, RESUME_FLAGS, CLIP_MODES,
    LOMO_DEFAULT_CLIP, DEFAULT_CLIP, GLOBAL_CLIP_NORM, DEFAULT_LORA_TARGETS, DEFAULT_LORA_LR,
    parse_args, add_clip_args, add_lora_args, check_args, clip_problem, lora_problem,
    check_data_args, schedule_problem, has_tokenizer, model_dir_problem)
from finetune.corpus import (  # noqa: E402,F401  (re-exported: tests use them)
    TARGET_LINE, corpus_parts, train_tokenizer, load_tokenizer, make_windows, batches,
    load_model, layered_model, n_params, sample_prompt, load_all, load_jsonl, trained_tokens)
from finetune.steps import (  # noqa: E402,F401  (re-exported: tests use them)
    make_schedule, transform, adaptive_clip_warmup, with_clip, unfused_step, run_transform,
    build_step, compile_step, step_bytes, memory_report)
from finetune.lora_mode import (  # noqa: E402,F401  (re-exported: tests use them)
    run_mode, lora_config, with_adapters, lora_transform, adapter_count, step_label,
    describe_run, describe_mode, export_note, lora_report, split_for_export)
from finetune.training import (  # noqa: E402,F401  (re-exported: tests use them)
    KILL_AFTER_STEP, select_device, placed, train_loop, kill_hook, checkpoint_dir, run_flags,
    flags_problem, find_resume, make_saver, data_iterator, run_training)
from finetune.report import (  # noqa: E402,F401  (re-exported: tests use them)
    MIB, CAVEAT, evaluate, describe_clip, describe_batch, complete, plot_eval, plot,
    print_memory, save_checkpoint, write_results, measure, describe_data, held_out_label,
    print_results, make_report)


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)  # fails here, before loading anything, on a bad --model/--tokenizer
    flags = run_flags(args)
    resume = find_resume(args, flags)  # and here on a resume with other flags
    where = select_device(args)
    out = Path(args.out)
    tokenizer, cfg, params, train, held_out, (prompt, sentence) = load_all(args)
    base = (layered_model(cfg), params) if args.lora is not None else None
    cfg, params = with_adapters(args, cfg, params)  # --lora: fresh adapters, same logits
    params = placed(params)
    packed, packing, eval_data = load_jsonl(args, tokenizer, cfg)  # fails here on bad data
    if eval_data is not None and eval_data.choices:
        item = eval_data.choices[0]
        prompt, sentence = item["prompt"], item["prompt"] + item["choices"][item["answer"]]
    out.mkdir(parents=True, exist_ok=True)
    lm = layered_model(cfg)
    print(f"model: {args.model}, {n_params(params) / 1e6:.2f}M parameters, "
          f"{cfg.num_hidden_layers} layers, {args.dtype} ({args.rounding} rounding); "
          f"fine-tuning data: {describe_data(args, train, held_out, packing)}; "
          f"{describe_mode(args, params)}, {describe_clip(args)}, {where}; {describe_batch(args)}")

    schedule = make_schedule(args.schedule, args.lr, args.steps, args.warmup_steps)
    step, init = build_step(args, lm, schedule)
    data_it = data_iterator(args, train, packed, resume)
    batch = next(data_it)  # compiled for, then trained on first
    t_compile = time.perf_counter()
    step = compile_step(step, init, params, batch)  # compiled once, used for training too
    t_compile = time.perf_counter() - t_compile
    opt_state = init(params)

    before = measure(cfg, lm, params, tokenizer, held_out, eval_data, prompt, args.batch_size)
    memory = {} if args.no_memory_report else memory_report(args, lm, params, batch, schedule,
                                                            step, base)
    params, run = run_training(args, step, params, opt_state, itertools.chain([batch], data_it),
                               packed, flags, resume)
    after = measure(cfg, lm, placed(params), tokenizer, held_out, eval_data, prompt,
                    args.batch_size)

    print_results(args, before, after, run, prompt, sentence, t_compile)
    if memory:
        print_memory(args, memory)

    save_checkpoint(args, out, params, cfg)
    report = make_report(args, before, after, run, prompt, packing, memory, t_compile, t_start,
                         params)
    title = f"{describe_run(args)}, {cfg.num_hidden_layers} layers, {args.dtype}"
    png, report_json = write_results(out, tokenizer, report, lambda path: plot(
        path, run["train_losses"], memory, title, (before["loss"], after["loss"]),
        (before, after), "corpus held-out loss" if args.data else "held-out loss"))
    print(f"\nwrote {png}, {report_json} and a transformers checkpoint in "
          f"{out}/ (AutoModelForCausalLM.from_pretrained loads it{export_note(args)}); "
          f"{report['wall_seconds']:.0f} s wall in all")
    return before["loss"], after["loss"]


if __name__ == "__main__":
    main()
