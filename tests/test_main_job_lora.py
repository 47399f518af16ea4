"""The main job's ``--lora RANK`` (issue 30): its flags' defaults, contradictory ones refused
naming the flag, ``--lora-only`` freezing the base while LoRA + LOMO trains both, the memory
table's rows, and one tiny LoRA + LOMO run: the report records the mode, rank, alpha and
targets, the run writes the merged model (the trained model's loss) and the adapter (PEFT's
files), a resume from its checkpoint ends byte for byte where the uninterrupted run did,
and a resume with another LoRA mode, rank or targets is refused."""

from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lomo_jax.models import llama, lora
from tests.jax.tiny_llama import TINY
from tests.once_per_run import once_per_run
from tests.test_main_job import refused
from tests.test_main_job_resume import job, report  # noqa: F401  (job: a fixture)


def parsed(job, *argv):  # noqa: F811
    args = job.parse_args(["--lora", "4", *argv])
    return args.lora_alpha, args.lora_targets, args.lora_lr, job.run_mode(args)


def test_lora_flags_defaults(job):  # noqa: F811
    assert parsed(job) == (8.0, ["q_proj", "v_proj"], job.DEFAULT_LORA_LR, "lora+lomo")
    assert parsed(job, "--lora-only")[3] == "lora"
    assert parsed(job, "--lora-targets", "v_proj, down_proj", "--lora-alpha", "3",
                  "--lora-lr", "1e-4") == (3.0, ["down_proj", "v_proj"], 1e-4, "lora+lomo")
    assert parsed(job, "--lora-targets", "all")[1] == sorted(lora.LORA_TARGETS)
    plain = job.parse_args([])
    assert (plain.lora, plain.lora_alpha, plain.lora_targets, plain.lora_only,
            plain.lora_lr, job.run_mode(plain)) == (None, None, None, False, None, "lomo")
    assert job.run_mode(job.parse_args(["--optimizer", "adamw"])) == "adamw"


@pytest.mark.parametrize("argv, message", [
    (["--lora-only"], "--lora-only is a LoRA flag: pass --lora RANK with it"),
    (["--lora-targets", "q_proj"], "--lora-targets is a LoRA flag: pass --lora RANK"),
    (["--lora-alpha", "8"], "--lora-alpha is a LoRA flag: pass --lora RANK"),
    (["--lora-lr", "1e-3"], "--lora-lr is a LoRA flag: pass --lora RANK"),
    (["--lora", "4", "--lora-targets", "q_proj,qkv_proj"],
     "--lora-targets q_proj,qkv_proj: unknown ['qkv_proj']"),
    (["--lora", "4", "--lora-targets", ""], "--lora-targets : unknown ['']"),
    (["--lora", "0"], "--lora RANK must be >= 1, got 0"),
    (["--lora", "4", "--lora-alpha", "0"], "--lora-alpha must be positive, got 0.0"),
    (["--lora", "4", "--lora-lr", "-1"], "--lora-lr must be positive, got -1.0"),
    (["--lora", "4", "--optimizer", "adamw"], "--lora trains through the fused step"),
])
def test_contradictory_lora_flags_are_refused_naming_the_flag(job, capsys, argv, message):  # noqa: F811
    assert message in refused(job, capsys, argv)


CFG = llama.LlamaConfig(**{k: v for k, v in TINY.items() if k != "max_position_embeddings"})


@functools.lru_cache(maxsize=1)
def tiny_params():
    """Random weights of the tiny model, drawn in numpy (no compile)."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype),
                        llama.param_shapes(CFG))


def tiny_lora(job, *argv):  # noqa: F811
    """``(args, cfg, lm, params)``: the tiny model with the job's adapters for ``argv``."""
    args = job.parse_args(["--lora", "2", "--lora-targets", "q_proj,down_proj", "--steps", "4",
                           "--warmup-steps", "0", "--schedule", "constant", *argv])
    cfg, params = job.with_adapters(args, CFG, tiny_params())
    return args, cfg, llama.llama_layered_model(cfg), params


@pytest.mark.parametrize("only", [True, False], ids=["lora_only", "lora_plus_lomo"])
def test_lora_only_freezes_the_base_and_lora_plus_lomo_trains_it(job, only):  # noqa: F811
    """The job's transform (``run_transform``, what its fused step applies) on a gradient of
    ones: every adapter gets an update in both modes; with ``--lora-only`` every base weight
    gets a zero one and no optimizer state (AdamW's two moments of the adapters and the
    step counts are all there is), without it every base weight gets AdaLomo's update."""
    args, cfg, _, params = tiny_lora(job, *(["--lora-only"] if only else []))
    tx = job.run_transform(args, job.make_schedule("constant", args.lr, 4, 0))
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
    moved = {jax.tree_util.keystr(p): bool(jnp.any(u != 0))
             for p, u in jax.tree_util.tree_leaves_with_path(updates)}
    adapters = {k for k in moved if "lora" in k}
    assert len(adapters) == 2 * 2 and all(moved[k] for k in adapters), moved
    base = [moved[k] for k in moved if k not in adapters]
    assert not any(base) if only else all(base), moved
    state_size = sum(x.size for x in jax.tree.leaves(state))  # + adam's and the schedule's counts
    assert (state_size == 2 * job.adapter_count(params) + 2) == only, state_size


def test_memory_report_puts_the_lora_step_beside_the_base_models(job, monkeypatch):  # noqa: F811
    """``--lora``: the run's own step is the first row (its compiled step, not compiled
    again), the fused and value_and_grad rows are compiled for the model without adapters."""
    args, cfg, lm, params = tiny_lora(job)
    base = llama.llama_layered_model(CFG), tiny_params()
    steps = sys.modules["finetune.steps"]
    monkeypatch.setattr(steps, "compile_step", lambda step, init, p, batch: (
        "compiled", any(lora.is_adapter(path) for path, _ in
                        jax.tree_util.tree_leaves_with_path(p))))
    monkeypatch.setattr(steps, "step_bytes", lambda compiled: compiled)
    schedule = job.make_schedule("constant", args.lr, 4, 0)
    rows = job.memory_report(args, lm, params, {"input_ids": jnp.zeros((2, 8), jnp.int32)},
                             schedule, "the run's step", base)
    assert list(rows) == ["fused LoRA (rank 2) + AdaLomo", "fused AdaLomo", "fused LOMO",
                          "value_and_grad + SGD", "value_and_grad + AdamW"]
    assert rows["fused LoRA (rank 2) + AdaLomo"] == "the run's step"
    assert all(v == ("compiled", False) for k, v in rows.items() if "LoRA" not in k), rows


def test_report_records_the_mode(job):  # noqa: F811
    args, _, _, params = tiny_lora(job, "--lora-only")
    assert job.lora_report(args, params) == {
        "mode": "lora", "lora": {"rank": 2, "alpha": 4.0, "targets": ["down_proj", "q_proj"],
                                 "lr": job.DEFAULT_LORA_LR, "frozen_base": True,
                                 "adapter_parameters": 2 * 2 * (64 + 64 + 128 + 64),
                                 "adapter_dir": "adapter",
                                 "adapter_base": str(Path(args.model).resolve())}}
    assert job.lora_report(job.parse_args([]), params) == {"mode": "lomo", "lora": None}


@pytest.mark.parametrize("only", [True, False], ids=["lora_only", "lora_plus_lomo"])
def test_export_writes_the_adapter_on_its_base_and_merges(job, tmp_path, only):  # noqa: F811
    """``split_for_export``: the adapter in PEFT's files under ``OUT/adapter``, on ``--model``
    with ``--lora-only`` and on no named base for LoRA + LOMO (its base weights were
    trained: only the merged model holds them); the model to save has no adapters left."""
    args, cfg, _, params = tiny_lora(job, *(["--lora-only"] if only else []))
    merged_cfg, merged = job.split_for_export(args, tmp_path, cfg, params)
    assert merged_cfg.lora is None and merged_cfg == cfg.replace(lora=None)
    assert not any(lora.is_adapter(p) for p, _ in jax.tree_util.tree_leaves_with_path(merged))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == (str(Path(args.model).resolve()) if only
                                                 else None)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    plain = job.parse_args([])
    base_cfg = cfg.replace(lora=None)
    assert job.split_for_export(plain, tmp_path / "plain", base_cfg, merged) == (base_cfg, merged)
    assert not (tmp_path / "plain").exists()


def test_checkpoints_from_before_lora_resume_as_runs_without_it(job):  # noqa: F811
    def flags(*argv):
        return job.run_flags(job.parse_args(list(argv)))

    old = {k: v for k, v in flags().items() if not k.startswith("lora")}
    assert job.flags_problem(old, flags()) is None
    assert "--lora was None in the checkpointed run, now 4" in job.flags_problem(
        old, flags("--lora", "4"))


# ------------------------------------------------------ the job, resumed -----

STEPS, EVERY = 4, 2
LORA = ["--lora", "4", "--lora-targets", "q_proj,down_proj"]
FLAGS = ["--tiny", "--steps", str(STEPS), "--checkpoint-every", str(EVERY),
         "--no-memory-report"]


def run(job, out, *extra):  # noqa: F811
    """A tiny in-process LoRA + LOMO run (AdaLomo on the base, AdamW on rank-4 adapters)."""
    job.main([*FLAGS, *LORA, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def whole(job, tmp_path_factory):  # noqa: F811
    out, _ = once_per_run(tmp_path_factory, "lora_whole", lambda out: run(job, out))
    return out


def test_report_and_adapter_record_the_run(whole):
    got = report(whole)
    assert got["mode"] == "lora+lomo"
    assert {k: got["lora"][k] for k in ("rank", "alpha", "targets", "frozen_base",
                                        "adapter_base")} == {
        "rank": 4, "alpha": 8.0, "targets": ["down_proj", "q_proj"], "frozen_base": False,
        "adapter_base": None}
    assert got["args"]["lora"] == 4 and got["args"]["lora_only"] is False
    config = json.loads((whole / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (
        4, 8.0, ["down_proj", "q_proj"])
    from safetensors.numpy import load_file

    tensors = load_file(whole / "adapter" / "adapter_model.safetensors")
    assert sum(x.size for x in tensors.values()) == got["lora"]["adapter_parameters"] > 0
    assert all(".lora_A." in k or ".lora_B." in k for k in tensors), sorted(tensors)


def test_merged_model_computes_the_trained_models_loss(job, whole):  # noqa: F811
    """The checkpoint in OUT is plain weights (no adapters left) whose held-out loss is
    the loss the job measured on its LoRA model after training."""
    args = job.parse_args(["--tiny", "--model", str(whole)])
    _, cfg, params, _, held_out, _ = job.load_all(args)
    assert cfg.lora is None
    assert not any(lora.is_adapter(p) for p, _ in jax.tree_util.tree_leaves_with_path(params))
    loss = job.evaluate(llama.llama_layered_model(cfg), params, held_out, args.batch_size)
    assert loss == pytest.approx(report(whole)["loss_after"], rel=1e-5)
    assert loss < report(whole)["loss_before"]


def test_resumed_lora_run_equals_an_uninterrupted_one(job, whole, tmp_path):  # noqa: F811
    """Resumed from the checkpoint of step 2 (adapters, base and both optimizers' state
    restored), the run writes the uninterrupted run's merged weights and adapter, byte for
    byte."""
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoints" / str(EVERY), resumed / "checkpoints" / str(EVERY))
    run(job, resumed, "--resume")
    assert report(resumed)["resumed_from_step"] == EVERY
    assert report(resumed)["train_losses"] == report(whole)["train_losses"]
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = (Path(d, name).read_bytes() for d in (whole, resumed))
        assert a == b, f"the resumed LoRA run's {name} differs from the uninterrupted run's"


@pytest.mark.parametrize("argv, message", [
    (["--lora", "8", "--lora-targets", "q_proj,down_proj"], "--lora was 4 in the checkpointed "
     "run, now 8"),
    (["--lora", "4", "--lora-targets", "q_proj"], "--lora-targets was ['down_proj', 'q_proj'] "
     "in the checkpointed run, now ['q_proj']"),
    ([*LORA, "--lora-only"], "--lora-only was False in the checkpointed run, now True"),
    ([], "--lora was 4 in the checkpointed run, now None"),
])
def test_resume_with_another_lora_mode_is_refused(job, whole, tmp_path, argv, message):  # noqa: F811
    out = tmp_path / "out"
    shutil.copytree(whole / "checkpoints", out / "checkpoints")
    with pytest.raises(SystemExit) as e:
        job.main([*FLAGS, *argv, "--out", str(out), "--resume"])
    assert message in str(e.value.code)
    assert not (out / "model.safetensors").exists()
