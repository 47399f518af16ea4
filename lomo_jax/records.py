"""JSONL records -> tokenized examples with their label masks (no JAX, no grain).

The tokenization rules :mod:`lomo_jax.data` packs for the JAX job and
``examples/torch_finetune.py`` batches for PyTorch, so both frameworks train on
the same token ids and the same labels. Three record forms, one JSON object a
line (blank lines are skipped; other keys are ignored):

* ``{"text": ...}``: every token is trained on;
* ``{"prompt": ..., "completion": ...}``: loss on the completion only (the
  prompt's positions get label ``-100``);
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered by the
  tokenizer's chat template, loss on the assistant turns only.

Tokens and labels follow :mod:`lomo_jax.models.llama` (and ``transformers``'
causal LMs): ``labels[t]`` is the token at ``t`` (or ``-100``) and position
``t`` predicts ``labels[t + 1]``. Every example's first label is ``-100``, so
once examples are packed into one row no example is predicted from the one
before it. Text is encoded as the tokenizer does by default (its BOS, if it
adds one, once at the start); the tokenizer's EOS is appended, and trained
on, after a text and after a completion (``add_eos=False`` turns that off); a
chat template places its own. A prompt/completion pair is split as
lm-evaluation-harness splits a context and its continuation
(:func:`encode_pair`): the whole string is encoded and the prompt's tokens are
its first ``len(encode(prompt))``; a pair whose tokens merge across the
boundary is refused, since no label split would be right.

:func:`load` tokenizes a training file, :func:`load_eval` an eval file (its
``{"prompt", "choices", "answer"}`` items apart); bad records raise
:class:`DataError` naming the file and line; examples longer than ``seq_len``
are cut to ``seq_len`` and counted. Example::

    from lomo_jax import records          # imports neither jax nor grain
    train = records.load("finetune.jsonl", tokenizer, seq_len=128)
    ex = train.examples[0]                # ex.input_ids, ex.labels: int32 [n]
    loss = model(input_ids=ids, labels=labels).loss   # a transformers model takes them as they are
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Iterator, Mapping, Optional

import numpy as np

IGNORE_INDEX = -100  # the label with no loss: lomo_jax.models.llama's (no flax needed here)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class DataError(ValueError):
    """A bad record or file: the message starts with ``FILE:LINE``."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized record: ``input_ids`` and ``labels`` (``-100`` where no
    loss), int32 ``[n]``; ``where`` is ``FILE:LINE``."""

    input_ids: np.ndarray
    labels: np.ndarray
    where: str

    @property
    def trained_tokens(self) -> int:
        return int(np.sum(self.labels != IGNORE_INDEX))


@dataclasses.dataclass(frozen=True)
class TokenizedData:
    """A file's examples, each at most ``seq_len`` tokens; ``truncated``:
    how many were cut to ``seq_len``; ``dropped``: how many were left out
    because the cut removed every trained token."""

    path: str
    examples: tuple
    seq_len: int
    truncated: int = 0
    dropped: int = 0

    def fingerprint(self) -> str:
        """A short hash of every token and label, to tell datasets apart."""
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(ex.input_ids.tobytes() + b"|" + ex.labels.tobytes() + b";")
        return h.hexdigest()[:16]


# ------------------------------------------------------------- reading -----

def read_jsonl(path) -> Iterator[tuple]:
    """``(line_number, record)`` for each non-blank line of ``path`` (1-based);
    invalid JSON or a line that is not an object raises :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n}: a record must be a JSON object, got "
                                f"{type(record).__name__}")
            yield n, record


def record_form(record: Mapping, where: str) -> str:
    """``"text"``, ``"prompt_completion"``, ``"messages"`` or ``"choices"`` (a
    multiple-choice eval record); a record of no form or of two raises."""
    if "choices" in record:
        return "choices"
    forms = [f for f, keys in (("messages", ("messages",)),
                               ("prompt_completion", ("prompt", "completion")),
                               ("text", ("text",)))
             if any(k in record for k in keys)]
    if len(forms) == 1:
        return forms[0]
    if not forms:
        raise DataError(f"{where}: the record has none of the keys 'text', 'prompt' + "
                        f"'completion', 'messages' (it has {sorted(record)})")
    raise DataError(f"{where}: the record mixes forms {forms} (keys {sorted(record)}); "
                    "give one per line")


def _string(record, key, where, *, empty_ok=False) -> str:
    if key not in record:
        raise DataError(f"{where}: missing key {key!r} (the record has {sorted(record)})")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not value and not empty_ok:
        raise DataError(f"{where}: {key!r} is empty")
    return value


# ------------------------------------------------------------ encoding -----

def prefix_token_id(tokenizer) -> Optional[int]:
    """The token lm-evaluation-harness conditions an empty context on: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer, text: str) -> list:
    """``tokenizer.encode(text)`` with its default special tokens, none added
    to text that already starts with the BOS (EOS) string (as lm-evaluation-
    harness's HF model encodes)."""
    prefix = prefix_token_id(tokenizer)
    if prefix is not None and text.startswith(tokenizer.decode([prefix])):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def _context_and_whole(tokenizer, context: str, continuation: str) -> tuple:
    """``(context_ids, whole_ids)`` of :func:`encode_pair`."""
    if context == "":
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        prefix = prefix_token_id(tokenizer)
        if prefix is None:
            raise ValueError("an empty prompt is conditioned on the BOS (or EOS) token, and "
                             "this tokenizer has neither")
        return (cont[:1], cont) if cont and prefix == cont[0] else ([prefix], [prefix] + cont)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    return encode(tokenizer, context), encode(tokenizer, context + continuation)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple:
    """``(context_ids, continuation_ids)`` exactly as lm-evaluation-harness's
    ``loglikelihood`` makes them for a causal HF model: the context's trailing
    whitespace moves to the continuation, the whole string is encoded and
    split at the encoded context's length; an empty context becomes the
    prefix token (BOS, else EOS)."""
    ctx, whole = _context_and_whole(tokenizer, context, continuation)
    return ctx, whole[len(ctx):]


def _eos(tokenizer, add_eos: bool) -> list:
    return [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []


def _text_ids(tokenizer, record, where, add_eos) -> tuple:
    ids = encode(tokenizer, _string(record, "text", where)) + _eos(tokenizer, add_eos)
    return ids, [True] * len(ids)


def _prompt_completion_ids(tokenizer, record, where, add_eos) -> tuple:
    prompt = _string(record, "prompt", where, empty_ok=True)
    completion = _string(record, "completion", where)
    ctx, whole = _context_and_whole(tokenizer, prompt, completion)
    if whole[:len(ctx)] != ctx or len(whole) == len(ctx):
        raise DataError(f"{where}: the prompt's last token and the completion's first merge "
                        "into one token, so the loss cannot start where the completion "
                        "does; end the prompt, or start the completion, with a space or "
                        "punctuation")
    cont = whole[len(ctx):] + _eos(tokenizer, add_eos)
    return ctx + cont, [False] * len(ctx) + [True] * len(cont)


def chat_template_error(where) -> str:
    return (f"{where}: 'messages' records need the tokenizer's chat template, and this "
            "tokenizer has none (tokenizer.chat_template is None). Load the tokenizer of a "
            "chat/instruct model, or set tokenizer.chat_template to a Jinja template "
            "(ideally with {% generation %} around assistant content), or write the "
            "records as {\"prompt\", \"completion\"}.")


def _messages(record, where) -> list:
    msgs = record["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of "
                        "{\"role\", \"content\"} objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be an object with string 'role' "
                            f"and 'content', got {m!r}")
    if not any(m["role"] == "assistant" and m["content"] for m in msgs):
        raise DataError(f"{where}: no assistant message with content, so nothing to train on")
    return msgs


def _render(tokenizer, msgs, generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(msgs, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _assistant_spans(tokenizer, msgs, full: str, where) -> list:
    """Character spans ``[start, end)`` of the assistant turns in ``full``: from
    the end of the conversation before it with the generation prompt, to the
    end of the conversation through it (its end-of-turn marker included)."""
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(f"{where}: the conversation starts with an assistant turn; "
                            "with no {% generation %} in the chat template its start cannot "
                            "be located (add one, or start with a user/system turn)")
        before, through = _render(tokenizer, msgs[:i], True), _render(tokenizer, msgs[:i + 1])
        if not (full.startswith(before) and full.startswith(through)):
            raise DataError(f"{where}: the chat template does not render the conversation up "
                            f"to messages[{i}] as a prefix of the whole, so the assistant's "
                            "tokens cannot be located; use a template with {% generation %} "
                            "around assistant content")
        spans.append((len(before), len(through)))
    return spans


def _messages_ids(tokenizer, record, where, add_eos) -> tuple:
    """Chat-template tokens; trained: the assistant turns' tokens (the
    template's ``{% generation %}`` mask if it has one, else a token whose
    first character lies in an assistant turn's span)."""
    msgs = _messages(record, where)
    if _GENERATION_TAG.search(str(tokenizer.chat_template)):
        out = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]
    full = _render(tokenizer, msgs)
    spans = _assistant_spans(tokenizer, msgs, full, where)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


_ENCODERS = {"text": _text_ids, "prompt_completion": _prompt_completion_ids,
             "messages": _messages_ids}


def tokenize_record(tokenizer, record: Mapping, where: str, *, add_eos: bool = True) -> Example:
    """One record as an :class:`Example` (the first label is always ``-100``)."""
    form = record_form(record, where)
    if form == "choices":
        raise DataError(f"{where}: a multiple-choice record ('choices') belongs in the eval "
                        "data, not the training data")
    if form == "messages" and getattr(tokenizer, "chat_template", None) is None:
        raise DataError(chat_template_error(where))
    ids, mask = _ENCODERS[form](tokenizer, record, where, add_eos)
    ids = np.asarray(ids, np.int32)
    labels = np.where(np.asarray(mask, bool), ids, IGNORE_INDEX).astype(np.int32)
    labels[:1] = IGNORE_INDEX
    if not np.any(labels != IGNORE_INDEX):
        raise DataError(f"{where}: the record tokenizes to {len(ids)} token(s) with nothing "
                        "to predict")
    return Example(ids, labels, where)


def _check_vocab(ex: Example, vocab_size: Optional[int]) -> None:
    if vocab_size is not None and ex.input_ids.size and int(ex.input_ids.max()) >= vocab_size:
        raise DataError(f"{ex.where}: token id {int(ex.input_ids.max())} is outside the "
                        f"model's vocab_size {vocab_size}; use the model's own tokenizer")


def _fit(examples, seq_len) -> tuple:
    """Examples cut to ``seq_len``: ``(kept, truncated, dropped)``."""
    kept, truncated, dropped = [], 0, 0
    for ex in examples:
        if ex.input_ids.size > seq_len:
            truncated += 1
            ex = Example(ex.input_ids[:seq_len], ex.labels[:seq_len], ex.where)
            if not ex.trained_tokens:
                dropped += 1
                continue
        kept.append(ex)
    return kept, truncated, dropped


def load(path, tokenizer, seq_len: int, *, add_eos: bool = True,
         vocab_size: Optional[int] = None) -> TokenizedData:
    """Tokenize the JSONL file ``path`` (see the module docstring); examples
    longer than ``seq_len`` are cut and counted in ``truncated`` (``dropped``
    if no trained token is left). ``vocab_size``: refuse ids outside it."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    examples = []
    for n, record in read_jsonl(path):
        ex = tokenize_record(tokenizer, record, f"{path}:{n}", add_eos=add_eos)
        _check_vocab(ex, vocab_size)
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no records")
    kept, truncated, dropped = _fit(examples, seq_len)
    if not kept:
        raise DataError(f"{path}: every example lost all its trained tokens when cut to "
                        f"seq_len {seq_len}")
    return TokenizedData(str(path), tuple(kept), seq_len, truncated, dropped)


# ---------------------------------------------------------------- eval -----

@dataclasses.dataclass(frozen=True)
class EvalData:
    """An eval file: ``choices`` (``{"prompt", "choices", "answer", "where"}``
    multiple-choice items) and ``loss`` (the other records, for the held-out
    loss on their trained tokens; ``None`` if there are none)."""

    choices: tuple
    loss: Optional[TokenizedData]


def choice_item(record: Mapping, where: str) -> dict:
    """A checked multiple-choice record: ``prompt`` (a string), ``choices``
    (two or more strings, none empty), ``answer`` (an index into them)."""
    prompt = _string(record, "prompt", where, empty_ok=True)
    choices = record["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or \
            not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of two or more non-empty "
                        f"strings, got {choices!r}")
    answer = record.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: 'answer' must be the index of the right choice, an integer "
                        f"in [0, {len(choices)}), got {answer!r}")
    return {"prompt": prompt, "choices": list(choices), "answer": answer, "where": where}


def load_eval(path, tokenizer, seq_len: int, *, add_eos: bool = True,
              vocab_size: Optional[int] = None) -> EvalData:
    """Split an eval file into multiple-choice items and loss examples (cut to
    ``seq_len`` and counted as :func:`load` does)."""
    items, examples = [], []
    for n, record in read_jsonl(path):
        where = f"{path}:{n}"
        if record_form(record, where) == "choices":
            items.append(choice_item(record, where))
            continue
        ex = tokenize_record(tokenizer, record, where, add_eos=add_eos)
        _check_vocab(ex, vocab_size)
        examples.append(ex)
    if not items and not examples:
        raise DataError(f"{path}: no records")
    kept, truncated, dropped = _fit(examples, seq_len)
    loss = TokenizedData(str(path), tuple(kept), seq_len, truncated, dropped) if kept else None
    return EvalData(tuple(items), loss)
