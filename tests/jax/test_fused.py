"""The fused LOMO step equals the unfused path, refuses what it cannot do, and
handles fp16 loss scaling.

Unfused reference: ``jax.value_and_grad(model.loss)`` on the whole model, the
global-norm coefficient ``min(1, c / (norm + 1e-6))`` when clipping, then
``tx`` on embed and head and ``lomo_jax.per_layer(tx)`` on the layers.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lomo_jax
from lomo_jax.fused import FusedState, LayeredModel, fused_init, fused_train_step

L, D, F, V, B, T = 3, 16, 24, 29, 2, 5


# --------------------------------------------------------------------------
# A small pre-norm transformer-ish model (attention-free: a token-mixing
# matrix stands in), written against the LayeredModel interface.
# --------------------------------------------------------------------------


def _rms_norm(x, scale):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def embed(p, batch):
    return p["tok"][batch["ids"]]


def layer(p, h, batch):
    x = _rms_norm(h, p["norm1"])
    h = h + jnp.einsum("st,btd->bsd", p["mix"], x)
    x = _rms_norm(h, p["norm2"])
    return h + jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"]


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels
    ).mean()


def head(p, h, batch):
    return _xent(_rms_norm(h, p["norm"]) @ p["out"], batch["labels"])


def tied_head(p, h, batch, embed_params=None):
    return _xent(_rms_norm(h, p["norm"]) @ embed_params["tok"].T, batch["labels"])


def make_params(seed=0, dtype=jnp.float32, tied=False, n_layers=L):
    rng = np.random.default_rng(seed)

    def a(*shape, scale=0.3):
        return jnp.asarray(rng.normal(size=shape) * scale, dtype)

    params = {
        "embed": {"tok": a(V, D, scale=1.0)},
        "layers": {
            "norm1": jnp.asarray(1.0 + rng.normal(size=(n_layers, D)) * 0.1, dtype),
            "mix": a(n_layers, T, T),
            "norm2": jnp.asarray(1.0 + rng.normal(size=(n_layers, D)) * 0.1, dtype),
            "w1": a(n_layers, D, F),
            "b1": a(n_layers, F, scale=0.1),
            "w2": a(n_layers, F, D),
        },
        "head": {"norm": jnp.ones((D,), dtype)},
    }
    if not tied:
        params["head"]["out"] = a(D, V)
    return params


def make_batch(seed):
    rng = np.random.default_rng(100 + seed)
    return {
        "ids": jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32),
        "labels": jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32),
    }


def make_model(tied=False):
    return LayeredModel(embed, layer, tied_head if tied else head, tied=tied)


def copy_tree(t):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), t)


def reference_step(model, tx, clip_grad_norm=None, loss_scale=None):
    """The unfused path the fused step must equal. With ``loss_scale`` S the
    gradient is that of ``S * loss``, divided by S in fp32 (as the fused step
    does for fp16). ``metrics["updates"]`` holds tx's fp32 updates, before the
    rounding into the parameters' dtype."""
    layer_tx = lomo_jax.per_layer(tx)
    scale = 1.0 if loss_scale is None else loss_scale

    @jax.jit
    def step(params, state, batch):
        loss, g = jax.value_and_grad(lambda p: model.loss(p, batch) * scale)(params)
        if loss_scale is not None:
            loss = loss / scale
            g = jax.tree.map(lambda x: x.astype(jnp.float32) / scale, g)
        norm = optax.tree.norm(g)
        if clip_grad_norm is not None:
            coef = jnp.minimum(1.0, clip_grad_norm / (norm + 1e-6))
            g = jax.tree.map(lambda x: x.astype(jnp.float32) * coef, g)
        new_params, new_state, updates = {}, {}, {}
        for key, t in (("embed", tx), ("layers", layer_tx), ("head", tx)):
            updates[key], new_state[key] = t.update(g[key], getattr(state, key), params[key])
            new_params[key] = optax.apply_updates(params[key], updates[key])
        state = FusedState(new_state["embed"], new_state["layers"], new_state["head"], None)
        return new_params, state, {"loss": loss, "grad_norm": norm, "updates": updates}

    return step


TRANSFORMS = {
    "lomo": lambda: lomo_jax.lomo(
        optax.linear_schedule(5e-2, 1e-2, 4), weight_decay=0.01, clip_grad_value=0.05
    ),
    "adalomo": lambda: lomo_jax.adalomo(5e-2, weight_decay=0.01),
    "sgd": lambda: optax.sgd(optax.linear_schedule(5e-2, 1e-2, 4), momentum=0.9),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.01),
    "adafactor": lambda: optax.adafactor(1e-2, min_dim_size_to_factor=4),
}


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6, what=""):
    fa = jax.tree_util.tree_flatten_with_path(a)[0]
    fb = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb], what
    for (path, x), (_, y) in zip(fa, fb):
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol,
            err_msg=f"{what}{jax.tree_util.keystr(path)}",
        )


# --------------------------------------------------------------------------
# Equality with the unfused path
# --------------------------------------------------------------------------

# Every transform on the full grid: with and without clipping, tied and untied.
CASES = [(name, clip, tied) for name in ("lomo", "adalomo", "sgd", "adamw", "adafactor")
         for clip in (None, 0.5) for tied in (False, True)]


@pytest.mark.parametrize("name,clip,tied", CASES)
def test_fused_equals_unfused(name, clip, tied):
    model = make_model(tied)
    tx = TRANSFORMS[name]()
    params = make_params(tied=tied)
    state = fused_init(tx, params)
    ref_params, ref_state = copy_tree(params), copy_tree(state)

    step = fused_train_step(model, tx, clip_grad_norm=clip)
    ref = reference_step(model, tx, clip)
    clipped = False
    for i in range(3):
        batch = make_batch(i)
        params, state, metrics = step(params, state, batch)
        ref_params, ref_state, ref_metrics = ref(ref_params, ref_state, batch)
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
        if clip is not None:
            np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
            clipped |= bool(ref_metrics["grad_norm"] > clip)
        assert_trees_close(params, ref_params, what=f"step {i} params")
        assert_trees_close(state, ref_state, what=f"step {i} state")
    if clip is not None:
        assert clipped, "the test should exercise actual clipping"
    # Every parameter changed, and dtypes/shapes are preserved.
    initial = make_params(tied=tied)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, initial)
    assert all(jax.tree.leaves(changed)), changed
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), initial
    )


def _float_embed(p, batch):  # identity: no parameters
    return batch["x"]


def _plain_head(p, h, batch):  # no parameters: a fixed read-out
    return _xent(h @ batch["out"], batch["labels"])


@pytest.mark.parametrize("empty", ["embed", "head"])
@pytest.mark.parametrize("name", ["lomo", "adalomo"])
def test_unit_without_parameters(name, empty):
    """An ``embed`` (or ``head``) with no trainable leaves: the fused step still
    equals the unfused reference on the units that have some."""
    model = LayeredModel(_float_embed if empty == "embed" else embed, layer,
                         _plain_head if empty == "head" else head)
    tx = TRANSFORMS[name]()
    params = make_params()
    params[empty] = {}
    state = fused_init(tx, params)
    ref_params, ref_state = copy_tree(params), copy_tree(state)
    step, ref = fused_train_step(model, tx, clip_grad_norm=0.5), reference_step(model, tx, 0.5)
    rng = np.random.default_rng(7)
    for i in range(2):
        batch = dict(make_batch(i), x=jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32),
                     out=jnp.asarray(rng.normal(size=(D, V)) * 0.3, jnp.float32))
        params, state, _ = step(params, state, batch)
        ref_params, ref_state, _ = ref(ref_params, ref_state, batch)
        assert_trees_close(params, ref_params, what=f"step {i} params")
        assert_trees_close(state, ref_state, what=f"step {i} state")
    assert params[empty] == {}
    assert _bits(params["layers"]) != _bits(make_params()["layers"])


def test_remat_policy_gives_same_result():
    model, tx = make_model(), TRANSFORMS["adalomo"]()
    p1 = make_params()
    p2 = copy_tree(p1)
    s1 = fused_init(tx, p1)
    s2 = copy_tree(s1)
    a = fused_train_step(model, tx)
    b = fused_train_step(model, tx, remat_policy=jax.checkpoint_policies.nothing_saveable)
    for i in range(2):
        p1, s1, _ = a(p1, s1, make_batch(i))
        p2, s2, _ = b(p2, s2, make_batch(i))
    assert_trees_close(p1, p2)


def test_offloaded_saved_inputs_give_same_result():
    """``offload_saved_inputs`` moves where ``h_i`` is kept, not what it is:
    bit-identical parameters, state and metrics, with clipping (two backward
    passes read the saved inputs) and micro-batches (their layout). XLA:CPU
    compiles host placement as a no-op, so this checks the traced program; the
    placement itself is checked on the GPU target (test_fused_memory)."""
    model, tx = make_model(), TRANSFORMS["adalomo"]()
    runs = []
    for offload in (False, True):
        params = make_params()
        state = fused_init(tx, params)
        step = fused_train_step(model, tx, clip_grad_norm=0.5, microbatches=2,
                                offload_saved_inputs=offload)
        for i in range(2):
            params, state, metrics = step(params, state, make_batch(i))
        runs.append((params, state, metrics))
    chex.assert_trees_all_equal(*runs)
    with pytest.raises(TypeError, match="offload_saved_inputs"):
        fused_train_step(model, tx, offload_saved_inputs="host")


def test_state_is_per_layer_state():
    tx = optax.adamw(1e-3)
    params = make_params()
    state = fused_init(tx, params)
    expected = lomo_jax.per_layer(tx).init(params["layers"])
    assert jax.tree.structure(state.layers) == jax.tree.structure(expected)
    assert_trees_close(state.layers, expected)
    assert state.loss_scale is None
    # every layer-state leaf has the leading layer axis
    assert all(x.shape[0] == L for x in jax.tree.leaves(state.layers))


def test_step_is_jitted_lowers_abstract_and_donates():
    model, tx = make_model(), lomo_jax.lomo(1e-2)
    params = make_params()
    state = fused_init(tx, params)
    step = fused_train_step(model, tx)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, state, make_batch(0)))
    compiled = step.lower(*shapes).compile()
    mem = compiled.memory_analysis()
    param_bytes = sum(x.nbytes for x in jax.tree.leaves((params, state)))
    assert mem.alias_size_in_bytes == param_bytes
    new_params, _, _ = step(params, state, make_batch(0))
    assert all(x.is_deleted() for x in jax.tree.leaves(params))
    assert not any(x.is_deleted() for x in jax.tree.leaves(new_params))


def _spacing(x, dtype):
    """The gap from ``|x|`` (rounded to ``dtype``) to the next larger value, in float64."""
    a = np.abs(np.asarray(x, np.float64)).astype(dtype)
    return np.nextafter(a, np.asarray(np.inf, dtype)).astype(np.float64) - a.astype(np.float64)


def assert_one_rounding_from(old, new, updates, dtype):
    r"""``new = round(old + u)`` for each leaf, ``u`` the reference's fp32 update.

    Rounding to nearest is off by at most half a spacing at ``old + u``; the
    gradient, computed in ``dtype`` in another op order, may differ by about
    one unit roundoff of ``dtype``, so ``u`` gets ``eps * |u|`` on top
    (``eps`` = 2^-11 for fp16, 2^-8 for bf16). An update off by 10% (or any
    fraction well over ``eps``) exceeds this wherever ``|u|`` is more than a
    few spacings, which the tests check holds for a good share of entries.
    """
    np_dtype = np.dtype(dtype)
    eps = float(jnp.finfo(dtype).eps) / 2
    flat = jax.tree_util.tree_flatten_with_path(old)[0]
    telling = []  # per leaf: share of entries where a 10% error would exceed tol
    for (path, o), n, u in zip(flat, jax.tree.leaves(new), jax.tree.leaves(updates)):
        o, n, u = (np.asarray(t, np.float64) for t in (o, n, u))
        tol = _spacing(o + u, np_dtype) / 2 + eps * np.abs(u)
        err = np.abs((n - o) - u)
        assert np.all(err <= tol), (
            f"{jax.tree_util.keystr(path)}: update off by {np.max(err / tol):.2f}x "
            "one rounding")
        telling.append(np.mean(0.1 * np.abs(u) > tol))
    assert np.mean(telling) > 0.1, f"updates too small to tell a 10% error: {telling}"


def test_bf16_params_keep_dtype_and_equal_reference():
    """Each step is within one bf16 rounding of value_and_grad + tx (fp32 math)
    on the same bf16 weights, and the loss falls."""
    model, tx = make_model(), lomo_jax.adalomo(5e-2)
    params = make_params(dtype=jnp.bfloat16)
    state = fused_init(tx, params)
    assert state.loss_scale is None
    step, ref = fused_train_step(model, tx, clip_grad_norm=1.0), reference_step(model, tx, 1.0)
    losses = []
    batch = make_batch(0)
    for _ in range(3):
        old, old_state = copy_tree(params), copy_tree(state)
        params, state, m = step(params, state, batch)
        _, _, ref_m = ref(old, old_state, batch)
        assert_one_rounding_from(old, params, ref_m["updates"], jnp.bfloat16)
        losses.append(float(m["loss"]))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------
# fp16: dynamic loss scaling, overflow skips the whole step
# --------------------------------------------------------------------------


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def test_fp16_overflow_skips_bit_for_bit_and_scale_adapts():
    model, tx = make_model(), optax.adamw(1e-2)
    params = make_params(dtype=jnp.float16)
    # 2**40 overflows the fp16 backward pass for sure.
    state = fused_init(tx, params, loss_scale=2.0**40)
    assert float(state.loss_scale.scale) == 2.0**40
    step = fused_train_step(model, tx, loss_scale_window=2)
    before_p, before_s = _bits(params), _bits(state._replace(loss_scale=None))
    params, state, m = step(params, state, make_batch(0))
    assert bool(m["skipped"])
    assert not np.isfinite(float(m["grad_norm"]))
    assert _bits(params) == before_p
    assert _bits(state._replace(loss_scale=None)) == before_s
    assert float(state.loss_scale.scale) == 2.0**39
    assert int(state.loss_scale.good_steps) == 0

    # Halve until the step goes through.
    for _ in range(40):
        params, state, m = step(params, state, make_batch(0))
        if not bool(m["skipped"]):
            break
    assert not bool(m["skipped"])
    assert _bits(params) != before_p
    assert all(x.dtype == jnp.float16 for x in jax.tree.leaves(params))


def test_fp16_loss_scale_grows_after_window_of_clean_steps():
    model, tx = make_model(), lomo_jax.lomo(1e-2)
    params = make_params(dtype=jnp.float16)
    state = fused_init(tx, params)
    assert float(state.loss_scale.scale) == 2.0**16  # the default for fp16
    state = fused_init(tx, params, loss_scale=8.0)
    step = fused_train_step(model, tx, loss_scale_window=2)
    scales = []
    for i in range(5):
        params, state, m = step(params, state, make_batch(i))
        assert not bool(m["skipped"])
        scales.append(float(m["loss_scale"]))
    assert scales == [8.0, 8.0, 16.0, 16.0, 32.0]


@pytest.mark.parametrize("name", ["lomo", "adalomo"])
def test_fp16_matches_scaled_unfused_reference(name):
    """fp16 fused step = value_and_grad of (S * loss) unscaled in fp32 + tx, then
    one rounding into fp16."""
    model = make_model()
    tx = lomo_jax.lomo(1e-1) if name == "lomo" else lomo_jax.adalomo(1e-1)
    params = make_params(dtype=jnp.float16)
    state = fused_init(tx, params, loss_scale=2.0**10)
    old, old_state = copy_tree(params), copy_tree(state._replace(loss_scale=None))
    step = fused_train_step(model, tx, clip_grad_norm=0.5)
    batch = make_batch(0)

    _, _, ref_m = reference_step(model, tx, 0.5, loss_scale=2.0**10)(old, old_state, batch)
    params, state, m = step(params, state, batch)
    assert not bool(m["skipped"])
    np.testing.assert_allclose(m["grad_norm"], ref_m["grad_norm"], rtol=2e-3)
    assert_one_rounding_from(old, params, ref_m["updates"], jnp.float16)


def test_fp16_without_loss_scale_state_is_refused():
    model, tx = make_model(), lomo_jax.lomo(1e-2)
    params32 = make_params()
    state = fused_init(tx, params32)
    params = make_params(dtype=jnp.float16)
    with pytest.raises(ValueError, match="float16.*loss scale"):
        fused_train_step(model, tx)(params, state, make_batch(0))


# --------------------------------------------------------------------------
# Refusals and clear errors
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tx",
    [
        optax.chain(optax.clip_by_global_norm(1.0), lomo_jax.lomo(1e-2)),
        optax.chain(optax.clip_by_global_norm(1e9), optax.adamw(1e-3)),
        optax.apply_if_finite(optax.sgd(1e-2), 3),
        optax.MultiSteps(optax.sgd(1e-2), 2),
        optax.MultiSteps(optax.sgd(1e-2), 2).gradient_transformation(),
        optax.chain(optax.sgd(1e-2), optax.MultiSteps(optax.sgd(1.0), 2).gradient_transformation()),
    ],
    ids=["clip_by_global_norm", "clip_by_global_norm_inactive", "apply_if_finite",
         "multisteps", "multisteps_gt", "multisteps_in_chain"],
)
def test_cross_leaf_transforms_are_refused(tx):
    with pytest.raises(ValueError, match="clip_grad_norm="):
        fused_train_step(make_model(), tx)


def test_cross_leaf_through_state_is_refused():
    """u_b depends on the state written from g_a on the previous step."""

    def init(params):
        return {"s": jnp.zeros([])}

    def update(updates, state, params=None):
        leaves, treedef = jax.tree.flatten(updates)
        out = [leaves[0]] + [x * state["s"] for x in leaves[1:]]
        return treedef.unflatten(out), {"s": jnp.sum(leaves[0])}

    with pytest.raises(ValueError, match="not leaf-wise"):
        fused_train_step(make_model(), optax.GradientTransformation(init, update))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_leafwise_transforms_are_accepted(name):
    fused_train_step(make_model(), TRANSFORMS[name]())
    fused_train_step(make_model(), optax.chain(optax.clip(1.0), TRANSFORMS[name]()))


def test_bad_params_keys():
    model, tx = make_model(), lomo_jax.lomo(1e-2)
    params = make_params()
    bad = {"embedding": params["embed"], "layers": params["layers"], "head": params["head"]}
    with pytest.raises(ValueError, match="exactly the keys 'embed', 'layers' and 'head'"):
        fused_init(tx, bad)
    with pytest.raises(ValueError, match="exactly the keys"):
        fused_train_step(model, tx)(bad, fused_init(tx, params), make_batch(0))


def test_mismatched_layer_axis_names_the_leaf():
    params = make_params()
    params["layers"]["w2"] = params["layers"]["w2"][:2]
    with pytest.raises(ValueError, match=r"params\['layers'\]\['w2'\] has 2"):
        fused_init(lomo_jax.lomo(1e-2), params)


def test_layer_changing_activation_is_refused():
    def bad_layer(p, h, batch):
        return jnp.concatenate([h, h], axis=-1)

    def bad_dtype_layer(p, h, batch):
        return h.astype(jnp.bfloat16)

    tx = lomo_jax.lomo(1e-2)
    for fn, pat in ((bad_layer, r"float32\[2, 5, 32\]"), (bad_dtype_layer, "bfloat16")):
        model = LayeredModel(embed, fn, head)
        params = make_params()
        with pytest.raises(ValueError, match=rf"same structure, shape and dtype.*{pat}"):
            fused_train_step(model, tx)(params, fused_init(tx, params), make_batch(0))


def test_non_scalar_loss_is_refused():
    def vec_head(p, h, batch):
        return jnp.sum(h @ p["out"], axis=(1, 2))

    tx = lomo_jax.lomo(1e-2)
    params = make_params()
    with pytest.raises(ValueError, match=r"real scalar loss.*float32\[2\]"):
        fused_train_step(LayeredModel(embed, layer, vec_head), tx)(
            params, fused_init(tx, params), make_batch(0)
        )


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64])
def test_integer_and_complex_params_are_refused(dtype):
    params = make_params()
    params["head"]["step"] = jnp.zeros((3,), dtype)
    with pytest.raises(TypeError, match=r"params\['head'\]\['step'\]"):
        fused_init(lomo_jax.lomo(1e-2), params)


def test_bad_arguments():
    with pytest.raises(TypeError, match="LayeredModel"):
        fused_train_step(lambda p: p, lomo_jax.lomo(1e-2))
    with pytest.raises(ValueError, match="clip_grad_norm"):
        fused_train_step(make_model(), lomo_jax.lomo(1e-2), clip_grad_norm=0.0)
    with pytest.raises(TypeError, match="LayeredModel.layer must be a function"):
        LayeredModel(embed, 3, head)
    model, tx = make_model(), lomo_jax.lomo(1e-2)
    params = make_params()
    with pytest.raises(TypeError, match="fused_init"):
        fused_train_step(model, tx)(params, tx.init(params), make_batch(0))


def test_pytree_activation():
    """h may be any pytree (here the hidden state plus a per-token gate)."""

    def embed2(p, batch):
        x = p["tok"][batch["ids"]]
        return {"x": x, "gate": jax.nn.sigmoid(x[..., :1])}

    def layer2(p, h, batch):
        return {"x": layer(p, h["x"], batch) * h["gate"], "gate": h["gate"]}

    def head2(p, h, batch):
        return head(p, h["x"], batch)

    model = LayeredModel(embed2, layer2, head2)
    tx = TRANSFORMS["adalomo"]()
    params = make_params()
    state = fused_init(tx, params)
    ref_params, ref_state = copy_tree(params), copy_tree(state)
    step, ref = fused_train_step(model, tx, clip_grad_norm=0.5), reference_step(model, tx, 0.5)
    for i in range(2):
        params, state, _ = step(params, state, make_batch(i))
        ref_params, ref_state, _ = ref(ref_params, ref_state, make_batch(i))
    assert_trees_close(params, ref_params)
