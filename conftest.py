"""Repository-wide pytest settings.

A test module skipped because a dependency is missing (``pytest.importorskip``)
counts as a failure: every dependency is in ``requirements-test.txt``, and a
suite that silently skips is not a passing suite. Set
``LOMO_ALLOW_MISSING_DEPS=1`` to run a partial install (e.g. JAX only) anyway.
"""

import os
import shutil
import tempfile

import pytest

# The tests run on the CPU. With JAX's CUDA plugin installed (requirements-test.txt
# installs it for deviceless GPU-target compiles, lomo_jax.aot) this must be set
# before JAX starts; it also keeps a GPU machine's JAX tests on the CPU they assume.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

STRICT = not os.environ.get("LOMO_ALLOW_MISSING_DEPS")


def _quick_cpu_codegen():
    """XLA:CPU's LLVM backend at -O0 for the session and its subprocesses (set before
    JAX starts, so in-process and subprocess programs are built alike). The tests'
    programs are tiny and compiled once or twice each, so compile time dominates: CPU
    seconds, ``pytest -n 0``, without/with the flag: tests/jax/test_microbatches.py
    203.6/170.0, tests/test_benchmarks.py -k speed 93.7/59.6. Only code generation
    changes: the HLO, its buffer assignment and so every ``memory_analysis()`` figure
    are the same (tests/jax/test_fused_memory.py, test_fsdp_memory.py, test_soak.py,
    test_reliability.py, test_checkpoint.py pass with it). A flag already given wins."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


_quick_cpu_codegen()


def _share_compilation_cache():
    """One persistent XLA compilation cache for the whole test session: the xdist workers
    and every subprocess a test starts (the main job, the examples, the multi-device
    scripts) inherit these variables, so a program compiled once (the tiny LLaMA's step,
    its loss) is loaded from disk by the next process or ``jit`` that builds it again.
    A cache hit is the same executable (XLA:CPU's memory analysis of a loaded one reads
    the same bytes); the size limit turns on JAX's file lock, so workers never read a
    half-written entry. Returns the directory if this process made it (and removes it at
    the end), None if one was given (``JAX_COMPILATION_CACHE_DIR``) or inherited."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    path = tempfile.mkdtemp(prefix="lomo-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    # Only programs that take a second or more to compile are stored: writing every tiny
    # jit costs more than it saves (parity_tests/test_rank_rules.py -k any_rank_fp32, -n 0:
    # 14.2 s without the cache, 22.5 s storing everything, 14.7 s with this threshold;
    # tests/test_main_job_resume.py -k jsonl: 34.1 s without, 28.5 s with it).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 * 2**30))
    return path


_COMPILATION_CACHE = _share_compilation_cache()


def pytest_unconfigure(config):
    if _COMPILATION_CACHE:
        shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and "could not import" in str(report.longrepr):
        report.outcome = "failed"


@pytest.fixture
def lomo_optim(monkeypatch):
    """The original ``lomo_optim`` package. Its AdaLomo creates its state with
    ``.cuda()``; without a GPU that is made a no-op for the test."""
    import torch

    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    import lomo_optim

    return lomo_optim


# Property tests draw the same examples on every run: CI is never red by the luck of a
# draw (HYPOTHESIS_PROFILE=explore draws new ones, for local bug hunting). A partial
# install without hypothesis (LOMO_ALLOW_MISSING_DEPS) has no property tests to set up.
try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # pragma: no cover
    pass
else:
    _hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
    _hypothesis_settings.register_profile("explore", derandomize=False, print_blob=True)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
