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
from lomo_jax.fused import LayeredModel, fused_init, fused_train_step
from tests.jax.builders import (
    TRANSFORMS, B, D, L, T, V, assert_one_rounding_from, bits, copy_tree, embed, head, layer,
    make_batch, make_model, make_params, reference_step, xent,
)

# --------------------------------------------------------------------------
# Equality with the unfused path
# --------------------------------------------------------------------------

# LOMO and AdaLomo on the full grid (with and without clipping, tied and untied);
# the optax transforms twice each, between them every (clip, tied) pair, and each
# of them clipped and unclipped, tied and untied (clipping and tying are the
# step's, the same for every transform): 14 cases, not 20 (CI time).
CASES = ([(name, clip, tied) for name in ("lomo", "adalomo")
          for clip in (None, 0.5) for tied in (False, True)]
         + [("sgd", None, False), ("sgd", 0.5, True), ("adamw", None, True),
            ("adamw", 0.5, False), ("adafactor", None, False), ("adafactor", 0.5, True)])


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
        chex.assert_trees_all_close(params, ref_params, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(state, ref_state, rtol=1e-5, atol=1e-6)
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
    return xent(h @ batch["out"], batch["labels"])


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
        chex.assert_trees_all_close(params, ref_params, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(state, ref_state, rtol=1e-5, atol=1e-6)
    assert params[empty] == {}
    assert bits(params["layers"]) != bits(make_params()["layers"])


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
    chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-6)


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
    chex.assert_trees_all_close(state.layers, expected, rtol=1e-5, atol=1e-6)
    assert state.loss_scale is None
    # every layer-state leaf has the leading layer axis
    assert all(x.shape[0] == L for x in jax.tree.leaves(state.layers))


def test_state_follows_committed_params_so_the_step_compiles_once():
    """Parameters committed to a device (``jax.device_put(params, device)``, as
    ``convert.load_pretrained`` gives them): every state array is committed there too
    (optax's step counts, the skip count and ``rng`` are made uncommitted), so the
    first step's arguments place like its outputs and the second step reuses the
    program. Uncommitted parameters leave the state uncommitted."""
    model, tx = make_model(), optax.adamw(1e-3)
    device = jax.devices()[0]
    params = jax.device_put(make_params(), device)
    state = fused_init(tx, params, skip_nonfinite=True, rng=jax.random.key(0))
    assert all(x.committed and x.devices() == {device} for x in jax.tree.leaves(state))
    step = fused_train_step(model, tx, skip_nonfinite=True, rounding="stochastic")
    for i in range(2):
        params, state, _ = step(params, state, make_batch(i))
    assert step._cache_size() == 1
    assert not any(x.committed for x in jax.tree.leaves(fused_init(tx, make_params()).layers))


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



def test_fp16_overflow_skips_bit_for_bit_and_scale_adapts():
    model, tx = make_model(), optax.adamw(1e-2)
    params = make_params(dtype=jnp.float16)
    # 2**40 overflows the fp16 backward pass for sure.
    state = fused_init(tx, params, loss_scale=2.0**40)
    assert float(state.loss_scale.scale) == 2.0**40
    step = fused_train_step(model, tx, loss_scale_window=2)
    before_p, before_s = bits(params), bits(state._replace(loss_scale=None))
    params, state, m = step(params, state, make_batch(0))
    assert bool(m["skipped"])
    assert not np.isfinite(float(m["grad_norm"]))
    assert bits(params) == before_p
    assert bits(state._replace(loss_scale=None)) == before_s
    assert float(state.loss_scale.scale) == 2.0**39
    assert int(state.loss_scale.good_steps) == 0

    # Halve until the step goes through.
    for _ in range(40):
        params, state, m = step(params, state, make_batch(0))
        if not bool(m["skipped"]):
            break
    assert not bool(m["skipped"])
    assert bits(params) != before_p
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
    chex.assert_trees_all_close(params, ref_params, rtol=1e-5, atol=1e-6)
