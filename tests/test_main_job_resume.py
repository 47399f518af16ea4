"""The main job's ``--checkpoint-every`` / ``--resume`` (issue 29): a tiny run killed with a
real SIGKILL between two checkpoints and resumed ends with the weights of an uninterrupted
run, byte for byte (``model.safetensors``), in bf16 on JSONL data: the stochastic rounding's
rng key and the packed iterator's position must both be restored (the shipped corpus's batch
position is restored by the resumed runs of tests/test_main_job_clip.py and
tests/test_main_job_lora.py); the report's losses cover the whole run and
``resumed_from_step`` says where it picked up. A resume with a flag that changes the math
is refused naming the flag. The uninterrupted run is tests/test_main_job.py's JSONL run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("orbax.checkpoint")
pytest.importorskip("transformers")

from tests.test_main_job import JSONL_FLAGS, job, jsonl_run  # noqa: E402,F401  (fixtures)
from tests.once_per_run import once_per_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune_llama.py"
# JSONL_FLAGS: --epochs 0.1 (6 steps) and --checkpoint-every 3; killed after step 4, the
# checkpoint of step 3 is the latest
STEPS, EVERY, KILL_AFTER = 6, 3, 4


def flags(out):
    return [*JSONL_FLAGS, "--out", str(out)]


def report(out):
    return json.loads((Path(out) / "finetune_report.json").read_text())


def killed_run(out):
    """The job in a subprocess that SIGKILLs itself after step ``KILL_AFTER`` (the job's
    ``LOMO_EXAMPLES_KILL_AFTER_STEP`` hook): no export, only its checkpoints are left."""
    env = dict(os.environ, MPLBACKEND="Agg", LOMO_EXAMPLES_KILL_AFTER_STEP=str(KILL_AFTER))
    proc = subprocess.run([sys.executable, str(SCRIPT), *flags(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, f"rc {proc.returncode}\n{proc.stderr[-3000:]}"
    assert not (out / "model.safetensors").exists()
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def runs(job, jsonl_run, tmp_path_factory):
    """``(whole, resumed)``: the out dirs of the uninterrupted run and of a run killed, then
    resumed with the same flags."""
    def kill_and_resume(out):
        assert killed_run(out) == [EVERY]
        job.main(flags(out) + ["--resume"])

    resumed, _ = once_per_run(tmp_path_factory, "main_job_jsonl_resumed", kill_and_resume)
    return jsonl_run[0], resumed


def test_killed_and_resumed_run_ends_bit_identical(runs):
    whole, resumed = runs
    a, b = (Path(d, "model.safetensors").read_bytes() for d in (whole, resumed))
    assert a == b, "the resumed run's weights differ from the uninterrupted run's"
    assert report(whole)["resumed_from_step"] is None
    assert report(resumed)["resumed_from_step"] == EVERY
    for key in ("train_losses", "tokens", "trained_tokens", "skipped_steps"):
        assert report(resumed)[key] == report(whole)[key], key
    assert len(report(resumed)["train_losses"]) == STEPS
    # the resumed run went on checkpointing; the 2 latest are kept
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["3", "6"]


def test_resume_with_a_changed_flag_is_refused_naming_it(job, runs, tmp_path):
    _, resumed = runs
    out = tmp_path / "out"
    shutil.copytree(resumed / "checkpoints", out / "checkpoints")
    with pytest.raises(SystemExit) as e:
        job.main(flags(out) + ["--resume", "--lr", "0.01"])
    assert "--lr was 0.03 in the checkpointed run, now 0.01" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        job.main(flags(out) + ["--resume", "--seed", "1"])
    assert "--seed was 0 in the checkpointed run, now 1" in str(e.value.code)
    with pytest.raises(SystemExit) as e:  # a fresh run would collide with the checkpoints
        job.main(flags(out))
    assert "has checkpoints (latest: step 6); pass --resume" in str(e.value.code)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["3", "6"]
    assert not (out / "model.safetensors").exists()


def test_checkpoint_every_must_not_be_negative(job, capsys):
    with pytest.raises(SystemExit):
        job.parse_args(["--checkpoint-every", "-1"])
    assert "--checkpoint-every must be >= 0" in capsys.readouterr().err
