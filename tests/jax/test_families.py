"""The model families beyond Llama/Mistral/Qwen2 (switches of the one scanned
model) and the yarn / dynamic RoPE types, against transformers (PyTorch, fp32,
eager attention) on tiny random configs built offline:

* logits within 1e-4 on a padded batch (a left-padded and a right-padded row);
* the state dict round trip params_from_hf -> params_to_hf is bit-exact
  (Phi-3's fused qkv_proj / gate_up_proj included);
* for each new family, two fused AdaLomo steps (clipped) equal
  jax.value_and_grad of a models.logits-based loss plus the same optax
  transform (the reference of tests/jax/test_fused.py).

Kept cheap (CI budget): one tiny model per case, shared by a module fixture.
"""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lomo_jax  # noqa: E402
from lomo_jax import models  # noqa: E402
from lomo_jax.models import convert, llama  # noqa: E402
from tests.jax.builders import reference_step  # noqa: E402
from tests.jax.test_llama_hf import _inputs, _jax_batch  # noqa: E402
from tests.jax.tiny_llama import hf_model  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 8, "beta_fast": 16.0}
DYNAMIC = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}

# name: (transformers family, config overrides). Sequences are 12 long.
CASES = {
    "qwen3": ("qwen3", dict(head_dim=24, rms_norm_eps=1e-5)),  # head_dim != 64 / 4
    "phi3": ("phi3", dict(pad_token_id=0, sliding_window=5)),
    "gemma": ("gemma", dict(head_dim=24, hidden_act="gelu_pytorch_tanh")),  # tied
    # 3 layers: sliding (window 4 < 12 tokens), full, sliding; both soft-caps
    "gemma2": ("gemma2", dict(num_hidden_layers=3, head_dim=16, sliding_window=4,
                              query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                              final_logit_softcapping=3.0)),
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
    assert {"model.layers.1.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} \
        <= set(convert.hf_parameter_shapes(_case("phi3")[1]))
    with pytest.raises(NotImplementedError, match="partial_rotary_factor.*0.5"):
        convert.config_from_hf(transformers.Phi3Config(
            hidden_size=32, num_attention_heads=4, pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}))
    with pytest.raises(ValueError, match="qk_norm=True .* model_type='llama'"):
        _case("llama_yarn")[1].replace(qk_norm=True).to_hf()


def _logits_loss(cfg):
    """The reference loss: next-token cross-entropy of models.logits."""
    def loss(params, batch):
        return llama.causal_lm_loss(models.logits(cfg, params, batch), llama.default_labels(batch))
    return types.SimpleNamespace(loss=loss)


FUSED = ["qwen3", "phi3", "gemma", "gemma2"]


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
    chex.assert_trees_all_close(p_f, p_r, rtol=1e-5, atol=1e-6)


def test_gemma2_alternating_window_matters_and_generate_matches():
    """Layers 0 and 2 slide (window 4), layer 1 does not: a window on every
    layer, or on none, gives other logits. Greedy generate (KV cache, the same
    soft-capped attention) equals transformers' on a left-padded batch."""
    hf, cfg, params = _case("gemma2")
    assert cfg.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert models.layered_model(cfg).takes_index
    ids, mask = _inputs(mask=None, seed=3)
    ref = _hf_logits(hf, ids, None)
    for other in (cfg.replace(layer_types=None), cfg.replace(sliding_window=None)):
        out = np.asarray(_logits_fn(other)(params, _jax_batch(ids)))
        assert np.abs(out - ref).max() > 1e-2
    from tests.jax.test_generate import _hf_greedy, _jgen, _prompts
    ids, mask = _prompts(seed=1)
    np.testing.assert_array_equal(_jgen(cfg, params, ids, mask), _hf_greedy(hf, ids, mask, 6))


@pytest.mark.parametrize("name", ["phi3", "gemma2"])
def test_save_pretrained_loads_in_transformers(tmp_path, name):
    hf, cfg, params = _case(name)
    convert.save_pretrained(params, cfg, str(tmp_path), hf_config=hf.config)  # its token ids
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert type(back) is type(hf)
    sd = hf.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, sd[k]), k
    cfg2, params2 = convert.load_pretrained(str(tmp_path))
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params2, params)
