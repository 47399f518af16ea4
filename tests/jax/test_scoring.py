"""lomo_jax.models.scoring: multiple-choice scores and the held-out loss against
transformers' log-likelihoods of the same (shipped) model, against
lm-evaluation-harness's ``acc`` on a local task item for item, and its errors.

Tolerance: fp32 on both sides, summed over at most ~30 tokens, JAX and torch
agree to ~1e-5; ``ATOL`` = 1e-3 is far below what one wrong token does to a
sum (each scored token's log-probability here is at least ``MIN_TOKEN_NLL``
in size, checked below), so a shifted split or an off-by-one target fails."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from lomo_jax import data
from lomo_jax.models import convert, scoring

ROOT = Path(__file__).resolve().parents[2]
PRETRAINED = ROOT / "examples" / "data" / "pretrained"
EVAL = ROOT / "examples" / "data" / "eval.jsonl"
ATOL = 1e-3
MIN_TOKEN_NLL = 1e-2


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(str(PRETRAINED))


@pytest.fixture(scope="module")
def jax_model():
    import jax.numpy as jnp

    return convert.load_pretrained(str(PRETRAINED), dtype=jnp.float32, config_dtype=jnp.float32)


@pytest.fixture(scope="module")
def hf_model():
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(PRETRAINED), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def items(tok):
    ev = data.load_eval(EVAL, tok, 128)
    return list(ev.choices[:8]), ev.loss.examples[:6]


def torch_token_logprobs(model, ids):
    """log p(ids[t] | ids[:t]) for t >= 1, from transformers, fp32."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy().astype(np.float64)


def test_choice_scores_match_transformers(tok, jax_model, hf_model, items):
    cfg, params = jax_model
    mc, _ = items
    res = scoring.score_choices(cfg, params, tok, mc, batch_size=4)  # 24 rows: 6 batches
    for item, got in zip(mc, res.scores):
        want = []
        for choice in item["choices"]:
            ctx, cont = data.encode_pair(tok, item["prompt"], choice)
            lp = torch_token_logprobs(hf_model, ctx + cont)[len(ctx) - 1:]
            assert lp.size == len(cont) and np.all(-lp > MIN_TOKEN_NLL)
            want.append(lp.sum())
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
        assert int(np.argmax(got)) == int(np.argmax(want))
    assert res.predictions.tolist() == [int(np.argmax(s)) for s in res.scores]
    assert res.accuracy == np.mean(res.predictions == [i["answer"] for i in mc])


def test_pretokenized_items_give_the_same_scores(tok, jax_model, items):
    cfg, params = jax_model
    mc, _ = items
    pre = []
    for item in mc[:3]:
        pairs = [data.encode_pair(tok, item["prompt"], c) for c in item["choices"]]
        assert all(p[0] == pairs[0][0] for p in pairs)
        pre.append({"prompt": pairs[0][0], "choices": [p[1] for p in pairs]})
    by_ids = scoring.score_choices(cfg, params, None, pre)
    by_text = scoring.score_choices(cfg, params, tok, mc[:3])
    np.testing.assert_array_equal(np.concatenate(by_ids.scores), np.concatenate(by_text.scores))
    assert by_ids.accuracy is None and by_ids.correct is None  # no answers given


def test_completion_loss_matches_transformers(tok, jax_model, hf_model, items):
    cfg, params = jax_model
    _, examples = items
    res = scoring.completion_loss(cfg, params, examples, batch_size=4)
    nll, n = 0.0, 0
    for ex in examples:
        lp = torch_token_logprobs(hf_model, ex.input_ids.tolist())
        trained = ex.labels[1:] != -100
        nll, n = nll - lp[trained].sum(), n + int(trained.sum())
    assert res["tokens"] == n == sum(ex.trained_tokens for ex in examples)
    assert abs(res["loss"] - nll / n) < ATOL / n


def test_evaluate_reports_both_parts(tok, jax_model):
    cfg, params = jax_model
    ev = data.load_eval(EVAL, tok, 128)
    ev = data.EvalData(ev.choices[:4], data.TokenizedData("x", ev.loss.examples[:2], 128))
    out = scoring.evaluate(cfg, params, tok, ev)
    assert out["choice_items"] == 4 and 0.0 <= out["accuracy"] <= 1.0
    assert out["loss"] > 0 and out["loss_tokens"] == sum(e.trained_tokens for e in ev.loss.examples)


def test_bad_rows_are_refused_with_their_item(tok, jax_model):
    cfg, params = jax_model
    with pytest.raises(ValueError, match=r"item 0, choice 1: 600 tokens exceed the model's "
                                         "max_position_embeddings 512"):
        scoring.score_choices(cfg, params, None, [{"prompt": [1, 2], "choices": [[3], [4] * 598]}])
    with pytest.raises(ValueError, match="item 1, choice 0: token id 936 is outside the model's "
                                         "vocab_size 936"):
        scoring.score_choices(cfg, params, None, [{"prompt": [1], "choices": [[3], [4]]},
                                                  {"prompt": [1], "choices": [[936], [4]]}])
    # "pe" + "ars": the whole string ends in the one token " pears", which the prompt's
    # tokens (" p", "e") outnumber: nothing is left for the choice
    item = {"prompt": "Ada had two pe", "choices": ["ars", " pears"], "where": "x.jsonl:4"}
    with pytest.raises(ValueError, match=r"x.jsonl:4: choice 0 \('ars'\) has no tokens of its own"):
        scoring.score_choices(cfg, params, tok, [item])


TASK = """\
task: lomo_scoring_test
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


# where lm-eval's split differs from encoding the choice alone: the prompt's trailing
# space moves to the choice; a choice that completes the prompt's last word (" t" +
# "en pears." is " ten pears.": the choice's tokens are what follows the prompt's)
SPLITS = [{"prompt": "At the market Ada had ", "choices": ["two pears.", "ten stones."],
           "answer": 0},
          {"prompt": "At the market Ada had t", "choices": ["en pears.", "wo stones."],
           "answer": 1}]


def test_agrees_with_lm_evaluation_harness_item_for_item(tok, jax_model, items, tmp_path,
                                                         monkeypatch):
    """lm-eval's ``acc`` on a local task (a JSONL dataset, no hub) with the
    shipped model: the same per-choice log-likelihoods and the same verdicts."""
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM":
                 "false", "HF_DATASETS_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(k, v)
    import lm_eval
    from lm_eval.tasks import TaskManager

    cfg, params = jax_model
    mc = items[0] + SPLITS
    records = [{k: i[k] for k in ("prompt", "choices", "answer")} for i in mc]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "task.yaml").write_text(TASK.format(data=tmp_path / "mc.jsonl"))
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={PRETRAINED},dtype=float32,device=cpu",
        tasks=["lomo_scoring_test"], log_samples=True, batch_size=8,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    samples = sorted(out["samples"]["lomo_scoring_test"], key=lambda s: s["doc_id"])
    ours = scoring.score_choices(cfg, params, tok, mc)
    assert len(samples) == len(mc)
    for s, item, got, pred in zip(samples, mc, ours.scores, ours.predictions):
        assert [a[1] for a in s["arguments"]] == item["choices"]  # as given: no separator
        np.testing.assert_allclose(got, [r[0] for r in s["filtered_resps"]], rtol=0, atol=ATOL)
        assert s["acc"] == float(pred == item["answer"])
    assert out["results"]["lomo_scoring_test"]["acc,none"] == pytest.approx(ours.accuracy)


def test_shipped_lm_eval_task_scores_the_eval_file_as_the_job_does(tok, jax_model, tmp_path,
                                                                   monkeypatch):
    """The task README tells users to run (examples/data/lm_eval/counting_choices.yaml,
    from the repository root) scores every multiple-choice record of the shipped
    eval file, and its per-item verdicts are score_choices' on the same model."""
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM":
                 "false", "HF_DATASETS_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(ROOT)  # the task's data_files path is relative to the repository root
    import lm_eval
    from lm_eval.tasks import TaskManager

    cfg, params = jax_model
    ours = scoring.score_choices(cfg, params, tok, data.load_eval(EVAL, tok, 128).choices)
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={PRETRAINED},dtype=float32,device=cpu",
        tasks=["counting_choices"], log_samples=True, batch_size=16,
        task_manager=TaskManager(include_path=str(ROOT / "examples" / "data" / "lm_eval"),
                                 include_defaults=False))
    samples = sorted(out["samples"]["counting_choices"], key=lambda s: s["doc_id"])
    assert len(samples) == len(ours.predictions) == 48
    assert [s["acc"] for s in samples] == [float(c) for c in ours.correct]
    assert out["results"]["counting_choices"]["acc,none"] == pytest.approx(ours.accuracy)
