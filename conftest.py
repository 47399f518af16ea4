"""Repository-wide pytest settings.

A test module skipped because a dependency is missing (``pytest.importorskip``)
counts as a failure: every dependency is in ``requirements-test.txt``, and a
suite that silently skips is not a passing suite. Set
``LOMO_ALLOW_MISSING_DEPS=1`` to run a partial install (e.g. JAX only) anyway.
"""

import os

import pytest

# The tests run on the CPU. With JAX's CUDA plugin installed (requirements-test.txt
# installs it for deviceless GPU-target compiles, lomo_jax.aot) this must be set
# before JAX starts; it also keeps a GPU machine's JAX tests on the CPU they assume.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

STRICT = not os.environ.get("LOMO_ALLOW_MISSING_DEPS")


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
