"""``optax.multi_transform`` with a label tree shaped like the whole params in the
fused step (``lomo_jax.fused.unit_view``), and a LoRA-only step keeping the frozen
base bit-identical."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lomo_jax
from lomo_jax._per_layer import per_layer
from lomo_jax.fused import FusedState, LayeredModel
from lomo_jax.models import lora
from tests.jax.builders import bits, copy_tree, head, layer, make_batch, make_model, make_params

FROZEN = ("tok", "norm1", "norm2", "norm")  # the embedding and every norm scale
TRAIN = {"adamw": lambda: optax.adamw(1e-2, weight_decay=0.01),
         "adalomo": lambda: lomo_jax.adalomo(5e-2, weight_decay=0.01)}


def _leaf_name(path):
    return str(path[-1].key)


def label_fn(tree):
    """The same labels as :func:`label_tree`, as a function of any (sub)tree: the
    unit-by-unit path the fused step supported before."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "freeze" if _leaf_name(path) in FROZEN else "train", tree)


def label_tree(params):
    """A label tree shaped like the whole params (static strings per leaf)."""
    return label_fn(params)


def multi(train, labels):
    return optax.multi_transform({"train": train, "freeze": optax.set_to_zero()}, labels)


def unfused_reference(model, train_fn, params, batches):
    """The plain optax loop on the whole params: ``multi_transform`` with the label
    tree, the layers' leaves labelled for ``per_layer(train)`` (each layer's slice
    its own statistics, as the fused step's layers are)."""
    labels = label_tree(params)
    labels["layers"] = jax.tree.map(lambda s: s + "_layers", labels["layers"])
    tx = optax.multi_transform(
        {"train": train_fn(), "train_layers": per_layer(train_fn()),
         "freeze": optax.set_to_zero(), "freeze_layers": optax.set_to_zero()}, labels)
    state = tx.init(params)

    @jax.jit
    def step(params, state, batch):
        loss, g = jax.value_and_grad(model.loss)(params, batch)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    for batch in batches:
        params, state, loss = step(params, state, batch)
    return params, loss


def run_fused(tx, params, batches, init_kwargs=None, model=None, **step_kwargs):
    init_kwargs = dict(init_kwargs or {})
    if "rng" in init_kwargs:  # a seed: a fresh key every run (the step donates it)
        init_kwargs["rng"] = jax.random.key(init_kwargs["rng"])
    state = lomo_jax.fused_init(tx, params, **init_kwargs)
    step = lomo_jax.fused_train_step(model or make_model(), tx, **step_kwargs)
    params = copy_tree(params)
    for batch in batches:
        params, state, metrics = step(params, state, batch)
    return params, state, metrics


@pytest.mark.parametrize("name", sorted(TRAIN))
def test_label_tree_equals_unfused_optax_loop(name):
    # The gradients are the same sums in a different order (the per-layer VJPs
    # of the scan vs jax.grad of the whole loss): fp32 rounding, a few ulps
    # (eps 1.2e-7) per step; after 3 steps rtol 1e-5 is ~100 ulps of headroom,
    # atol 1e-6 covers elements whose value is near zero. test_fused.py's
    # fused-vs-unfused tolerance, for the same reason.
    params, batches = make_params(), [make_batch(i) for i in range(3)]
    ref, ref_loss = unfused_reference(make_model(), TRAIN[name], copy_tree(params), batches)
    got, _, metrics = run_fused(multi(TRAIN[name](), label_tree(params)), params, batches)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, ref)
    # frozen leaves keep every bit, every other leaf moves
    as_labelled = jax.tree_util.tree_map_with_path(
        lambda path, a, b: (bits(a) == bits(b)) == (_leaf_name(path) in FROZEN), got, params)
    assert all(jax.tree.leaves(as_labelled))


@pytest.mark.parametrize("dtype,step_kwargs,init_kwargs", [
    (jnp.float32, {"skip_nonfinite": True, "microbatches": 2, "clip_grad_norm": 0.5},
     {"skip_nonfinite": True}),
    (jnp.bfloat16, {"rounding": "stochastic"}, {"rng": 3}),
])
def test_label_tree_equals_label_function_bit_for_bit(dtype, step_kwargs, init_kwargs):
    """The whole-tree labels give exactly the updates of the per-unit label
    function (the path that worked before), in every step variant; frozen
    leaves keep every bit."""
    params, batches = make_params(dtype=dtype), [make_batch(i) for i in range(2)]
    train = TRAIN["adalomo"]
    by_tree, _, m1 = run_fused(multi(train(), label_tree(params)), params, batches, init_kwargs,
                               **step_kwargs)
    by_fn, _, m2 = run_fused(multi(train(), label_fn), params, batches, init_kwargs, **step_kwargs)
    assert bits(by_tree) == bits(by_fn)
    assert bits(m1["loss"]) == bits(m2["loss"])
    for unit, name in (("embed", "tok"), ("layers", "norm1"), ("layers", "norm2"),
                       ("head", "norm")):
        assert bits(by_tree[unit][name]) == bits(params[unit][name])
    assert not np.array_equal(by_tree["layers"]["w1"], params["layers"]["w1"])


def test_prefix_label_tree():
    """A label tree that is a prefix of params (one label per unit) works too."""
    params, batches = make_params(), [make_batch(0)]
    labels = {"embed": "freeze", "layers": "train", "head": "train"}
    got, _, _ = run_fused(multi(optax.sgd(0.1), labels), params, batches)
    assert bits(got["embed"]) == bits(params["embed"])
    assert not np.array_equal(got["layers"]["w1"], params["layers"]["w1"])
    assert not np.array_equal(got["head"]["out"], params["head"]["out"])


@pytest.mark.parametrize("make_tx", [
    lambda p: lomo_jax.adalomo(1e-3),
    lambda p: optax.adamw(1e-3),
    lambda p: multi(lomo_jax.adalomo(1e-3), label_fn),
])
def test_state_of_a_tx_that_takes_a_unit_is_unchanged(make_tx):
    """Only a tx that cannot take a unit gets the whole-tree view: every other
    keeps the state it had (``tx.init`` per unit, ``per_layer(tx).init`` on the
    layers), so checkpoints and ``per_layer`` stay interchangeable."""
    params = make_params()
    tx = make_tx(params)
    state = lomo_jax.fused_init(tx, params)
    want = FusedState(tx.init(params["embed"]), per_layer(tx).init(params["layers"]),
                      tx.init(params["head"]), None)
    assert jax.tree.structure(state) == jax.tree.structure(want)
    assert bits(state) == bits(want)


def _mismatched_labels(params):
    labels = label_tree(params)
    labels["layers"]["w9"] = labels["layers"].pop("w1")
    return labels


def test_mismatched_label_tree_names_the_mismatch():
    params = make_params()
    tx = multi(lomo_jax.adalomo(1e-3), _mismatched_labels(params))
    with pytest.raises(ValueError, match=r"(?s)tx takes neither params\['embed'\].*"
                                         r"\['layers'\].*w9"):
        lomo_jax.fused_init(tx, params)
    good_state = lomo_jax.fused_init(multi(lomo_jax.adalomo(1e-3), label_tree(params)), params)
    step = lomo_jax.fused_train_step(make_model(), tx)
    with pytest.raises(ValueError, match=r"(?s)tx takes neither.*\['layers'\].*w9"):
        step(copy_tree(params), good_state, make_batch(0))


# ---- LoRA only: the frozen base keeps every bit ---------------------------------


def lora_layer(p, h, batch):
    base = {k: v for k, v in p.items() if not k.startswith("lora")}
    return layer(base, h, batch) + (h @ p["lora_a"]) @ p["lora_b"]


def lora_params(dtype):
    params = make_params(dtype=dtype)
    n, d = params["layers"]["w1"].shape[:2]
    rng = np.random.default_rng(7)
    params["layers"]["lora_a"] = jnp.asarray(rng.normal(size=(n, d, 2)) * 0.3, dtype)
    params["layers"]["lora_b"] = jnp.zeros((n, 2, d), dtype)
    for unit, name, index in (("embed", "tok", (0, 0)), ("layers", "w1", (1, 2, 3)),
                              ("head", "out", (4, 5))):
        params[unit][name] = params[unit][name].at[index].set(-0.0)
    return params


@pytest.mark.parametrize("dtype,step_kwargs,init_kwargs", [
    (jnp.float32, {"skip_nonfinite": True}, {"skip_nonfinite": True}),
    (jnp.bfloat16, {"rounding": "stochastic", "skip_nonfinite": True, "microbatches": 2},
     {"rng": 1, "skip_nonfinite": True}),
])
def test_lora_only_step_keeps_base_bit_identical(dtype, step_kwargs, init_kwargs):
    """``lora.optimizer(base=None)`` in the fused step: every base leaf, ``-0.0``
    included, keeps its bits (with ``skip_nonfinite`` the update goes through a
    select, so XLA cannot fold ``p + 0``); the adapters move."""
    params = lora_params(dtype)
    model = LayeredModel(lambda p, b: p["tok"][b["ids"]], lora_layer, head)
    tx = lora.optimizer(base=None, adapters=optax.adamw(1e-2))
    got, _, _ = run_fused(tx, params, [make_batch(i) for i in range(2)],
                          init_kwargs, model, **step_kwargs)
    base = lambda t: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, x: None if lora.is_adapter(path) else x, t)
    assert bits(base(got)) == bits(base(params))
    assert np.signbit(np.asarray(got["layers"]["w1"][1, 2, 3], np.float32))
    assert not np.array_equal(got["layers"]["lora_b"], params["layers"]["lora_b"])
