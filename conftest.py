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

from tests.jax.cpu_devices import QUICK_COMPILE_FLAGS, with_xla_flags

# The tests run on the CPU. With JAX's CUDA plugin installed (requirements-test.txt
# installs it for deviceless GPU-target compiles, lomo_jax.aot) this must be set
# before JAX starts; it also keeps a GPU machine's JAX tests on the CPU they assume.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

STRICT = not os.environ.get("LOMO_ALLOW_MISSING_DEPS")


# XLA:CPU compiled for compile time (tests/jax/cpu_devices.py says what and how much);
# the HLO, and so the tests' outcomes, are the same. Set before JAX starts, so in-process
# and subprocess programs alike; a flag already given wins.
os.environ["XLA_FLAGS"] = with_xla_flags(os.environ.get("XLA_FLAGS", ""), QUICK_COMPILE_FLAGS,
                                         replace=False)


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


def _share_gpu_kernels():
    """XLA:GPU's kernel cache for the GPU-target compiles (no GPU runs them; only their
    memory figures and HLO are read): a kernel built for one program is reused by the next
    that has the same fused computation, instead of going through LLVM, PTX and ptxas again
    (keyed by the computation's fingerprint; the buffer assignment is made before and is
    the same). ``python benchmarks/memory.py --settings tiny --target rtx4090`` with its
    7 programs: 49.5 s without, 40.7 s with an empty cache, 26.8 s with a warm one; the
    same table. XLA appends to the file without a lock, so each xdist worker has its own
    (the subprocesses a worker starts share it, one at a time: the worker waits for them)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    path = os.path.join(os.environ["JAX_COMPILATION_CACHE_DIR"], f"gpu-kernels-{worker}.bin")
    os.environ["XLA_FLAGS"] = with_xla_flags(os.environ.get("XLA_FLAGS", ""),
                                             [f"--xla_gpu_kernel_cache_file={path}"], replace=True)


_share_gpu_kernels()

# ptxas at -O0 for the GPU-target compiles: their kernels never run, and ptxas is the last
# step, after the buffer assignment the memory figures come from and the optimized HLO the
# tests read. Both are the same with it (every GPU-target program of test_fused_memory,
# test_fsdp_memory, test_attention and test_microbatches compared: figures and HLO text);
# a program compiles in 13% less CPU time (3 of test_fused_memory's: 39.8 -> 34.3 s,
# 41.8 -> 36.5 s). A flag already given wins.
os.environ["XLA_FLAGS"] = with_xla_flags(os.environ["XLA_FLAGS"],
                                         ["--xla_gpu_disable_gpuasm_optimizations=true"],
                                         replace=False)


def pytest_unconfigure(config):
    if _COMPILATION_CACHE:
        shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(items):
    """The tests that compile for a GPU target (``@pytest.mark.gpu_target``,
    tests/jax/gpu_target.py) run first, one after another: xdist's ``--dist load`` gives
    each worker a first chunk of consecutive tests (a quarter of its share: 122 of 981 on 2
    workers), so the first worker runs them all and its GPU kernel cache (above) reuses a
    kernel for every later program with the same fused computation, as the in-process
    caches do (test_fused_memory's ``inference_temp``). Their GPU-target compiles over the
    two workers: 1982 kernels built, 353 CPU-seconds; on one: 1432 and 291. Each worker
    sorts alike (xdist requires the same order), stable: the rest keep their order."""
    items.sort(key=lambda item: item.get_closest_marker("gpu_target") is None)


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
