"""lomo_jax.data: the three record forms (exact label masks), packing with
segment_ids (no avoidable padding, truncation counted, the packed loss equal to
the unpacked one), order from the seed, iterator state save/restore, and the
errors that name the file and line. The shipped tokenizer
(``examples/data/pretrained``: byte-level BPE, no BOS added, EOS
``<|endoftext|>`` = 0, no chat template) is used throughout."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from lomo_jax import data
from lomo_jax.models import llama

ROOT = Path(__file__).resolve().parents[2]
PRETRAINED = ROOT / "examples" / "data" / "pretrained"
EOS = 0
X = -100
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
GEN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}:{% if m['role'] == 'assistant' %}"
                "{% generation %}{{ m['content'] }}\n{% endgeneration %}{% else %}"
                "{{ m['content'] }}\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
CHAT = [{"role": "user", "content": " Ada had two pears"},
        {"role": "assistant", "content": " so Ada had two pears."},
        {"role": "user", "content": " Gus gave Ada one more"},
        {"role": "assistant", "content": " so Ada had three pears."}]


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(str(PRETRAINED))


def write(tmp_path, records, name="d.jsonl"):
    """``records``: dicts (written as JSON) or raw strings (written as they are)."""
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def one(tok, tmp_path, record, seq_len=64, **kw):
    return data.load(write(tmp_path, [record]), tok, seq_len, **kw).examples[0]


# ---------------------------------------------------------------- forms -----

def test_data_needs_neither_flax_nor_the_model_and_ignores_the_models_label():
    import subprocess
    import sys

    code = ("import sys, lomo_jax.data; "
            "print('flax' in sys.modules, 'lomo_jax.models' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    assert data.IGNORE_INDEX == llama.IGNORE_INDEX == X


def test_text_trains_every_token_but_the_first_and_appends_eos(tok, tmp_path):
    ex = one(tok, tmp_path, {"text": "Ada went home."})
    want = ids(tok, "Ada went home.") + [EOS]
    assert ex.input_ids.tolist() == want
    assert ex.labels.tolist() == [X] + want[1:]
    no_eos = one(tok, tmp_path, {"text": "Ada went home."}, add_eos=False)
    assert no_eos.input_ids.tolist() == want[:-1]


def test_prompt_completion_trains_the_completion_and_eos_only(tok, tmp_path):
    ex = one(tok, tmp_path, {"prompt": "Two plus two is", "completion": " four."})
    prompt, completion = ids(tok, "Two plus two is"), ids(tok, " four.")
    assert ex.input_ids.tolist() == prompt + completion + [EOS]
    assert ex.labels.tolist() == [X] * len(prompt) + completion + [EOS]
    assert ex.where.endswith("d.jsonl:1")


def test_prompt_trailing_space_moves_to_the_completion_as_lm_eval_does(tok, tmp_path):
    ex = one(tok, tmp_path, {"prompt": "Two plus two is ", "completion": "four."})
    assert ex.input_ids.tolist() == ids(tok, "Two plus two is four.") + [EOS]
    assert tok.decode([i for i in ex.labels if i != X]) == " four.<|endoftext|>"


def test_prompt_completion_merging_into_one_token_is_refused(tok, tmp_path):
    # "pe" + "ars": the whole string encodes " pears" as one token, so no label split is right
    path = write(tmp_path, [{"prompt": "Ada had two pe", "completion": "ars."}])
    with pytest.raises(data.DataError, match=rf"{path}:1: the prompt's last token and the "
                       "completion's first merge"):
        data.load(path, tok, 64)


def _assistant_text(tok, ex):
    """The trained tokens, decoded, split where the label mask has a gap."""
    runs, cur = [], []
    for i, lab in zip(ex.input_ids.tolist(), ex.labels.tolist()):
        if lab != X:
            cur.append(i)
        elif cur:
            runs, cur = runs + [tok.decode(cur)], []
    return runs + ([tok.decode(cur)] if cur else [])


@pytest.mark.parametrize("template", [TEMPLATE, GEN_TEMPLATE], ids=["prefixes", "generation"])
def test_messages_train_the_assistant_turns_only(tok, tmp_path, template):
    tok.chat_template = template
    try:
        ex = one(tok, tmp_path, {"messages": CHAT}, seq_len=128)
        full = tok.apply_chat_template(CHAT, tokenize=False)
    finally:
        tok.chat_template = None
    assert ex.input_ids.tolist() == ids(tok, full)  # the template's text, no EOS added
    assert _assistant_text(tok, ex) == [" so Ada had two pears.\n", " so Ada had three pears.\n"]


def test_messages_without_chat_template_name_the_file_and_the_fix(tok, tmp_path):
    assert tok.chat_template is None
    path = write(tmp_path, [{"text": "Ada went home."}, {"messages": CHAT}])
    with pytest.raises(data.DataError, match=rf"{path}:2: 'messages' records need the "
                       r"tokenizer's chat template.*tokenizer.chat_template"):
        data.load(path, tok, 64)


# ---------------------------------------------------------- bad records -----

BAD = [
    ('{"text": "Ada went home."', "invalid JSON"),
    ('["text", "Ada"]', "must be a JSON object, got list"),
    ({"prompt": "Ada had"}, "the record has none of the keys|missing key 'completion'"),
    ({"prompt": "Ada had", "completion": ""}, "'completion' is empty"),
    ({"prompt": "Ada had", "completion": 3}, "'completion' must be a string, got int"),
    ({"text": ""}, "'text' is empty"),
    ({"txt": "Ada"}, "none of the keys 'text', 'prompt' \\+ 'completion', 'messages'"),
    ({"text": "Ada", "prompt": "a", "completion": "b"}, "mixes forms"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "Ada"}]}, "no assistant message"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]},
     r"messages\[0\] must be an object with string 'role' and 'content'"),
    ({"prompt": "Ada had", "choices": [" two", " three"], "answer": 0},
     "a multiple-choice record .* belongs in the eval data"),
]


@pytest.mark.parametrize("bad, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_records_name_the_file_and_line(tok, tmp_path, bad, message):
    tok.chat_template = TEMPLATE  # so the messages records get as far as their own checks
    try:
        path = write(tmp_path, [{"text": "Ada went home."}, "", bad])
        with pytest.raises(data.DataError, match=rf"^{path}:3: .*({message})"):
            data.load(path, tok, 64)
    finally:
        tok.chat_template = None


BAD_CHOICES = [
    ({"prompt": "Ada had", "choices": " two", "answer": 0}, "'choices' must be a list of two"),
    ({"prompt": "Ada had", "choices": [" two", ""], "answer": 0}, "'choices' must be a list"),
    ({"prompt": "Ada had", "choices": [" two", " three"], "answer": 2}, r"in \[0, 2\), got 2"),
    ({"prompt": "Ada had", "choices": [" two", " three"]}, "'answer' must be the index"),
    ({"prompt": "Ada had", "choices": [" two", " three"], "answer": True}, "got True"),
    ({"choices": [" two", " three"], "answer": 0}, "missing key 'prompt'"),
]


@pytest.mark.parametrize("bad, message", BAD_CHOICES, ids=[str(i) for i in range(len(BAD_CHOICES))])
def test_bad_choice_records_name_the_file_and_line(tok, tmp_path, bad, message):
    path = write(tmp_path, [{"prompt": "Ada", "completion": " had."}, bad])
    with pytest.raises(data.DataError, match=rf"^{path}:2: .*{message}"):
        data.load_eval(path, tok, 64)


def test_ids_outside_the_vocabulary_name_the_file_and_line(tok, tmp_path):
    path = write(tmp_path, [{"text": "Ada went home."}])
    top = max(ids(tok, "Ada went home."))
    with pytest.raises(data.DataError, match=rf"{path}:1: token id {top} is outside the "
                       rf"model's vocab_size {top}"):
        data.load(path, tok, 64, vocab_size=top)


def test_a_missing_file_is_named(tok, tmp_path):
    with pytest.raises(data.DataError, match=f"{tmp_path / 'nope.jsonl'}: no such file"):
        data.load(tmp_path / "nope.jsonl", tok, 64)


# -------------------------------------------------------------- packing -----

def _tokens(n, start):
    """A text record of ``n`` tokens (``n - 1`` words + EOS), each word one token."""
    words = ["Ada", " went", " home", " and", " Gus", " met", " Rosa", " at", " the", " market"]
    return {"text": "".join(words[(start + k) % len(words)] for k in range(n - 1))}


def test_packing_fills_rows_with_segments_and_no_avoidable_padding(tok, tmp_path):
    lengths = [6, 2, 5, 3, 4, 4, 7, 2, 3, 5]
    train = data.load(write(tmp_path, [_tokens(n, i) for i, n in enumerate(lengths)]), tok, 8)
    assert [e.input_ids.size for e in train.examples] == lengths and sum(lengths) == 41
    report = data.packing_report(train, batch_size=2)
    assert report["real_tokens"] == 41 and report["row_tokens"] == 8 * report["rows"]
    batch = next(data.packed_batches(train, 2, seed=3))
    assert set(batch) == {"input_ids", "labels", "segment_ids"}
    assert all(v.shape == (2, 8) and v.dtype == np.int32 for v in batch.values())
    known = {tuple(e.input_ids.tolist()): e.labels.tolist() for e in train.examples}
    for row_ids, row_labels, row_seg in zip(*(batch[k] for k in data.ROW_KEYS)):
        for s in set(row_seg.tolist()) - {0}:  # each segment is one whole example, labels intact
            at = row_seg == s
            assert known[tuple(row_ids[at].tolist())] == row_labels[at].tolist()
        pad = row_seg == 0
        assert (row_labels[pad] == X).all() and (row_ids[pad] == 0).all()
        assert list(row_seg[~pad]) == sorted(row_seg[~pad])  # contiguous, increasing


def test_exact_fit_leaves_no_padding(tok, tmp_path):
    train = data.load(write(tmp_path, [_tokens(4, i) for i in range(8)]), tok, 8)
    report = data.packing_report(train, batch_size=4)
    assert report["packing_efficiency"] == 1.0 and report["rows"] == 4
    batch = next(data.packed_batches(train, 4))
    assert (batch["segment_ids"] != 0).all()
    assert (batch["segment_ids"] == [[1] * 4 + [2] * 4] * 4).all()


def test_truncation_is_counted_never_silent(tok, tmp_path):
    recs = [_tokens(12, 0), _tokens(4, 1),
            {"prompt": "Ada went home and Gus met Rosa at the", "completion": " market."}]
    train = data.load(write(tmp_path, recs), tok, 8)
    assert (train.truncated, train.dropped) == (2, 1)  # the prompt fills the row: no loss left
    assert [e.input_ids.size for e in train.examples] == [8, 4]
    report = data.packing_report(train)
    assert report["truncated_examples"] == 2 and report["dropped_examples"] == 1
    assert report["examples"] == 2 and report["trained_tokens"] == 7 + 3


def test_packed_loss_equals_the_loss_of_each_example_alone(tok, tmp_path):
    """segment_ids + the -100 first labels make a packed row's loss the
    token-weighted loss of its examples, each run on its own."""
    recs = [{"prompt": "Ada went", "completion": " home."}, {"text": "Gus met Rosa."},
            {"prompt": "At the market", "completion": " Ada met Gus."}, _tokens(5, 3)]
    train = data.load(write(tmp_path, recs), tok, 32)
    cfg = llama.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=64)
    rng = np.random.default_rng(0)  # any weights do (and init_params is slow here)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype),
                          llama.param_shapes(cfg))
    batch = next(data.packed_batches(train, 1))
    seg = batch["segment_ids"][0]
    parts = [(batch["input_ids"][0][seg == s], batch["labels"][0][seg == s])
             for s in sorted(set(seg.tolist()) - {0})]
    assert len(parts) >= 4 and (seg == 0).any()  # every example (and more) in one padded row
    loss = jax.jit(functools.partial(llama.llama_loss, cfg))
    packed = float(loss(params, {k: jnp.asarray(v) for k, v in batch.items()}))
    alone_ids, alone_labels = np.zeros((len(parts), 32), np.int32), np.full((len(parts), 32), X)
    for row, (i, lab) in enumerate(parts):  # one example a row, right-padded, unmasked:
        alone_ids[row, :i.size], alone_labels[row, :i.size] = i, lab  # the batch's mean loss
    alone = float(loss(params, {"input_ids": jnp.asarray(alone_ids),  # is token-weighted
                                "labels": jnp.asarray(alone_labels)}))
    assert abs(packed - alone) < 1e-5


# ------------------------------------------------- order and resumption -----

def _take(it, n):
    return [{k: v.copy() for k, v in next(it).items()} for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all((x[k] == y[k]).all() for x, y in zip(a, b) for k in x)


@pytest.fixture
def many(tok, tmp_path):
    return data.load(write(tmp_path, [_tokens(2 + i % 7, i) for i in range(30)]), tok, 8)


def test_order_is_deterministic_from_the_seed(many):
    first = _take(data.packed_batches(many, 2, seed=5), 12)
    assert _same(first, _take(data.packed_batches(many, 2, seed=5), 12))
    assert not _same(first, _take(data.packed_batches(many, 2, seed=6), 12))


def test_every_example_once_per_epoch_in_a_new_order(many):
    rows = data.PackedRows(many, seed=1)
    n = len(data.epoch_rows(many, 1, 0)) + len(data.epoch_rows(many, 1, 1))
    segs = [tuple(r["input_ids"][r["segment_ids"] == s].tolist())
            for r in (rows[k] for k in range(n))
            for s in sorted(set(r["segment_ids"].tolist()) - {0})]
    everything = sorted(tuple(e.input_ids.tolist()) for e in many.examples)
    assert sorted(segs) == sorted(everything * 2)
    assert segs[:10] != segs[30:40]


def test_iterator_state_restores_the_following_batches(many):
    it = data.packed_batches(many, 2, seed=7)
    _take(it, 5)  # mid-way through a packed group of rows
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint's metadata holds
    following = _take(it, 20)  # past the end of an epoch
    resumed = data.packed_batches(many, 2, seed=7)
    resumed.set_state(state)
    assert _same(following, _take(resumed, 20))
    fresh = data.packed_batches(many, 2, seed=7)
    assert not _same(following[:3], _take(fresh, 3))  # so the restore did something


def test_a_state_for_other_data_or_settings_is_refused(many, tok, tmp_path):
    state = data.packed_batches(many, 2, seed=7).get_state()
    with pytest.raises(ValueError, match="seed: saved 7, now 8"):
        data.packed_batches(many, 2, seed=8).set_state(state)
    with pytest.raises(ValueError, match="batch_size: saved 2, now 4"):
        data.packed_batches(many, 4, seed=7).set_state(state)
    other = data.load(write(tmp_path, [_tokens(3, i) for i in range(30)], "o.jsonl"), tok, 8)
    with pytest.raises(ValueError, match="fingerprint: saved"):
        data.packed_batches(other, 2, seed=7).set_state(state)
    with pytest.raises(ValueError, match="not a lomo_jax.data iterator state"):
        data.packed_batches(many, 2, seed=7).set_state({"next_index": 3})


# ---------------------------------------------------------- shipped data -----

def test_shipped_data_loads_and_packs(tok):
    d = ROOT / "examples" / "data"
    train = data.load(d / "finetune.jsonl", tok, 256, vocab_size=936)
    report = data.packing_report(train, batch_size=4)
    assert report["examples"] == 240 and report["truncated_examples"] == 0
    assert report["packing_efficiency"] >= 0.95
    ev = data.load_eval(d / "eval.jsonl", tok, 128, vocab_size=936)
    assert len(ev.choices) == 48 and len(ev.loss.examples) == 24
    prompts = {json.loads(s)["prompt"] for s in (d / "finetune.jsonl").read_text().splitlines()}
    assert not prompts & {c["prompt"] for c in ev.choices}  # held out


def test_shipped_jsonl_is_what_make_finetune_data_writes():
    import importlib.util

    d = ROOT / "examples" / "data"
    spec = importlib.util.spec_from_file_location("make_finetune_data", d / "make_finetune_data.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    train, evaluation = make.build()
    for name, records in (("finetune.jsonl", train), ("eval.jsonl", evaluation)):
        assert (d / name).read_text() == "".join(json.dumps(r) + "\n" for r in records)


def test_shipped_data_packs_to_the_floor_at_the_jobs_seq_len(tok):
    """At the main job's default --seq-len 128 the 240 shipped examples (4,975 tokens)
    fill ceil(4975 / 128) = 39 rows (grain's online best-fit packer made 41: 0.948)."""
    train = data.load(ROOT / "examples" / "data" / "finetune.jsonl", tok, 128)
    report = data.packing_report(train, batch_size=8)
    assert report["rows"] == -(-report["real_tokens"] // 128) == 39
    assert report["packing_efficiency"] >= 0.95


@pytest.mark.parametrize("seq_len", [8, 13, 64])
def test_pack_rows_places_every_example_once_within_the_row(seq_len):
    lengths = [int(n) for n in np.random.default_rng(seq_len).integers(1, seq_len + 1, 200)]
    rows = data.pack_rows(lengths, seq_len)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= seq_len for row in rows)
    with pytest.raises(ValueError, match=f"example 1 has {seq_len + 1} tokens"):
        data.pack_rows([1, seq_len + 1], seq_len)
