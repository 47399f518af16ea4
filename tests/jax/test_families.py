"""The model families beyond Llama/Mistral/Qwen2 (switches of the one scanned
model) and the yarn / dynamic RoPE types, against transformers (PyTorch, fp32,
eager attention) on tiny random configs built offline:

* logits within 1e-4 on a padded batch (a left-padded and a right-padded row);
* the state dict round trip params_from_hf -> params_to_hf is bit-exact
  (Phi-3's fused qkv_proj / gate_up_proj included);
* a few fused LOMO steps equal jax.value_and_grad of a models.logits-based
  loss plus the same optax transform (the reference of tests/jax/test_fused.py).

Kept cheap (CI budget): one tiny model per case, shared by a module fixture.
"""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lomo_jax  # noqa: E402
from lomo_jax import models  # noqa: E402
from lomo_jax.models import convert, llama  # noqa: E402
from tests.jax.test_fused import assert_trees_close, reference_step  # noqa: E402
from tests.jax.test_llama_hf import _inputs, _jax_batch  # noqa: E402
from tests.jax.tiny_llama import hf_model  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 8, "beta_fast": 16.0}
DYNAMIC = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}

# name: (transformers family, config overrides). Sequences are 12 long.
CASES = {
    "qwen3": ("qwen3", dict(head_dim=24, rms_norm_eps=1e-5)),  # head_dim != 64 / 4
    "llama_yarn": ("llama", dict(rope_parameters=YARN)),
    # max_position_embeddings 8 < 12 tokens: the dynamic rescaling is in force
    "llama_dynamic": ("llama", dict(max_position_embeddings=8, rope_parameters=DYNAMIC)),
}


@functools.lru_cache(maxsize=None)
def _case(name):
    """``(hf, cfg, params)`` of a case (built once per session)."""
    kind, kw = CASES[name]
    hf = hf_model(kind, seed=len(name), **kw)
    cfg, params = convert.from_hf_model(hf)
    return hf, cfg, params


@functools.lru_cache(maxsize=None)
def _logits_fn(cfg):
    return jax.jit(functools.partial(models.logits, cfg))


def _hf_logits(hf, ids, mask):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits.numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name):
    hf, cfg, params = _case(name)
    assert cfg.model_type == CASES[name][0]
    ids, mask = _inputs(mask="both", seed=len(name))
    ref = _hf_logits(hf, ids, mask)
    out = np.asarray(_logits_fn(cfg)(params, _jax_batch(ids, mask)))
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(out, ref, **TOL)


@pytest.mark.parametrize("name", list(CASES))
def test_layered_model_loss_equals_logits_loss(name):
    """lomo_jax.fused_train_step runs models.layered_model's embed/layer/head
    (tests/jax/test_fused.py: its step equals value_and_grad(model.loss) + tx);
    here that loss is the logits-based one for every case."""
    _, cfg, params = _case(name)
    batch = _jax_batch(*_inputs(mask="both", seed=1))
    got = jax.jit(models.layered_model(cfg).loss)(params, batch)
    want = jax.jit(_logits_loss(cfg).loss)(params, batch)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_round_trip_is_exact(name):
    hf, cfg, params = _case(name)
    sd = hf.state_dict()
    back = convert.params_to_hf(convert.params_from_hf(sd, cfg), cfg)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_config_round_trip_and_refusals():
    for name in CASES:
        hf, cfg, _ = _case(name)
        again = cfg.to_hf()
        assert type(again) is type(hf.config)
        assert llama.LlamaConfig.from_hf(again) == cfg
    assert _case("qwen3")[1].qk_norm and _case("qwen3")[1].head_dim == 24
    with pytest.raises(NotImplementedError, match="longrope"):
        llama.LlamaConfig(vocab_size=8, hidden_size=8, num_attention_heads=2,
                          rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.0]})
    with pytest.raises(ValueError, match="qk_norm=True .* model_type='llama'"):
        _case("llama_yarn")[1].replace(qk_norm=True).to_hf()


def _logits_loss(cfg):
    """The reference loss: next-token cross-entropy of models.logits."""
    def loss(params, batch):
        return llama.causal_lm_loss(models.logits(cfg, params, batch), llama.default_labels(batch))
    return types.SimpleNamespace(loss=loss)


FUSED = ["qwen3"]


@pytest.mark.parametrize("name", FUSED)
def test_fused_step_equals_value_and_grad_of_logits_loss(name):
    _, cfg, params = _case(name)
    tx = lomo_jax.adalomo(5e-2, weight_decay=0.01)
    fused = lomo_jax.fused_train_step(models.layered_model(cfg), tx, clip_grad_norm=1.0)
    ref = reference_step(_logits_loss(cfg), tx, clip_grad_norm=1.0)
    p_f = jax.tree.map(lambda x: jnp.array(x, copy=True), params)  # the step donates
    s_f = lomo_jax.fused_init(tx, p_f)
    p_r, s_r = params, lomo_jax.fused_init(tx, params)
    for seed in range(2):
        batch = _jax_batch(*_inputs(mask="both", seed=seed))
        p_f, s_f, m_f = fused(p_f, s_f, batch)
        p_r, s_r, m_r = ref(p_r, s_r, batch)
        np.testing.assert_allclose(float(m_f["loss"]), float(m_r["loss"]), rtol=1e-5)
    assert_trees_close(p_f, p_r, rtol=1e-5, atol=1e-6, what=name)
