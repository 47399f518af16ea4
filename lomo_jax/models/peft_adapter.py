r"""LoRA adapters in PEFT's format: :func:`save_adapter` and :func:`load_adapter`.

A directory ``peft.PeftModel.from_pretrained(base_model, path)`` loads:
``adapter_config.json`` (a ``peft.LoraConfig``: ``r``, ``lora_alpha``,
``target_modules``, ``lora_dropout``, every other field at PEFT's default)
and ``adapter_model.safetensors`` with the names PEFT uses for a
``LlamaForCausalLM`` (and the other families whose projections are separate
``nn.Linear`` modules), torch's ``[out, in]`` layout, layer by layer::

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  [r, d_in]   = lora_a[i].T
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  [d_out, r]  = lora_b[i].T

PEFT's forward on a targeted projection is :math:`y = x W^\top + b +
\frac{\alpha}{r} B (A x)` (``use_rslora=False``): the same numbers as
:class:`~lomo_jax.models.lora_config.LoraLinear`'s
:math:`x W + b + \frac{\alpha}{r} (x A) B`.

Example::

    from lomo_jax.models import lora
    lora.save_adapter(cfg, params, "out/adapter")               # cfg.lora set
    cfg, params = lora.load_adapter("out/adapter", base_cfg, base_params)

    # PyTorch: peft.PeftModel.from_pretrained(base_hf_model, "out/adapter")
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lomo_jax._files import write_atomically
from lomo_jax.models.config import LlamaConfig
from lomo_jax.models.hf_names import _fused_parts
from lomo_jax.models.lora_config import LORA_TARGETS, LoraConfig, adapter_dtype, lora_path
from lomo_jax.models.params import check_params, param_shapes
from lomo_jax.models.safetensors_load import _finite_source, load_safetensors
from lomo_jax.models.safetensors_save import _ST_DTYPES, _Out, _to_host, _write_safetensors

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "load_adapter", "save_adapter"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model

#: ``peft.LoraConfig`` fields that change what an adapter computes or which
#: modules it touches, each with the value lomo_jax's adapters have (written
#: by :func:`save_adapter`; any other value is refused by :func:`load_adapter`)
#: and what another value means
_FIXED = {
    "bias": ("none", "trained biases saved with the adapter"),
    "fan_in_fan_out": (False, "Conv1D-layout weights (GPT-2 style)"),
    "use_rslora": (False, "rank-stabilised LoRA (scale alpha/sqrt(r), not alpha/r)"),
    "use_dora": (False, "DoRA (a magnitude vector per projection)"),
    "lora_bias": (False, "a bias on lora_B"),
    "modules_to_save": (None, "fully trained extra modules saved with the adapter"),
    "rank_pattern": ({}, "per-module ranks"),
    "alpha_pattern": ({}, "per-module alphas"),
    "layers_to_transform": (None, "adapters on some layers only"),
    "layers_pattern": (None, "adapters on some layers only"),
    "exclude_modules": (None, "targeted modules excluded again"),
}
#: other ``peft.LoraConfig`` fields lomo_jax has no counterpart of, refused
#: unless empty (None, False, {} or [])
_UNSUPPORTED = {
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "adapters on nn.Parameters (MoE experts)",
    "use_qalora": "QA-LoRA's pooled inputs",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing", "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
}
#: the fields :func:`load_adapter` reads and checks one by one
_READ = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
         "init_lora_weights"}
#: fields that leave the saved adapter's function unchanged (metadata, or how
#: the adapter was initialised before training): ignored
_IGNORED = {"auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
            "megatron_config", "megatron_core", "qalora_group_size", "runtime_config",
            "ensure_weight_tying"}
#: ``init_lora_weights`` values that leave the base weights as they are (PiSSA,
#: OLoRA, CorDA, LoftQ and LoRA-GA change them; MiCA changes the forward)
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _lora_of(cfg: LlamaConfig, what: str) -> LoraConfig:
    if not isinstance(cfg, LlamaConfig) or cfg.lora is None:
        raise ValueError(f"{what} needs a config with lora set (cfg.replace(lora=LoraConfig(...))); "
                         f"got lora={getattr(cfg, 'lora', None)!r}.")
    return cfg.lora


def _check_representable(cfg: LlamaConfig, targets) -> None:
    """Refuse targets that are not separate ``nn.Linear`` modules in ``cfg``'s
    ``transformers`` family (Phi-3 fuses q/k/v into ``qkv_proj`` and
    gate/up into ``gate_up_proj``): PEFT adapts the fused module there."""
    fused = _fused_parts(cfg)
    for target in targets:
        name = f"model.layers.0.{LORA_TARGETS[target]}.{target}.weight"
        if name in fused:
            module = fused[name][0][len("model.layers.0."):-len(".weight")]
            raise ValueError(
                f"LoRA target {target!r}: {cfg.model_type} fuses it into {module!r} in "
                f"transformers, so PEFT's adapter there is one pair on the fused projection, "
                f"which lomo_jax's per-projection adapters cannot represent (target the "
                f"projections that are separate in {cfg.model_type}, e.g. o_proj, down_proj).")


def _tensors(cfg: LlamaConfig) -> list:
    """``[(PEFT name, target, layer, "lora_a"|"lora_b", shape in the file)]``, in file order."""
    shapes = param_shapes(cfg)["layers"]
    out = []
    for i in range(cfg.num_hidden_layers):
        for target in cfg.lora.targets:
            branch, proj = lora_path(target)
            module = f"{_PREFIX}model.layers.{i}.{branch}.{proj}"
            for leaf, peft in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
                shape = tuple(shapes[branch][proj][leaf].shape[:0:-1])  # [L, x, y] -> (y, x)
                out.append((f"{module}.{peft}.weight", target, i, leaf, shape))
    return out


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _adapter_config(lora: LoraConfig, base_model_name_or_path: Optional[str]) -> dict:
    """``adapter_config.json``: a ``peft.LoraConfig``'s fields (the rest at PEFT's defaults)."""
    fixed = {k: v for k, (v, _) in _FIXED.items()}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
            "r": lora.rank, "lora_alpha": _number(lora.alpha), "lora_dropout": lora.dropout,
            "target_modules": list(lora.targets), "init_lora_weights": True, **fixed}


def save_adapter(cfg: LlamaConfig, params, path: str, *,
                 base_model_name_or_path: Optional[str] = None) -> str:
    """Write the adapters of ``params`` as a PEFT LoRA adapter directory.

    ``peft.PeftModel.from_pretrained(base, path)`` on the ``transformers``
    model the base weights came from computes the same logits as
    ``lomo_jax.models.logits(cfg, params, batch)`` (up to rounding). Only the
    adapters are written (``lora_A``/``lora_B`` per layer and target, in
    their params dtype); the base model is not. Atomic as
    ``convert.save_pretrained``: the files are staged and renamed into place,
    ``adapter_config.json`` last. Every process of a multi-process run calls
    it (the adapters are gathered to the host, a collective); process 0 writes.

    Example::

        lora.save_adapter(cfg, params, "out/adapter", base_model_name_or_path="meta-llama/...")

    Raises:
      ValueError: ``cfg`` has no lora; ``params`` do not match ``cfg``; a
        target that ``cfg``'s family fuses in ``transformers`` (Phi-3's q/k/v,
        gate/up).

    Returns:
      ``path``.
    """
    lora = _lora_of(cfg, "save_adapter")
    _check_representable(cfg, lora.targets)
    check_params(cfg, params, "params")
    leaves = {(t, leaf): params["layers"][lora_path(t)[0]][t][leaf]
              for t in lora.targets for leaf in ("lora_a", "lora_b")}
    for (t, leaf), a in leaves.items():
        if np.dtype(a.dtype).name not in _ST_DTYPES:
            raise ValueError(f"save_adapter: {t}.{leaf} is {a.dtype}, which safetensors does "
                             f"not store.")
    host = {k: _to_host(a) for k, a in leaves.items()}  # every process: a collective
    if jax.process_index() == 0:
        plan = _tensors(cfg)
        outs = [_Out(name, (), shape, np.dtype(host[(t, leaf)].dtype))
                for name, t, _, leaf, shape in plan]
        where = {name: (t, i, leaf) for name, t, i, leaf, _ in plan}

        def get(out):
            t, i, leaf = where[out.name]
            return np.ascontiguousarray(host[(t, leaf)][i].T)

        with write_atomically(path, last=(ADAPTER_CONFIG_NAME,)) as tmp:
            _write_safetensors(os.path.join(tmp, ADAPTER_WEIGHTS_NAME), outs, get)
            with open(os.path.join(tmp, ADAPTER_CONFIG_NAME), "w") as f:
                json.dump(_adapter_config(lora, base_model_name_or_path), f, indent=2)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lomo_jax.models.lora.save_adapter")
    return path


def _empty(value) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, tuple)) and not value)


def _refuse(field: str, value, means: str) -> ValueError:
    return ValueError(f"adapter_config.json has {field}={value!r} ({means}); lomo_jax's LoRA "
                      f"adapters cannot represent it.")


def _lora_from_peft(conf: dict) -> LoraConfig:
    """The :class:`LoraConfig` of a PEFT ``adapter_config.json`` (as a dict),
    refusing every setting lomo_jax's adapters do not compute."""
    if conf.get("peft_type") != "LORA":
        raise ValueError(f"adapter_config.json has peft_type={conf.get('peft_type')!r}; "
                         f"only LoRA adapters (peft_type 'LORA') are read.")
    if conf.get("task_type") not in (None, "CAUSAL_LM"):
        raise _refuse("task_type", conf["task_type"], "not a causal LM adapter")
    for field, (want, means) in _FIXED.items():
        value = conf.get(field, want)
        if not (_empty(value) if _empty(want) else value == want):
            raise _refuse(field, value, means)
    for field, value in conf.items():
        if field not in _FIXED and field not in _READ | _IGNORED and not _empty(value):
            raise _refuse(field, value, _UNSUPPORTED.get(field, "a field lomo_jax does not know"))
    init = conf.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise _refuse("init_lora_weights", init, "an initialisation that changes the base "
                      "weights too; convert it to a plain LoRA with PEFT's "
                      "save_pretrained(path_initial_model_for_weight_conversion=...) first")
    targets = conf.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise _refuse("target_modules", targets, "a regular expression or 'all-linear', "
                      f"not a list of module names out of {sorted(LORA_TARGETS)}")
    unknown = sorted(t for t in targets if t not in LORA_TARGETS)
    if unknown:
        raise _refuse("target_modules", targets, f"{unknown} are not among the projections "
                      f"lomo_jax adapts, {sorted(LORA_TARGETS)}")
    return LoraConfig(rank=conf["r"], alpha=conf["lora_alpha"], targets=tuple(targets),
                      dropout=conf.get("lora_dropout", 0.0))


def _read_config(path: str) -> dict:
    file = os.path.join(path, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} has no {ADAPTER_CONFIG_NAME}: not a PEFT adapter directory.")
    with open(file) as f:
        return json.load(f)


def _weights(path: str):
    file = os.path.join(path, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{path} has no {ADAPTER_WEIGHTS_NAME} (only safetensors adapters are read; "
            f"save with PEFT's save_pretrained(safe_serialization=True)).")
    return _finite_source(load_safetensors(file))


def _check_names(src, plan: list, file: str) -> None:
    """Raise naming the first tensor of ``plan`` missing from ``src``, the first
    tensor ``src`` has that ``plan`` does not, or the first misshapen one."""
    want = {name: shape for name, *_, shape in plan}
    have = set(src.keys)
    missing = [name for name in want if name not in have]
    if missing:
        raise ValueError(f"{file} lacks {missing[0]} (and {len(missing) - 1} more tensor(s) "
                         f"the adapter config names).")
    extra = sorted(k for k in src.keys if k not in want)
    if extra:
        raise ValueError(f"{file} has {extra[0]}, a tensor a LoRA of these targets does not "
                         f"have ({len(extra)} such tensor(s)).")
    for name, shape in want.items():
        if src.shape(name) != shape:
            raise ValueError(f"{file}: {name} has shape {src.shape(name)}, expected {shape} "
                             f"(adapter_config.json's r and the base model's sizes).")


def load_adapter(path: str, cfg: LlamaConfig, params):
    """``(cfg with lora, params with adapters)`` from a PEFT LoRA adapter directory.

    Reads what :func:`save_adapter` writes and what PEFT writes
    (``get_peft_model(model, peft.LoraConfig(...)).save_pretrained(path)``):
    ``r``, ``lora_alpha``, ``target_modules`` and ``lora_dropout`` become the
    :class:`LoraConfig` (``dropout``: see its docstring), each
    ``lora_A.weight`` ``[r, d_in]`` / ``lora_B.weight`` ``[d_out, r]`` a layer
    of ``lora_a`` ``[L, d_in, r]`` / ``lora_b`` ``[L, r, d_out]``, in fp32 or
    its kernel's dtype if wider (on the default device). The base arrays are shared, not copied.

    Example::

        cfg, params = convert.load_pretrained("Llama-3-8B/")
        cfg, params = lora.load_adapter("my-adapter/", cfg, params)

    Raises:
      ValueError: ``cfg`` already has a lora; ``params`` are not ``cfg``'s;
        the file lacks, adds or misshapes a tensor (the first such is named);
        a NaN or infinity; a setting lomo_jax's adapters cannot represent:
        ``use_rslora``, ``use_dora``, ``bias`` other than ``"none"``,
        ``modules_to_save``, ``rank_pattern``/``alpha_pattern``,
        ``layers_to_transform``, a regex or ``all-linear`` ``target_modules``
        or targets outside :data:`LORA_TARGETS`, a family whose
        ``transformers`` projections are fused (Phi-3's ``qkv_proj``,
        ``gate_up_proj``).
      FileNotFoundError: no ``adapter_config.json`` or ``adapter_model.safetensors``.
    """
    if not isinstance(cfg, LlamaConfig) or cfg.lora is not None:
        raise ValueError(f"load_adapter takes the base model's config (lora=None); got "
                         f"lora={getattr(cfg, 'lora', None)!r} (merge or drop that adapter first).")
    check_params(cfg, params, "params")
    lora = _lora_from_peft(_read_config(path))
    _check_representable(cfg, lora.targets)
    cfg = cfg.replace(lora=lora)
    src = _weights(path)
    plan = _tensors(cfg)
    _check_names(src, plan, os.path.join(path, ADAPTER_WEIGHTS_NAME))
    layers: dict = {}
    for name, target, _, leaf, _ in plan:
        layers.setdefault((target, leaf), []).append(src.get(name).T)
    out = jax.tree.map(lambda a: a, params)  # fresh dicts, the same arrays
    for (target, leaf), mats in layers.items():
        branch, proj = lora_path(target)
        dtype = adapter_dtype(params["layers"][branch][proj]["kernel"].dtype)
        out["layers"][branch][proj][leaf] = jnp.asarray(np.stack(mats), dtype)
    check_params(cfg, out, "params")
    return cfg, out
