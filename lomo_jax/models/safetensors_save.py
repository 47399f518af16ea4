r"""Streaming, crash-safe writes of plain-dict params as a ``save_pretrained`` directory.

The tensors are planned in checkpoint order (:func:`_save_plan`: names,
shapes, dtypes, the params pieces each is made of), split into shards
(:func:`_shard_files`), and each written at an offset fixed in advance (the
safetensors header is computed from the shapes, :func:`_safetensors_header`),
gathered to the host one at a time (:func:`_gather`): host memory holds one
tensor, never the model. Files are staged and renamed into place
(:func:`lomo_jax._files.write_atomically`), the weights' entry point last.

Example::

    from lomo_jax.models import safetensors_save

    plan = safetensors_save._save_plan(params, cfg, None)
    files = safetensors_save._shard_files(plan, 2**30)  # [(file name, [tensor]), ...]
    safetensors_save._save_files(params, cfg, None, plan[0].dtype, files, "out/")
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lomo_jax import _files
from lomo_jax._files import write_atomically
from lomo_jax.models import hf_config as _hf_config
from lomo_jax.models.hf_names import _fused_parts, _Leaf, _leaves, hf_parameter_shapes
from lomo_jax.models.safetensors_load import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, _at

if TYPE_CHECKING:
    from lomo_jax.models.llama import LlamaConfig

_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}(-\d+)?\.safetensors")
_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
              "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
              "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


class _Out(NamedTuple):
    """One tensor to write: its checkpoint name, the ``(params leaf, layer)``
    pieces it is made of (layer ``None``: an unstacked leaf; several: a
    family's fused tensor, the pieces' rows concatenated), shape and dtype."""

    name: str
    pieces: tuple
    shape: tuple
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _save_plan(params, cfg: LlamaConfig, dtype) -> list:
    """The tensors of a ``save_pretrained`` checkpoint in checkpoint order:
    embedding, every layer's tensors (layer-major; a fused tensor where its
    first part would be), final norm, untied head."""
    shapes = hf_parameter_shapes(cfg)
    fused = _fused_parts(cfg)
    leaves = _leaves(cfg, lambda n: n)
    stacked = [lf for lf in leaves if lf.stacked]
    order = [(leaves[0], None)]
    order += [(lf, i) for i in range(cfg.num_hidden_layers) for lf in stacked]
    order += [(lf, None) for lf in leaves[1:] if not lf.stacked]
    pieces: dict = {}  # name -> [(first row, (leaf, layer))], in checkpoint order
    for lf, i in order:
        part = lf.names[0 if i is None else i]
        name, row = fused[part][:2] if part in fused else (part, 0)
        pieces.setdefault(name, []).append((row, (lf, i)))
    plan = []
    for name, rows in pieces.items():
        first = rows[0][1][0]
        dt = np.dtype(dtype if dtype is not None else _at(params, first.path).dtype)
        if dt.name not in _ST_DTYPES:
            raise ValueError(f"save_pretrained: {name} would be {dt}, which safetensors does "
                             f"not store (pass dtype=, e.g. jnp.bfloat16).")
        plan.append(_Out(name, tuple(p for _, p in sorted(rows, key=lambda r: r[0])),
                         tuple(shapes[name]), dt))
    return plan


def _shard_files(plan: list, max_shard_size: Optional[int]) -> list:
    """``[(file name, [_Out])]``: one ``model.safetensors``, or consecutive
    shards of at most ``max_shard_size`` bytes each (a tensor larger than
    that gets a shard of its own)."""
    if max_shard_size is None:
        return [(SAFE_WEIGHTS_NAME, list(plan))]
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, (int, np.integer)) \
            or max_shard_size <= 0:
        raise ValueError(f"save_pretrained: max_shard_size must be a positive number of bytes "
                         f"(an int) or None, got {max_shard_size!r}.")
    shards: list = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    n = len(shards)
    return [(f"model-{j:05d}-of-{n:05d}.safetensors", s) for j, s in enumerate(shards, 1)]


def _one_file(files: list) -> bool:
    return len(files) == 1 and files[0][0] == SAFE_WEIGHTS_NAME


def _save_files(params, cfg: LlamaConfig, hf_config, first_dtype, files: list, path: str) -> None:
    """Process 0's part of ``save_pretrained``: the configs and weights
    written into a staging directory, renamed into ``path`` (the weights'
    entry point last), then the previous export's leftovers removed."""
    os.makedirs(path, exist_ok=True)
    files = _free_shard_names(files, path)
    entry = SAFE_WEIGHTS_NAME if _one_file(files) else SAFE_WEIGHTS_INDEX_NAME
    with write_atomically(path, last=(entry,)) as tmp:
        _hf_config._write_configs(cfg, hf_config, first_dtype, tmp)
        _write_weights(params, files, tmp)
    _remove_stale(path, {f for f, _ in files} | {entry})


def _free_shard_names(files: list, path: str) -> list:
    """``files`` with shard names no file in ``path`` has (``-1``, ``-2``, ...
    added when the plain ones are taken), so that no new shard replaces one
    the current index points to."""
    if _one_file(files):
        return files
    n = len(files)
    for k in range(len(os.listdir(path)) + 1):
        names = [f"model-{j:05d}-of-{n:05d}{f'-{k}' if k else ''}.safetensors"
                 for j in range(1, n + 1)]
        if not any(os.path.lexists(os.path.join(path, name)) for name in names):
            return [(name, tensors) for name, (_, tensors) in zip(names, files)]
    raise AssertionError("unreachable: some suffix is free")  # pragma: no cover


def _remove_stale(path: str, keep: set) -> None:
    """Remove the weight files of a previous export in ``path`` that the new one
    (``keep``) does not use: first the other entry point, then the shards."""
    stale = [n for n in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME) if n not in keep]
    stale += sorted(n for n in os.listdir(path) if _SHARD_NAME.fullmatch(n) and n not in keep)
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, name))
    _files._fsync_dir(path)


def _write_weights(params, files: list, path: str) -> None:
    """Every file of ``files`` under ``path`` (tensors gathered one at a time),
    and, for shards, ``model.safetensors.index.json``."""
    os.makedirs(path, exist_ok=True)
    for fname, tensors in files:
        _write_safetensors(os.path.join(path, fname), tensors, lambda t: _gather(params, t))
    if _one_file(files):
        return
    weight_map = {t.name: fname for fname, tensors in files for t in tensors}
    total = sum(t.nbytes for _, tensors in files for t in tensors)
    with open(os.path.join(path, SAFE_WEIGHTS_INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _gather_weights(params, files: list) -> None:
    """Gather every tensor as :func:`_write_weights` does, writing nothing (a
    process other than 0 takes part in the collectives)."""
    for _, tensors in files:
        for t in tensors:
            _gather(params, t)


def _gather(params, t: _Out) -> np.ndarray:
    """Tensor ``t`` on this host (C-contiguous, cast as ``params_to_hf``
    does): each piece cut out on its leaf's devices (:func:`_device_tensor`)
    and gathered (:func:`_to_host`); a fused tensor's pieces concatenated."""
    parts = [_gather_piece(params, leaf, layer) for leaf, layer in t.pieces]
    h = np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))
    return h if h.dtype == t.dtype else h.astype(t.dtype)


def _gather_piece(params, leaf: _Leaf, layer: Optional[int]) -> np.ndarray:
    """Layer ``layer`` of ``leaf`` (the leaf if ``None``), in HF's orientation, on this host."""
    a = _at(params, leaf.path)
    stacked = layer is not None
    if isinstance(a, jax.Array):
        return _to_host(_device_tensor(a, np.int32(layer or 0), stacked, leaf.transpose))
    h = np.asarray(a)[layer] if stacked else np.asarray(a)
    return h.T if leaf.transpose else h


@functools.partial(jax.jit, static_argnums=(2, 3))
def _device_tensor(a, i, stacked: bool, transpose: bool):
    """Layer ``i`` of a stacked leaf (else the leaf), transposed for a Linear
    weight, as a new array: ``np.asarray`` keeps the host copy it makes on
    the array it reads, which must not be a params leaf (the host would
    keep every unstacked leaf after the save). ``jnp.copy`` so that a jit
    that forwards an unchanged input never hands back the leaf itself."""
    x = a[i] if stacked else a
    return jnp.copy(x.T if transpose else x)


def _to_host(x) -> np.ndarray:
    """``x`` as one numpy array on this host. An array spread over several
    processes (not fully addressable) is all-gathered
    (``multihost_utils.process_allgather``: a collective every process must
    call); others are copied from their devices."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _safetensors_header(tensors: list) -> tuple:
    """``(header bytes, {name: data offset})`` of a safetensors file of
    ``tensors``: an 8-byte little-endian length, then the JSON header padded
    with spaces to a multiple of 8. The data are laid out by decreasing item
    size (every tensor aligned to its item size), in ``tensors``' order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offsets, at = {}, 0
    for t in sorted(tensors, key=lambda t: -t.dtype.itemsize):  # stable
        header[t.name] = {"dtype": _ST_DTYPES[t.dtype.name], "shape": list(t.shape),
                          "data_offsets": [at, at + t.nbytes]}
        offsets[t.name] = at
        at += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


def _write_safetensors(file: str, tensors: list, get: Callable[[_Out], np.ndarray]) -> None:
    """A safetensors file of ``tensors``: the header first, then each tensor,
    produced by ``get`` in ``tensors``' order, written at its offset and
    dropped (host memory: one tensor)."""
    head, offsets = _safetensors_header(tensors)
    with open(file, "wb") as f:
        f.write(head)
        f.truncate(len(head) + sum(t.nbytes for t in tensors))
        for t in tensors:
            a = get(t)
            if a.shape != t.shape or a.dtype != t.dtype:  # pragma: no cover - a bug here
                raise AssertionError(f"{t.name}: got {a.dtype}{a.shape}, planned {t.dtype}{t.shape}")
            f.seek(len(head) + offsets[t.name])
            f.write(a.reshape(-1).view(np.uint8).data)
            del a
