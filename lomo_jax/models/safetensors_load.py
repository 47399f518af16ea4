r"""Streaming reads of ``transformers`` checkpoints into plain-dict (numpy) params.

A :class:`_Source` gives name -> array access over a ``state_dict`` or
lazily opened safetensors files (:func:`load_safetensors`); :func:`_read`
reads any part of one tensor in chunks of about ``_CHUNK_BYTES``, so
host memory holds one chunk beyond the result; :func:`_finite_source`
checks every chunk of floating data as it is read.

Example::

    from lomo_jax.models import safetensors_load

    src = safetensors_load.load_safetensors("path/to/hf_dir")   # sharded or not
    src.shape("model.embed_tokens.weight")                      # read from the header
    rows = src.read("model.embed_tokens.weight", (slice(0, 8),))
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from lomo_jax.models.hf_names import _check_checkpoint, _fused_parts, _leaves

if TYPE_CHECKING:
    from lomo_jax.models.llama import LlamaConfig

__all__ = ["load_safetensors"]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_CHUNK_BYTES = 8 * 2**20
#: 16-bit floats, checked on their bits (no float temporaries; numpy's isfinite is slow
#: on them): an exponent of all ones is an infinity or a NaN
_EXPONENT_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}


def _to_numpy(x) -> np.ndarray:
    """torch tensor / jax array / numpy array -> numpy, bit-exact (bf16 via ml_dtypes)."""
    if type(x).__module__.startswith("torch"):
        import torch

        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return t.numpy().copy()  # never alias torch memory (torch may update it in place)
    return np.asarray(x)


class _Source:
    """Name -> array access over a mapping or lazily opened safetensors files.

    ``read(name, index)`` returns only the ``index`` (a tuple of slices) of a
    tensor, so a loader that places arrays shard by shard reads only what its
    devices hold. ``where(name)``: the file a tensor is in (``None``: in memory)."""

    def __init__(self, keys: Iterable[str], read: Callable[[str, Any], Any],
                 shape: Callable[[str], tuple], where: Callable[[str], Optional[str]] = None):
        self.keys = list(keys)
        self._read = read
        self._shape = shape
        self.where = where or (lambda name: None)

    def get(self, name):
        return _to_numpy(self._read(name, None))

    def read(self, name, index=None):
        return _to_numpy(self._read(name, index))

    def shape(self, name):
        return tuple(self._shape(name))


def _mapping_source(sd: Mapping[str, Any]) -> _Source:
    def read(name, index):
        x = sd[name]
        return x if index is None else x[index]

    return _Source(sd.keys(), read, lambda n: tuple(sd[n].shape))


def _safetensors_files(path: str) -> Optional[dict]:
    """``{tensor: file}`` of a sharded directory (``None``: one file, ``path``
    or its ``model.safetensors``, which wins over an index as in ``transformers``)."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, SAFE_WEIGHTS_NAME)):
        return None
    index = os.path.join(path, SAFE_WEIGHTS_INDEX_NAME)
    if not os.path.exists(index):
        raise FileNotFoundError(
            f"{path} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME} "
            "(only safetensors checkpoints are read; convert pytorch_model.bin with "
            "transformers' save_pretrained(safe_serialization=True) first)."
        )
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    return {k: os.path.join(path, v) for k, v in weight_map.items()}


def load_safetensors(path: str) -> _Source:
    """Lazy access to the tensors of a ``save_pretrained`` directory: either
    ``model.safetensors`` or ``model.safetensors.index.json`` + shards (the
    first when both are there, as ``transformers``), or a single
    ``.safetensors`` file. Tensors are read on demand (memory-mapped).

    Returns an object with ``.keys`` (names), ``.get(name)`` (numpy array),
    ``.read(name, index)`` (only ``index``, a tuple of slices, is read) and
    ``.shape(name)`` (without reading the tensor)."""
    from safetensors import safe_open

    files = _safetensors_files(path)
    if files is None:
        single = os.path.join(path, SAFE_WEIGHTS_NAME) if os.path.isdir(path) else path
        with safe_open(single, framework="np") as f:
            files = {k: single for k in f.keys()}

    def read(name, index):
        # a file is opened (memory-mapped) per read and closed after it, so the pages
        # read do not stay resident: host memory holds one tensor (slice) at a time
        with safe_open(files[name], framework="np") as f:
            return f.get_tensor(name) if index is None else f.get_slice(name)[index]

    def shape(name):
        with safe_open(files[name], framework="np") as f:
            return f.get_slice(name).get_shape()

    return _Source(files.keys(), read, shape, files.get)


def _finite_source(src: _Source) -> _Source:
    """``src`` whose every read of floating data (each chunk, as it is read)
    raises ``ValueError`` if it holds a NaN or an infinity."""

    def read(name, index):
        a = src.read(name, index)
        if not _all_finite(a):
            raise _nonfinite_error(src, name, index, a)
        return a

    return _Source(src.keys, read, src.shape, src.where)


def _all_finite(a: np.ndarray) -> bool:
    """Whether ``a`` holds no NaN or infinity (``True`` for non-floating dtypes)."""
    if a.size == 0 or not jnp.issubdtype(a.dtype, jnp.inexact):
        return True
    mask = _EXPONENT_BITS.get(a.dtype.name)
    if mask is None:
        return bool(np.isfinite(a).all())
    bits = np.ascontiguousarray(a).view(np.uint16) & np.uint16(mask)
    return int(bits.max()) != mask


def _nonfinite_error(src: _Source, name: str, index, a: np.ndarray) -> ValueError:
    """The error for a read ``a`` (``index`` of tensor ``name``) holding a NaN or an
    infinity: where the first one is, in the whole tensor, and its value."""
    at = np.argwhere(~np.isfinite(a.astype(np.float32) if a.dtype.itemsize < 4 else a))[0]
    shape, index = src.shape(name), tuple(index or ())
    pos = [int(index[k].indices(shape[k])[0] + i * index[k].indices(shape[k])[2])
           if k < len(index) else int(i) for k, i in enumerate(at)]
    file = src.where(name)
    return ValueError(
        f"{name}{f' (in {file})' if file else ''} holds a non-finite value, "
        f"{a[tuple(at)]} at index {pos} of its {a.dtype} {list(shape)}: the checkpoint looks "
        "corrupted. Pass check_finite=False to load non-finite values anyway.")


def _unfused(src: _Source, cfg: LlamaConfig, rename) -> _Source:
    """``src`` with each fused tensor also readable as its parts (row ranges)."""
    parts = {rename(p): (rename(f), lo, hi) for p, (f, lo, hi) in _fused_parts(cfg).items()}
    if not parts:
        return src

    def where(name, index):
        fused, lo, hi = parts[name]
        index = tuple(index or ()) or (slice(None),)
        a, b, step = index[0].indices(hi - lo)
        return fused, (slice(lo + a, lo + b, step),) + index[1:]

    def read(name, index):
        return src.read(*where(name, index)) if name in parts else src.read(name, index)

    def shape(name):
        if name not in parts:
            return src.shape(name)
        fused, lo, hi = parts[name]
        return (hi - lo,) + tuple(src.shape(fused)[1:])

    return _Source(list(src.keys) + list(parts), read, shape)


def _read(src: _Source, name: str, transpose: bool, index=None, dtype=None,
          out: Optional[np.ndarray] = None) -> np.ndarray:
    """``index`` (a tuple of slices in the params layout; ``None``: all) of one
    checkpoint tensor, transposed for a Linear weight, in ``dtype``, written
    into ``out`` if given. Only that part is read, in chunks of the
    checkpoint's rows of about ``_CHUNK_BYTES`` written straight into the
    result, so reading adds one chunk (not a tensor) to host memory."""
    hf_shape = src.shape(name)
    shape = hf_shape[::-1] if transpose else hf_shape
    index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
    ranges = [range(*sl.indices(n)) for sl, n in zip(index, shape)]
    if not ranges:  # a scalar
        return np.asarray(src.read(name, None), dtype)
    if out is None:
        out = np.empty([len(r) for r in ranges], dtype or _file_dtype(src, name))
    hf_ranges = ranges[::-1] if transpose else ranges
    for at, part in _row_chunks(hf_ranges, max(4, out.itemsize)):
        piece = src.read(name, part)
        if transpose:
            out[..., at] = piece.T
        else:
            out[at] = piece
        del piece  # before the next chunk is read
    return out


def _row_chunks(hf_ranges: list, itemsize: int):
    """``(position in the result, checkpoint index)`` per chunk of about
    ``_CHUNK_BYTES`` along the checkpoint's first axis of ``hf_ranges``."""
    rows, rest = hf_ranges[0], hf_ranges[1:]
    row_bytes = max(1, int(np.prod([len(r) for r in rest])) * itemsize)
    per_chunk = max(1, _CHUNK_BYTES // row_bytes)
    tail = tuple(slice(r.start, r.stop, r.step) for r in rest)
    for k in range(0, len(rows), per_chunk):
        sub = rows[k:k + per_chunk]
        yield slice(k, k + len(sub)), (slice(sub.start, sub.stop, sub.step),) + tail


def _file_dtype(src: _Source, name: str) -> np.dtype:
    """A tensor's dtype, from one element."""
    return src.read(name, (slice(0, 1),) * len(src.shape(name))).dtype


def _set_path(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _at(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _convert(src: _Source, cfg: LlamaConfig, dtype, strict: bool) -> dict:
    """numpy params; each stacked leaf is allocated once and read layer by layer
    into its slices (no per-layer copies and stack)."""
    rename = _check_checkpoint(src, cfg, strict)
    src = _unfused(src, cfg, rename)
    params: dict = {}
    for leaf in _leaves(cfg, rename):
        if not leaf.stacked:
            _set_path(params, leaf.path, _read(src, leaf.names[0], leaf.transpose, dtype=dtype))
            continue
        shape = src.shape(leaf.names[0])
        shape = shape[::-1] if leaf.transpose else shape
        dt = np.dtype(dtype) if dtype is not None else _file_dtype(src, leaf.names[0])
        out = np.empty((len(leaf.names),) + tuple(shape), dt)
        for i, name in enumerate(leaf.names):
            _read(src, name, leaf.transpose, out=out[i])
        _set_path(params, leaf.path, out)
    return params
