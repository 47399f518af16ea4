"""benchmarks/gpu.py (issue 31's GPU check) on a machine without a GPU: it checks its
arguments, says that no CUDA GPU was found (JAX and torch, each) and exits 0; bad arguments
exit 2 naming what is wrong. The pieces that do not need a GPU run here for real: the fit
and throughput arithmetic, the report writer, the random weights (tiny), one case's
pipeline on the CPU (compiled total and tokens/s of the tiny model), the CUDA test finder
and pytest's summary parser."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
GIB = 1024**3


@pytest.fixture(scope="module")
def gpu():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu as module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


@pytest.fixture(scope="module")
def no_gpu(gpu):
    if any(gpu.gpu_status()):
        pytest.skip("a CUDA GPU is here: the no-GPU path does not run")


def run(*argv):
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_without_a_gpu_it_says_so_for_each_framework_and_exits_0(no_gpu, tmp_path):
    out = tmp_path / "gpu.md"
    proc = run("--out", str(out), "--steps", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "JAX: no CUDA GPU found" in proc.stdout
    assert "torch: no CUDA GPU found (torch.cuda.is_available() is False)" in proc.stdout
    assert not out.exists()  # nothing measured, nothing written


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--margin-gib", "-2"], "--margin-gib must be >= 0, got -2.0"),
    (["--out", "benchmarks"], "--out benchmarks is a directory"),
    (["--settings", "70b"], "invalid choice: '70b'"),
    (["--parts", "disk"], "invalid choice: 'disk'"),
])
def test_bad_arguments_exit_2_naming_what_is_wrong(gpu, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        gpu.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_arguments_are_refused_before_looking_for_a_gpu():
    proc = run("--steps", "0")
    assert proc.returncode == 2 and "--steps must be >= 1" in proc.stderr
    assert "no CUDA GPU" not in proc.stdout


def test_fit_arithmetic(gpu):
    assert gpu.fit_problem(10 * GIB, 12 * GIB, 1 * GIB) is None
    assert gpu.fit_problem(11 * GIB, 12 * GIB, 1 * GIB) is None  # exactly full fits
    assert gpu.fit_problem(15 * GIB, 12 * GIB, 1 * GIB) == (
        "skipped: needs 16.0 GiB (15.0 + 1.0 margin), card has 12.0 free")
    assert gpu.tokens_per_s(8, 512, 0.5) == 8192
    assert gpu.fill_rows((32, 4096, 11008), 4) == 1  # one 7B MLP slice is 172 MiB in fp32
    assert gpu.fill_rows((12, 1024), 4, cap=4096 * 5) == 4  # the largest divisor under cap
    assert gpu.fill_rows((7, 8), 4, cap=4) == 1


def test_report_writer(gpu, tmp_path):
    results = [
        {"setting": "7b-8x512", "method": "fused LOMO", "compiled": 15 * GIB, "peak": 16 * GIB,
         "init_peak": 14 * GIB, "tokens_per_s": 1234.5},
        {"setting": "8b-2x2048", "method": "value_and_grad + AdamW", "compiled": 90 * GIB,
         "skipped": "skipped: needs 91.0 GiB (90.0 + 1.0 margin), card has 79.0 free"},
        {"setting": "tiny", "method": "fused LOMO", "compiled": GIB, "peak": 2 * GIB,
         "init_peak": 2 * GIB, "tokens_per_s": 10.0},
        {"setting": "tiny", "method": "fused LOMO, clip global", "error": "failed (rc 1): OOM"},
    ]
    rows = gpu.memory_rows(results)
    assert rows[0] == ["7b-8x512", "fused LOMO", "15.00", "16.00", "1.067", "1,234", ""]
    assert rows[1][2:] == ["90.00", "-", "-", "-", results[1]["skipped"]]
    assert rows[2][-1] == "peak set while drawing the weights"
    assert rows[3][2] == "-" and rows[3][-1] == "failed (rc 1): OOM"
    out = tmp_path / "sub" / "gpu.md"
    text = gpu.write_report(out, "GPU check", [("memory", ["a", "b"], [[1, 2]], "a note")])
    assert out.read_text() == text
    assert text == "# GPU check\n\n## memory\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\na note\n"


def test_random_params_match_the_shapes_one_block_at_a_time(gpu):
    import jax
    import numpy as np

    memory = gpu.import_benchmark("memory")
    cfg = memory.MODELS["tiny"]
    from lomo_jax.models import llama

    params = gpu.random_params(cfg, seed=0)
    want = llama.param_shapes(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(want)
    for (path, p), w in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                            jax.tree.leaves(want)):
        assert p.shape == w.shape and p.dtype == w.dtype, path
        x = np.asarray(p, np.float32)
        if "norm" in jax.tree_util.keystr(path):
            assert np.all(x == 1), path
        else:  # every block drawn (none left at zero), about 0.02 wide
            assert np.all(x.reshape(x.shape[0], -1).std(axis=1) > 0.01), path
            assert abs(x.std() - 0.02) < 0.004, path


def test_importing_a_benchmark_keeps_the_environment(gpu, monkeypatch):
    """benchmarks/memory.py sets JAX_PLATFORMS (and XLA_FLAGS on its cpu target) for itself;
    the case processes must get the user's."""
    import os

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    sys.modules.pop("memory", None)
    before = dict(os.environ)
    gpu.import_benchmark("memory")
    assert dict(os.environ) == before
    assert "JAX_PLATFORMS" not in gpu.child_env() or gpu.USER_JAX_PLATFORMS is not None
    assert gpu.child_env()["XLA_PYTHON_CLIENT_MEM_FRACTION"]


def test_one_case_runs_on_the_cpu_in_tiny_form(gpu):
    """The case pipeline (memory.py's builders, random weights, timed steps) on the tiny
    model: a compiled total and tokens/s; no peak on the CPU (no memory_stats there)."""
    method = "fused LOMO, clip adaptive"
    result = gpu.run_case("tiny", method, steps=1, warmup=0, margin_gib=0.0)
    assert result["setting"] == "tiny" and result["method"] == method
    assert result["compiled"] > 0 and result["tokens_per_s"] > 0
    assert "skipped" not in result and "error" not in result


@pytest.mark.parametrize("method", ["fused LOMO", "fused LOMO, clip global",
                                    "fused LOMO, clip adaptive", "value_and_grad + AdamW"])
def test_each_case_inits_the_state_its_step_was_lowered_for(gpu, method):
    import jax
    from lomo_jax.adaptive_clipping import AdaptiveClipState
    from lomo_jax.models import llama

    cfg = gpu.import_benchmark("memory").MODELS["tiny"]
    lowered, init = gpu.lowered_case(method, cfg, 2, 64)
    state = jax.eval_shape(init, llama.param_shapes(cfg))
    assert jax.tree.structure(state) == jax.tree.structure(lowered.args_info[0][1])
    is_clip = lambda x: isinstance(x, AdaptiveClipState)  # noqa: E731
    clips = [x for x in jax.tree.leaves(state, is_leaf=is_clip) if is_clip(x)]
    assert len(clips) == (3 if method.endswith("adaptive") else 0)  # embed, layers, head


def test_cuda_tests_are_found_and_counted(gpu):
    files = gpu.cuda_test_files()
    assert "tests/torch/test_state_and_memory.py" in files
    assert "tests/torch/test_errors_and_scaler.py" in files
    assert all(f.startswith(("tests/", "parity_tests/")) for f in files)
    assert gpu.pytest_counts("....s\n12 passed, 3 skipped in 4.20s\n") == {
        "passed": 12, "skipped": 3}
    assert gpu.pytest_counts("1 failed, 2 passed, 1 error in 1s") == {
        "failed": 1, "passed": 2, "error": 1}
    assert gpu.pytest_counts("no tests ran") == {}


def test_a_case_that_fails_is_reported_with_its_reason(gpu):
    """A case's process that dies (here: refused arguments) becomes an ``error`` row with
    its exit status and last line of stderr, not a crash of the whole check."""
    args = gpu.parse_args(["--steps", "1"])
    result = gpu.isolated_case("70b", "fused LOMO", args)
    assert result == {"setting": "70b", "method": "fused LOMO", "error": (
        "failed (rc 2): gpu.py: error: --case 70b fused LOMO: unknown setting or method")}
