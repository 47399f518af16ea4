"""Every example runs, on its tiny configuration, so none can rot; the PyTorch
example runs as a script and reads the JAX job's JSONL forms with the same token ids
and labels, without importing JAX, and saves a model that loads with its trained logits."""

import importlib.util
import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "examples" / "data" / "finetune.jsonl"
PRETRAINED = ROOT / "examples" / "data" / "pretrained"
# The main job, finetune_llama.py, runs as a user runs it in tests/test_main_job.py;
# torch_finetune.py runs in a fresh process of its own below (it must not import JAX):
# as a script (the plain loop on text), then --trainer on JSONL
# (test_torch_example_runs_..., on text with --trainer: tests/torch/test_trainer.py).
# The JAX examples run as scripts in this process (their imports are the session's).
TORCH_EXAMPLE = "torch_finetune.py"
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py")
                  if p.name not in ("finetune_llama.py", TORCH_EXAMPLE))


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_tiny(name, tmp_path, monkeypatch):
    """``LOMO_EXAMPLES_TINY=1 python examples/NAME`` from ``tmp_path``: the file run as
    ``__main__`` with the script's directory first on ``sys.path``, as Python runs it."""
    script = ROOT / "examples" / name
    monkeypatch.setenv("LOMO_EXAMPLES_TINY", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script)])
    monkeypatch.syspath_prepend(str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:  # what `python examples/NAME` would exit with
        assert e.code in (None, 0), f"{name} failed: {e.code}"


def tiny_jsonl(tmp_path):
    """40 records of the shipped data, a few as {"text"} (both forms, padding needed)."""
    lines = [json.loads(s) for s in FINETUNE.read_text().splitlines()[:40]]
    for r in lines[::7]:
        r["text"] = r.pop("prompt") + r.pop("completion")
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


# Runs the example as `python examples/torch_finetune.py` does (tiny: the plain loop on the
# text corpus), then its run() on JSONL, and saves what that trained model gives for PROBE;
# then reports whether any jax module was ever imported.
WRAPPER = """
import os, runpy, sys, torch
sys.path.insert(0, {examples!r})
os.environ["LOMO_EXAMPLES_TINY"] = "1"
sys.argv = [{script!r}]
runpy.run_path({script!r}, run_name="__main__")
print("JSONL_RUN")
import torch_finetune
result = torch_finetune.run({argv!r})
with torch.no_grad():  # (the tiny run computes on one thread)
    logits = result["model"].eval()(torch.tensor([{probe!r}])).logits
torch.save({{"logits": logits, "weights": result["model"].state_dict()}}, {logits!r})
print("JAX_MODULES", sorted(m for m in sys.modules if m == "jax" or m.startswith(("jax.", "jaxlib"))))
"""
PROBE = [5, 17, 42, 99, 3, 250, 7]


def test_torch_example_runs_tiny_imports_no_jax_and_saves_a_loadable_model(tmp_path):
    """One fresh process (torch and transformers imported once): the example as a script
    (the plain loop on the text corpus, saved in ``runs/torch_finetune``), then with
    ``--trainer`` on JSONL; neither imports JAX."""
    import torch
    import transformers

    out, logits = tmp_path / "out", tmp_path / "logits.pt"
    argv = ["--tiny", "--trainer", "--data", str(tiny_jsonl(tmp_path)), "--out", str(out)]
    code = WRAPPER.format(examples=str(ROOT / "examples"), argv=argv, probe=PROBE,
                          logits=str(logits), script=str(ROOT / "examples" / TORCH_EXAMPLE))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "JAX_MODULES []" in proc.stdout
    script_run, jsonl_run = proc.stdout.split("JSONL_RUN\n")
    assert "from " + str(ROOT / "examples" / "data" / "corpus.txt") in script_run
    assert "held-out loss" in script_run
    assert (tmp_path / "runs" / "torch_finetune" / "config.json").is_file()
    assert "from " + str(tmp_path / "tiny.jsonl") in jsonl_run and "nearest rounding" in jsonl_run
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    saved = torch.load(logits)
    trained = saved["logits"]
    assert all(torch.equal(v, saved["weights"][k]) for k, v in loaded.state_dict().items())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same summation order as the run's
    try:
        with torch.no_grad():
            again = loaded(torch.tensor([PROBE])).logits
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(again, trained)
    original = transformers.AutoModelForCausalLM.from_pretrained(PRETRAINED).float().eval()
    with torch.no_grad():
        assert not torch.allclose(original(torch.tensor([PROBE])).logits, trained)  # it trained
    assert transformers.AutoTokenizer.from_pretrained(out)("Ada had")["input_ids"]


def test_both_frameworks_get_the_same_token_ids_and_labels(tmp_path):
    """The torch example's batches of a JSONL file hold, example for example, the ids
    and labels the JAX job's packed rows hold (segment by segment)."""
    import transformers

    from lomo_jax import data

    example = load_example("torch_finetune")
    tok = transformers.AutoTokenizer.from_pretrained(PRETRAINED)
    path = tiny_jsonl(tmp_path)
    train, held_out = example.jsonl_features(path, tok, 32, 936)
    batch = example.collate(train + held_out, tok.eos_token_id)
    torch_side = sorted((tuple(i[m].tolist()), tuple(lab[m].tolist())) for i, lab, m in zip(
        batch["input_ids"], batch["labels"], batch["attention_mask"].bool()))
    tokenized = data.load(path, tok, 32)
    rows = data.packing_report(tokenized)["rows"]
    packed = data.packed_batches(tokenized, rows)
    b = next(packed)
    jax_side = sorted((tuple(i[s == k].tolist()), tuple(lab[s == k].tolist()))
                      for i, lab, s in zip(b["input_ids"], b["labels"], b["segment_ids"])
                      for k in set(s.tolist()) - {0})
    assert len(torch_side) == 40 and torch_side == jax_side
    masked = [lab for _, lab in torch_side if data.IGNORE_INDEX in lab[1:]]
    assert len(masked) > 30  # the prompt/completion records: prompts carry -100
    assert (np.asarray(batch["labels"])[~np.asarray(batch["attention_mask"], bool)]
            == data.IGNORE_INDEX).all()  # padding has no loss


def test_torch_and_jax_jobs_share_the_rounding_flag_and_default(capsys):
    import torch

    example = load_example("torch_finetune")
    job = load_example("finetune_llama")
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")):
        expected = "nearest" if name == "fp32" else "stochastic"
        assert example.pick_rounding(None, dtype) == expected
        assert job.parse_args(["--dtype", name]).rounding == expected
        assert example.pick_rounding("nearest", dtype) == "nearest"
    for module in (example, job):
        with pytest.raises(SystemExit):
            module.parse_args(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--rounding {stochastic,nearest}" in text and "stochastic for bf16/fp16" in text


def test_the_main_jobs_held_out_loss_says_whose_it_is_with_data():
    """With --data the printed held-out loss is the shipped corpus's, and says so."""
    job = load_example("finetune_llama")
    assert job.held_out_label(job.parse_args([])) == "held-out loss"
    label = job.held_out_label(job.parse_args(["--data", str(FINETUNE)]))
    assert "corpus" in label and "not --data" in label
