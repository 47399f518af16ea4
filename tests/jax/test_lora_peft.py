"""LoRA adapters in and out of PEFT's format (``lomo_jax.models.peft_adapter``):

* ``save_adapter`` -> ``peft.PeftModel.from_pretrained`` on the original
  transformers base = lomo_jax's base + adapter logits (B non-zero);
* an adapter PEFT wrote (``get_peft_model(...).save_pretrained``) ->
  ``load_adapter`` -> lomo_jax's logits = PEFT's;
* save -> load is exact (fp32 and bf16);
* ``merge`` -> ``convert.save_pretrained`` -> ``AutoModelForCausalLM`` = lomo_jax's logits;
* refusals, each naming what is wrong: ``save_pretrained``/``params_to_hf`` of a
  LoRA config, every adapter setting lomo_jax cannot represent, missing,
  extra, misshapen or non-finite tensors, fused (Phi-3) targets.

Tolerance: the fp32 logits agree within 1e-4 (abs and rel), as the base
model's do (``test_llama_hf``): the adapter adds one rank-4 product per
targeted projection, computed in the same order as PEFT's (``(x A) B`` then
the scale), so the differences stay those of the matmuls' summation order
(fp32 eps ~1.2e-7 times sums of <= 128 terms of O(1) logits, over 2 layers;
measured: max abs difference 2.3e-6 and 2.5e-6 on logits up to 4, the
adapters moving them by up to 3.5 and 4.3).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from lomo_jax.models import convert, llama  # noqa: E402
from lomo_jax.models import peft_adapter as pa  # noqa: E402
from lomo_jax.models.lora import LoraConfig, add_adapters, merge  # noqa: E402
from lomo_jax.models.lora_config import lora_path  # noqa: E402
from tests.jax.test_llama_hf import TOL, _inputs, _jax_batch  # noqa: E402
from tests.jax.tiny_llama import TINY  # noqa: E402
from tests.jax.tiny_llama import hf_model as _hf_model  # noqa: E402

LORA = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))


def _base():
    hf = _hf_model("llama")
    return (hf,) + convert.from_hf_model(hf)


def _adapted(cfg, params, lora=LORA, seed=0):
    """``cfg`` with ``lora``, params with PEFT-initialised A and a non-zero B."""
    cfg = cfg.replace(lora=lora)
    params = add_adapters(cfg, params, rng=jax.random.key(seed))
    rng = np.random.default_rng(seed)
    for target in lora.targets:
        p = params["layers"][lora_path(target)[0]][target]
        p["lora_b"] = jnp.asarray(0.3 * rng.standard_normal(p["lora_b"].shape), p["lora_b"].dtype)
    return cfg, params


def _jax_logits(cfg, params, ids, mask):
    return np.asarray(jax.jit(functools.partial(llama.llama_logits, cfg))(
        params, _jax_batch(ids, mask)))


def _torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.numpy()


def _assert_close_and_adapted(out, ref, base):
    """``out`` = ``ref`` within TOL, and the adapter moved the logits far beyond it."""
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(out, ref, **TOL)
    assert np.abs(ref - base).max() > 100 * TOL["atol"]


def test_save_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    hf, cfg, params = _base()
    ids, mask = _inputs()
    base_logits = _torch_logits(hf, ids, mask)
    cfg, params = _adapted(cfg, params)
    pa.save_adapter(cfg, params, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [pa.ADAPTER_CONFIG_NAME, pa.ADAPTER_WEIGHTS_NAME]

    written = json.loads((tmp_path / pa.ADAPTER_CONFIG_NAME).read_text())
    fields = {f.name: f for f in peft.LoraConfig.__dataclass_fields__.values()}
    assert set(written) <= set(fields)  # every key is a peft.LoraConfig field
    for name in pa._FIXED:  # the fields lomo_jax fixes are at PEFT's own defaults
        f = fields[name]
        assert written[name] == (f.default_factory() if f.default is dataclasses.MISSING
                                 else f.default), name

    peft_model = peft.PeftModel.from_pretrained(_hf_model("llama"), str(tmp_path)).eval()
    pc = peft_model.peft_config["default"]
    assert (pc.r, pc.lora_alpha, set(pc.target_modules), pc.use_rslora) == (4, 8, set(LORA.targets), False)
    _assert_close_and_adapted(_jax_logits(cfg, params, ids, mask),
                              _torch_logits(peft_model, ids, mask), base_logits)


def _peft_written(path, dropout=0.05, seed=0):
    """A PEFT LoRA (r=4, alpha=8, q/v/down_proj) with a non-zero B, saved by PEFT."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(_hf_model("llama"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        lora_dropout=dropout)).eval()
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(path))
    return model


def test_load_adapter_reads_what_peft_wrote(tmp_path):
    hf, cfg, params = _base()
    ids, mask = _inputs()
    peft_model = _peft_written(tmp_path)
    cfg_l, params_l = pa.load_adapter(str(tmp_path), cfg, params)
    assert cfg_l.lora == LoraConfig(rank=4, alpha=8, targets=LORA.targets, dropout=0.05)
    assert cfg_l.replace(lora=None) == cfg and cfg.lora is None
    assert params_l["embed"]["embedding"] is params["embed"]["embedding"]  # shared, not copied
    assert "lora_a" not in params["layers"]["self_attn"]["q_proj"]  # the caller's dict untouched
    _assert_close_and_adapted(_jax_logits(cfg_l, params_l, ids, mask),
                              _torch_logits(peft_model, ids, mask), _torch_logits(hf, ids, mask))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_then_load_is_exact(tmp_path, dtype):
    _, base_cfg, base = _base()
    base = jax.tree.map(lambda a: a.astype(dtype), base)
    cfg, params = _adapted(base_cfg, base)
    pa.save_adapter(cfg, params, str(tmp_path))
    cfg2, params2 = pa.load_adapter(str(tmp_path), base_cfg, base)
    assert cfg2 == cfg
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                 jax.tree_util.tree_flatten_with_path(params2)[0]):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), path
    pa.save_adapter(cfg2, params2, str(tmp_path / "again"))  # byte-identical files
    for name in (pa.ADAPTER_CONFIG_NAME, pa.ADAPTER_WEIGHTS_NAME):
        assert (tmp_path / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_merge_then_save_pretrained_loads_in_transformers(tmp_path):
    _, cfg, params = _base()
    ids, mask = _inputs()
    cfg, params = _adapted(cfg, params)
    expected = _jax_logits(cfg, params, ids, mask)
    merged_cfg, merged = merge(cfg, params)
    convert.save_pretrained(merged, merged_cfg, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
    hf.config._attn_implementation = "eager"
    np.testing.assert_allclose(_torch_logits(hf, ids, mask), expected, **TOL)


# --------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------


def test_plain_exports_refuse_a_lora_config(tmp_path):
    _, cfg, params = _base()
    cfg, params = _adapted(cfg, params)
    for export in (lambda: convert.save_pretrained(params, cfg, str(tmp_path / "m")),
                   lambda: convert.params_to_hf(params, cfg)):
        with pytest.raises(ValueError, match=r"lora\.merge.*save_adapter"):
            export()
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(base cfg, base params, a save_adapter directory)``."""
    _, cfg, params = _base()
    path = tmp_path_factory.mktemp("adapter")
    pa.save_adapter(*_adapted(cfg, params), str(path))
    return cfg, params, path


def _edited_copy(src, dst, **fields):
    shutil.copytree(src, dst)
    conf = json.loads((dst / pa.ADAPTER_CONFIG_NAME).read_text())
    (dst / pa.ADAPTER_CONFIG_NAME).write_text(json.dumps({**conf, **fields}))
    return str(dst)


@pytest.mark.parametrize("fields,message", [
    (dict(use_rslora=True), "use_rslora=True"),
    (dict(use_dora=True), "use_dora=True"),
    (dict(bias="all"), "bias='all'"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
    (dict(alpha_pattern={"q_proj": 4}), "alpha_pattern"),
    (dict(layers_to_transform=[0]), "layers_to_transform"),
    (dict(target_modules=".*proj"), "regular expression"),
    (dict(target_modules="all-linear"), "all-linear"),
    (dict(target_modules=["q_proj", "embed_tokens"]), r"\['embed_tokens'\] are not among"),
    (dict(init_lora_weights="pissa"), "changes the base"),
    (dict(use_qalora=True), "QA-LoRA"),
    (dict(some_future_field=3), "a field lomo_jax does not know"),
    (dict(peft_type="IA3"), "only LoRA"),
    (dict(task_type="SEQ_CLS"), "task_type"),
])
def test_load_adapter_refuses_what_it_cannot_represent(saved, tmp_path, fields, message):
    cfg, params, path = saved
    with pytest.raises(ValueError, match=message):
        pa.load_adapter(_edited_copy(path, tmp_path / "a", **fields), cfg, params)


def test_load_adapter_accepts_defaults_spelled_out(saved, tmp_path):
    """PEFT writes every field; empty spellings and plain initialisations load."""
    cfg, params, path = saved
    edited = _edited_copy(path, tmp_path / "a", modules_to_save=[], rank_pattern=None,
                          init_lora_weights="gaussian", task_type=None, lora_dropout=0.1,
                          use_qalora=False, some_future_field=None)
    assert pa.load_adapter(edited, cfg, params)[0].lora.dropout == 0.1


def _edit_tensors(path, dst, edit):
    shutil.copytree(path, dst)
    file = str(dst / pa.ADAPTER_WEIGHTS_NAME)
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return str(dst)


_Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(f"{_Q0}.lora_B.weight"), f"lacks {_Q0}.lora_B.weight"),
    (lambda t: t.__setitem__(f"{_Q0}.lora_C.weight", np.zeros(2, np.float32)),
     f"has {_Q0}.lora_C.weight"),
    (lambda t: t.__setitem__(f"{_Q0}.lora_A.weight", np.zeros((4, 3), np.float32)),
     rf"{_Q0}.lora_A.weight has shape \(4, 3\), expected \(4, 64\)"),
    (lambda t: t[f"{_Q0}.lora_A.weight"].__setitem__((1, 2), np.nan), "(?i)nan"),
])
def test_load_adapter_names_the_first_wrong_tensor(saved, tmp_path, edit, message):
    cfg, params, path = saved
    with pytest.raises(ValueError, match=message):
        pa.load_adapter(_edit_tensors(path, tmp_path / "a", edit), cfg, params)


def test_load_adapter_refuses_a_lora_config_missing_files_and_wrong_params(saved, tmp_path):
    cfg, params, path = saved
    with pytest.raises(ValueError, match="base model's config"):
        pa.load_adapter(str(path), cfg.replace(lora=LORA), params)
    with pytest.raises(ValueError, match="do not match the config"):
        pa.load_adapter(str(path), cfg.replace(num_hidden_layers=3), params)
    with pytest.raises(FileNotFoundError, match=pa.ADAPTER_CONFIG_NAME):
        pa.load_adapter(str(tmp_path), cfg, params)
    shutil.copy(path / pa.ADAPTER_CONFIG_NAME, tmp_path)
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        pa.load_adapter(str(tmp_path), cfg, params)


def test_fused_families_are_refused_both_ways(saved, tmp_path):
    phi3 = convert.config_from_hf(transformers.Phi3Config(**TINY))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), llama.param_shapes(phi3))
    with pytest.raises(ValueError, match="phi3 fuses it into 'self_attn.qkv_proj'"):
        pa.save_adapter(phi3.replace(lora=LORA), params, str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="phi3 fuses it into 'mlp.gate_up_proj'"):
        pa.save_adapter(phi3.replace(lora=LoraConfig(4, 8, ("up_proj",))), params, str(tmp_path))
    with pytest.raises(ValueError, match="fuses it into 'self_attn.qkv_proj'"):
        pa.load_adapter(str(saved[2]), phi3, params)


def test_save_adapter_refuses_a_config_without_lora(saved, tmp_path):
    cfg, params, _ = saved
    with pytest.raises(ValueError, match="needs a config with lora set"):
        pa.save_adapter(cfg, params, str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_a_failed_save_leaves_the_previous_adapter(saved, tmp_path, monkeypatch):
    cfg, params, path = saved
    target = tmp_path / "a"
    shutil.copytree(path, target)
    before = {n: (target / n).read_bytes() for n in os.listdir(target)}

    def torn(file, tensors, get):  # writes part of the file, then fails
        with open(file, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pa, "_write_safetensors", torn)
    with pytest.raises(OSError, match="disk full"):
        pa.save_adapter(*_adapted(cfg, params, seed=1), str(target))
    assert {n: (target / n).read_bytes() for n in os.listdir(target)} == before


def test_save_adapter_refuses_a_dtype_safetensors_cannot_store(saved, tmp_path):
    cfg, params, _ = saved
    cfg, params = _adapted(cfg, params)
    q = params["layers"]["self_attn"]["q_proj"]
    q["lora_b"] = np.asarray(q["lora_b"]).astype(np.complex64)
    with pytest.raises(ValueError, match="q_proj.lora_b is complex64"):
        pa.save_adapter(cfg, params, str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()
