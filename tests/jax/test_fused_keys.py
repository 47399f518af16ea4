"""Layer index and per-layer, per-step PRNG keys in the fused step.

A layer may take ``index`` and/or ``key`` (``layer(p, h, batch, *, index,
key)``); layer ``i`` gets ``key = fold_in(step_key, i)`` (micro-batch ``m``:
``fold_in(fold_in(step_key, i), m)``), in the forward and in every recompute of
the backward scans. ``step_key`` is ``step(..., key=k)``, or drawn from
``opt_state.rng``: ``fold_in(split(rng)[1], 3)``.

The reference is ``jax.value_and_grad`` of the whole model's loss with the same
keys, then ``tx`` on embed/head and ``per_layer(tx)`` on the layers. Tolerance
``rtol=1e-5, atol=1e-6`` (fp32, the fused step's own test): a mask that differs
between the forward and a recompute, or a wrong key, flips about half of a
layer's dropped units and changes its gradient by O(1), far above it.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lomo_jax
from lomo_jax.fused import FusedState, LayeredModel, fused_init, fused_train_step

L, D, V, B, T = 3, 8, 11, 4, 3
RATE = 0.5


def embed(p, batch):
    return p["tok"][batch["ids"]]


def head(p, h, batch):
    logits = h @ p["out"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def block(p, h, index):
    """Even layers add ``tanh(h W)``, odd ones subtract half of it (index parity),
    scaled by ``1 + index / 4`` (so any permutation of the indices shows)."""
    y = jnp.tanh(h @ p["w"] + p["b"]) * (1.0 + 0.25 * index)
    return h + jnp.where(index % 2 == 0, y, -0.5 * y)


def dropout(h, key):
    keep = jax.random.bernoulli(key, 1.0 - RATE, h.shape)
    return jnp.where(keep, h / (1.0 - RATE), 0.0), keep


def make_layer(seen=None):
    """The dropout layer; with ``seen`` (a list) every call appends ``(index, mask)``
    from the running program (forward and recomputes alike)."""

    def layer(p, h, batch, *, index, key):
        x, keep = dropout(h, key)
        if seen is not None:
            jax.debug.callback(lambda i, m: seen.append((int(i), np.asarray(m))), index, keep)
        return block(p, x, index)

    return layer


def index_layer(p, h, batch, *, index):
    return block(p, h, index)


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    a = lambda *s: jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32)  # noqa: E731
    return {"embed": {"tok": a(V, D)}, "layers": {"w": a(L, D, D), "b": a(L, D)},
            "head": {"out": a(D, V)}}


def make_batch(seed=0):
    rng = np.random.default_rng(50 + seed)
    return {"ids": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
            "labels": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)}


def reference(loss_fn, tx, clip=None):
    """``value_and_grad(loss_fn)(params, batch, key)``, the global-norm clip
    (if ``clip``), then ``tx`` per unit (``per_layer(tx)`` on the layers)."""

    @jax.jit
    def step(params, state, batch, key):
        loss, g = jax.value_and_grad(loss_fn)(params, batch, key=key)
        if clip is not None:
            coef = jnp.minimum(1.0, clip / (optax.tree.norm(g) + 1e-6))
            g = jax.tree.map(lambda x: x * coef, g)
        out = {}
        for unit, t in (("embed", tx), ("layers", lomo_jax.per_layer(tx)), ("head", tx)):
            u, out[unit] = t.update(g[unit], getattr(state, unit), params[unit])
            params = dict(params, **{unit: optax.apply_updates(params[unit], u)})
        return params, FusedState(out["embed"], out["layers"], out["head"], None), loss

    return step


def assert_close(a, b):
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)


def copy(t):
    return jax.tree.map(jnp.copy, t)


TXS = {"adalomo": lambda: lomo_jax.adalomo(5e-2), "lomo": lambda: lomo_jax.lomo(5e-2)}


def test_rng_path_masks_and_equality():
    """Without key=: the layers' step key is fold_in(split(opt_state.rng)[1], 3).
    Per step, every call of layer i (forward, norm pass, update pass, and the
    reference's with that key) sees one mask; the masks of different layers and
    of the two steps differ; the result equals value_and_grad(model.loss)(...,
    key=that key) + adalomo; the rng advances to split(rng)[0]."""
    seen = []
    model, tx = LayeredModel(embed, make_layer(seen), head), TXS["adalomo"]()
    params = make_params()
    state = fused_init(tx, params, rng=jax.random.key(7))
    ref_p, ref_s = copy(params), copy(state)
    step, ref = fused_train_step(model, tx, clip_grad_norm=0.1), reference(model.loss, tx, 0.1)
    masks = []
    for s in range(2):
        new_rng, step_key = jax.random.split(state.rng)  # before the step donates it
        params, state, met = step(params, state, make_batch(s))
        ref_p, ref_s, ref_loss = ref(ref_p, ref_s, make_batch(s), jax.random.fold_in(step_key, 3))
        jax.effects_barrier()
        masks.append(_one_mask_per_layer(seen))
        seen.clear()
        np.testing.assert_array_equal(jax.random.key_data(state.rng),
                                      jax.random.key_data(new_rng))
        np.testing.assert_allclose(met["loss"], ref_loss, rtol=1e-6)
        assert_close(params, ref_p)
        assert_close((state.embed, state.layers, state.head), ref_s[:3])
    flat = [m for ms in masks for m in ms]
    for a in range(len(flat)):
        for b in range(a):
            assert not np.array_equal(flat[a], flat[b]), (a, b)
    assert 0.3 < np.mean(flat) < 0.7  # rate 0.5


def _one_mask_per_layer(seen):
    """The mask of each layer, checking that all four calls of it (the fused
    forward, norm pass and update pass, and the reference's) saw the same one."""
    assert sorted(i for i, _ in seen) == [i for i in range(L) for _ in range(4)]
    by_layer = {i: [m for j, m in seen if j == i] for i in range(L)}
    for ms in by_layer.values():
        assert all(np.array_equal(ms[0], m) for m in ms[1:])
    return [by_layer[i][0] for i in range(L)]


def test_key_argument_equals_grad_of_loss_with_the_same_key():
    """step(..., key=k) == value_and_grad(model.loss)(..., key=k) + lomo, with
    clipping (norm pass and update pass both recompute with the key). Sharded
    (jit refuses keyword arguments with in_shardings: the key goes positionally)."""
    model, tx = LayeredModel(embed, make_layer(), head), TXS["lomo"]()
    params = make_params()
    state = fused_init(tx, params)
    ref_p, ref_s = copy(params), copy(state)
    key = jax.random.key(100)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step = fused_train_step(model, tx, clip_grad_norm=0.1, shardings=(one, one, one))
    params, state, met = step(params, state, make_batch(), key=key)
    ref_p, ref_s, ref_loss = reference(model.loss, tx, 0.1)(ref_p, ref_s, make_batch(), key)
    np.testing.assert_allclose(met["loss"], ref_loss, rtol=1e-6)
    assert_close(params, ref_p)
    assert_close(state, ref_s)
    assert state.rng is None  # nothing drawn from a state without rng


def micro_loss(m):
    """The loss with micro-batch ``k`` (rows ``k, k+m, ...``) of layer ``i`` keyed
    ``fold_in(fold_in(key, i), k)``, written out by hand."""
    layer = make_layer()

    def loss(params, batch, key):
        h = embed(params["embed"], batch)
        for i in range(L):
            p_i = jax.tree.map(lambda x: x[i], params["layers"])
            for k in range(m):
                key_ik = jax.random.fold_in(jax.random.fold_in(key, i), k)
                part = layer(p_i, h[k::m], None, index=jnp.int32(i), key=key_ik)
                h = h.at[k::m].set(part)
        return head(params["head"], h, batch)

    return loss


def test_microbatches_fold_in_the_microbatch():
    """Micro-batch k of layer i: fold_in(fold_in(key, i), k), against the loss
    written out by hand (one pass: forward/recompute agreement is tested above)."""
    m = 2
    model, tx = LayeredModel(embed, make_layer(), head), TXS["lomo"]()
    params = make_params()
    state = fused_init(tx, params)
    ref_p, ref_s = copy(params), copy(state)
    key = jax.random.key(11)
    step = fused_train_step(model, tx, microbatches=m)
    params, state, met = step(params, state, make_batch(), key=key)
    ref_p, ref_s, ref_loss = reference(micro_loss(m), tx)(ref_p, ref_s, make_batch(), key)
    np.testing.assert_allclose(met["loss"], ref_loss, rtol=1e-6)
    assert_close(params, ref_p)
    assert_close(state, ref_s)


def test_index_only_layer():
    """A layer taking ``index`` alone gets an int32 scalar and no key, and needs
    no key anywhere; ``model.loss`` gives it 0..L-1 (the values inside the fused
    step are tested with the dropout layer, which uses the index the same way)."""
    seen = []

    def layer(p, h, batch, *, index):
        seen.append(jax.ShapeDtypeStruct(jnp.shape(index), jnp.result_type(index)))
        return index_layer(p, h, batch, index=index)

    model, tx = LayeredModel(embed, layer, head), TXS["lomo"]()
    assert model.takes_index and not model.takes_key
    params = make_params()
    jax.eval_shape(fused_train_step(model, tx, clip_grad_norm=0.1), params,
                   fused_init(tx, params), make_batch())
    assert len(seen) == 4 and set(seen) == {jax.ShapeDtypeStruct((), jnp.int32)}, seen
    h = embed(params["embed"], make_batch())
    for i in range(L):
        h = block(jax.tree.map(lambda x: x[i], params["layers"]), h, i)
    np.testing.assert_allclose(model.loss(params, make_batch()),
                               head(params["head"], h, make_batch()), rtol=1e-6)


def test_signatures():
    """Only the keywords a layer takes are passed; three arguments stay three."""
    kw = lambda p, h, b, **kwargs: h  # noqa: E731
    assert LayeredModel(embed, kw, head).takes_key and LayeredModel(embed, kw, head).takes_index
    three = LayeredModel(embed, lambda p, h, b: h, head)
    assert not three.takes_key and not three.takes_index
    assert three.call_layer({}, 1.0, None, index=2, key=jax.random.key(0)) == 1.0
    key_only = LayeredModel(embed, lambda p, h, b, *, key: key, head)
    assert key_only.takes_key and not key_only.takes_index
    assert key_only.call_layer({}, 1.0, None, index=2, key="k") == "k"


def test_key_needed_but_missing():
    model, tx = LayeredModel(embed, make_layer(), head), TXS["lomo"]()
    params = make_params()
    step = fused_train_step(model, tx)
    with pytest.raises(ValueError, match=r"takes a `key`.*key=k.*fused_init\(tx, params, rng="):
        step(params, fused_init(tx, params), make_batch())
    with pytest.raises(ValueError, match=r"takes a `key`.*model.loss\(params, batch, key=k\)"):
        model.loss(params, make_batch())


def test_key_given_but_unused():
    model, tx = LayeredModel(embed, index_layer, head), TXS["lomo"]()
    params = make_params()
    with pytest.raises(ValueError, match="takes no `key` argument.*silently ignored"):
        fused_train_step(model, tx)(params, fused_init(tx, params), make_batch(),
                                    key=jax.random.key(0))
    with pytest.raises(ValueError, match="takes no `key` argument"):
        model.loss(params, make_batch(), key=jax.random.key(0))
