"""The main job (examples/finetune_llama.py) on its tiny configuration: it
learns, reports memory, writes a plot and a transformers checkpoint that
transformers loads with the same logits, and fine-tunes that checkpoint again
with ``--model``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from lomo_jax.models import convert, llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job():
    spec = importlib.util.spec_from_file_location("finetune_llama", ROOT / "examples" / "finetune_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(job, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    before, after = job.main(["--tiny", "--steps", "12", "--out", str(out)])
    return out, before, after


def test_loss_goes_down_and_report_is_written(trained):
    out, before, after = trained
    assert after < before - 0.05
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["loss_before"] == before and report["loss_after"] == after
    assert len(report["train_losses"]) == 12
    mem = report["memory_bytes"]
    assert set(mem) == {"fused AdaLomo", "fused LOMO", "value_and_grad + SGD",
                        "value_and_grad + AdamW"}
    # the fused steps hold no whole-model gradient and AdamW adds two moments
    assert mem["fused AdaLomo"] < mem["value_and_grad + SGD"] < mem["value_and_grad + AdamW"]
    assert (out / "loss_and_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


@pytest.mark.parametrize("extra", [["--optimizer", "lomo"],
                                   ["--optimizer", "adamw", "--dtype", "bf16"]],
                         ids=["lomo", "adamw_bf16"])
def test_model_dir_is_fine_tuned_again(job, trained, tmp_path, extra):
    out, _, after = trained
    before2, after2 = job.main(["--tiny", "--steps", "3", "--model", str(out),
                                "--out", str(tmp_path), "--no-memory-report", *extra])
    # it starts from the trained checkpoint (with its tokenizer), not from scratch
    assert abs(before2 - after) < 0.05 * after + (0.02 if "bf16" in extra else 1e-4)
    assert np.isfinite(after2)
    assert (tmp_path / "model.safetensors").exists()


def test_bad_arguments_are_refused(job):
    with pytest.raises(SystemExit):
        job.parse_args(["--optimizer", "adamw", "--dtype", "fp16"])
    with pytest.raises(SystemExit):
        job.parse_args(["--lr", "-1"])
