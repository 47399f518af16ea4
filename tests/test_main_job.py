"""The main job (examples/finetune_llama.py) on its tiny configuration: it
fine-tunes the shipped pretrained checkpoint on the corpus's target slice and
lowers the held-out loss there, reports throughput, wall time and memory (with
its caveat), writes a plot and a transformers checkpoint (with the tokenizer
and generation_config.json) that transformers loads with the same logits, each
file renamed into place once whole, and fine-tunes that checkpoint again with
``--model``. A bad ``--model`` or
``--tokenizer`` is refused before anything is loaded; the shipped checkpoint
is small, loads in transformers and lomo_jax alike, and its maker script is
deterministic."""

from __future__ import annotations

import filecmp
import functools
import importlib.util
import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lomo_jax.models import convert, llama  # noqa: E402
from tests.jax.compile_cache import compiled_afresh  # noqa: E402
from tests.once_per_run import once_per_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = ROOT / "examples" / "data" / "pretrained"


@functools.lru_cache(maxsize=None)
def load_job():
    """``examples/finetune_llama.py`` as a module (loaded once)."""
    spec = importlib.util.spec_from_file_location("finetune_llama", ROOT / "examples" / "finetune_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def job():
    return load_job()


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The README's command, as a user runs it (a subprocess of the script), on the tiny
    configuration; this is also the examples suite's run of the main job."""
    def run(out):
        env = dict(os.environ, MPLBACKEND="Agg")
        proc = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "finetune_llama.py"), "--tiny",
             "--steps", "12", "--out", str(out)],
            cwd=out, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return {"stdout": proc.stdout, "stderr": proc.stderr}

    out, output = once_per_run(tmp_path_factory, "main_job_tiny", run)
    proc = subprocess.CompletedProcess([], 0, **output)
    report = json.loads((out / "finetune_report.json").read_text())
    return out, report, proc


def test_loss_goes_down_and_report_is_written(trained):
    out, report, proc = trained
    before, after = report["loss_before"], report["loss_after"]
    assert after < before - 0.05
    # the report a user reads at the end, and the progress bar on stderr
    assert f"held-out loss: {before:.3f} before -> {after:.3f} after 12 steps" in proc.stdout
    # a greedy completion of a held-out prompt (lomo_jax.models.generate) before and after
    prompt = report["sample_prompt"]
    assert prompt.endswith(" is") and report["sample_before"] != report["sample_after"]
    assert f"greedy completion of the held-out {prompt!r}" in proc.stdout
    assert f"  after:  {report['sample_after']!r}" in proc.stdout
    for name in ("fused AdaLomo", "fused LOMO", "value_and_grad + SGD", "value_and_grad + AdamW"):
        assert re.search(rf"{re.escape(name)}\s+[\d.]+ MiB total", proc.stdout), name
    assert "12/12" in proc.stderr and "loss=" in proc.stderr and "tok_s=" in proc.stderr
    assert len(report["train_losses"]) == 12
    mem = report["memory_bytes"]
    assert set(mem) == {"fused AdaLomo", "fused LOMO", "value_and_grad + SGD",
                        "value_and_grad + AdamW"}
    # AdamW adds two moments to what every other step holds. (At this toy size the
    # step is activations - ~1.5 MiB of temporaries against 0.4 MiB of parameters -
    # so the fused step's saving over value_and_grad + SGD, one gradient at most, is
    # inside XLA:CPU's scheduling noise: within 3% either way. The fused step's
    # bounds are asserted at real widths in tests/jax/test_fused_memory.py.)
    for name in ("fused AdaLomo", "fused LOMO", "value_and_grad + SGD"):
        assert mem[name] < mem["value_and_grad + AdamW"], name
    assert (out / "loss_and_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_fine_tunes_the_shipped_checkpoint(job, trained):
    """The default is the shipped checkpoint, fine-tuned on the target slice; the output
    keeps its tokenizer, token ids and generation_config.json."""
    out, report, proc = trained
    assert report["args"]["model"] == str(PRETRAINED) and report["args"]["tokenizer"] is None
    assert f"model: {PRETRAINED}" in proc.stdout

    def read(path):  # as written by this transformers (its version aside)
        saved = json.loads(path.read_text())
        return {k: v for k, v in saved.items() if k != "transformers_version"}

    assert read(out / "generation_config.json") == read(PRETRAINED / "generation_config.json")
    assert filecmp.cmp(out / "tokenizer.json", PRETRAINED / "tokenizer.json", shallow=False)
    config, source = read(out / "config.json"), read(PRETRAINED / "config.json")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[name] == source[name], name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staging left


def test_results_are_renamed_into_place(job, tmp_path):
    """The tokenizer, plot and report are written aside and renamed into OUT: a run that
    dies while writing them leaves the previous run's files whole."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(PRETRAINED))
    draw = lambda path: path.write_bytes(b"\x89PNG first")  # noqa: E731
    png, report = job.write_results(tmp_path, tokenizer, {"run": 1}, draw)
    assert (png.read_bytes(), json.loads(report.read_text())) == (b"\x89PNG first", {"run": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {"tokenizer.json", "loss_and_memory.png", "finetune_report.json"} <= set(before)

    def dies(path):
        path.write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt  # e.g. Ctrl-C while matplotlib writes

    with pytest.raises(KeyboardInterrupt):
        job.write_results(tmp_path, tokenizer, {"run": 2}, dies)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_report_has_throughput_wall_time_and_memory_caveat(job, trained):
    out, report, proc = trained
    tokens = 12 * 4 * 32  # steps x batch x sequence (--tiny)
    assert report["tokens"] == tokens
    assert report["tokens_per_s"] == pytest.approx(tokens / report["train_seconds"])
    assert 0 < report["train_seconds"] < report["wall_seconds"]
    assert report["compile_seconds"] > 0 and report["skipped_steps"] == 0
    assert f"throughput: {report['tokens_per_s']:,.0f} tokens/s" in proc.stdout
    assert job.CAVEAT in proc.stdout and "benchmarks/memory.py" in job.CAVEAT
    assert "PyTorch was not found" not in proc.stderr


def test_target_slice_is_unseen(job):
    """The checkpoint is pretrained on stories and notes only; the job fine-tunes on the
    arithmetic sentences and measures on ones it never trains on."""
    parts = {k: v.splitlines() for k, v in job.corpus_parts().items()}
    assert len(parts["held_out"]) > 50 and len(parts["target"]) > 5 * len(parts["held_out"])
    assert all(job.TARGET_LINE.fullmatch(s) for s in parts["target"] + parts["held_out"])
    assert not any(job.TARGET_LINE.fullmatch(s) for s in parts["pretrain"])
    assert not set(parts["held_out"]) & set(parts["target"] + parts["pretrain"])
    assert sum(map(len, parts.values())) == len(job.CORPUS.read_text().splitlines())


def test_torch_notice_is_filtered_out(job):
    """transformers says "PyTorch was not found" when torch is absent (the torch-free
    install); the job drops that notice only."""
    seen, handler = [], logging.Handler()
    handler.emit = seen.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        logger.warning("PyTorch was not found. Models won't be available and only tokenizers, "
                       "configuration and file/data utilities can be used.")
        logger.warning("some other transformers warning")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["some other transformers warning"]


def refused(job, capsys, argv):
    """parse_args (main's first step) refuses ``argv``; returns its error message."""
    with pytest.raises(SystemExit) as e:
        job.parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_model_dir_is_checked_before_anything_is_loaded(job, tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert f"--model {missing}: no such directory" in refused(job, capsys, ["--model", str(missing)])
    with pytest.raises(SystemExit):  # main too, before it makes the output directory
        job.main(["--model", str(missing), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "needs config.json and *.safetensors" in refused(job, capsys, ["--model", str(empty)])


def test_model_dir_without_tokenizer_needs_one(job, tmp_path, capsys):
    bare = tmp_path / "bare"  # the shipped checkpoint without its tokenizer
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).symlink_to(PRETRAINED / f)
    err = refused(job, capsys, ["--model", str(bare)])
    assert f"--model {bare} has no tokenizer" in err and "--tokenizer" in err
    err = refused(job, capsys, ["--model", str(bare), "--tokenizer", str(tmp_path)])
    assert f"--tokenizer {tmp_path}: no tokenizer.json" in err
    args = job.parse_args(["--model", str(bare), "--tokenizer", str(PRETRAINED)])
    tokenizer = job.load_tokenizer(args)
    assert tokenizer.backend_tokenizer.to_str() == \
        transformers.AutoTokenizer.from_pretrained(str(PRETRAINED)).backend_tokenizer.to_str()


def test_shipped_checkpoint_is_small_and_loads_alike(job):
    """examples/data/pretrained: a few MB of bf16 safetensors that transformers'
    LlamaForCausalLM and lomo_jax load with the same logits."""
    files = {p.name: p.stat().st_size for p in PRETRAINED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(files)
    assert sum(files.values()) <= 6 * 1024**2, files
    hf = transformers.LlamaForCausalLM.from_pretrained(str(PRETRAINED)).float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(PRETRAINED))
    assert len(tok) <= hf.config.vocab_size
    ids = tok("Rain fell softly all morning when Ada went to the harbour.", return_tensors="np")["input_ids"]
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    cfg, params = convert.load_pretrained(str(PRETRAINED), dtype=jnp.float32)
    assert {x.dtype for x in jax.tree.leaves(convert.load_pretrained(str(PRETRAINED))[1])} == {
        jnp.dtype(jnp.bfloat16)}
    ours = np.asarray(llama.llama_logits(cfg, params, {"input_ids": jnp.asarray(ids)}))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    # pretrained on the stories: a story sentence costs far less than a random model's ln V
    logp = torch.log_softmax(torch.from_numpy(ref[0, :-1]), -1)
    nll = -logp[torch.arange(ids.shape[1] - 1), torch.from_numpy(ids[0, 1:])].mean().item()
    assert nll < 0.3 * math.log(hf.config.vocab_size), nll


def test_checkpoint_loads_in_transformers_with_same_logits(trained):
    out, _, _ = trained
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok("Ada walked to the harbour and met Basil.", return_tensors="np")["input_ids"]
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    cfg, params = convert.load_pretrained(str(out))
    ours = np.asarray(llama.llama_logits(cfg, params, {"input_ids": jnp.asarray(ids)}))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


# (the lomo case: tests/test_main_job_clip.py's run, which starts from the same checkpoint)
@pytest.mark.parametrize("extra", [["--optimizer", "adamw", "--dtype", "bf16"]],
                         ids=["adamw_bf16"])
def test_model_dir_is_fine_tuned_again(job, trained, tmp_path, extra):
    out, report, _ = trained
    after = report["loss_after"]
    before2, after2 = job.main(["--tiny", "--steps", "3", "--model", str(out),
                                "--out", str(tmp_path), "--no-memory-report", *extra])
    # it starts from the trained checkpoint (with its tokenizer), not from scratch
    assert abs(before2 - after) < 0.05 * after + (0.02 if "bf16" in extra else 1e-4)
    assert np.isfinite(after2)
    assert (tmp_path / "model.safetensors").exists()


def test_checkpoint_maker_is_deterministic(job, tmp_path):
    """examples/data/make_pretrained.py writes the same bytes twice (tiny model, 2 steps),
    and its tokenizer trainer reproduces the shipped tokenizer."""
    spec = importlib.util.spec_from_file_location(
        "make_pretrained", ROOT / "examples" / "data" / "make_pretrained.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    with compiled_afresh():  # not loaded from the session's compilation cache
        for run in ("a", "b"):
            maker.make(tmp_path / run, steps=2, size="tiny")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert "model.safetensors" in names and "generation_config.json" in names
    for name in names:
        assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False), name
    tokenizer = job.train_tokenizer(job.corpus_parts()["pretrain"], maker.SIZES["default"][1])
    shipped = transformers.AutoTokenizer.from_pretrained(str(PRETRAINED))
    assert tokenizer.backend_tokenizer.to_str() == shipped.backend_tokenizer.to_str()


def flat(params):
    return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(params)])


def test_fp16_run_follows_fp32(job, trained, tmp_path, capsys):
    """fp16 (the fused step's dynamic loss scaling, stochastic rounding) with an explicit
    --lr and two micro-batches, from the trained checkpoint: its update of the weights is
    the fp32 run's (same weights, same batches) up to fp16 rounding; the progress bar
    reports the loss and tokens/s, the report the micro-batches."""
    out, _, _ = trained
    steps = 4
    common = ["--tiny", "--steps", str(steps), "--lr", "1e-2", "--microbatches", "2",
              "--model", str(out), "--no-memory-report"]
    before, after = job.main([*common, "--dtype", "fp16", "--out", str(tmp_path / "fp16")])
    captured = capsys.readouterr()
    assert np.isfinite(before) and np.isfinite(after)
    assert "4/4" in captured.err and "loss=" in captured.err and "tok_s=" in captured.err
    assert "fp16 (stochastic rounding)" in captured.out and "CPU" in captured.out.upper()
    assert "batch 4 x 32 in 2 micro-batches of 2" in captured.out, captured.out
    report = json.loads((tmp_path / "fp16" / "finetune_report.json").read_text())
    assert report["args"]["lr"] == 1e-2 and report["args"]["dtype"] == "fp16"
    assert report["args"]["rounding"] == "stochastic"  # the default for bf16/fp16
    assert report["args"]["device"] == "cpu" and report["args"]["microbatches"] == 2
    assert len(report["train_losses"]) == steps
    _, p16 = convert.load_pretrained(str(tmp_path / "fp16"))
    assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.float16)}

    before32, _ = job.main([*common, "--dtype", "fp32", "--out", str(tmp_path / "fp32")])
    _, p32 = convert.load_pretrained(str(tmp_path / "fp32"))
    _, start16 = convert.load_pretrained(str(out), dtype=jnp.float16, config_dtype=jnp.float16)
    _, start32 = convert.load_pretrained(str(out))
    # the same weights' held-out loss: fp16's relative rounding 2^-11 of a loss near 5
    assert abs(before - before32) < 5e-3, (before, before32)
    s16 = flat(start16)
    update16, update32 = flat(p16) - s16, flat(p32) - flat(start32)
    # Stochastic rounding adds, per weight and step, a zero-mean error whose standard
    # deviation is at most half the weight's fp16 spacing, so over `steps` steps (the
    # first, at lr 0, adds none) its norm is at most sqrt(steps) * ||spacing|| / 2 (it
    # concentrates: ~1e5 weights; measured 0.76 ||spacing||, and the fp16 forward's
    # effect on AdaLomo's normalised update is small). A skipped or halved update is off
    # by a third of the update or more (~6 ||spacing||), a rounding biased toward zero by
    # about half a spacing per step (1.5 ||spacing||).
    noise = np.sqrt(steps) * np.linalg.norm(np.spacing(s16.astype(np.float16)).astype(np.float32)) / 2
    err = np.linalg.norm(update16 - update32)
    assert err <= noise, (err / noise, np.linalg.norm(update32) / noise)
    assert noise < 0.2 * np.linalg.norm(update32)  # the check is meaningful at this lr


def test_rounding_defaults(job):
    assert job.parse_args([]).rounding == "nearest"  # fp32: nothing to round
    assert job.parse_args(["--dtype", "bf16"]).rounding == "stochastic"
    assert job.parse_args(["--dtype", "bf16", "--rounding", "nearest"]).rounding == "nearest"
    assert job.parse_args(["--dtype", "bf16", "--optimizer", "adamw"]).rounding == "nearest"


def test_bad_arguments_are_refused(job):
    with pytest.raises(SystemExit):
        job.parse_args(["--optimizer", "adamw", "--dtype", "bf16", "--rounding", "stochastic"])
    with pytest.raises(SystemExit):
        job.parse_args(["--optimizer", "adamw", "--dtype", "fp16"])
    with pytest.raises(SystemExit):
        job.parse_args(["--lr", "-1"])
    with pytest.raises(SystemExit):
        job.parse_args(["--microbatches", "3"])  # does not divide --batch-size 8
    with pytest.raises(SystemExit):
        job.parse_args(["--optimizer", "adamw", "--microbatches", "2"])


# ------------------------------------------- --data / --eval-data (issue 29) -----

FINETUNE = ROOT / "examples" / "data" / "finetune.jsonl"
EVAL = ROOT / "examples" / "data" / "eval.jsonl"


# A tenth of an epoch of packed rows (6 steps), scored on the eval file before and after,
# in bf16, checkpointed every 3 steps: tests/test_main_job_resume.py kills and resumes a run
# with these flags, and compares it with this one.
JSONL_FLAGS = ["--tiny", "--data", str(FINETUNE), "--eval-data", str(EVAL), "--epochs", "0.1",
               "--dtype", "bf16", "--checkpoint-every", "3", "--no-memory-report"]


@pytest.fixture(scope="session")
def jsonl_run(tmp_path_factory):
    """``(out, report)`` of one tiny in-process run on the shipped JSONL files (``--resume``
    with no checkpoint there: it starts fresh)."""
    out, _ = once_per_run(tmp_path_factory, "main_job_jsonl", lambda out: load_job().main(
        [*JSONL_FLAGS, "--resume", "--out", str(out)]))
    return out, json.loads((out / "finetune_report.json").read_text())


def test_jsonl_run_reports_eval_loss_and_accuracy(jsonl_run):
    out, report = jsonl_run
    before, after = report["eval_loss_before"], report["eval_loss_after"]
    assert math.isfinite(before) and math.isfinite(after) and after < before - 0.5
    for key in ("choice_accuracy_before", "choice_accuracy_after"):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["truncated_examples"] == 0 and 0.3 < report["packing_efficiency"] <= 1.0
    assert report["args"]["clip_grad_norm"] == 0.0  # adalomo: no clipping by default
    assert (out / "loss_and_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_jsonl_epochs_and_trained_tokens_follow_the_packing(job, jsonl_run):
    """--epochs 0.1 runs ceil(0.1 * rows / batch) steps (rows from data.packing_report), and
    trained_tokens counts the loss tokens of exactly the packed batches those steps took."""
    from lomo_jax import data

    _, report = jsonl_run
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(PRETRAINED))
    tokenized = data.load(FINETUNE, tokenizer, 32)
    packing = data.packing_report(tokenized, 4, seed=0)
    steps = math.ceil(0.1 * packing["rows"] / 4)
    assert report["args"]["steps"] == steps == len(report["train_losses"])
    assert report["packing"] == packing
    it = data.packed_batches(tokenized, 4, seed=0)
    expected = sum(int(np.sum(next(it)["labels"][:, 1:] != data.IGNORE_INDEX))
                   for _ in range(steps))
    assert report["trained_tokens"] == expected > 0


def test_default_run_has_no_eval_figures(trained):
    """Without --eval-data the new fields are null; every token after a row's first trains."""
    _, report, _ = trained
    for key in ("eval_loss_before", "eval_loss_after", "choice_accuracy_before",
                "choice_accuracy_after", "packing_efficiency"):
        assert report[key] is None, key
    assert report["trained_tokens"] == 12 * 4 * 31 and report["truncated_examples"] == 0


def test_bad_data_record_stops_the_job_with_file_and_line(job, tmp_path):
    """A bad record stops main before training or writing anything: exit status 1 with
    lomo_jax.data's FILE:LINE message (what Python prints on stderr)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "Ada had two pears."}\n{"prompt": "Ada had"}\n')
    with pytest.raises(SystemExit) as e:
        job.main(["--tiny", "--data", str(bad), "--out", str(tmp_path / "out")])
    assert isinstance(e.value.code, str) and e.value.code.startswith(f"error: {bad}:2: ")
    assert "'completion'" in e.value.code
    assert not (tmp_path / "out").exists()


def test_data_arguments_are_checked(job, tmp_path, capsys):
    assert job.parse_args([]).clip_grad_norm == 0.0  # AdaLomo's authors: no clipping
    # LOMO clips adaptively by default (one pass): no global threshold applies
    lomo = job.parse_args(["--optimizer", "lomo"])
    assert (lomo.clip, lomo.clip_grad_norm) == ("adaptive", 0.0)
    assert job.parse_args(["--clip-grad-norm", "0.5"]).clip_grad_norm == 0.5
    assert "--clip-grad-norm must be >= 0" in refused(job, capsys, ["--clip-grad-norm", "-1"])
    missing = tmp_path / "missing.jsonl"
    assert f"--data {missing}: no such file" in refused(job, capsys, ["--data", str(missing)])
    assert f"--eval-data {missing}: no such file" in refused(
        job, capsys, ["--eval-data", str(missing)])
    assert "without --data use --steps" in refused(job, capsys, ["--epochs", "1"])
    assert "not both" in refused(job, capsys, ["--data", str(FINETUNE), "--epochs", "1",
                                               "--steps", "3"])
    assert "--epochs must be positive" in refused(job, capsys, ["--data", str(FINETUNE),
                                                                "--epochs", "0"])
    assert "--warmup-steps 5 must be fewer than the 5" in refused(
        job, capsys, ["--steps", "5", "--warmup-steps", "5"])


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_warm_up_then_follow_kind(job, kind):
    lr, steps = 0.1, 20
    s = job.make_schedule(kind, lr, steps, warmup=4)
    assert float(s(0)) == 0.0 and float(s(2)) == pytest.approx(lr / 2)
    assert float(s(4)) == pytest.approx(lr)
    end = {"constant": lr}.get(kind, lr / 10)
    assert float(s(steps)) == pytest.approx(end, rel=1e-5)
    assert float(job.make_schedule(kind, lr, steps, warmup=0)(0)) == pytest.approx(lr)
    assert float(job.make_schedule(kind, lr, steps)(2)) == pytest.approx(lr)  # warmup 2
