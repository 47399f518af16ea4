"""The test session's shared compilation cache (root conftest): a program compiled
again is loaded from disk, with the memory analysis of a fresh compile, and
:func:`compiled_afresh` really compiles."""

import os

import jax
import jax.numpy as jnp
from jax import monitoring

from tests.jax.compile_cache import compiled_afresh

HITS, MISSES = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"


def _loss(w, x):
    return jnp.sum(jnp.tanh(x @ w) ** 2)


def _compile(events):
    """Compile a small gradient program (in-memory caches cleared first) and return its
    memory figures and the persistent-cache events its compile recorded."""
    jax.clear_caches()
    del events[:]
    shapes = (jax.ShapeDtypeStruct((32, 48), jnp.float32),
              jax.ShapeDtypeStruct((8, 32), jnp.float32))
    m = jax.jit(jax.grad(_loss)).lower(*shapes).compile().memory_analysis()
    figures = (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
               m.temp_size_in_bytes)
    return figures, [e for e in events if e in (HITS, MISSES)]


def test_second_compile_is_loaded_with_the_same_memory_and_afresh_compiles():
    assert os.environ.get("JAX_COMPILATION_CACHE_DIR"), "the root conftest sets the cache up"
    # the session stores only compiles of >= 1 s (conftest); this small program is
    # stored as any compile is when the threshold is 0
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    events = []
    listener = lambda event, **kw: events.append(event)  # noqa: E731
    monitoring.register_event_listener(listener)
    try:
        first, _ = _compile(events)  # a miss, or a hit if another test compiled it first
        again, seen = _compile(events)
        assert seen == [HITS]
        with compiled_afresh():
            fresh, seen_afresh = _compile(events)
        assert seen_afresh == []  # compiled by XLA, the cache not consulted
        assert again == fresh == first
        _, seen = _compile(events)  # the cache is back after the block
        assert seen == [HITS]
    finally:
        monitoring.unregister_event_listener(listener)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)
