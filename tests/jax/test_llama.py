"""lomo_jax.models.llama on its own: the NNX model, its plain-dict view, the
LayeredModel view and the fused LOMO step on it agree (no transformers needed)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lomo_jax.models import llama
from tests.jax.tiny_llama import TINY


def _batch(key, b=3, t=12, vocab=128, pad=True):
    ids = jax.random.randint(key, (b, t), 0, vocab, dtype=jnp.int32)
    batch = {"input_ids": ids}
    if pad:
        mask = np.ones((b, t), np.int32)
        mask[0, :4] = 0  # left padding
        mask[1, 9:] = 0  # right padding
        batch["attention_mask"] = jnp.asarray(mask)
    return batch


def _perturb(params, key, scale=0.1):
    """Norm scales / biases away from their init so every parameter matters."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    )


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True},
        {"qkv_bias": True, "model_type": "qwen2", "sliding_window": 5,
         "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 500.0},
    ],
    ids=["base", "tied_bias", "qkv_sliding_rope"],
)
def test_module_and_layered_view_agree(extra):
    cfg = llama.LlamaConfig(**TINY, **extra)
    model = llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    params = _perturb(llama.module_to_params(model), jax.random.key(1))
    llama.update_module(model, params)
    batch = _batch(jax.random.key(2))
    lm = llama.llama_layered_model(cfg)
    assert lm.tied == cfg.tie_word_embeddings

    @nnx.jit
    def nnx_fwd(m, b):
        return m(b["input_ids"], b["attention_mask"]), m.loss(b)

    @jax.jit
    def pure_fwd(p, b):
        return llama.llama_logits(cfg, p, b), lm.loss(p, b), llama.llama_loss(cfg, p, b)

    logits_nnx, loss_nnx = nnx_fwd(model, batch)
    logits_fn, loss_view, loss_fn = pure_fwd(params, batch)
    np.testing.assert_allclose(logits_nnx, logits_fn, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(loss_view, loss_nnx, rtol=1e-6)
    np.testing.assert_allclose(loss_view, loss_fn, rtol=1e-6)
    assert np.isfinite(float(loss_view))


def test_module_and_layered_view_gradients_agree():
    """Gradients through the pure view (what the fused step differentiates)
    equal nnx.grad of the module, tied embeddings included."""
    cfg = llama.LlamaConfig(**TINY, tie_word_embeddings=True)
    model = llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    params = _perturb(llama.module_to_params(model), jax.random.key(1))
    llama.update_module(model, params)
    batch = _batch(jax.random.key(2))
    lm = llama.llama_layered_model(cfg)
    g_view = jax.jit(jax.grad(lm.loss))(params, batch)
    g_nnx = nnx.jit(nnx.grad(lambda m, b: m.loss(b)))(model, batch)
    g_nnx = llama._params_layout(cfg, nnx.to_pure_dict(g_nnx))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_view, g_nnx)


def test_param_layout_and_shapes():
    cfg = llama.LlamaConfig(**TINY, attention_bias=True)
    p = llama.init_params(cfg, 0)
    L, D, V = 2, 64, 128
    assert set(p) == {"embed", "layers", "head"}
    assert p["embed"]["embedding"].shape == (V, D)
    assert p["head"]["norm"].shape == (D,)
    assert p["head"]["lm_head"].shape == (D, V)
    a = p["layers"]["self_attn"]
    assert a["q_proj"]["kernel"].shape == (L, D, 64)
    assert a["k_proj"]["kernel"].shape == (L, D, 32)  # 2 kv heads x 16
    assert a["o_proj"]["bias"].shape == (L, D)
    assert p["layers"]["mlp"]["down_proj"]["kernel"].shape == (L, 128, D)
    assert jax.tree.structure(p) == jax.tree.structure(llama.param_shapes(cfg))
    for leaf in jax.tree.leaves(p["layers"]):
        assert leaf.shape[0] == L
    # distinct layers got distinct random init
    k = p["layers"]["self_attn"]["q_proj"]["kernel"]
    assert not np.allclose(k[0], k[1])

    tied = llama.init_params(cfg.replace(tie_word_embeddings=True, attention_bias=False), 0)
    assert "lm_head" not in tied["head"]
    assert "bias" not in tied["layers"]["self_attn"]["q_proj"]
    qwen = llama.init_params(cfg.replace(attention_bias=False, qkv_bias=True), 0)
    assert "bias" in qwen["layers"]["self_attn"]["v_proj"]
    assert "bias" not in qwen["layers"]["self_attn"]["o_proj"]


def test_params_to_module_round_trip_and_shape_errors():
    cfg = llama.LlamaConfig(**TINY)
    p = llama.init_params(cfg, 3)
    m = llama.params_to_module(cfg, p)
    back = llama.module_to_params(m)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), p, back)

    bad = jax.tree.map(lambda x: x, p)
    bad["layers"]["mlp"]["up_proj"]["kernel"] = jnp.zeros((2, 64, 96))
    with pytest.raises(ValueError, match=r"up_proj.*\(2, 64, 96\).*\(2, 64, 128\)"):
        llama.update_module(m, bad)
    missing = jax.tree.map(lambda x: x, p)
    del missing["head"]["lm_head"]
    with pytest.raises(ValueError, match="missing.*lm_head"):
        llama.params_to_module(cfg, missing)


def test_masking_semantics():
    """Padding keys are invisible; real tokens do not depend on pad tokens."""
    cfg = llama.LlamaConfig(**TINY)
    p = llama.init_params(cfg, 0)
    batch = _batch(jax.random.key(5))
    f = jax.jit(functools.partial(llama.llama_logits, cfg))
    base = f(p, batch)
    ids = batch["input_ids"]
    changed = dict(batch, input_ids=ids.at[0, :4].set(7).at[1, 9:].set(11))
    out = f(p, changed)
    mask = np.asarray(batch["attention_mask"], bool)
    np.testing.assert_allclose(np.asarray(out)[mask], np.asarray(base)[mask], rtol=1e-6, atol=1e-6)
    # causality: changing the last token changes nothing before it
    later = dict(batch, input_ids=ids.at[2, -1].set((ids[2, -1] + 1) % 128))
    np.testing.assert_allclose(f(p, later)[2, :-1], base[2, :-1], rtol=1e-6, atol=1e-6)
    # default labels ignore padding: the loss only counts real next tokens
    labels = llama.default_labels(batch)
    assert int((labels == -100).sum()) == int((1 - batch["attention_mask"]).sum())


def test_config_validation_and_rope():
    with pytest.raises(ValueError, match="multiple of"):
        llama.LlamaConfig(**{**TINY, "num_key_value_heads": 3})
    with pytest.raises(NotImplementedError, match="longrope"):
        llama.LlamaConfig(**TINY, rope_scaling={"rope_type": "longrope", "factor": 4.0})
    cfg = llama.LlamaConfig(**TINY, rope_scaling={"rope_type": "default"})
    assert cfg.rope_scaling is None and cfg.rope_type == "default"
    hash(llama.LlamaConfig(**TINY, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    inv = llama.rope_inv_freq(cfg)
    np.testing.assert_allclose(inv, 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16), rtol=1e-6)
    assert cfg.head_dim == 16 and cfg.num_kv_groups == 2


def test_bf16_forward_runs():
    cfg = llama.LlamaConfig(**TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    p = llama.init_params(cfg, 0)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p))
    batch = _batch(jax.random.key(0))
    lm = llama.llama_layered_model(cfg)
    logits, loss = jax.jit(lambda p, b: (llama.llama_logits(cfg, p, b), lm.loss(p, b)))(p, batch)
    assert logits.dtype == jnp.bfloat16
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))


def test_fused_step_matches_unfused_reference():
    """lomo_jax.fused_train_step on the LLaMA view (tied embeddings: the head's
    and the embedding's gradients are summed) == value_and_grad + per_layer(tx).
    (The untied case, against PyTorch, is in test_llama_e2e.py.)"""
    import lomo_jax

    cfg = llama.LlamaConfig(**TINY, tie_word_embeddings=True)
    params = _perturb(llama.init_params(cfg, 0), jax.random.key(1))
    lm = llama.llama_layered_model(cfg)
    tx = lomo_jax.adalomo(1e-2, weight_decay=0.01)
    batches = [_batch(jax.random.key(10 + i)) for i in range(2)]

    ref = jax.tree.map(jnp.array, params)
    ref_state = {
        "embed": tx.init(ref["embed"]),
        "layers": lomo_jax.per_layer(tx).init(ref["layers"]),
        "head": tx.init(ref["head"]),
    }

    @jax.jit
    def ref_step(p, s, batch):
        loss, g = jax.value_and_grad(lm.loss)(p, batch)
        new_p, new_s = {}, {}
        for k, t in (("embed", tx), ("layers", lomo_jax.per_layer(tx)), ("head", tx)):
            u, new_s[k] = t.update(g[k], s[k], p[k])
            new_p[k] = optax.apply_updates(p[k], u)
        return new_p, new_s, loss

    fused = jax.tree.map(jnp.array, params)
    state = lomo_jax.fused_init(tx, fused)
    step = lomo_jax.fused_train_step(lm, tx)
    for batch in batches:
        ref, ref_state, ref_loss = ref_step(ref, ref_state, batch)
        fused, state, metrics = step(fused, state, batch)
        np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), fused, ref)
