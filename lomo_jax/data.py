"""JSONL fine-tuning data -> packed, fixed-length rows for the model (with grain).

The records and their tokenization (three forms: ``{"text"}``,
``{"prompt", "completion"}``, ``{"messages"}``; label ``-100`` where no loss;
errors naming ``FILE:LINE``) are :mod:`lomo_jax.records`' (no JAX there, so
PyTorch code uses the same rules); its names are re-exported here
(:func:`load`, :func:`load_eval`, :class:`DataError`, ...).

:func:`packed_batches` packs the examples into rows of ``seq_len`` with
``segment_ids`` (the model keeps attention inside a segment and restarts
positions there) and yields batches forever. Each epoch is packed offline,
once: the examples are shuffled from ``(seed, epoch)``, packed by *minimum
bin slack* (:func:`pack_rows`: each row takes the longest example left and
then the others that fill it fullest; on the shipped data at ``seq_len`` 128,
39 rows, the floor ``ceil(tokens / seq_len)``, where grain's online best-fit
packer made 41), and the rows shuffled again, so every example is seen once an
epoch, in a new order, with the same rows for the same seed. The rows are a
``grain.MapDataset`` (row ``k`` of the endless stream is found from its epoch's
packing), so the iterator's ``get_state()`` is a small JSON dict to keep in a
checkpoint's metadata, ``set_state()`` resumes from it.
:func:`packing_report` gives the counts and the packing efficiency
(real tokens / row tokens). Example::

    from lomo_jax import data
    train = data.load("finetune.jsonl", tokenizer, seq_len=128, vocab_size=cfg.vocab_size)
    print(data.packing_report(train, batch_size=8))
    it = data.packed_batches(train, batch_size=8, seed=0)
    batch = next(it)              # {"input_ids", "labels", "segment_ids"}: int32 [8, 128]
    meta = {"data": it.get_state()}
    it.set_state(meta["data"])    # later, on resume
"""

from __future__ import annotations

import bisect
import collections
import sys
from typing import Any, Mapping, Optional

import numpy as np

from lomo_jax.records import (  # noqa: F401  (re-exported: lomo_jax.data's public names)
    IGNORE_INDEX,
    DataError,
    EvalData,
    Example,
    TokenizedData,
    chat_template_error,
    choice_item,
    encode,
    encode_pair,
    load,
    load_eval,
    prefix_token_id,
    read_jsonl,
    record_form,
    tokenize_record,
)

ROW_KEYS = ("input_ids", "labels", "segment_ids")


# ------------------------------------------------------------- packing -----

def _fullest_subset(available: Mapping[int, int], room: int) -> collections.Counter:
    """``{length: k}`` from ``available`` (``{length: count}``) with the largest
    sum ``<= room``: a bounded knapsack (counts split in powers of two, one
    numpy pass each, the longer lengths tried first so they win ties)."""
    sizes, groups = [], []
    for length in sorted(available, reverse=True):
        left, k = min(available[length], room // length), 1
        while left > 0:
            groups.append((length, min(k, left)))
            sizes.append(length * groups[-1][1])
            left, k = left - groups[-1][1], 2 * k
    reached, via = np.zeros(room + 1, bool), np.full(room + 1, -1)
    reached[0] = True
    for g, size in enumerate(sizes):
        new = np.zeros_like(reached)
        new[size:] = reached[:room + 1 - size] & ~reached[size:]
        via[new] = g  # first reached with group g, from a sum reached with groups < g
        reached |= new
    total, chosen = int(np.flatnonzero(reached)[-1]), collections.Counter()
    while total:
        length, k = groups[via[total]]
        chosen[length] += k
        total -= length * k
    return chosen


def pack_rows(lengths, seq_len: int) -> list:
    """Rows of indices into ``lengths``, each row's lengths summing to at most
    ``seq_len``, by *minimum bin slack* (Gupta and Ho, 1999): a row takes the
    longest example left, then the others that fill it fullest (equal lengths
    in the order given). Cost: a knapsack of ``seq_len`` a row, about 1 ms at
    2048.

    >>> pack_rows([3, 5, 2, 6], 8)
    [[3, 2], [1, 0]]
    """
    by_length = collections.defaultdict(list)
    for i, n in enumerate(lengths):
        if not 0 < n <= seq_len:
            raise ValueError(f"example {i} has {n} tokens; rows hold 1..{seq_len}")
        by_length[int(n)].append(i)
    for queue in by_length.values():
        queue.reverse()  # pop() takes them in the order given

    def take(length, k):
        row.extend(by_length[length].pop() for _ in range(k))
        if not by_length[length]:
            del by_length[length]

    rows = []
    while by_length:
        row, longest = [], max(by_length)
        take(longest, 1)
        available = {n: len(q) for n, q in by_length.items()}
        for length, k in _fullest_subset(available, seq_len - longest).items():
            take(length, k)
        rows.append(row)
    return rows


def _fill_row(examples, seq_len: int) -> dict:
    """``examples`` one after another in a row (padding: id 0, label -100, segment 0)."""
    row = {"input_ids": np.zeros(seq_len, np.int32),
           "labels": np.full(seq_len, IGNORE_INDEX, np.int32),
           "segment_ids": np.zeros(seq_len, np.int32)}
    at = 0
    for segment, ex in enumerate(examples, 1):
        n = ex.input_ids.size
        row["input_ids"][at:at + n], row["labels"][at:at + n] = ex.input_ids, ex.labels
        row["segment_ids"][at:at + n] = segment
        at += n
    return row


def epoch_rows(data: TokenizedData, seed: int, epoch: int) -> list:
    """Epoch ``epoch``'s packed rows (lists of indices into ``data.examples``):
    examples shuffled from ``(seed, epoch)``, packed by :func:`pack_rows`, rows
    shuffled."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(data.examples))
    rows = pack_rows([data.examples[i].input_ids.size for i in order], data.seq_len)
    return [[int(order[i]) for i in rows[r]] for r in rng.permutation(len(rows))]


class PackedRows:
    """The endless stream of packed rows, epoch after epoch, as a random-access
    sequence (a ``grain.MapDataset`` source): row ``k`` is found from the row
    counts of the epochs before it (each epoch packed once, the latest cached)."""

    def __init__(self, data: TokenizedData, seed: int):
        self.data, self.seed = data, seed
        self._ends = []  # _ends[e]: rows in epochs 0..e
        self._cached = (None, None)

    def __len__(self) -> int:
        return sys.maxsize

    def _epoch(self, epoch: int) -> list:
        if self._cached[0] != epoch:
            self._cached = (epoch, epoch_rows(self.data, self.seed, epoch))
        return self._cached[1]

    def __getitem__(self, k: int) -> dict:
        while not self._ends or self._ends[-1] <= k:
            rows = len(self._epoch(len(self._ends)))
            self._ends.append((self._ends[-1] if self._ends else 0) + rows)
        epoch = bisect.bisect_right(self._ends, k)
        start = self._ends[epoch - 1] if epoch else 0
        row = self._epoch(epoch)[k - start]
        return _fill_row([self.data.examples[i] for i in row], self.data.seq_len)


def _grain():
    try:
        import grain
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("lomo_jax.data batches with grain: pip install grain") from e
    return grain


class BatchIterator:
    """Endless packed batches ``{"input_ids", "labels", "segment_ids"}`` (int32
    ``[batch_size, seq_len]``) with a checkpointable position."""

    def __init__(self, data: TokenizedData, batch_size: int, seed: int):
        self.identity = {"fingerprint": data.fingerprint(), "seq_len": data.seq_len,
                         "batch_size": batch_size, "seed": seed, "packing": "min_bin_slack"}
        ds = _grain().MapDataset.source(PackedRows(data, seed))
        self._it = iter(ds.batch(batch_size, drop_remainder=True))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def get_state(self) -> dict:
        """The position, as a small JSON-able dict (the next batch is the one
        :meth:`set_state` with it resumes at)."""
        return {**self.identity, "grain": self._it.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state`` (from :meth:`get_state` of an iterator over the
        same data, batch size and seed: anything else raises)."""
        if not isinstance(state, Mapping) or "grain" not in state:
            raise ValueError(f"not a lomo_jax.data iterator state: {state!r}")
        differ = {k: (state.get(k), v) for k, v in self.identity.items() if state.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"the saved data position is for other data or settings ({detail})")
        self._it.set_state(state["grain"])


def packed_batches(data: TokenizedData, batch_size: int, *, seed: int = 0) -> BatchIterator:
    """An endless :class:`BatchIterator` over ``data`` (see the module docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return BatchIterator(data, batch_size, seed)


def packing_report(data: TokenizedData, batch_size: int = 1, *, seed: int = 0) -> dict:
    """Counts of one epoch packed as :func:`packed_batches` packs it:
    ``examples``, ``truncated_examples``, ``dropped_examples``,
    ``trained_tokens`` (labels not -100), ``real_tokens`` (not padding),
    ``rows``, ``row_tokens`` and ``packing_efficiency`` = real / row tokens
    (the floor of ``rows`` is ``ceil(real_tokens / seq_len)``).
    ``batch_size`` is accepted for symmetry with :func:`packed_batches`: the
    packing does not depend on it."""
    del batch_size
    rows = epoch_rows(data, seed, 0)
    real = sum(ex.input_ids.size for ex in data.examples)
    row_tokens = len(rows) * data.seq_len
    return {"examples": len(data.examples), "truncated_examples": data.truncated,
            "dropped_examples": data.dropped,
            "trained_tokens": sum(ex.trained_tokens for ex in data.examples),
            "real_tokens": real, "rows": len(rows), "row_tokens": row_tokens,
            "packing_efficiency": real / row_tokens}
