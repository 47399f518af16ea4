"""Make the small pretrained checkpoint that the main job fine-tunes, ``examples/data/pretrained/``.

    python examples/data/make_pretrained.py   # ~2 min of CPU time (measured: 4 min 48 s
                                              # wall on a 2-core machine shared with other jobs)

What it writes (transformers ``LlamaForCausalLM`` format, 1.9 MB):
``config.json``, ``model.safetensors`` (bf16), ``tokenizer.json`` +
``tokenizer_config.json``, ``generation_config.json`` and a ``README.md``.

How: a byte-level BPE tokenizer (vocabulary 1024) and a 4-layer LLaMA
(d = 128, 0.9M parameters, tied embeddings) are trained from scratch on the
*pretraining part* of ``corpus.txt`` (its stories and notes,
``finetune_llama.corpus_parts()["pretrain"]``) and never see its arithmetic
sentences, which are the main job's fine-tuning target. Pretraining reuses the
job's code: its tokenizer trainer, token windows and batches, and the fused
step (``lomo_jax.fused_train_step``) with ``optax.adamw``, fp32,
``--steps`` (default 300) steps of 8 x 128 tokens; the weights are saved in
bf16. Every seed is fixed: re-running it with the same library versions on the
same machine writes the same bytes (``tests/test_main_job.py`` checks that on
``--tiny``); another CPU or XLA version may round differently.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import time
from pathlib import Path

import jax.numpy as jnp
import optax

import lomo_jax
from lomo_jax.models import convert, llama

HERE = Path(__file__).resolve().parent
SIZES = {  # model, vocabulary, batch x sequence length
    "default": (dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2), 1024, 8, 128),
    "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1), 300, 4, 32),
}


def load_job():
    """``examples/finetune_llama.py`` as a module (its data and training code)."""
    spec = importlib.util.spec_from_file_location("finetune_llama", HERE.parent / "finetune_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def adamw_step(cfg, steps):
    """The fused AdamW step (warmup-cosine schedule, clipping at 1) and its transform;
    cached, so making a checkpoint twice in one process compiles once."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, max(1, steps // 10), steps,
                                                  end_value=3e-4)
    tx = optax.adamw(schedule, weight_decay=0.01)
    return lomo_jax.fused_train_step(llama.llama_layered_model(cfg), tx, clip_grad_norm=1.0), tx


def pretrain(job, cfg, params, windows, batch_size, steps, seed):
    """``steps`` fused AdamW steps; returns params, losses."""
    step, tx = adamw_step(cfg, steps)
    opt_state = lomo_jax.fused_init(tx, params)
    losses = []
    for i, batch in enumerate(itertools.islice(job.batches(windows, batch_size, seed), steps)):
        params, opt_state, metrics = step(params, opt_state, batch)
        losses.append(float(metrics["loss"]))
        if (i + 1) % 100 == 0 or i + 1 == steps:
            print(f"step {i + 1}/{steps}: loss {losses[-1]:.3f}", flush=True)
    return params, losses


def save(out, cfg, params, tokenizer, note):
    import transformers

    eos = tokenizer.eos_token_id
    hf_config = cfg.to_hf(bos_token_id=eos, eos_token_id=eos)
    convert.save_pretrained(params, cfg, str(out), hf_config=hf_config, dtype=jnp.bfloat16)
    tokenizer.save_pretrained(str(out))
    transformers.GenerationConfig(bos_token_id=eos, eos_token_id=eos,
                                  pad_token_id=eos).save_pretrained(str(out))
    (Path(out) / "README.md").write_text(note)


def make(out, *, steps=300, size="default", seed=0):
    """Train the tokenizer and the model and write the checkpoint to ``out``."""
    job = load_job()
    shape, vocab, batch_size, seq_len = SIZES[size]
    text = job.corpus_parts()["pretrain"]
    tokenizer = job.train_tokenizer(text, vocab)
    cfg = llama.LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512,
                            tie_word_embeddings=True, **shape)
    windows = job.make_windows(tokenizer, text, seq_len, cfg.vocab_size)
    params, losses = pretrain(job, cfg, llama.init_params(cfg, seed), windows, batch_size,
                              steps, seed)
    note = (f"# A small LLaMA for lomo-jax's main job\n\nMade by `examples/data/make_pretrained.py"
            f"{'' if size == 'default' else ' --tiny'} --steps {steps}` from the stories and notes "
            f"of `examples/data/corpus.txt` (self-written, CC0), never its arithmetic sentences: "
            f"{job.n_params(params):,} parameters, bf16; {steps} fused AdamW steps of "
            f"{batch_size} x {seq_len} tokens, final training loss {losses[-1]:.3f}.\n")
    save(out, cfg, params, tokenizer, note)
    return losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "pretrained"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tiny", action="store_true", help="a tiny model (the test of determinism)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    make(args.out, steps=args.steps, size="tiny" if args.tiny else "default")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
