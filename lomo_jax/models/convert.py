r"""Hugging Face ``transformers`` <-> :mod:`lomo_jax.models.llama` weights: the entry points.

Conversion is exact (a transpose and a stack, dtype kept unless asked
otherwise), so torch -> JAX -> torch is bit-exact; the name and layout
mapping is :mod:`lomo_jax.models.hf_names`', the families
:mod:`lomo_jax.models.families`', the config mapping
:mod:`lomo_jax.models.hf_config`'.

Reading needs only ``numpy`` and ``safetensors`` (plus ``transformers`` for
the config; :mod:`lomo_jax.models.safetensors_load`, placed on devices by
:mod:`lomo_jax.models.load_placed`); a ``state_dict`` of torch tensors needs
``torch``. Writing a ``save_pretrained``-style directory
(:mod:`lomo_jax.models.safetensors_save`) writes ``config.json`` through the
``transformers`` config class, ``generation_config.json`` and
``model.safetensors`` (or shards plus ``model.safetensors.index.json``),
loadable by ``transformers.AutoModelForCausalLM.from_pretrained(path)``, each
file renamed into place once written (a killed save leaves the old export).
Loading checks that floating weights are finite (``check_finite=False`` to
skip), and the config keeps the checkpoint's special token ids and
``generation_config.json`` for the save.

The entry points live here and re-export the split modules' names; a name is
patched (in tests) in the module that defines it, e.g.
``safetensors_save._gather``.

Example::

    import transformers
    from lomo_jax.models import convert, llama

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(...))
    cfg, params = convert.from_hf_model(hf)                  # or:
    cfg = convert.config_from_hf(hf.config)                  # = llama.LlamaConfig.from_hf
    params = convert.params_from_hf(hf.state_dict(), cfg)
    cfg, params = convert.load_pretrained("path/to/dir")     # safetensors, sharded or not
    ...                                                       # train with lomo_jax
    convert.save_pretrained(params, cfg, "out/")              # AutoModelForCausalLM-loadable
    sd = convert.params_to_hf(params, cfg)                    # {name: torch.Tensor}
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lomo_jax._files import _fsync_dir, _fsync_file, write_atomically  # noqa: F401
from lomo_jax.models import hf_config as hf_config_mapping
from lomo_jax.models.families import check_switches as _check_switches  # noqa: F401
from lomo_jax.models.hf_config import (  # noqa: F401
    _TOKEN_FIELDS, GENERATION_CONFIG_NAME, _check_hf_config, _config_to_write,
    _read_generation_config, _write_configs, config_to_hf)
from lomo_jax.models.hf_names import (  # noqa: F401
    _IGNORED, _check_checkpoint, _fuse, _fused_parts, _Leaf, _layer_entries, _leaves,
    hf_parameter_shapes)
from lomo_jax.models.llama import LlamaConfig, check_params
from lomo_jax.models.load_placed import _leaf_shardings, _placed  # noqa: F401
from lomo_jax.models.safetensors_load import (  # noqa: F401
    _CHUNK_BYTES, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, _all_finite, _at, _convert,
    _file_dtype, _finite_source, _mapping_source, _read, _Source, _to_numpy, load_safetensors)
from lomo_jax.models.safetensors_save import (  # noqa: F401
    _gather, _gather_weights, _Out, _save_files, _save_plan, _shard_files, _to_host,
    _write_weights)

__all__ = [
    "config_from_hf",
    "config_to_hf",
    "hf_parameter_shapes",
    "params_from_hf",
    "params_to_hf",
    "from_hf_model",
    "load_pretrained",
    "load_safetensors",
    "save_pretrained",
    "write_atomically",
]


def config_from_hf(hf_config, *, dtype=None, param_dtype=None,
                   generation_config=None) -> LlamaConfig:
    """A :class:`LlamaConfig` from a ``transformers`` config of any supported
    family (``LlamaConfig``, ``MistralConfig``, ``Qwen2Config``, ...).

    Reads both the transformers>=5 ``rope_parameters`` dict and the older
    ``rope_theta`` + ``rope_scaling`` fields. ``dtype``/``param_dtype`` are
    not taken from the checkpoint (default fp32; pass ``jnp.bfloat16`` for
    bf16). Also available as ``LlamaConfig.from_hf``. The special token ids
    are kept, and ``generation_config`` (a dict or ``transformers.GenerationConfig``:
    the checkpoint's; default: derived from ``hf_config`` as ``transformers``
    does for a checkpoint without one), so that a save writes them back.
    See :func:`lomo_jax.models.hf_config.config_from_hf`.

    Raises:
      ValueError: unsupported ``model_type``.
      NotImplementedError: an unsupported RoPE type, or a Qwen2 config mixing
        sliding-window and full-attention layers.
    """
    return hf_config_mapping.config_from_hf(hf_config, cls=LlamaConfig, dtype=dtype,
                                            param_dtype=param_dtype,
                                            generation_config=generation_config)


def _to_torch(a: np.ndarray):
    import torch

    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _refuse_lora(cfg: LlamaConfig, what: str) -> None:
    """``transformers`` checkpoints have no place for LoRA adapters: a config
    with ``lora`` set is refused (writing it would drop the adapters)."""
    if getattr(cfg, "lora", None) is not None:
        raise ValueError(
            f"{what} writes a plain transformers model, and cfg has LoRA adapters "
            f"(cfg.lora={cfg.lora!r}), which it would drop: fold them into the weights first "
            f"with `cfg, params = lomo_jax.models.lora.merge(cfg, params)`, or write the "
            f"adapter alone in PEFT's format with "
            f"`lomo_jax.models.lora.save_adapter(cfg, params, path)`.")


def params_from_hf(state_dict: Mapping[str, Any], cfg: LlamaConfig, *, dtype=None,
                   strict: bool = True, as_numpy: bool = False,
                   check_finite: bool = True) -> dict:
    """Plain-dict params from a ``transformers`` ``state_dict``.

    Args:
      state_dict: ``{name: tensor}`` of ``LlamaForCausalLM`` (torch tensors,
        numpy or jax arrays); a bare ``LlamaModel`` dict (no ``model.``
        prefix) works for tied configs. ``lm_head.weight`` is ignored when
        ``cfg.tie_word_embeddings``.
      cfg: the architecture (e.g. ``LlamaConfig.from_hf(hf_model.config)``).
      dtype: cast every array to this dtype (``None``: keep the checkpoint's).
      strict: raise on tensors the config does not use.
      as_numpy: return numpy arrays instead of jax arrays.
      check_finite: raise on a NaN or an infinity in a floating tensor
        (``False``: take them as they are).

    Raises:
      ValueError: a missing or unexpected tensor, a tensor whose shape
        does not match the config (the message names the tensor and both
        shapes), or a non-finite value (the tensor, the index and the value).
    """
    src = _mapping_source(state_dict)
    params = _convert(_finite_source(src) if check_finite else src, cfg, dtype, strict)
    return params if as_numpy else jax.tree.map(jnp.array, params)


def params_to_hf(params, cfg: LlamaConfig, *, include_tied: bool = True, framework: str = "pt",
                 dtype=None) -> dict:
    """A ``transformers`` ``state_dict`` from plain-dict params.

    Args:
      params: ``{"embed", "layers", "head"}`` (jax or numpy arrays).
      cfg: the architecture.
      include_tied: with tied embeddings also emit ``lm_head.weight`` (the same
        values as the embedding, as ``model.state_dict()`` does).
      framework: ``"pt"`` (torch tensors) or ``"np"``.
      dtype: cast to this (numpy/ml_dtypes) dtype (``None``: keep).

    Returns:
      ``{name: tensor}`` with ``[out, in]`` Linear weights; loadable with
      ``hf_model.load_state_dict(sd)``.

    Raises:
      ValueError: ``params`` do not match ``cfg``; ``cfg.lora`` is set (merge
        the adapters first: ``lomo_jax.models.lora.merge``).
    """
    _refuse_lora(cfg, "params_to_hf")
    check_params(cfg, params)
    np_params = jax.tree.map(np.asarray, params)
    cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype))
    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": cast(np_params["embed"]["embedding"])}
    for suffix, path, _, linear in _layer_entries(cfg):
        node = _at(np_params["layers"], path)
        for i in range(cfg.num_hidden_layers):
            a = node[i]
            out[f"model.layers.{i}.{suffix}"] = cast(np.ascontiguousarray(a.T if linear else a))
    out["model.norm.weight"] = cast(np_params["head"]["norm"])
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = cast(np.ascontiguousarray(np_params["head"]["lm_head"].T))
    elif include_tied:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    out = _fuse(out, cfg)
    if framework == "np":
        return {k: np.ascontiguousarray(v) for k, v in out.items()}
    if framework != "pt":
        raise ValueError(f"framework must be 'pt' or 'np', got {framework!r}.")
    converted = {}
    for k, v in out.items():
        converted[k] = converted["model.embed_tokens.weight"] if (
            k == "lm_head.weight" and cfg.tie_word_embeddings) else _to_torch(v)
    return converted


def from_hf_model(hf_model, *, dtype=None, config_dtype=None, check_finite: bool = True):
    """``(LlamaConfig, params)`` from an instantiated ``transformers`` causal LM
    (the config keeps its token ids and ``generation_config``).

    ``config_dtype``: ``LlamaConfig.dtype``/``param_dtype`` (default fp32);
    ``dtype``: cast of the arrays (default: keep the model's);
    ``check_finite``: as :func:`params_from_hf`.
    """
    cfg = config_from_hf(hf_model.config, dtype=config_dtype or jnp.float32,
                         generation_config=getattr(hf_model, "generation_config", None))
    return cfg, params_from_hf(hf_model.state_dict(), cfg, dtype=dtype, check_finite=check_finite)


def load_pretrained(path: str, *, dtype=None, config_dtype=None, strict: bool = True,
                    as_numpy: bool = False, shardings=None, check_finite: bool = True):
    """``(LlamaConfig, params)`` from a local ``save_pretrained`` directory.

    The config is read with ``transformers.AutoConfig.from_pretrained(path)``
    (local files only; it keeps the token ids and ``generation_config.json``,
    which :func:`save_pretrained` writes back), the weights with ``safetensors`` (sharded or not),
    tensor by tensor, each placed as it is read: a stacked ``[L, ...]`` leaf is
    allocated on its sharding and each layer is written into its slice in
    place, and only the parts of a tensor that this process's devices hold are
    read. Host memory beyond the arrays themselves is about one tensor (on a
    CPU backend, where the arrays are host memory too: the model plus that).

    Example::

        mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
        cfg, params = convert.load_pretrained("Llama-3-8B/", dtype=jnp.bfloat16,
                                              config_dtype=jnp.bfloat16, shardings=mesh)

    Args:
      path: the directory.
      dtype: cast of the arrays (default: keep the file's).
      config_dtype: computation/param dtype of the returned config (default fp32).
      strict: raise on tensors the config does not use.
      as_numpy: return numpy arrays (host memory) instead of placed jax arrays.
      shardings: where the arrays go: ``None`` (the default device), a
        ``Mesh`` (``lomo_jax.sharding.param_shardings`` on it), one
        ``Sharding`` for every leaf, or a pytree of shardings with the params'
        structure (e.g. ``lomo_jax.sharding.llama_shardings(...).params``).
      check_finite: check every chunk of floating data as it is read and raise
        ``ValueError`` on a NaN or an infinity (naming the tensor, its file, the
        index and the value; corrupted bytes); ``False`` loads them as they are.
    """
    import transformers

    hf_cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    cfg = config_from_hf(hf_cfg, dtype=config_dtype or jnp.float32,
                         generation_config=_read_generation_config(path))
    src = load_safetensors(path)
    src = _finite_source(src) if check_finite else src
    if as_numpy:
        if shardings is not None:
            raise ValueError("load_pretrained: as_numpy=True returns host arrays; "
                             "shardings applies to jax arrays only.")
        return cfg, _convert(src, cfg, dtype, strict)
    return cfg, _placed(src, cfg, dtype, strict, shardings)


def save_pretrained(params, cfg: LlamaConfig, path: str, *, hf_config=None, dtype=None,
                    max_shard_size: Optional[int] = None) -> str:
    """Write a directory ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

    Writes ``config.json`` (``hf_config`` if given; else ``cfg.to_hf()``, with
    the token ids ``cfg`` carries from the checkpoint it was loaded from),
    ``generation_config.json`` (the one ``cfg`` carries, else derived from the
    config as ``transformers`` does) and the weights as
    ``model.safetensors``, or, with ``max_shard_size`` (bytes), as
    ``model-0000k-of-0000n.safetensors`` shards (each at most
    ``max_shard_size`` bytes of tensors, unless one tensor alone is larger)
    plus ``model.safetensors.index.json``. Tied embeddings are written once.
    Names, ``[out, in]`` transposes and the ``dtype`` cast are
    :func:`params_to_hf`'s.

    Atomic: every file is written into a staging directory inside ``path``
    and only then renamed into place (:func:`write_atomically`), the weights'
    entry point (the index, or ``model.safetensors``) last; shards get names
    that no file in ``path`` has (``model-0000k-of-0000n-1.safetensors`` when
    the plain ones are taken), so the previous export's stay intact until the
    new index replaces its own; afterwards the files of the previous export
    that the new one does not use are removed. A save killed at any moment
    leaves the previous weights or the new ones, never a mix or a torn
    file. (``config.json`` and ``generation_config.json`` are renamed just
    before the weights' entry point, when they changed: a kill between those
    renames pairs them with the previous weights.)

    Streaming: the tensors are produced in checkpoint order (embedding,
    layer 0, ..., layer L-1, final norm, head), each stacked ``[L, ...]`` leaf
    one layer at a time (the layer sliced on its devices, then gathered to
    the host), and each written into its file at an offset fixed in advance
    (the safetensors header is computed from the shapes), so host memory
    holds one tensor at a time (at most the largest, e.g. the embedding;
    its device copy too on a CPU backend), never the model, with or
    without ``max_shard_size``. ``params`` may span several JAX processes
    (arrays that are not fully addressable): every process must call this
    with the same arguments (the gathers are collectives, run in the same
    order); only process 0 touches the file system (and imports
    ``transformers`` to write the config), and every process returns after
    a barrier once it is done.

    A config with LoRA adapters (``cfg.lora``) is refused: merge them first
    (``cfg, params = lomo_jax.models.lora.merge(cfg, params)``), or write the
    adapter alone with ``lomo_jax.models.lora.save_adapter`` (PEFT's format).

    Raises:
      ValueError: ``cfg.lora`` is set; ``params`` do not match ``cfg``, ``max_shard_size`` is not
        a positive integer, ``hf_config`` disagrees with ``cfg``, a dtype
        safetensors cannot store (on every process, before anything is
        gathered or written). An error of ``cfg.to_hf()`` is raised on
        process 0 only (before its first gather; the others wait there).

    Returns:
      ``path``.
    """
    _refuse_lora(cfg, "save_pretrained")
    check_params(cfg, params)
    plan = _save_plan(params, cfg, dtype)
    files = _shard_files(plan, max_shard_size)
    if hf_config is not None:
        _check_hf_config(cfg, hf_config)  # on every process, before any collective
    if jax.process_index() == 0:
        _save_files(params, cfg, hf_config, plan[0].dtype, files, path)
    else:
        _gather_weights(params, files)  # the collectives process 0 runs, in its order
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lomo_jax.convert.save_pretrained")
    return path
