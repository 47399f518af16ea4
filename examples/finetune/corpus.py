"""The main job's data: the shipped corpus's target slice as token windows, its tokenizer,
``--data``/``--eval-data`` JSONL, and the model they train."""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from lomo_jax import data
from lomo_jax.models import convert, llama

from finetune.arguments import CORPUS, DTYPES, schedule_problem

TARGET_LINE = re.compile(r"[A-Z][a-z]+ (plus|minus) [a-z]+ is [a-z]+\.")


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


def load_model(args):
    dtype = DTYPES[args.dtype]
    return convert.load_pretrained(args.model, dtype=dtype, config_dtype=dtype)


@functools.lru_cache(maxsize=8)
def layered_model(cfg):
    """``llama.llama_layered_model(cfg)``, one per config: a process that runs the job again
    (the tests) compiles the held-out loss (``report.evaluate``) once per model."""
    return llama.llama_layered_model(cfg)


def n_params(params):
    return sum(x.size for x in jax.tree.leaves(params))


def sample_prompt(held_out_text: str) -> tuple:
    """``(prompt, sentence)``: the first held-out sentence and its start up to
    and including "is" ("Two minus one is"), whose answer the model never saw."""
    sentence = held_out_text.splitlines()[0].strip()
    head, sep, _ = sentence.partition(" is ")
    return (head + " is" if sep else " ".join(sentence.split()[:3])), sentence


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
