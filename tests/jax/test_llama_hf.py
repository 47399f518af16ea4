"""lomo_jax.models.llama against transformers (PyTorch, fp32, eager attention):
logits, loss and gradients on the same converted weights; conversion round
trips; save_pretrained directories; conversion errors. All models are built
offline from tiny configs."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lomo_jax.models import convert, llama  # noqa: E402
from tests.jax.tiny_llama import TINY  # noqa: E402
from tests.jax.tiny_llama import hf_model as _hf_model  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)


def _inputs(b=3, t=12, vocab=128, mask="both", seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    if mask is None:
        return ids, None
    m = torch.ones(b, t, dtype=torch.long)
    if mask in ("left", "both"):
        m[0, :4] = 0
    if mask in ("right", "both"):
        m[1, 8:] = 0
    return ids, m


def _jax_batch(ids, mask=None, **extra):
    batch = {"input_ids": jnp.asarray(ids.numpy(), jnp.int32)}
    if mask is not None:
        batch["attention_mask"] = jnp.asarray(mask.numpy(), jnp.int32)
    for k, v in extra.items():
        batch[k] = jnp.asarray(v.numpy(), jnp.int32)
    return batch


def _compare_logits(hf, cfg, params, ids, mask, **extra):
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, **extra).logits.numpy()
    out = np.asarray(
        jax.jit(functools.partial(llama.llama_logits, cfg))(params, _jax_batch(ids, mask, **extra))
    )
    assert out.shape == ref.shape
    assert np.abs(ref).max() > 1.0  # the comparison is not of near-zero numbers
    # every position agrees, padded query rows included (they attend uniformly
    # to all keys in both frameworks: additive lowest-float mask)
    np.testing.assert_allclose(out, ref, **TOL)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("mask", [None, "left", "right", "both"])
def test_logits_match_llama(mask):
    hf = _hf_model("llama")
    cfg, params = convert.from_hf_model(hf)
    ids, m = _inputs(mask=mask)
    _compare_logits(hf, cfg, params, ids, m)


def test_logits_match_llama_tied_and_all_biases_and_llama3_rope():
    hf = _hf_model(
        "llama",
        seed=1,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        num_key_value_heads=1,
        head_dim=8,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    )
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    cfg, params = convert.from_hf_model(hf)
    assert cfg.tie_word_embeddings and cfg.attention_bias and cfg.mlp_bias
    assert cfg.rope_type == "llama3" and cfg.head_dim == 8
    assert "lm_head" not in params["head"]
    ids, m = _inputs(mask="both", seed=1)
    _compare_logits(hf, cfg, params, ids, m)
    _compare_logits(hf, cfg, params, ids, None)  # tied, without an attention mask
    # explicit position_ids (e.g. counting from the first real token)
    pos = (m.cumsum(-1) - 1).clamp(min=0)
    _compare_logits(hf, cfg, params, ids, m, position_ids=pos)


def test_logits_match_qwen2():
    hf = _hf_model("qwen2", seed=2)
    assert hf.model.layers[0].self_attn.q_proj.bias is not None
    assert hf.model.layers[0].self_attn.o_proj.bias is None
    cfg, params = convert.from_hf_model(hf)
    assert cfg.qkv_bias and not cfg.attention_bias and cfg.sliding_window is None
    ids, m = _inputs(mask="both", seed=2)
    _compare_logits(hf, cfg, params, ids, m)


def test_logits_match_mistral_sliding_window():
    hf = _hf_model("mistral", seed=3, sliding_window=5)
    cfg, params = convert.from_hf_model(hf)
    assert cfg.sliding_window == 5 and cfg.model_type == "mistral"
    ids, m = _inputs(mask="both", seed=3)
    _compare_logits(hf, cfg, params, ids, m)
    # the window matters at this length: full attention gives other logits
    full = np.asarray(llama.llama_logits(cfg.replace(sliding_window=None), params, _jax_batch(ids)))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.numpy()
    assert np.abs(full - ref).max() > 1e-2


@pytest.mark.parametrize("tied", [False, True])
def test_loss_and_gradients_match(tied):
    hf = _hf_model("llama", seed=4, tie_word_embeddings=tied)
    cfg, params = convert.from_hf_model(hf)
    ids, m = _inputs(mask="both", seed=4)
    labels = ids.masked_fill(m == 0, -100)
    labels[2, 5] = -100  # an explicitly ignored real token
    hf.zero_grad()
    out = hf(input_ids=ids, attention_mask=m, labels=labels)
    out.loss.backward()
    lm = llama.llama_layered_model(cfg)

    # labels default to input_ids with padding ignored
    default = jax.jit(lm.loss)(params, _jax_batch(ids, m))
    with torch.no_grad():
        ref_default = hf(input_ids=ids, attention_mask=m, labels=ids.masked_fill(m == 0, -100)).loss
    np.testing.assert_allclose(float(default), float(ref_default), rtol=1e-5)

    batch = _jax_batch(ids, m, labels=labels)
    loss, grads = jax.jit(jax.value_and_grad(lm.loss))(params, batch)
    np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-5)
    ref_grads = {k: v.grad for k, v in hf.named_parameters()}
    if tied:  # named_parameters lists the shared tensor once
        ref_grads["lm_head.weight"] = ref_grads["model.embed_tokens.weight"]
    ours = convert.params_to_hf(grads, cfg, framework="np")
    assert set(ours) == set(ref_grads)
    for k, g in ours.items():
        np.testing.assert_allclose(g, ref_grads[k].numpy(), rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("kind,kw", [("llama", {}), ("llama", {"tie_word_embeddings": True}),
                                     ("qwen2", {}), ("llama", {"attention_bias": True})])
def test_state_dict_round_trip_bit_exact(kind, kw):
    hf = _hf_model(kind, seed=5, **kw)
    sd = hf.state_dict()
    cfg, params = convert.from_hf_model(hf)
    back = convert.params_to_hf(params, cfg)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert torch.equal(back[k], v), k
    hf2 = _hf_model(kind, seed=99, **kw)
    hf2.load_state_dict(back)
    # bf16 too: stored as bf16 in JAX, back bit-exact
    sd16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    p16 = convert.params_from_hf(sd16, cfg)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    back16 = convert.params_to_hf(p16, cfg)
    for k, v in sd16.items():
        assert back16[k].dtype == torch.bfloat16 and torch.equal(back16[k], v), k


def test_config_round_trip():
    for kind, kw in [("llama", {"attention_bias": True, "tie_word_embeddings": True}),
                     ("qwen2", {}), ("mistral", {"sliding_window": 7}),
                     ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                    "rope_theta": 1000.0}})]:
        hc = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
              "mistral": transformers.MistralConfig}[kind](**TINY, **kw)
        cfg = llama.LlamaConfig.from_hf(hc)
        assert llama.LlamaConfig.from_hf(cfg.to_hf()) == cfg
        assert type(cfg.to_hf()) is type(hc)
    qwen_mixed = transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4,
                                          max_window_layers=1)
    with pytest.raises(NotImplementedError, match="mixes sliding-window"):
        llama.LlamaConfig.from_hf(qwen_mixed)
    qwen_all = transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4,
                                        max_window_layers=0)
    assert llama.LlamaConfig.from_hf(qwen_all).sliding_window == 4


@pytest.mark.parametrize("tied,shard", [(False, None), (True, 40_000)])
def test_save_pretrained_loads_in_transformers(tmp_path, tied, shard):
    hf = _hf_model("llama", seed=6, tie_word_embeddings=tied)
    cfg, params = convert.from_hf_model(hf)
    # change the weights in JAX
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    params = jax.tree.unflatten(
        tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    )
    out = convert.save_pretrained(params, cfg, str(tmp_path / "ckpt"), max_shard_size=shard)
    files = sorted(os.listdir(out))
    assert "config.json" in files
    if shard:
        assert "model.safetensors.index.json" in files
        assert sum(f.endswith(".safetensors") for f in files) > 1
    else:
        assert "model.safetensors" in files
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    loaded = loaded.float().eval()
    assert type(loaded) is transformers.LlamaForCausalLM
    ids, m = _inputs(mask="both", seed=6)
    _compare_logits(loaded, cfg, params, ids, m)
    # and our own reader gives the same arrays back
    cfg2, params2 = convert.load_pretrained(out)
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params2, params)


QWEN_GENERATION = dict(bos_token_id=5, eos_token_id=[6, 7], pad_token_id=5, do_sample=True,
                       temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)


@pytest.mark.parametrize("kind,ids,generation", [
    ("llama", dict(bos_token_id=0, eos_token_id=0, pad_token_id=0), None),
    ("qwen2", dict(bos_token_id=5, eos_token_id=[6, 7], pad_token_id=5), QWEN_GENERATION)])
def test_save_without_hf_config_keeps_the_special_tokens(tmp_path, kind, ids, generation):
    """load_pretrained -> save_pretrained (no hf_config, as README's snippet) writes the
    source's token ids into config.json and its generation_config.json back (once
    1/2/null for this Llama: 2 made generate stop early; null for a Qwen2; none)."""
    hf = _hf_model(kind, seed=10, **ids)
    if generation:
        hf.generation_config = transformers.GenerationConfig(**generation)
    hf.save_pretrained(tmp_path / "src")
    cfg, params = convert.load_pretrained(str(tmp_path / "src"), as_numpy=True)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == tuple(
        tuple(v) if isinstance(v, list) else v for v in ids.values())
    convert.save_pretrained(params, cfg, str(tmp_path / "out"))

    def read(d, name):
        text = json.loads((tmp_path / d / name).read_text())
        text.pop("transformers_version")
        return text

    src, out = read("src", "config.json"), read("out", "config.json")
    assert {k: out[k] for k in ids} == {k: src[k] for k in ids} == ids
    assert read("out", "generation_config.json") == read("src", "generation_config.json")
    if generation:
        assert read("out", "generation_config.json")["temperature"] == 0.7
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert loaded.generation_config.eos_token_id == ids["eos_token_id"]
    # and again: the saved directory loads to the same config
    assert convert.load_pretrained(str(tmp_path / "out"), as_numpy=True)[0] == cfg


def test_hand_built_config_keeps_transformers_defaults(tmp_path):
    """A config built by hand (no checkpoint) is saved as before: the transformers
    class's default token ids, and the generation config derived from them."""
    hf = _hf_model("llama", seed=11)
    _, params = convert.from_hf_model(hf)
    cfg = llama.LlamaConfig(**TINY)
    assert cfg.generation_config is None and cfg.bos_token_id is None
    convert.save_pretrained(params, cfg, str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["bos_token_id"], saved["eos_token_id"], saved.get("pad_token_id")) == (1, 2, None)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    mine = cfg.replace(eos_token_id=[7, 8], generation_config={"top_k": 3})
    assert mine.eos_token_id == (7, 8) and mine.generation_config_dict == {"top_k": 3}
    assert hash(mine) != hash(cfg) and mine.to_hf().eos_token_id == [7, 8]
    with pytest.raises(ValueError, match=r"pad_token_id='0' must be an integer token id"):
        llama.LlamaConfig(**TINY, pad_token_id="0")
    with pytest.raises(ValueError, match=r"generation_config must be a dict"):
        llama.LlamaConfig(**TINY, generation_config=[("top_k", 3)])


def test_load_pretrained_reads_transformers_sharded_dir(tmp_path):
    hf = _hf_model("qwen2", seed=7)
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    with open(tmp_path / "model.safetensors.index.json") as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    cfg, params = convert.load_pretrained(str(tmp_path))
    _, expected = convert.from_hf_model(hf)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, expected)
    assert cfg.qkv_bias and cfg.model_type == "qwen2"


def test_bad_shapes_and_keys_give_clear_errors():
    hf = _hf_model("llama", seed=8)
    sd = hf.state_dict()
    cfg = llama.LlamaConfig.from_hf(hf.config)
    wrong = cfg.replace(intermediate_size=96)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*"
                                         r"\(128, 64\).*expects \(96, 64\)"):
        convert.params_from_hf(sd, wrong)
    bad = dict(sd)
    bad["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight' has "
                                         r"shape \(64, 64\) but the config expects \(32, 64\)"):
        convert.params_from_hf(bad, cfg)
    missing = {k: v for k, v in sd.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match=r"missing.*model\.norm\.weight"):
        convert.params_from_hf(missing, cfg)
    with pytest.raises(ValueError, match=r"does not use.*q_proj\.bias"):
        convert.params_from_hf({**sd, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, cfg)
    # export checks the JAX side too
    params = convert.params_from_hf(sd, cfg)
    params["head"]["lm_head"] = jnp.zeros((64, 100))
    with pytest.raises(ValueError, match=r"lm_head.*\(64, 100\).*\(64, 128\)"):
        convert.params_to_hf(params, cfg)
