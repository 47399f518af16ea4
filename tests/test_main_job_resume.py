"""The main job's ``--checkpoint-every`` / ``--resume`` (issue 29): a tiny run killed with a
real SIGKILL between two checkpoints and resumed ends with the weights of an uninterrupted
run, byte for byte (``model.safetensors``), on the shipped corpus in bf16 (stochastic
rounding: the rng key must be restored too) and on JSONL data (the packed iterator's
position); the report's losses cover the whole run and ``resumed_from_step`` says where it
picked up. A resume with a flag that changes the math is refused naming the flag."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("orbax.checkpoint")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune_llama.py"
FINETUNE = ROOT / "examples" / "data" / "finetune.jsonl"
STEPS, EVERY, KILL_AFTER = 4, 2, 3  # killed after step 3: the checkpoint of step 2 is the latest
RUNS = {"corpus_bf16": ["--dtype", "bf16"], "jsonl": ["--data", str(FINETUNE)]}


@pytest.fixture(scope="module")
def job():
    spec = importlib.util.spec_from_file_location("finetune_llama_resume", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flags(kind, out):
    return ["--tiny", "--steps", str(STEPS), "--checkpoint-every", str(EVERY),
            "--no-memory-report", *RUNS[kind], "--out", str(out)]


def report(out):
    return json.loads((Path(out) / "finetune_report.json").read_text())


def killed_run(kind, out):
    """The job in a subprocess that SIGKILLs itself after step ``KILL_AFTER`` (the job's
    ``LOMO_EXAMPLES_KILL_AFTER_STEP`` hook): no export, only its checkpoints are left."""
    env = dict(os.environ, MPLBACKEND="Agg", LOMO_EXAMPLES_KILL_AFTER_STEP=str(KILL_AFTER))
    proc = subprocess.run([sys.executable, str(SCRIPT), *flags(kind, out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, f"rc {proc.returncode}\n{proc.stderr[-3000:]}"
    assert not (out / "model.safetensors").exists()
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module", params=list(RUNS))
def runs(job, request, tmp_path_factory):
    """``(kind, whole, resumed)``: the out dirs of an uninterrupted run (with ``--resume`` and
    no checkpoint: it starts fresh) and of a run killed, then resumed with the same flags."""
    kind = request.param
    whole, resumed = (tmp_path_factory.mktemp(f"{kind}_{n}") for n in ("whole", "resumed"))
    job.main(flags(kind, whole) + ["--resume"])
    assert killed_run(kind, resumed) == [EVERY]
    job.main(flags(kind, resumed) + ["--resume"])
    return kind, whole, resumed


def test_killed_and_resumed_run_ends_bit_identical(runs):
    kind, whole, resumed = runs
    a, b = (Path(d, "model.safetensors").read_bytes() for d in (whole, resumed))
    assert a == b, f"{kind}: the resumed run's weights differ from the uninterrupted run's"
    assert report(whole)["resumed_from_step"] is None
    assert report(resumed)["resumed_from_step"] == EVERY
    for key in ("train_losses", "tokens", "trained_tokens", "skipped_steps"):
        assert report(resumed)[key] == report(whole)[key], key
    assert len(report(resumed)["train_losses"]) == STEPS
    # the resumed run went on checkpointing; the 2 latest are kept
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["2", "4"]


def test_resume_with_a_changed_flag_is_refused_naming_it(job, runs, tmp_path):
    kind, _, resumed = runs
    out = tmp_path / "out"
    shutil.copytree(resumed / "checkpoints", out / "checkpoints")
    with pytest.raises(SystemExit) as e:
        job.main(flags(kind, out) + ["--resume", "--lr", "0.01"])
    assert "--lr was 0.03 in the checkpointed run, now 0.01" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        job.main(flags(kind, out) + ["--resume", "--seed", "1"])
    assert "--seed was 0 in the checkpointed run, now 1" in str(e.value.code)
    with pytest.raises(SystemExit) as e:  # a fresh run would collide with the checkpoints
        job.main(flags(kind, out))
    assert "has checkpoints (latest: step 4); pass --resume" in str(e.value.code)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4"]
    assert not (out / "model.safetensors").exists()


def test_checkpoint_every_must_not_be_negative(job, capsys):
    with pytest.raises(SystemExit):
        job.parse_args(["--checkpoint-every", "-1"])
    assert "--checkpoint-every must be >= 0" in capsys.readouterr().err
