"""Attention of lomo_jax.models.llama: packed sequences (segment_ids), the
cuDNN flash path on a GPU target, and lomo_jax.grad_order's reordering."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lomo_jax
from lomo_jax import aot
from lomo_jax.grad_order import param_grads_first
from lomo_jax.models import llama
from tests.jax.tiny_llama import TINY
from tests.jax.gpu_target import COMPILES_FOR_GPU, rtx4090_mesh

CFG = llama.LlamaConfig(**TINY)
# Compiled once per batch structure (run op by op, each call cost 0.3-1 s of dispatch).
logits_of = jax.jit(functools.partial(llama.llama_logits, CFG))
loss_of = jax.jit(functools.partial(llama.llama_loss, CFG))


@functools.lru_cache(maxsize=None)
@jax.jit
def _params():
    """Random parameters, drawn once (one compiled program) for the tests that share them."""
    p = llama.init_params(CFG, 0)
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_segment_positions_restart_in_each_document():
    seg = jnp.array([[7, 7, 7, 2, 2, 5], [1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(llama.segment_positions(seg), [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])


def test_packed_documents_do_not_see_each_other():
    """Two documents packed in one row give the logits each gives alone, and the
    loss is the token-weighted mean over both (the first token of the second
    document is not predicted from the first)."""
    params = _params()
    ids = jax.random.randint(jax.random.key(3), (1, 12), 0, CFG.vocab_size)
    a, b = ids[:, :5], ids[:, 5:]
    packed = {"input_ids": ids, "segment_ids": jnp.array([[0] * 5 + [1] * 7])}
    logits = logits_of(params, packed)
    alone_a = logits_of(params, {"input_ids": a})
    alone_b = logits_of(params, {"input_ids": b})
    np.testing.assert_allclose(logits[:, :5], alone_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[:, 5:], alone_b, rtol=1e-5, atol=1e-5)
    # without segment ids the second document does see the first
    assert np.abs(logits_of(params, {"input_ids": ids})[:, 5:] - alone_b).max() > 1e-2

    labels = llama.default_labels(packed)
    assert int(labels[0, 5]) == llama.IGNORE_INDEX and int(labels[0, 4]) == int(ids[0, 4])
    loss = loss_of(params, packed)
    loss_a = loss_of(params, {"input_ids": a})
    loss_b = loss_of(params, {"input_ids": b})
    np.testing.assert_allclose(loss, (4 * loss_a + 6 * loss_b) / 10, rtol=1e-5)


def test_segments_combine_with_padding():
    params = _params()
    ids = jax.random.randint(jax.random.key(4), (1, 10), 0, CFG.vocab_size)
    batch = {"input_ids": ids, "segment_ids": jnp.array([[0] * 4 + [1] * 6]),
             "attention_mask": jnp.array([[1] * 8 + [0] * 2])}
    logits = logits_of(params, batch)
    alone = logits_of(params, {"input_ids": ids[:, 4:8]})
    np.testing.assert_allclose(logits[:, 4:8], alone, rtol=1e-5, atol=1e-5)


def _compiled_hlo(cfg, batch_extra):
    mesh = aot.target_mesh("rtx4090")
    tx = lomo_jax.adalomo(1e-3)
    p = aot.abstract(llama.param_shapes(cfg), mesh)
    s = aot.abstract(jax.eval_shape(lambda q: lomo_jax.fused_init(tx, q), p), mesh)
    b = aot.abstract({"input_ids": jax.ShapeDtypeStruct((2, 128), jnp.int32), **batch_extra}, mesh)
    step = lomo_jax.fused_train_step(llama.llama_layered_model(cfg), tx)
    return step.lower(p, s, b).compile().as_text()


@COMPILES_FOR_GPU
@pytest.mark.parametrize("extra", [(), ("attention_mask",), ("segment_ids",)],
                         ids=["causal", "padding", "packed"])
def test_gpu_target_uses_cudnn_flash_attention(extra):
    """Compiled for an RTX 4090, the bf16 step runs cuDNN's fused attention in the
    forward and the backward (with a sliding window too); fp32 runs XLA's
    (checked for the causal case)."""
    rtx4090_mesh()  # fails (or skips) with the reason when the CUDA plugin is missing
    kw = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=2, sliding_window=64, model_type="mistral")
    batch_extra = {k: jax.ShapeDtypeStruct((2, 128), jnp.int32) for k in extra}
    bf16 = _compiled_hlo(llama.LlamaConfig(**kw, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
                         batch_extra)
    calls = set(re.findall(r'custom_call_target="(__cudnn\$fmha[A-Za-z]*)"', bf16))
    assert any(c.endswith("Softmax") for c in calls), calls  # forward (with a bias: padding)
    assert any(c.endswith("Backward") for c in calls), calls
    assert '"sliding_window_length":64' in bf16.replace(" ", "")
    if not extra:  # the fp32 check once (CI time): cuDNN's fused attention is bf16/fp16 only
        fp32 = _compiled_hlo(llama.LlamaConfig(**kw), batch_extra)
        assert "__cudnn$fmha" not in fp32


def test_param_grads_first_changes_nothing_but_the_order():
    def block(p, x, scale):
        return jnp.tanh(x @ p["w"] + p["b"]) * scale

    k = jax.random.split(jax.random.key(0), 3)
    p = {"w": jax.random.normal(k[0], (4, 4)), "b": jax.random.normal(k[1], (4,))}
    x = jax.random.normal(k[2], (3, 4))
    scale = jnp.float32(1.5)
    wrapped = param_grads_first(block)

    def loss(f):
        return lambda p, x: jnp.sum(f(p, x, scale) ** 2)

    np.testing.assert_array_equal(wrapped(p, x, (scale,)), block(p, x, scale))
    want = jax.grad(loss(block), argnums=(0, 1))(p, x)
    got = jax.grad(lambda p, x: jnp.sum(wrapped(p, x, (scale,)) ** 2), argnums=(0, 1))(p, x)
    jax.tree.map(np.testing.assert_array_equal, got, want)
