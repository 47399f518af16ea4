"""lomo_jax.cross_entropy: the chunked head loss equals the plain one, value and
gradients, and never builds the [N, V] logits or their cotangent; labels outside
the vocabulary raise (concrete) or make the loss NaN (traced)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lomo_jax import aot
from lomo_jax.cross_entropy import linear_cross_entropy, vocab_chunk_size

IGNORE = -100


def reference(x, w, labels, transposed=False, reduction="mean"):
    """``(x @ W).astype(f32)`` and optax's cross-entropy: what autodiff would give."""
    logits = (x @ (w.T if transposed else w)).astype(jnp.float32)
    return reference_of_logits(logits, labels, reduction)


def reference_of_logits(logits, labels, reduction="mean"):
    valid = labels != IGNORE
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    total = jnp.sum(jnp.where(valid, nll, 0.0))
    return total / jnp.maximum(valid.sum(), 1) if reduction == "mean" else total


def data(n=37, d=16, vocab=1000, seed=0, dtype=jnp.float32):
    """x [3, n, d], W [d, V], labels [3, n] (five ignored)."""
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (3, n, d)).astype(dtype)
    w = (jax.random.normal(k[1], (d, vocab)) * 0.3).astype(dtype)
    labels = jax.random.randint(k[2], (3, n), 0, vocab).at[0, :5].set(IGNORE)
    return x, w, labels


# (vocabulary, chunk_bytes): 128-column chunks and a tail (a prime vocabulary has
# no divisor to chunk by); the default (40-column chunks dividing 1000); one chunk
CHUNKINGS = {"tail": (1009, 128 * (6 * 111 + 128)), "many": (1000, None), "whole": (1000, 10**10)}


@pytest.mark.parametrize("chunking", sorted(CHUNKINGS))
@pytest.mark.parametrize("transposed", [False, True], ids=["DV", "VD_tied"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_value_and_gradients_match_plain_cross_entropy(chunking, transposed, reduction):
    vocab, chunk_bytes = CHUNKINGS[chunking]
    x, w, labels = data(vocab=vocab)
    w_arg = w.T if transposed else w

    def ours(x, w):
        return linear_cross_entropy(x, w, labels, transposed=transposed, reduction=reduction,
                                    chunk_bytes=chunk_bytes)

    (a, (gx, gw)), (b, (rx, rw)) = [
        jax.value_and_grad(f, argnums=(0, 1))(x, w_arg)
        for f in (ours, lambda x, w: reference(x, w, labels, transposed, reduction))
    ]
    np.testing.assert_allclose(a, b, rtol=1e-6)
    # 1e-5 of the largest entry: fp32 summation order only; a missing chunk, a wrong
    # softmax, label or scale term is off by O(1e-2) of it.
    for ours_g, ref_g in ((gx, rx), (gw, rw)):
        np.testing.assert_allclose(ours_g, ref_g, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref_g).max()))


@pytest.mark.parametrize("transposed", [False, True], ids=["DV", "VD_tied"])
def test_logit_softcap_matches_capped_plain_cross_entropy(transposed):
    """Gemma 2's final soft-cap c tanh(z / c), chunk by chunk (chunks and a tail),
    equals optax's cross-entropy of the capped logits, value and gradients. The
    cap is small next to the logits (|z| up to ~6), so tanh bends them: a cap
    left out of the forward, or its 1 - tanh^2 out of the backward, is off by
    O(1e-1) of the largest gradient entry."""
    vocab, chunk_bytes = CHUNKINGS["tail"]
    x, w, labels = data(vocab=vocab)
    w_arg = w.T if transposed else w
    cap = 2.0

    def capped(x, w):
        logits = (x @ (w.T if transposed else w)).astype(jnp.float32)
        return reference_of_logits(cap * jnp.tanh(logits / cap), labels)

    def ours(x, w):
        return linear_cross_entropy(x, w, labels, transposed=transposed, chunk_bytes=chunk_bytes,
                                    logit_softcap=cap)

    (a, grads), (b, refs) = [jax.value_and_grad(f, argnums=(0, 1))(x, w_arg)
                             for f in (ours, capped)]
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert abs(float(a) - float(reference(x, w_arg, labels, transposed))) > 0.1  # the cap bends
    for ours_g, ref_g in zip(grads, refs):
        np.testing.assert_allclose(ours_g, ref_g, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref_g).max()))
    with pytest.raises(ValueError, match="logit_softcap must be a positive"):
        linear_cross_entropy(x, w, labels, logit_softcap=0.0)


def test_the_chunkings_really_differ():
    """The parametrisation above covers a tail chunk, divisor chunks and one chunk."""
    n, d = 111, 16
    assert vocab_chunk_size(n, 1009, d, CHUNKINGS["tail"][1], 4) == 128  # 7 chunks + 113
    assert vocab_chunk_size(n, 1000, d, None, 4) == 40  # 25 chunks
    assert vocab_chunk_size(n, 1000, d, CHUNKINGS["whole"][1], 4) == 1000
    # The 7B/8B heads: divisors of the vocabulary, chunks of 10-30 MiB.
    assert vocab_chunk_size(4096, 32000, 4096) == 800
    assert vocab_chunk_size(1024, 128256, 4096) == 1336


def test_bf16_gradients_are_those_of_the_plain_bf16_computation():
    """Logits are rounded to bf16 and their cotangent cast to bf16, as autodiff of
    ``(x @ W).astype(f32)`` does: the gradients agree to bf16 rounding."""
    x, w, labels = data(vocab=1009, dtype=jnp.bfloat16)
    f = lambda x, w: linear_cross_entropy(x, w, labels, chunk_bytes=CHUNKINGS["tail"][1])  # noqa: E731
    (a, g), (b, r) = [jax.value_and_grad(h, argnums=(0, 1))(x, w)
                      for h in (f, lambda x, w: reference(x, w, labels))]
    chex.assert_trees_all_equal_dtypes(g, (x, w))
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for ours, ref in zip(g, r):
        ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
        # two bf16 spacings of the largest entry: a wrong term would be ~1e-1 off
        assert np.abs(ours - ref).max() <= 2 * 2**-8 * np.abs(ref).max()


def test_all_ignored_gives_zero_loss_and_gradients():
    x, w, labels = data()
    labels = jnp.full_like(labels, IGNORE)
    loss, g = jax.value_and_grad(lambda x: linear_cross_entropy(x, w, labels))(x)
    assert float(loss) == 0.0 and float(jnp.abs(g).max()) == 0.0


def test_no_logits_sized_buffer():
    """Compiled memory of value_and_grad: the chunked loss holds a fraction of one
    [N, V] fp32 logits array; the plain loss holds several."""
    n, d, vocab = 2048, 64, 16384
    x = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, vocab), jnp.float32)
    labels = jax.ShapeDtypeStruct((n,), jnp.int32)
    logits_bytes = n * vocab * 4

    def grad_of(loss):
        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    ours = aot.compiled_memory(grad_of(linear_cross_entropy), x, w, labels)
    plain = aot.compiled_memory(grad_of(reference), x, w, labels)
    assert plain.temporaries >= logits_bytes  # the measurement sees the logits
    assert ours.temporaries <= logits_bytes / 4, (ours.temporaries, logits_bytes)


def test_bad_shapes_are_named():
    x, w, labels = data()
    with pytest.raises(ValueError, match=r"w must be \[D, V\]"):
        linear_cross_entropy(x, w.T, labels)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(x, w, labels[:, :-1])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, w, labels, reduction="max")


def test_labels_out_of_range_raise_concrete_and_give_nan_traced():
    """A label >= V or negative (other than -100) is an error: concrete labels
    raise naming the value; under jit the loss and the gradients are NaN (before,
    the label's logit was taken as 0: a finite, wrong loss)."""
    x, w, labels = data(n=5, vocab=200)
    for bad in (200, -5):
        wrong = labels.at[1, 2].set(bad)
        with pytest.raises(ValueError, match=rf"linear_cross_entropy: labels holds {bad}; its "
                                             r"entries must lie in \[0, 200\) \(vocab_size = 200\)"
                                             r" or be -100 \(ignored\)"):
            linear_cross_entropy(x, w, wrong)
        loss, (gx, gw) = jax.jit(jax.value_and_grad(linear_cross_entropy, argnums=(0, 1)))(
            x, w, wrong)
        assert np.isnan(float(loss)) and np.isnan(np.asarray(gw)).all()
        assert np.isnan(np.asarray(gx)[1, 2]).all()
    ok = jax.jit(linear_cross_entropy)(x, w, labels)  # -100 is ignored, not an error
    np.testing.assert_allclose(ok, reference(x, w, labels), rtol=1e-5)
