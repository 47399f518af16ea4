"""Multiple-choice scoring and held-out loss on the plain-dict parameters.

:func:`score_choices` scores ``{"prompt", "choices", "answer"}`` items as
lm-evaluation-harness's ``acc`` does with an empty ``target_delimiter``: each
choice is appended to the prompt as given, the pair is encoded as its HF model
encodes it (:func:`lomo_jax.records.encode_pair`: the whole string, split at the
encoded prompt's length), and the choice whose tokens have the highest summed
log-likelihood wins (the first on a tie). :func:`completion_loss` is the mean
next-token loss on the trained tokens (labels not ``-100``) of
:class:`lomo_jax.records.Example` s. Both right-pad their rows into fixed-shape
batches and run one jitted forward (:func:`lomo_jax.models.logits`) per batch::

    from lomo_jax import data
    from lomo_jax.models import scoring
    ev = data.load_eval("eval.jsonl", tokenizer, seq_len=128)
    res = scoring.score_choices(cfg, params, tokenizer, ev.choices)
    res.accuracy, res.predictions, res.scores
    scoring.completion_loss(cfg, params, ev.loss)      # {"loss", "tokens"}
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lomo_jax import records as _records  # the JSONL rules (no JAX, no grain)
from lomo_jax.models.llama import IGNORE_INDEX

PAD_TO = 8  # row lengths are rounded up to a multiple of this (fewer compiles)


@dataclasses.dataclass(frozen=True)
class ChoiceScores:
    """``scores[i][j]``: summed log-likelihood of item ``i``'s choice ``j``;
    ``predictions[i]``: the argmax (first on a tie); ``correct`` and
    ``accuracy``: against the items' ``answer`` (``None`` where none is given)."""

    scores: tuple
    predictions: np.ndarray
    correct: Optional[np.ndarray]
    accuracy: Optional[float]


@functools.partial(jax.jit, static_argnums=0)
def _row_logprobs(cfg, params, input_ids, scored):
    """Summed log-probability of the tokens where ``scored`` (``[B, T]``
    bool; token ``t`` is predicted at position ``t - 1``), per row, in fp32.
    Rows are right-padded, so no real token attends to padding."""
    from lomo_jax import models

    logits = models.logits(cfg, params, {"input_ids": input_ids})[:, :-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok = jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(scored[:, 1:], tok, 0.0), axis=-1)


def _check_rows(cfg, rows, names) -> None:
    limit = cfg.max_position_embeddings
    for (ids, _), name in zip(rows, names):
        if len(ids) > limit:
            raise ValueError(f"{name}: {len(ids)} tokens exceed the model's "
                             f"max_position_embeddings {limit}")
        bad = [int(i) for i in ids if not 0 <= int(i) < cfg.vocab_size]
        if bad:
            raise ValueError(f"{name}: token id {bad[0]} is outside the model's vocab_size "
                             f"{cfg.vocab_size}; use the model's own tokenizer")


def score_rows(cfg, params, rows: Sequence[tuple], *, batch_size: int = 32,
               names: Optional[Sequence[str]] = None) -> np.ndarray:
    """Summed log-likelihood (float64 ``[n]``) of each ``(ids, scored)`` row:
    the tokens ``ids[t]`` with ``scored[t]`` true, each given ``ids[:t]``."""
    if not rows:
        return np.zeros(0)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_rows(cfg, rows, names or [f"row {i}" for i in range(len(rows))])
    t = -(-max(len(ids) for ids, _ in rows) // PAD_TO) * PAD_TO
    n = -(-len(rows) // batch_size) * batch_size
    ids, scored = np.zeros((n, t), np.int32), np.zeros((n, t), bool)
    for i, (row_ids, row_scored) in enumerate(rows):
        ids[i, :len(row_ids)], scored[i, :len(row_ids)] = row_ids, row_scored
    sums = [np.asarray(_row_logprobs(cfg, params, jnp.asarray(ids[k:k + batch_size]),
                                     jnp.asarray(scored[k:k + batch_size])))
            for k in range(0, n, batch_size)]
    return np.concatenate(sums)[:len(rows)].astype(np.float64)


def _choice_rows(tokenizer, items) -> tuple:
    """``(rows, names, sizes)``: one ``(context + continuation, scored)`` row
    per choice, in item order."""
    rows, names, sizes = [], [], []
    for i, item in enumerate(items):
        where = item.get("where", f"item {i}")
        for j, choice in enumerate(item["choices"]):
            if tokenizer is None:
                ctx, cont = list(item["prompt"]), list(choice)
            else:
                ctx, cont = _records.encode_pair(tokenizer, item["prompt"], choice)
            if not cont:
                raise ValueError(f"{where}: choice {j} ({choice!r}) has no tokens of its own "
                                 "after the prompt's, so it cannot be scored")
            rows.append((ctx + cont, [False] * len(ctx) + [True] * len(cont)))
            names.append(f"{where}, choice {j}")
        sizes.append(len(item["choices"]))
    return rows, names, sizes


def score_choices(cfg, params, tokenizer, items: Sequence[Mapping[str, Any]], *,
                  batch_size: int = 32) -> ChoiceScores:
    """Score multiple-choice ``items`` (``{"prompt", "choices", "answer"?}``;
    with ``tokenizer=None``, ``prompt`` and each choice are token-id lists,
    the context and the continuation) -- see the module docstring."""
    rows, names, sizes = _choice_rows(tokenizer, items)
    flat = score_rows(cfg, params, rows, batch_size=batch_size, names=names)
    scores = tuple(np.split(flat, np.cumsum(sizes)[:-1])) if items else ()
    predictions = np.asarray([int(np.argmax(s)) for s in scores], np.int64)
    if not items or any(item.get("answer") is None for item in items):
        return ChoiceScores(scores, predictions, None, None)
    correct = predictions == np.asarray([item["answer"] for item in items])
    return ChoiceScores(scores, predictions, correct, float(np.mean(correct)))


def completion_loss(cfg, params, examples, *, batch_size: int = 32) -> dict:
    """``{"loss", "tokens"}``: the mean negative log-likelihood over every
    trained token (labels not ``-100``) of ``examples`` (a
    :class:`lomo_jax.data.TokenizedData` or a sequence of ``Example``)."""
    if isinstance(examples, _records.TokenizedData):
        examples = examples.examples
    rows = [(ex.input_ids.tolist(), (ex.labels != IGNORE_INDEX).tolist()) for ex in examples]
    tokens = int(sum(sum(scored) for _, scored in rows))
    if not tokens:
        raise ValueError("no trained tokens to take the loss on")
    sums = score_rows(cfg, params, rows, batch_size=batch_size,
                      names=[ex.where for ex in examples])
    return {"loss": float(-np.sum(sums) / tokens), "tokens": tokens}


def evaluate(cfg, params, tokenizer, eval_data, *, batch_size: int = 32) -> dict:
    """A :class:`lomo_jax.data.EvalData`'s figures: ``accuracy`` and
    ``choice_items`` (multiple choice), ``loss`` and ``loss_tokens`` (the
    held-out loss); ``None`` for a part the file does not have."""
    out = {"accuracy": None, "choice_items": len(eval_data.choices), "loss": None,
           "loss_tokens": 0}
    if eval_data.choices:
        out["accuracy"] = score_choices(cfg, params, tokenizer, eval_data.choices,
                                        batch_size=batch_size).accuracy
    if eval_data.loss is not None:
        res = completion_loss(cfg, params, eval_data.loss, batch_size=batch_size)
        out["loss"], out["loss_tokens"] = res["loss"], res["tokens"]
    return out
