"""The RTX 4090 target mesh for the deviceless GPU-target tests.

They need JAX's CUDA plugin (``requirements-test.txt`` installs it on Linux
x86-64; the root conftest sets ``JAX_PLATFORMS=cpu`` so that it compiles
without a GPU). Without the plugin a test fails, as a missing dependency does
under the root conftest's rule, and is skipped with ``LOMO_ALLOW_MISSING_DEPS=1``.
"""

import os

import pytest

from lomo_jax import aot


def rtx4090_mesh():
    if not aot.gpu_target_available("rtx4090"):
        reason = ("the GPU-target test needs the CUDA plugin (jax[cuda12], in "
                  "requirements-test.txt) and JAX_PLATFORMS=cpu (the root conftest sets it)")
        if os.environ.get("LOMO_ALLOW_MISSING_DEPS"):
            pytest.skip(reason)
        pytest.fail(reason)
    return aot.target_mesh("rtx4090")
