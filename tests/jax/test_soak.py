"""Soak test: 200 fused steps on a small model with a learning-rate schedule
and global-norm clipping, next to the unfused reference run on the same data.

Checked: no NaN/inf anywhere (losses, norms, final parameters and state);
the loss goes down (mean of the last 20 steps below a tenth of the first 20);
the step is compiled once for the whole run (no retracing from weak types or
changing state structure); ``memory_analysis()`` of the compiled step is the
same when compiled again after the run and after ``jax.clear_caches()``; and
the fused and unfused parameters still agree at the end.

200 steps prove what 2,000 did: a retrace, a state whose structure or weak
types change, or a leak of compiled memory shows from the second step on, and
the schedule runs its whole course (warmup, cosine decay to ``end_value``)
within the run. Measured on this model (x86 CPU, fp32, 200 steps): the mean
loss of the first 10 steps is 3.9, of the last 10 0.012 (the bound asks for a
tenfold fall); clipping is active in the first 20 steps.

Tolerance of the fused-vs-unfused comparison: the two compute the same math
in a different order (per-layer vjp inside a reverse scan vs. one
``jax.grad``; the global norm summed in another order), so each step differs
by float32 rounding (~1e-7 relative) and the differences are carried along
by the steps of training. Measured on this model (x86 CPU, fp32): the
largest parameter difference, relative to its leaf's largest magnitude, is
1e-7 after 10 steps, 4e-7 after 100 and 200, and 7e-7 after 1,000 and 2,000 (it
does not grow: the decaying schedule and clipping keep the run contractive); the
largest loss difference is 1e-6 absolute. The bound is ``1e-4`` (relative to
each leaf's scale, and absolute plus relative for the losses): ~100x the
measured drift, for other CPUs' BLAS and vector widths, and still far below
what a real bug (a wrong clip coefficient, a missed or repeated layer update,
a stale state slice) does to the parameters within a few steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lomo_jax
from lomo_jax.fused import fused_init, fused_train_step
from tests.jax.builders import B, T, V, make_model, make_params, reference_step
from tests.jax.compile_cache import compiled_afresh

N_STEPS = 200
WINDOW = 20  # steps averaged at the start and at the end of the run
CLIP = 1.0
TOL = 1e-4


def _batches(n, seed=0):
    """A learnable task: the label of token ``t`` is ``(3 t + 1) mod V``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(n, B, T)).astype(np.int32)
    return ids, ((3 * ids + 1) % V).astype(np.int32)


def _mem(compiled):
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
            m.temp_size_in_bytes)


def _finite(tree):
    return all(bool(np.isfinite(np.asarray(x, np.float64)).all())
               for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact))


@pytest.mark.soak
def test_soak_fused_steps():
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, 2e-2, warmup_steps=N_STEPS // 20, decay_steps=N_STEPS, end_value=1e-3)
    tx = lomo_jax.adalomo(schedule, weight_decay=0.01)
    model = make_model()
    # committed to the device, like the step's outputs: one input signature
    params = jax.device_put(make_params(0), jax.devices()[0])
    state = jax.device_put(fused_init(tx, params), jax.devices()[0])
    ref_params = jax.tree.map(jnp.copy, params)
    ref_state = jax.tree.map(jnp.copy, state)
    step = fused_train_step(model, tx, clip_grad_norm=CLIP)
    ref = reference_step(model, tx, CLIP)
    ids, labels = _batches(N_STEPS)

    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          (params, state, {"ids": ids[0], "labels": labels[0]}))
    with compiled_afresh():  # each compile here is XLA's, not a load of the session's cache
        mem = _mem(step.lower(*shapes).compile())
    assert mem[2] == sum(x.nbytes for x in jax.tree.leaves((params, state)))  # in place

    losses, norms, ref_losses = [], [], []
    for i in range(N_STEPS):
        batch = {"ids": jnp.asarray(ids[i]), "labels": jnp.asarray(labels[i])}
        params, state, m = step(params, state, batch)
        ref_params, ref_state, rm = ref(ref_params, ref_state, batch)
        losses.append(m["loss"])
        norms.append(m["grad_norm"])
        ref_losses.append(rm["loss"])
        if i == 0:
            compiled_after_first = step._cache_size()
    losses, norms, ref_losses = (np.asarray(jnp.stack(x)) for x in (losses, norms, ref_losses))

    # compiled once for all the steps
    assert step._cache_size() == compiled_after_first == 1
    # no NaN / inf
    assert np.isfinite(losses).all() and np.isfinite(norms).all()
    assert _finite((params, state))
    # the loss goes down
    first, last = losses[:WINDOW].mean(), losses[-WINDOW:].mean()
    assert last < 0.1 * first, (first, last)
    # clipping was active early on
    assert (norms[:WINDOW] > CLIP).any()
    # fused and unfused still agree
    np.testing.assert_allclose(losses, ref_losses, rtol=TOL, atol=TOL)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                            jax.tree.leaves(ref_params)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(np.abs(b).max(), 1e-3)
        np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL * scale,
                                   err_msg=jax.tree_util.keystr(path))
    # the same memory analysis after the run and after clearing every cache
    with compiled_afresh():
        assert _mem(step.lower(*shapes).compile()) == mem
        jax.clear_caches()
        assert _mem(step.lower(*shapes).compile()) == mem
