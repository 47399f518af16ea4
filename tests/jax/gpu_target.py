"""The RTX 4090 target mesh for the deviceless GPU-target tests, and the byte
count their memory bounds are written in.

They need JAX's CUDA plugin (``requirements-test.txt`` installs it on Linux
x86-64; the root conftest sets ``JAX_PLATFORMS=cpu`` so that it compiles
without a GPU). Without the plugin a test fails, as a missing dependency does
under the root conftest's rule, and is skipped with ``LOMO_ALLOW_MISSING_DEPS=1``.

Every test that compiles for a GPU target is marked :data:`COMPILES_FOR_GPU`.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lomo_jax import aot

# The mark of every test that compiles for a GPU target: the root conftest runs them first,
# one after another, so that one xdist worker compiles them all and its XLA GPU kernel cache
# (root conftest) reuses a kernel for every later program with the same fused computation.
COMPILES_FOR_GPU = pytest.mark.gpu_target


def nbytes(tree) -> int:
    """Bytes of every array (or ``ShapeDtypeStruct``) in ``tree``, unsharded."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def rtx4090_mesh():
    if not aot.gpu_target_available("rtx4090"):
        reason = ("the GPU-target test needs the CUDA plugin (jax[cuda12], in "
                  "requirements-test.txt) and JAX_PLATFORMS=cpu (the root conftest sets it)")
        if os.environ.get("LOMO_ALLOW_MISSING_DEPS"):
            pytest.skip(reason)
        pytest.fail(reason)
    return aot.target_mesh("rtx4090")
