"""lomo_jax.per_layer equals running the inner transform on each layer alone."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lomo_jax

L = 4


def stacked_tree(rng):
    return {
        "attn": {"q": jnp.asarray(rng.normal(size=(L, 8, 6)), jnp.float32)},
        "norm": jnp.asarray(rng.normal(size=(L, 6)), jnp.float32),
        "gate": jnp.asarray(rng.normal(size=(L, 2, 3, 5)), jnp.float32),
    }


TRANSFORMS = {
    "adalomo": lambda: lomo_jax.adalomo(1e-2, weight_decay=0.1),
    "lomo": lambda: lomo_jax.lomo(optax.linear_schedule(1e-2, 1e-3, 5), clip_grad_value=0.5),
    "adafactor": lambda: optax.adafactor(1e-2, min_dim_size_to_factor=2),
    "adamw": lambda: optax.adamw(1e-2),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_per_layer_equals_each_layer_separately(name):
    rng = np.random.default_rng(0)
    params = stacked_tree(rng)
    grads_seq = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype) * 0.1,
                              params) for _ in range(3)]

    tx = lomo_jax.per_layer(TRANSFORMS[name]())
    state = tx.init(params)
    stacked = params
    for g in grads_seq:
        u, state = jax.jit(tx.update)(g, state, stacked)
        stacked = optax.apply_updates(stacked, u)

    for layer in range(L):
        take = lambda t: jax.tree.map(lambda x: x[layer], t)  # noqa: E731
        inner = TRANSFORMS[name]()
        p = take(params)
        s = inner.init(p)
        for g in grads_seq:
            u, s = inner.update(take(g), s, p)
            p = optax.apply_updates(p, u)
        chex.assert_trees_all_close(take(stacked), p, rtol=1e-6, atol=1e-7)
        # and the state slice is the separate run's state
        chex.assert_trees_all_close(take(state.inner_state), s, rtol=1e-6, atol=1e-7)


def test_per_layer_statistics_differ_from_whole_stack():
    # Treating the stack as one tensor would share RMS across layers: a layer
    # with 100x larger weights would move every other layer 100x further.
    params = {"w": jnp.stack([jnp.ones((4, 4)), 100 * jnp.ones((4, 4))])}
    grads = {"w": jnp.ones((2, 4, 4))}
    u_per, _ = lomo_jax.per_layer(lomo_jax.adalomo(1.0)).update(
        grads, lomo_jax.per_layer(lomo_jax.adalomo(1.0)).init(params), params)
    u_all, _ = lomo_jax.adalomo(1.0).update(grads, lomo_jax.adalomo(1.0).init(params), params)
    np.testing.assert_allclose(u_per["w"][0], -jnp.ones((4, 4)), rtol=1e-6)
    np.testing.assert_allclose(u_per["w"][1], -100 * jnp.ones((4, 4)), rtol=1e-6)
    assert not np.allclose(u_all["w"][0], u_per["w"][0])


def test_state_gets_the_layer_axis():
    params = {"w": jnp.zeros((L, 8, 6)), "b": jnp.zeros((L, 6))}
    state = lomo_jax.per_layer(lomo_jax.scale_by_adalomo()).init(params)
    inner = state.inner_state
    chex.assert_shape(inner.count, (L,))
    chex.assert_shape([inner.v_row["w"], inner.v_col["w"], inner.v["b"]], [(L, 8), (L, 6), (L, 6)])


def test_mismatched_layer_axes_are_named():
    params = {"w": jnp.zeros((4, 3, 3)), "b": jnp.zeros((5, 3))}
    with pytest.raises(ValueError, match=r"\['b'\]: 5.*|\['w'\]: 4.*\['b'\]: 5"):
        lomo_jax.per_layer(lomo_jax.adalomo(1e-3)).init(params)
    with pytest.raises(ValueError, match=r"\['s'\] is a scalar"):
        lomo_jax.per_layer(lomo_jax.adalomo(1e-3)).init({"s": jnp.zeros(())})
