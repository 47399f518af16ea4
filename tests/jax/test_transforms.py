"""Unit tests of lomo_jax.lomo / lomo_jax.adalomo and their scale_by_* halves."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lomo_jax


# ---------------------------------------------------------------------------
# A straightforward float64 NumPy reference of the rules, written from the
# papers' equations (and lomo-optim's numbers), independent of the JAX code.
# ---------------------------------------------------------------------------


def ref_adalomo_step(p, g, st, t, lr, eps=(1e-30, 1e-3), d=1.0, rho=-0.8, wd=0.0,
                     clip_value=None):
    g = np.asarray(g, np.float64)
    p = np.asarray(p, np.float64)
    if clip_value is not None:
        g = np.clip(g, -clip_value, clip_value)
    beta = 1.0 - t**rho
    sq = g * g + eps[0]
    if g.ndim >= 2:
        st["row"] = beta * st["row"] + (1 - beta) * sq.mean(-1)
        st["col"] = beta * st["col"] + (1 - beta) * sq.mean(-2)
        r = 1 / np.sqrt(st["row"] / st["row"].mean(-1, keepdims=True))
        c = 1 / np.sqrt(st["col"])
        u = r[..., :, None] * c[..., None, :] * g
    else:
        st["v"] = beta * st["v"] + (1 - beta) * sq
        u = g / np.sqrt(st["v"])
    u = u / max(1.0, np.sqrt(np.mean(u * u)) / d)
    lr_eff = lr * max(eps[1], np.sqrt(np.mean(p * p)))
    return p * (1 - lr_eff * wd) - lr_eff * u


def ref_state(p):
    p = np.asarray(p)
    if p.ndim >= 2:
        return {"row": np.zeros(p.shape[:-1]), "col": np.zeros(p.shape[:-2] + p.shape[-1:])}
    return {"v": np.zeros(p.shape)}


def run(tx, params, grads_seq):
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for g in grads_seq:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        out.append(params)
    return out, state


SHAPES = [(), (7,), (5, 6), (3, 4, 5), (2, 3, 4, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("wd,clip_value", [(0.0, None), (0.1, None), (0.0, 0.02), (0.05, 0.02)])
def test_adalomo_matches_reference(shape, wd, clip_value):
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=shape).astype(np.float32)
    grads = [rng.normal(size=shape).astype(np.float32) * 0.05 for _ in range(4)]
    lrs = [1e-2, 8e-3, 6e-3, 4e-3]
    schedule = lambda count: jnp.asarray(lrs)[count]  # noqa: E731
    tx = lomo_jax.adalomo(schedule, weight_decay=wd, clip_grad_value=clip_value)
    got, _ = run(tx, {"p": jnp.asarray(p0)}, [{"p": jnp.asarray(g)} for g in grads])
    p, st = p0.astype(np.float64), ref_state(p0)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        p = ref_adalomo_step(p, g, st, t, lr, wd=wd, clip_value=clip_value)
        np.testing.assert_allclose(np.asarray(got[t - 1]["p"]), p, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("wd,clip_value", [(0.0, None), (0.1, 0.03)])
def test_lomo_matches_reference(wd, clip_value):
    rng = np.random.default_rng(1)
    p0 = rng.normal(size=(4, 3)).astype(np.float32)
    grads = [rng.normal(size=(4, 3)).astype(np.float32) * 0.05 for _ in range(3)]
    schedule = optax.linear_schedule(0.1, 0.01, 3)
    tx = lomo_jax.lomo(schedule, weight_decay=wd, clip_grad_value=clip_value)
    got, _ = run(tx, {"p": jnp.asarray(p0)}, [{"p": jnp.asarray(g)} for g in grads])
    p = p0.astype(np.float64)
    for step, g in enumerate(grads):
        lr = float(schedule(step))
        gc = np.clip(g, -clip_value, clip_value) if clip_value else g
        p = p * (1 - lr * wd) - lr * gc
        np.testing.assert_allclose(np.asarray(got[step]["p"]), p, rtol=1e-6, atol=1e-7)


def test_adalomo_state_is_factored_and_small():
    params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,)), "s": jnp.zeros(()),
              "t": jnp.zeros((3, 8, 16))}
    state = lomo_jax.scale_by_adalomo().init(params)
    chex.assert_shape([state.v_row["w"], state.v_col["w"]], [(64,), (32,)])
    chex.assert_shape([state.v["b"], state.v["s"]], [(32,), ()])
    chex.assert_shape([state.v_row["t"], state.v_col["t"]], [(3, 8), (3, 16)])
    chex.assert_type([state.v_row["w"], state.v_col["w"], state.v["b"]], jnp.float32)
    floats = lambda x: sum(l.size for l in jax.tree.leaves(x))  # noqa: E731
    # an (m, n) matrix costs exactly m + n floats of state
    assert floats((state.v_row["w"], state.v_col["w"], state.v["w"])) == 64 + 32
    assert state.count.dtype == jnp.int32 and state.count.shape == ()


def test_first_step_uses_only_current_gradient():
    # beta_1 = 1 - 1**rho = 0: after one step the statistics are the gradient's own.
    g = jnp.asarray(np.random.default_rng(2).normal(size=(4, 6)), jnp.float32)
    tx = lomo_jax.scale_by_adalomo()
    _, st = tx.update({"w": g}, tx.init({"w": g}), {"w": g})
    np.testing.assert_allclose(st.v_row["w"], jnp.mean(g * g + 1e-30, -1), rtol=1e-6)
    np.testing.assert_allclose(st.v_col["w"], jnp.mean(g * g + 1e-30, -2), rtol=1e-6)
    assert int(st.count) == 1


def test_factored_statistics_are_layout_independent():
    # PyTorch keeps Linear weights as [out, in]; Flax kernels are [in, out].
    # AdaLomo's factored update of W^T is the transpose of the update of W.
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(6, 9)), jnp.float32)
    gs = [jnp.asarray(rng.normal(size=(6, 9)), jnp.float32) for _ in range(3)]
    a, _ = run(lomo_jax.adalomo(1e-2), {"w": w}, [{"w": g} for g in gs])
    b, _ = run(lomo_jax.adalomo(1e-2), {"w": w.T}, [{"w": g.T} for g in gs])
    # mean(row stats) == mean(col stats) == mean(G^2 + eps1): equal up to fp32 rounding
    np.testing.assert_allclose(a[-1]["w"], b[-1]["w"].T, rtol=1e-5, atol=1e-7)


LOW_PRECISION_TX = {
    "adalomo": lambda: lomo_jax.adalomo(1e-2, weight_decay=0.1),
    "lomo": lambda: lomo_jax.lomo(0.2, weight_decay=0.1, clip_grad_value=0.15),
}


@pytest.mark.parametrize("name", sorted(LOW_PRECISION_TX))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params_math_in_fp32(dtype, name):
    rng = np.random.default_rng(4)
    p32 = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
    g32 = jnp.asarray(rng.normal(size=(8, 16)) * 0.1, jnp.float32)
    p, g = p32.astype(dtype), g32.astype(dtype)
    tx = LOW_PRECISION_TX[name]()
    params, expected_p = {"w": p}, {"w": p.astype(jnp.float32)}
    state, state32 = tx.init(params), tx.init(expected_p)
    tx32 = LOW_PRECISION_TX[name]()
    for step in range(3):  # several steps: rounding happens once per step, never compounds inside
        gs = {"w": (g * (step + 1)).astype(dtype)}
        u, state = tx.update(gs, state, params)
        chex.assert_type(u["w"], jnp.float32)  # the update is never pre-rounded
        assert [x.dtype for x in jax.tree.leaves(state)] == [
            x.dtype for x in jax.tree.leaves(tx.init({"w": p32}))]  # fp32 statistics
        params = optax.apply_updates(params, u)
        chex.assert_type(params["w"], dtype)
        # the same as doing the whole step in fp32 on the upcast values, rounded once
        u32, state32 = tx32.update({"w": gs["w"].astype(jnp.float32)}, state32, expected_p)
        expected = (expected_p["w"] + u32["w"]).astype(dtype)
        np.testing.assert_array_equal(np.asarray(params["w"], np.float32),
                                      np.asarray(expected, np.float32))
        assert np.mean(np.asarray(params["w"] != p)) > 0.5  # the step did move the weights
        expected_p = {"w": params["w"].astype(jnp.float32)}


def test_scale_by_lomo_composes():
    """``scale_by_lomo`` is LOMO without the learning rate: chained with
    ``optax.scale_by_learning_rate`` it is ``lomo``; alone it is the direction
    ``clip(g) + wd * p``."""
    rng = np.random.default_rng(9)
    p = {"w": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
         "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1, jnp.float32), p)
             for _ in range(3)]
    schedule = optax.exponential_decay(0.1, 1, 0.5)
    composed = optax.chain(lomo_jax.scale_by_lomo(weight_decay=0.1, clip_grad_value=0.05),
                           optax.scale_by_learning_rate(schedule))
    a, _ = run(composed, p, grads)
    b, _ = run(lomo_jax.lomo(schedule, weight_decay=0.1, clip_grad_value=0.05), p, grads)
    for x, y in zip(a, b):
        chex.assert_trees_all_close(x, y, rtol=1e-6, atol=1e-7)
    direction = lomo_jax.scale_by_lomo(weight_decay=0.1, clip_grad_value=0.05)
    u, _ = direction.update(grads[0], direction.init(p), p)
    want = jax.tree.map(lambda g, w: jnp.clip(g, -0.05, 0.05) + 0.1 * w, grads[0], p)
    chex.assert_trees_all_close(u, want, rtol=1e-6)


def test_in_optax_chain_with_global_norm_clip_and_schedule():
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
    grads = jax.tree.map(lambda x: 10.0 * jnp.ones_like(x), params)
    tx = optax.chain(optax.clip_by_global_norm(1.0), lomo_jax.lomo(optax.constant_schedule(0.1)))
    (new,), _ = run(tx, params, [grads])
    norm = optax.tree.norm(grads)
    for k in params:
        np.testing.assert_allclose(new[k], params[k] - 0.1 * grads[k] / norm, rtol=1e-6)


def test_inject_hyperparams_changes_learning_rate():
    params = {"w": jnp.ones((3, 4))}
    grads = {"w": jnp.full((3, 4), 0.5)}
    tx = optax.inject_hyperparams(lomo_jax.adalomo)(learning_rate=1e-2, weight_decay=0.0)
    state = tx.init(params)
    u1, state = tx.update(grads, state, params)
    state.hyperparams["learning_rate"] = jnp.asarray(2e-2)
    u2, _ = tx.update(grads, state, params)
    # same gradient every step, so the normalised update is the same: only lr changed
    np.testing.assert_allclose(u2["w"], 2 * u1["w"], rtol=1e-6)


def test_flax_nnx_optimizer():
    """In ``nnx.Optimizer`` the chain gives exactly what it gives applied by hand to the
    same parameters and gradients, step after step, and the model learns."""
    from flax import nnx

    def make_tx():
        return optax.chain(optax.clip_by_global_norm(1.0),
                           lomo_jax.adalomo(optax.exponential_decay(1e-1, 10, 0.8)))

    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(16, 4)), jnp.float32)
    y = x @ jnp.ones((4, 3))

    def loss_fn(m):
        return jnp.mean((m(x) - y) ** 2)

    @nnx.jit
    def step(m, o):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        o.update(m, grads)
        return loss

    # the same by hand on the pure parameter dict
    tx = make_tx()
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    opt_state = tx.init(params)

    @jax.jit
    def ref_step(params, opt_state):
        def loss_of(p):
            s = nnx.State(state)
            nnx.replace_by_pure_dict(s, p)
            return loss_fn(nnx.merge(graphdef, s))

        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(30):
        losses.append(float(step(model, opt)))
        params, opt_state, ref_loss = ref_step(params, opt_state)
        np.testing.assert_allclose(losses[-1], float(ref_loss), rtol=1e-6)
        chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), params,
                                    rtol=1e-6, atol=1e-7)
    assert losses[-1] < 0.5 * losses[0]


def test_linen_train_state():
    import flax.linen as nn
    from flax.training import train_state

    module = nn.Dense(3)
    x = jnp.ones((2, 4))
    params = module.init(jax.random.key(0), x)["params"]
    state = train_state.TrainState.create(apply_fn=module.apply, params=params,
                                          tx=lomo_jax.lomo(0.1, weight_decay=0.01))
    grads = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, x)))(params)
    new = state.apply_gradients(grads=grads)
    assert int(new.step) == 1
    np.testing.assert_allclose(new.params["kernel"],
                               params["kernel"] * (1 - 0.1 * 0.01) - 0.1 * grads["kernel"],
                               rtol=1e-6)


def test_jit_and_tree_structure_preserved():
    params = {"a": {"w": jnp.ones((2, 3))}, "b": [jnp.ones(3), jnp.ones(())]}
    tx = lomo_jax.adalomo(1e-3)
    state = tx.init(params)
    u, state2 = jax.jit(tx.update)(params, state, params)
    chex.assert_trees_all_equal_structs(u, params)
    chex.assert_trees_all_equal_shapes(u, params)
    chex.assert_trees_all_equal_structs(state, state2)


# ------------------------------- bad input ---------------------------------


def test_integer_params_are_refused_with_their_path():
    with pytest.raises(TypeError, match=r"\['layer'\]\['ids'\].*int32"):
        lomo_jax.adalomo(1e-3).init({"layer": {"ids": jnp.zeros(3, jnp.int32)}})
    with pytest.raises(TypeError, match="complex"):
        lomo_jax.lomo(1e-3).init({"z": jnp.zeros(3, jnp.complex64)})


@pytest.mark.parametrize("kwargs,match", [
    ({"learning_rate": 0.0}, "learning_rate must be positive"),
    ({"learning_rate": -1e-3}, "learning_rate must be positive"),
    ({"learning_rate": 1e-3, "clip_grad_value": 0.0}, "clip_grad_value must be positive"),
    ({"learning_rate": 1e-3, "weight_decay": -0.1}, "weight_decay must be >= 0"),
])
def test_bad_hyperparameters(kwargs, match):
    for factory in (lomo_jax.lomo, lomo_jax.adalomo):
        with pytest.raises(ValueError, match=match):
            factory(**kwargs)
    with pytest.raises(ValueError, match="clip_threshold must be positive"):
        lomo_jax.adalomo(1e-3, clip_threshold=0.0)
    with pytest.raises(ValueError, match="eps must be a pair"):
        lomo_jax.adalomo(1e-3, eps=(1e-30,))


def test_adalomo_update_needs_params():
    tx = lomo_jax.adalomo(1e-3)
    p = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="needs `params`"):
        tx.update(p, tx.init(p))


# ------------------------- empty trees, decay_rate ---------------------------

EVERY_TX = {
    "lomo": lambda: lomo_jax.lomo(1e-3),
    "lomo_wd": lambda: lomo_jax.lomo(1e-3, weight_decay=0.1, clip_grad_value=1.0),
    "adalomo": lambda: lomo_jax.adalomo(1e-3, weight_decay=0.1),
    "scale_by_lomo": lambda: lomo_jax.scale_by_lomo(weight_decay=0.1),
    "scale_by_adalomo": lambda: lomo_jax.scale_by_adalomo(),
}


@pytest.mark.parametrize("name", sorted(EVERY_TX))
@pytest.mark.parametrize("tree", [{}, {"embed": {}, "head": ()}], ids=["empty", "nested_empty"])
def test_update_of_an_empty_tree(name, tree):
    """A unit with no trainable leaves (as optax.adafactor allows): empty updates."""
    tx = EVERY_TX[name]()
    state = tx.init(tree)
    updates, state = jax.jit(tx.update)(tree, state, tree)
    assert updates == tree
    assert jax.tree.structure(tx.update(tree, state, tree)[1]) == jax.tree.structure(state)


def test_adalomo_rejects_a_positive_decay_rate():
    for factory in (lomo_jax.scale_by_adalomo, lambda **kw: lomo_jax.adalomo(1e-3, **kw)):
        with pytest.raises(ValueError, match=r"decay_rate must be <= 0 .*got 0\.5"):
            factory(decay_rate=0.5)
        factory(decay_rate=0.0)  # beta_t = 0: only the current gradient, allowed as in torch


@pytest.mark.parametrize("make", [lomo_jax.lomo, lomo_jax.adalomo])
def test_schedules_expose_the_learning_rate_the_update_uses(make):
    """``tx.update.learning_rate_at(state)``: the step and the rate an update from
    ``state`` uses (the fused step refuses a negative/non-finite one); a
    constant rate, checked when built, has none."""
    schedule = optax.linear_schedule(1e-1, -1e-1, 10)
    tx = make(schedule)
    params = {"w": jnp.ones((3, 4))}
    state = tx.init(params)
    grads = {"w": jnp.full((3, 4), 0.5)}
    for t in range(8):
        step, rate = tx.update.learning_rate_at(state)
        assert int(step) == t and float(rate) == pytest.approx(float(schedule(t)))
        u, state = tx.update(grads, state, params)
        if make is lomo_jax.lomo:  # lr * g: the rate used is the one reported
            np.testing.assert_allclose(u["w"], -float(rate) * 0.5, rtol=1e-6, atol=1e-8)
    assert float(rate) < 0  # the schedule did turn negative; tx.update alone applies it
    assert not hasattr(make(1e-2).update, "learning_rate_at")
