"""Compiling past the test session's persistent compilation cache.

The root conftest shares one XLA compilation cache across the session (the
xdist workers and the subprocesses of the tests), so a program is compiled once
and loaded from disk after that. A test whose claim is about compiling again
(the same memory analysis after a run, the same bytes from a second run of a
script) must really compile again: inside :func:`compiled_afresh` every compile
goes to XLA, as it does in a user's fresh process without a cache.

Example::

    with compiled_afresh():
        again = step.lower(*shapes).compile()
"""

import contextlib

import jax
from jax.experimental.compilation_cache import compilation_cache


@contextlib.contextmanager
def compiled_afresh():
    """Turn the persistent compilation cache off for the block (JAX decides once per
    process whether it uses the cache: ``reset_cache`` makes it decide again)."""
    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)
        compilation_cache.reset_cache()
