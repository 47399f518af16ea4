"""The fused step's input guards (issue 27): bad input is refused, never applied.

* token ids / labels outside the vocabulary: the step is skipped whole (every
  parameter and state bit, the skip counter and the key unchanged) and the
  next call raises naming the key, the value and ``vocab_size``; outside the
  step, concrete batches raise and traced ones give NaN, never a finite wrong
  loss;
* a learning-rate schedule that turns negative or NaN later: the same refusal;
* an ``opt_state`` made for other params: refused when traced, naming the leaf;
* 1-D ``input_ids``, an array donated twice: errors that name the batch shape
  and the leaf paths.

A tiny LLaMA (2 layers, width 32, vocabulary 64) and the 3-layer width-8 model
of ``test_reliability``: each step function compiles once per test.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lomo_jax
from lomo_jax import models
from lomo_jax.models import llama
from lomo_jax.embedding import IndexRange
from lomo_jax.fused import LayeredModel, fused_init, fused_train_step
from tests.jax import test_reliability as rel

V = 64
CFG = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
INTACT = r"skipped as a whole.*dispatched nothing: the params and opt_state passed to it are intact"


def bits(tree):
    """Every leaf's bytes (PRNG keys by their key data)."""
    def raw(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x).tobytes()
    return [raw(x) for x in jax.tree.leaves(tree)]


def llama_setup(**kw):
    """A tiny config and random params (numpy: no init to compile)."""
    cfg = models.LlamaConfig(**{**CFG, **kw})
    rng = np.random.default_rng(0)
    return cfg, jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.2, s.dtype),
                             llama.param_shapes(cfg))


def llama_batch(ids=None, labels=None):
    base = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 8)), jnp.int32)
    return {"input_ids": base if ids is None else ids(base),
            "labels": base if labels is None else labels(base)}


BAD_BATCHES = {
    "id=V": (dict(ids=lambda b: b.at[1, 5].set(V)), "input_ids", f"holds {V}"),
    "id=-1": (dict(ids=lambda b: b.at[0, 2].set(-1)), "input_ids", "holds -1"),
    "label=V+3": (dict(labels=lambda b: b.at[0, 4].set(V + 3)), "labels", f"holds {V + 3}"),
    "label=-5": (dict(labels=lambda b: b.at[1, 1].set(-5)), "labels", "holds -5"),
}


def masked_head(p, h, batch):
    """``test_reliability``'s head, with labels -100 ignored."""
    logits = (h[0] @ p["out"]).astype(jnp.float32)
    labels = batch["labels"]
    keep = labels != -100
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, labels, 0))
    return jnp.sum(jnp.where(keep, ce, 0.0)) / jnp.maximum(jnp.sum(keep), 1) * batch["loss_mult"]


RANGED = LayeredModel(rel.embed, rel.layer, masked_head,
                      index_ranges={"ids": rel.V, "labels": IndexRange(rel.V, ignore=-100)})


def small_batch(i, key=None, value=None):
    """``test_reliability``'s batch ``i``, with ``batch[key][0, 1] = value``."""
    b = rel.batch_np(i)
    if key is not None:
        b[key][0, 1] = value
    return rel.jax_batch(b)


# --------------------------------------------------------------------------
# Token ids and labels out of range
# --------------------------------------------------------------------------


def test_out_of_range_ids_and_labels_are_refused_whole_and_named():
    """ids >= V, ids -1, labels >= V, labels -5 (one compiled step). The guard
    and stochastic rounding are on, so the skip counter and the key must stay
    unchanged too; the next call raises and dispatches nothing."""
    tx = lomo_jax.adalomo(1e-2)
    params = rel.jax_params(jnp.bfloat16)
    state = fused_init(tx, params, skip_nonfinite=True, rng=jax.random.key(1))
    step = fused_train_step(RANGED, tx, skip_nonfinite=True, rounding="stochastic")
    params, state, m = step(params, state, small_batch(0))  # a clean step first
    assert not bool(m["refused"]) and not bool(m["skipped"])
    calls = 1
    for key, value in [("ids", rel.V), ("ids", -1), ("labels", rel.V + 2), ("labels", -5)]:
        before = bits((params, state))
        params, state, m = step(params, state, small_batch(1, key, value))
        jax.block_until_ready(m)
        assert bool(m["refused"]) and bool(m["skipped"]), (key, value)
        assert bits((params, state)) == before, f"{key}={value}: a refused step changed something"
        assert int(state.nonfinite_steps) == 0  # refused is not non-finite
        with pytest.raises(ValueError, match=re.compile(
                rf"call {calls + 1} of this step function was refused: batch\['{key}'\] holds "
                rf"{value}; its entries must lie in \[0, {rel.V}\) \(vocab_size = {rel.V}\)"
                + (r" or be -100 \(ignored\)" if key == "labels" else r"\.") + ".*" + INTACT,
                re.S)):
            step(params, state, small_batch(2))
        assert bits((params, state)) == before  # the raising call changed nothing either
        params, state, m = step(params, state, small_batch(2))  # and nothing is pending
        assert not bool(m["skipped"]) and bits((params, state)) != before
        calls += 2
    # -100 is the ignore index, not an error: the step trains
    before = bits(params)
    params, state, m = step(params, state, small_batch(3, "labels", -100))
    assert not bool(m["refused"]) and not bool(m["skipped"]) and np.isfinite(float(m["loss"]))
    assert bits(params) != before


def test_llama_layered_model_carries_its_vocabulary_ranges():
    """``models.layered_model(cfg)`` declares input_ids in [0, V) and labels in
    [0, V) or -100, so its fused step reports the check (traced, not compiled)."""
    cfg, params = llama_setup()
    lm = models.layered_model(cfg)
    assert lm.index_ranges == (("input_ids", IndexRange(V)), ("labels", IndexRange(V, -100)))
    tx = lomo_jax.lomo(1e-2)
    step = fused_train_step(lm, tx)
    m = jax.eval_shape(step, params, fused_init(tx, params), llama_batch())[2]
    assert m["refused"].dtype == jnp.bool_ and set(m["index_extremes"]) == {"input_ids", "labels"}


def test_refused_step_keeps_the_fp16_loss_scale():
    """fp16: a bad batch whose gradients also overflow, with the scale at its
    minimum: the scale state must not change (no reset of its clean-step
    count), and the watch reports the bad input, not the overflow."""
    model = LayeredModel(rel.embed, rel.layer, rel.head,
                         index_ranges={"ids": rel.V, "labels": IndexRange(rel.V, ignore=-100)})
    tx = lomo_jax.adalomo(1e-2)
    params = rel.jax_params(jnp.float16)
    state = fused_init(tx, params, loss_scale=1.0)  # already at min_loss_scale
    step = fused_train_step(model, tx)
    params, state, m = step(params, state, rel.jax_batch(rel.batch_np(1)))
    assert int(state.loss_scale.good_steps) == 1  # an overflow would reset it
    batch = rel.batch_np(0, loss_mult=1e30)  # its fp16 gradients overflow too
    batch["ids"][0, 0] = rel.V
    before = bits((params, state))
    params, state, m = step(params, state, rel.jax_batch(batch))
    jax.block_until_ready(m)
    assert bool(m["refused"]) and bits((params, state)) == before
    assert not np.isfinite(float(m["grad_norm"])) and float(m["loss_scale"]) == 1.0
    with pytest.raises(ValueError, match=rf"batch\['ids'\] holds {rel.V}; .*vocab_size = {rel.V}"):
        step(params, state, rel.jax_batch(rel.batch_np(1)))


def test_index_ranges_are_checked_when_the_model_is_built_and_traced():
    with pytest.raises(ValueError, match=r"index_ranges\['ids'\] must be a positive int"):
        LayeredModel(rel.embed, rel.layer, rel.head, index_ranges={"ids": 0})
    model = LayeredModel(rel.embed, rel.layer, rel.head, index_ranges={"ids": rel.V})
    assert model.index_ranges == (("ids", IndexRange(rel.V)),)
    hash(model)
    batch = rel.jax_batch(rel.batch_np(0))
    batch["ids"] = batch["ids"].astype(jnp.float32)
    tx = lomo_jax.lomo(1e-2)
    params = rel.jax_params(jnp.float32)
    with pytest.raises(TypeError, match=r"batch\['ids'\] must hold integers.*got float32"):
        fused_train_step(model, tx)(params, fused_init(tx, params), batch)


def test_model_loss_and_logits_refuse_concrete_and_give_nan_traced():
    """Outside the fused step there is no next call: a concrete batch raises at
    once; under jit the result is NaN (never a finite, wrong loss)."""
    cfg, params = llama_setup()
    lm = models.layered_model(cfg)
    module = models.params_to_module(cfg, params)
    eager = {
        "models.logits": lambda b: models.logits(cfg, params, b),
        "LayeredModel.loss": lambda b: lm.loss(params, b),
        "LlamaForCausalLM.loss": lambda b: module.loss(b),
    }
    module_loss, small_loss = nnx.jit(lambda m, b: m.loss(b)), jax.jit(RANGED.loss)
    jitted = {  # each compiled once
        "models.logits": jax.jit(eager["models.logits"]),
        "LlamaForCausalLM.loss": lambda b: module_loss(module, b),
        "LayeredModel.loss (small model)": lambda b: small_loss(
            rel.jax_params(jnp.float32), dict(small_batch(0), **b)),
    }
    for case, (make, key, held) in BAD_BATCHES.items():
        batch = llama_batch(**make)
        for name, fn in eager.items():
            if name == "models.logits" and key == "labels":
                continue  # logits do not read labels
            where = {"models.logits": "lomo_jax.models"}.get(name, name.split(".")[0])
            with pytest.raises(ValueError, match=rf"{where}(\.loss)?: batch\['{key}'\] {held}; "
                                                 rf".*vocab_size = {V}"):
                fn(batch)
        for name, fn in jitted.items():
            if name == "models.logits" and key == "labels":
                continue
            if name.endswith("(small model)"):  # its vocabulary is rel.V
                bad = {"ids": small_batch(0, "ids", -1)["ids"]} if key == "input_ids" else \
                      {"labels": small_batch(0, "labels", rel.V)["labels"]}
                out = np.asarray(fn(bad), np.float32)
            else:
                out = np.asarray(fn(batch), np.float32)
            assert np.isnan(out).any(), (case, name)
            assert name == "models.logits" or np.isnan(out).all(), (case, name)
    ok = llama_batch(labels=lambda b: b.at[:, :3].set(-100))
    assert np.isfinite(float(jitted["LlamaForCausalLM.loss"](ok)))
    assert np.isfinite(np.asarray(jitted["models.logits"](ok))).all()
    assert np.isfinite(float(jitted["LayeredModel.loss (small model)"]({})))


# --------------------------------------------------------------------------
# Learning-rate schedules that turn negative or NaN
# --------------------------------------------------------------------------


def test_schedule_turning_negative_is_refused():
    """The issue's schedule: 0.1 -> -0.1 over 10 steps. Steps 0-5 (rate >= 0)
    apply; step 6 (-0.02) is skipped whole and the next call raises."""
    tx = lomo_jax.lomo(optax.linear_schedule(1e-1, -1e-1, 10))
    params = rel.jax_params(jnp.float32)
    state = fused_init(tx, params)
    step = fused_train_step(rel.MODEL, tx)
    for i in range(6):
        params, state, m = step(params, state, rel.jax_batch(rel.batch_np(i)))
        assert not bool(m["refused"]) and int(m["learning_rate_step"]) == i
    before = bits((params, state))
    params, state, m = step(params, state, rel.jax_batch(rel.batch_np(6)))
    jax.block_until_ready(m)
    assert bool(m["refused"]) and bool(m["skipped"])
    assert float(m["learning_rate"]) == pytest.approx(-0.02)
    assert bits((params, state)) == before
    with pytest.raises(ValueError, match=re.compile(
            r"the learning rate at step 6 of its schedule is -0.02.*finite and >= 0.*" + INTACT,
            re.S)):
        step(params, state, rel.jax_batch(rel.batch_np(7)))


def test_schedule_turning_nan_is_refused_without_the_guard():
    """AdaLomo with a schedule that is NaN from step 2, and no skip_nonfinite:
    before, NaN reached every parameter; now the step is refused."""
    tx = lomo_jax.adalomo(lambda count: jnp.where(count >= 2, jnp.nan, 1e-2))
    params = rel.jax_params(jnp.float32)
    state = fused_init(tx, params)
    step = fused_train_step(rel.MODEL, tx)
    for i in range(2):
        params, state, m = step(params, state, rel.jax_batch(rel.batch_np(i)))
    before = bits((params, state))
    params, state, m = step(params, state, rel.jax_batch(rel.batch_np(2)))
    jax.block_until_ready(m)
    assert bool(m["refused"]) and bits((params, state)) == before
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    with pytest.raises(ValueError, match=r"learning rate at step 2 of its schedule is nan"):
        step(params, state, rel.jax_batch(rel.batch_np(3)))


# --------------------------------------------------------------------------
# opt_state made for other params
# --------------------------------------------------------------------------


def test_opt_state_for_other_params_names_the_leaf():
    """Refused while tracing (nothing compiled)."""
    tx = lomo_jax.adalomo(1e-2)
    params = rel.jax_params(jnp.float32)  # 3 layers, width 8
    step = fused_train_step(rel.MODEL, tx)
    batch = rel.jax_batch(rel.batch_np(0))
    two = jax.tree.map(lambda x: x, params)
    two["layers"] = jax.tree.map(lambda x: x[:2], params["layers"])
    rebuild = r"opt_state was made for other params: rebuild it with fused_init\(tx, params\)"
    with pytest.raises(ValueError, match=re.escape(
            "opt_state.layers.inner_state[0].count is int32[3], expected int32[2]") + ".*"
            + rebuild):
        step(two, fused_init(tx, params), batch)
    wide = jax.tree.map(lambda x: jnp.zeros(x.shape[:-1] + (x.shape[-1] * 2,), x.dtype), params)
    with pytest.raises(ValueError, match=re.escape(
            "opt_state.embed[0].v_col['tok'] is float32[16], expected float32[8]") + ".*"
            + rebuild):
        step(params, fused_init(tx, wide), batch)
    other_tx = optax.sgd(1e-2, momentum=0.9)
    with pytest.raises(ValueError, match=r"opt_state.embed.* expected.*" + rebuild):
        step(params, fused_init(other_tx, params), batch)


# --------------------------------------------------------------------------
# Minor: 1-D input_ids, an array donated twice
# --------------------------------------------------------------------------


def test_1d_input_ids_are_named_with_their_shape():
    cfg, params = llama_setup()
    tx = lomo_jax.lomo(1e-2)
    step = fused_train_step(models.layered_model(cfg), tx)
    with pytest.raises(ValueError, match=re.escape(
            "batch['input_ids'] must be [B, T] (a batch axis, then the sequence), got shape [8]")):
        step(params, fused_init(tx, params), {"input_ids": jnp.arange(8, dtype=jnp.int32)})


def test_a_generic_layer_failure_shows_the_batch_shapes():
    """A layer that fails on a batch of the wrong rank: the message shows the
    batch's shapes and says to check them, not only the stacking hint."""
    def layer(p, h, batch):
        b, t = batch["mask"].shape  # needs [B, T]
        return h * batch["mask"].reshape(b, t, 1)

    model = LayeredModel(rel.embed, lambda p, h, batch: (layer(p, h[0], batch), h[1]),
                         rel.head)
    tx = lomo_jax.lomo(1e-2)
    params = rel.jax_params(jnp.float32)
    batch = rel.jax_batch(rel.batch_np(0))
    batch["mask"] = jnp.ones((rel.T,), jnp.float32)
    with pytest.raises(ValueError, match=re.compile(
            r"batch: \{.*'mask': 'float32\[4\]'.*check the batch's shapes", re.S)):
        fused_train_step(model, tx)(params, fused_init(tx, params), batch)


def test_an_array_donated_twice_is_named_by_its_paths():
    tx = lomo_jax.lomo(1e-2)
    params = rel.jax_params(jnp.float32)
    state = fused_init(tx, params)
    step = fused_train_step(rel.MODEL, tx)
    twice = dict(params, layers=dict(params["layers"], w2=params["layers"]["w1"]))
    with pytest.raises(ValueError, match=re.escape(
            "params['layers']['w2'] is the same array as params['layers']['w1']") +
            r".*donated.*jnp.copy"):
        step(twice, state, rel.jax_batch(rel.batch_np(0)))
    batch = rel.jax_batch(rel.batch_np(0))
    batch["extra"] = params["head"]["out"]
    with pytest.raises(ValueError, match=re.escape(
            "batch['extra'] is the same array as params['head']['out']")):
        step(params, state, batch)
    batch = rel.jax_batch(rel.batch_np(0))
    batch["labels"] = batch["ids"]  # the same array twice in the (undonated) batch is fine
    params, state, _ = step(params, state, batch)
