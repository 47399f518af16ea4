"""The main job's ``--clip {none,global,adaptive}`` (issue 31): the defaults per optimizer,
``--clip-grad-norm``'s old meaning kept, contradictory flags refused naming both, the
adaptive clip chained in front of the optimizer in one pass (fused and unfused alike: one
scalar a layer's tensor), recorded in the report, and its state in the checkpoints: a
resumed adaptive run ends with the weights of an uninterrupted one, and a resume with
another ``--clip`` is refused. The LOMO run starts from the main job's output: it is also
the lomo case of tests/test_main_job.py's test_model_dir_is_fine_tuned_again."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lomo_jax
from lomo_jax.adaptive_clipping import AdaptiveClipState
from lomo_jax.models import llama
from tests.jax.tiny_llama import TINY
from tests.once_per_run import once_per_run
from tests.test_main_job import refused, trained  # noqa: F401  (trained: a fixture)
from tests.test_main_job_resume import job, report  # noqa: F401  (job: a fixture)


def parsed(job, *argv):  # noqa: F811
    args = job.parse_args(list(argv))
    return args.clip, args.clip_grad_norm


def test_defaults_follow_the_optimizers_authors(job):  # noqa: F811
    assert parsed(job) == ("none", 0.0)  # adalomo: RMS-clipped per tensor already
    assert parsed(job, "--optimizer", "lomo") == (
        job.LOMO_DEFAULT_CLIP, 1.0 if job.LOMO_DEFAULT_CLIP == "global" else 0.0)
    assert parsed(job, "--optimizer", "adamw") == ("global", 1.0)
    assert job.LOMO_DEFAULT_CLIP in job.CLIP_MODES


def test_clip_grad_norm_alone_keeps_its_meaning(job):  # noqa: F811
    assert parsed(job, "--clip-grad-norm", "0.5") == ("global", 0.5)
    assert parsed(job, "--optimizer", "lomo", "--clip-grad-norm", "0") == ("none", 0.0)
    assert parsed(job, "--optimizer", "adamw", "--clip-grad-norm", "0") == ("none", 0.0)
    assert parsed(job, "--clip", "global") == ("global", 1.0)
    assert parsed(job, "--clip", "global", "--clip-grad-norm", "2") == ("global", 2.0)
    assert parsed(job, "--clip", "none", "--clip-grad-norm", "0") == ("none", 0.0)
    assert parsed(job, "--optimizer", "adamw", "--clip", "adaptive") == ("adaptive", 0.0)


@pytest.mark.parametrize("argv, message", [
    (["--clip", "none", "--clip-grad-norm", "1.0"],
     "--clip none and --clip-grad-norm 1.0 contradict each other"),
    (["--clip", "adaptive", "--clip-grad-norm", "1.0"],
     "--clip adaptive and --clip-grad-norm 1.0 contradict each other"),
    (["--clip", "global", "--clip-grad-norm", "0"],
     "--clip global clips at --clip-grad-norm, which must be > 0"),
    (["--adaptive-clip-warmup", "3"], "--adaptive-clip-warmup is --clip adaptive's"),
    (["--optimizer", "lomo", "--clip", "global", "--adaptive-clip-warmup", "3"],
     "--adaptive-clip-warmup is --clip adaptive's; this run clips 'global'"),
    (["--clip", "adaptive", "--adaptive-clip-warmup", "0"],
     "--adaptive-clip-warmup must be >= 1, got 0"),
    (["--clip-grad-norm", "-1"], "--clip-grad-norm must be >= 0"),
])
def test_contradictory_clip_flags_are_refused_naming_both(job, capsys, argv, message):  # noqa: F811
    assert message in refused(job, capsys, argv)


def test_adaptive_warmup_defaults_to_the_learning_rates(job):  # noqa: F811
    def warmup(*argv):
        return job.adaptive_clip_warmup(job.parse_args(["--clip", "adaptive", *argv]))

    assert warmup("--steps", "100") == 10
    assert warmup("--steps", "100", "--warmup-steps", "7") == 7
    assert warmup("--steps", "5", "--warmup-steps", "0") == 1  # the rule needs a history
    assert warmup("--steps", "100", "--adaptive-clip-warmup", "3") == 3


def lomo_args(job, clip):  # noqa: F811
    warmup = ["--adaptive-clip-warmup", "1"] if clip == "adaptive" else []
    return job.parse_args(["--optimizer", "lomo", "--clip", clip, "--steps", "10", *warmup])


def test_with_clip_builds_each_mode(job):  # noqa: F811
    tx = lomo_jax.lomo(1e-2)
    assert job.with_clip(lomo_args(job, "none"), tx, fused=True) == (tx, None)
    assert job.with_clip(lomo_args(job, "global"), tx, fused=True) == (tx, 1.0)
    chained, clip = job.with_clip(lomo_args(job, "adaptive"), tx, fused=True)
    assert clip is None  # one pass: no global norm
    cfg = llama.LlamaConfig(**{k: v for k, v in TINY.items() if k != "max_position_embeddings"})
    params = llama.init_params(cfg, jax.random.key(0))
    state = lomo_jax.fused_init(chained, params)
    clip_state = state.layers.inner_state[0]
    assert isinstance(clip_state, AdaptiveClipState)
    assert all(x.shape == (cfg.num_hidden_layers,) for x in jax.tree.leaves(clip_state.norm_ema))


def test_unfused_adaptive_clip_keeps_the_fused_steps_granularity(job):  # noqa: F811
    """value_and_grad + ``with_clip(..., fused=False)`` and the fused step with
    ``with_clip(..., fused=True)`` train the same weights (LOMO, fp32, past the clip's
    warm-up): the unfused clip sees each layer's slice of a stacked leaf as its own tensor,
    as the fused step does (without ``per_layer`` it clips the whole stack's norm)."""
    cfg = llama.LlamaConfig(**{k: v for k, v in TINY.items() if k != "max_position_embeddings"})
    lm = llama.llama_layered_model(cfg)
    args = lomo_args(job, "adaptive")
    params = llama.init_params(cfg, jax.random.key(0))
    tx, _ = job.with_clip(args, lomo_jax.lomo(0.1), fused=True)
    fused, f_state = lomo_jax.fused_train_step(lm, tx), lomo_jax.fused_init(tx, params)
    step, init = job.unfused_step(lm, *job.with_clip(args, lomo_jax.lomo(0.1), fused=False))
    ref = jax.tree.map(jnp.copy, params)
    u_state = init(ref)
    rng = np.random.default_rng(0)
    for _ in range(4):
        batch = {"input_ids": jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 8)))}
        params, f_state, _ = fused(params, f_state, batch)
        ref, u_state, _ = step(ref, u_state, batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=2e-5, atol=1e-6), params, ref)


# ------------------------------------------------------ the job, resumed -----

STEPS, EVERY = 4, 2


FLAGS = ["--tiny", "--optimizer", "lomo", "--clip", "adaptive", "--adaptive-clip-warmup", "1",
         "--steps", str(STEPS), "--checkpoint-every", str(EVERY), "--lr", "0.1",
         "--no-memory-report"]


def run(job, out, model, *extra):  # noqa: F811
    """A tiny in-process LOMO run from ``model`` with the adaptive clip past its warm-up by
    step 2."""
    job.main([*FLAGS, "--model", str(model), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def model(trained):  # noqa: F811
    """Where the LOMO runs start: the main job's output (tests/test_main_job.py)."""
    return trained[0]


@pytest.fixture(scope="module")
def whole(job, model, tmp_path_factory):  # noqa: F811
    out, _ = once_per_run(tmp_path_factory, "clip_whole", lambda out: run(job, out, model))
    return out


def clip_state(job, out, model, step):  # noqa: F811
    """The layers' adaptive-clip state (:class:`AdaptiveClipState`) in the checkpoint of
    ``step``, restored into the job's own state structure."""
    from lomo_jax import checkpoint

    args = job.parse_args([*FLAGS, "--model", str(model), "--out", str(out)])
    cfg, params = job.load_model(args)
    _, init = job.build_step(args, llama.llama_layered_model(cfg),
                             job.make_schedule(args.schedule, args.lr, args.steps))
    with checkpoint.Checkpointer(job.checkpoint_dir(args), max_to_keep=None,
                                 read_only=True) as ckpt:
        state, _ = ckpt.restore({"params": params, "opt_state": init(params)}, step)
    return state["opt_state"].layers.inner_state[0]


def test_lomo_fine_tunes_the_main_jobs_output_again(whole, trained):  # noqa: F811
    """``--model OUT`` of the main job (the lomo case of tests/test_main_job.py's
    test_model_dir_is_fine_tuned_again): the run starts from the trained checkpoint, with its
    tokenizer, not from scratch."""
    after = trained[1]["loss_after"]
    assert abs(report(whole)["loss_before"] - after) < 0.05 * after + 1e-4
    assert np.isfinite(report(whole)["loss_after"])
    assert (whole / "model.safetensors").exists()


def test_report_records_the_clip_mode(whole):
    assert report(whole)["args"]["clip"] == "adaptive"
    assert report(whole)["args"]["clip_grad_norm"] == 0.0
    assert report(whole)["args"]["adaptive_clip_warmup"] == 1


def test_resumed_adaptive_run_equals_an_uninterrupted_one(job, whole, model, tmp_path):  # noqa: F811
    """Resumed from the checkpoint of step 2 (the clip's averages restored with the rest of
    the optimizer state), the run ends with the uninterrupted run's weights, byte for byte,
    and the same clip state at step 4."""
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoints" / str(EVERY), resumed / "checkpoints" / str(EVERY))
    run(job, resumed, model, "--resume")
    assert report(resumed)["resumed_from_step"] == EVERY
    assert report(resumed)["train_losses"] == report(whole)["train_losses"]
    a, b = (Path(d, "model.safetensors").read_bytes() for d in (whole, resumed))
    assert a == b, "the resumed adaptive run's weights differ from the uninterrupted run's"
    ours, theirs = clip_state(job, resumed, model, STEPS), clip_state(job, whole, model, STEPS)
    assert isinstance(ours, AdaptiveClipState) and np.all(np.asarray(ours.count) == STEPS)
    for x, y in zip(jax.tree.leaves(ours.norm_ema), jax.tree.leaves(theirs.norm_ema)):
        assert np.all(np.isfinite(x)) and np.array_equal(np.asarray(x), np.asarray(y))


def test_resume_with_another_clip_is_refused(job, whole, model, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    shutil.copytree(whole / "checkpoints", out / "checkpoints")
    for clip in ("global", "none"):  # none: --clip-grad-norm is 0.0 in both runs
        with pytest.raises(SystemExit) as e:
            job.main(["--tiny", "--optimizer", "lomo", "--clip", clip, "--steps", str(STEPS),
                      "--checkpoint-every", str(EVERY), "--lr", "0.1", "--no-memory-report",
                      "--model", str(model), "--out", str(out), "--resume"])
        assert f"--clip was 'adaptive' in the checkpointed run, now {clip!r}" in str(e.value.code)
    assert not (out / "model.safetensors").exists()


def test_checkpoints_from_before_clip_resume_as_their_clip_grad_norm_said(job):  # noqa: F811
    """A checkpoint's flags without ``clip`` (saved before the flag existed) read as
    ``--clip-grad-norm`` said: > 0 global, 0 none."""
    def flags(*argv):
        return job.run_flags(job.parse_args(list(argv)))

    old = {k: v for k, v in flags().items() if k not in ("clip", "adaptive_clip_warmup")}
    assert job.flags_problem(old, flags()) is None  # adalomo, unclipped, as before
    old_lomo = {k: v for k, v in flags("--optimizer", "lomo", "--clip", "global").items()
                if k not in ("clip", "adaptive_clip_warmup")}
    assert job.flags_problem(old_lomo, flags("--optimizer", "lomo", "--clip", "global")) is None
    assert "--clip was 'global' in the checkpointed run, now 'adaptive'" in job.flags_problem(
        old_lomo, flags("--optimizer", "lomo", "--clip", "adaptive"))
