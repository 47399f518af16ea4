"""lomo_jax.adaptive_clip (in lomo_jax.adaptive_clipping): the AdaGC rule, tested
against a numpy transcription of its equations and inside the fused step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lomo_jax.adaptive_clipping import AdaptiveClipState, adaptive_clip


def reference(grads, relative, decay, warmup, absolute):
    """The module docstring's equations for one tensor, in float64."""
    gamma, out, gammas = math.inf, [], []
    for t, g in enumerate(grads):
        n = float(np.linalg.norm(g))
        limit = (math.inf if absolute is None else absolute) if t < warmup else relative * gamma
        h = min(1.0, limit / n) if n > 0 else 1.0
        c = h * n
        if t < warmup:
            gamma = min(gamma, c) if c > 0 else gamma
        elif math.isinf(gamma):
            gamma = c if c > 0 else gamma
        else:
            gamma = decay * gamma + (1 - decay) * c
        out.append(h * g)
        gammas.append(gamma)
    return out, gammas


def run(tx, steps):
    """Apply ``tx`` to a list of gradient trees, jitted; the updates and states."""
    state = tx.init(steps[0])
    update = jax.jit(tx.update)
    outs, states = [], []
    for g in steps:
        u, state = update(g, state)
        outs.append(u)
        states.append(state)
    return outs, states


def spiky_steps(rng, n=8):
    """Two tensors in a tuple container (so pairs can't be mistaken for
    containers), one of them zero at step 2, a x50 spike at step 5, and a
    scalar bias that is always zero."""
    steps = []
    for t in range(n):
        w = rng.normal(size=(4, 3)).astype(np.float32) * (0.5 + 0.1 * t)
        v = rng.normal(size=(5,)).astype(np.float32)
        if t == 2:
            v = np.zeros_like(v)
        if t == 5:
            w = w * 50
        steps.append({"pair": (w, v), "bias": np.zeros((), np.float32)})
    return steps


@pytest.mark.parametrize("absolute", [1.0, None])
def test_rule_matches_the_equations_leaf_by_leaf(absolute):
    steps = spiky_steps(np.random.default_rng(0))
    tx = adaptive_clip(relative=1.05, decay=0.9, warmup_steps=3, absolute=absolute)
    outs, states = run(tx, [jax.tree.map(jnp.asarray, s) for s in steps])
    for path in [("pair", 0), ("pair", 1), ("bias",)]:
        pick = lambda tree: tree[path[0]] if len(path) == 1 else tree[path[0]][path[1]]  # noqa: E731
        want, want_gamma = reference([pick(s) for s in steps], 1.05, 0.9, 3, absolute)
        for t in range(len(steps)):
            np.testing.assert_allclose(np.asarray(pick(outs[t])), want[t], rtol=2e-6, atol=0,
                                       err_msg=f"{path} step {t}")
            np.testing.assert_allclose(float(pick(states[t].norm_ema)), want_gamma[t],
                                       rtol=2e-6, err_msg=f"{path} gamma at step {t}")
    assert int(states[-1].count) == len(steps)


def test_a_spike_after_warm_up_is_cut_to_relative_times_the_average():
    steps = spiky_steps(np.random.default_rng(1))
    tx = adaptive_clip(relative=1.05, decay=0.9, warmup_steps=3)
    outs, states = run(tx, [jax.tree.map(jnp.asarray, s) for s in steps])
    before = float(states[4].norm_ema["pair"][0])
    raw = float(np.linalg.norm(steps[5]["pair"][0]))
    got = float(jnp.linalg.norm(outs[5]["pair"][0]))
    assert raw > 20 * before  # the spike is real
    assert got == pytest.approx(1.05 * before, rel=1e-6)
    # and the direction is kept
    np.testing.assert_allclose(np.asarray(outs[5]["pair"][0]) / got, steps[5]["pair"][0] / raw,
                               rtol=1e-5, atol=1e-7)


def test_warm_up_clips_each_tensor_to_absolute():
    g = {"w": jnp.full((10,), 3.0)}  # norm 9.49
    tx = adaptive_clip(warmup_steps=2, absolute=0.5)
    u, state = tx.update(g, tx.init(g))
    assert float(jnp.linalg.norm(u["w"])) == pytest.approx(0.5, rel=1e-6)
    assert float(state.norm_ema["w"]) == pytest.approx(0.5, rel=1e-6)


def test_bf16_gradients_keep_their_dtype_and_state_is_one_fp32_scalar_a_leaf():
    g = {"w": jnp.ones((3, 4), jnp.bfloat16) * 7, "b": jnp.ones((4,), jnp.bfloat16)}
    tx = adaptive_clip(warmup_steps=1)
    state = tx.init(g)
    assert isinstance(state, AdaptiveClipState)
    for leaf in jax.tree.leaves(state.norm_ema):
        assert leaf.shape == () and leaf.dtype == jnp.float32
    u, _ = tx.update(g, state)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))


@pytest.mark.parametrize("kwargs, message", [
    ({"relative": 0.0}, "relative must be a finite number > 0, got 0.0"),
    ({"relative": float("nan")}, "relative must be a finite number > 0, got nan"),
    ({"decay": 1.0}, r"decay must lie in \[0, 1\), got 1.0"),
    ({"warmup_steps": 0}, "warmup_steps must be an int >= 1"),
    ({"warmup_steps": 2.5}, "warmup_steps must be an int >= 1"),
    ({"absolute": -1.0}, "absolute must be None or a finite number > 0, got -1.0"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        adaptive_clip(**kwargs)



def test_fused_step_equals_the_unfused_chain_with_one_scalar_a_layer():
    """Leaf-wise, so it fuses: ``chain(adaptive_clip, lomo)`` in the fused step
    (one backward pass) gives the parameters and per-layer state of
    value_and_grad + the same chain (``per_layer`` on the stacked layers),
    through a x1000 loss spike after warm-up that the clip cuts."""
    import optax

    import lomo_jax
    from lomo_jax.models import llama

    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2)

    def head(p, h, batch):  # the loss times batch["spike"] (1 or 1000)
        return batch["spike"][0] * llama.llama_head(cfg, p, h, batch)

    model = lomo_jax.LayeredModel(lambda p, b: llama.llama_embed(cfg, p, b),
                                  lambda p, h, b: llama.llama_layer(cfg, p, h, b), head)
    tx = optax.chain(adaptive_clip(warmup_steps=2), lomo_jax.lomo(1e-2))
    per_layer = lomo_jax.per_layer(tx)
    params = llama.init_params(cfg, jax.random.key(0))
    ref = jax.tree.map(jnp.copy, params)
    state = lomo_jax.fused_init(tx, params)
    ref_state = {"embed": tx.init(ref["embed"]), "layers": per_layer.init(ref["layers"]),
                 "head": tx.init(ref["head"])}
    step = lomo_jax.fused_train_step(model, tx)

    @jax.jit
    def ref_step(p, s, batch):
        g = jax.grad(lambda p: model.loss(p, batch))(p)
        for k, t in (("embed", tx), ("layers", per_layer), ("head", tx)):
            u, s[k] = t.update(g[k], s[k], p[k])
            p[k] = optax.apply_updates(p[k], u)
        return p, s

    rng = np.random.default_rng(0)
    for i in range(5):
        batch = {"input_ids": jnp.asarray(rng.integers(0, 64, (2, 8))),
                 "attention_mask": jnp.ones((2, 8), jnp.int32),
                 "spike": jnp.full((2,), 1000.0 if i == 3 else 1.0)}
        params, state, _ = step(params, state, batch)
        ref, ref_state = ref_step(ref, ref_state, batch)
        gamma = np.asarray(state.layers.inner_state[0].norm_ema["mlp"]["down_proj"]["kernel"])
        if i == 2:
            pre = gamma
        if i == 3:  # cut to 1.05 gamma: gamma grows by 0.1% at most (x21 unclipped)
            assert np.all(gamma <= 1.0011 * pre), (gamma, pre)
    close = lambda a, b: np.testing.assert_allclose(  # noqa: E731
        np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    jax.tree.map(close, params, ref)
    jax.tree.map(close, state.layers.inner_state[0].norm_ema,
                 ref_state["layers"].inner_state[0].norm_ema)
    assert gamma.shape == (3,)  # one scalar a layer


def test_fused_step_refuses_adaptive_clip_with_global_clipping():
    """Two clipping rules on one step are refused by name, before anything runs
    (as lomo_torch refuses ``adaptive_clip`` with ``clip_grad_norm``); either
    alone runs."""
    import optax

    import lomo_jax
    from tests.jax.builders import make_batch, make_model, make_params

    model, batch = make_model(), make_batch(0)
    clipped = optax.chain(adaptive_clip(), lomo_jax.lomo(1e-2))
    params = make_params()
    state = lomo_jax.fused_init(clipped, params)
    with pytest.raises(ValueError, match=r"clip_grad_norm=1\.0.*adaptive_clip.*choose one"):
        lomo_jax.fused_train_step(model, clipped, clip_grad_norm=1.0)(params, state, batch)
    # the refusal ran nothing: the arrays are neither donated nor changed
    np.testing.assert_array_equal(np.asarray(params["embed"]["tok"]),
                                  np.asarray(make_params()["embed"]["tok"]))
    plain = lomo_jax.lomo(1e-2)
    lomo_jax.fused_train_step(model, plain, clip_grad_norm=1.0)(
        make_params(), lomo_jax.fused_init(plain, make_params()), batch)
