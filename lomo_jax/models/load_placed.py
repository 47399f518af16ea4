r"""Reading a checkpoint straight onto device shardings, one tensor (part) at a time.

Each params leaf is read onto its sharding: a stacked ``[L, ...]`` leaf is
allocated there and each layer is written into its slice in place (a
donated ``dynamic_update``); a matrix whose checkpoint rows are not split is
written in row blocks of about ``_CHUNK_BYTES``; only the parts this
process's devices hold are read. Host memory beyond the arrays: about one
tensor.

Example::

    from lomo_jax.models import load_placed, safetensors_load

    src = safetensors_load.load_safetensors("path/to/hf_dir")
    params = load_placed._placed(src, cfg, None, True, mesh)   # = convert.load_pretrained's
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from lomo_jax.models.hf_names import _check_checkpoint, _Leaf, _leaves
from lomo_jax.models.llama import param_shapes
from lomo_jax.models import safetensors_load
from lomo_jax.models.safetensors_load import (
    _at, _file_dtype, _read, _set_path, _Source, _unfused)
from lomo_jax.sharding import param_shardings

if TYPE_CHECKING:
    from lomo_jax.models.llama import LlamaConfig


def _placed(src: _Source, cfg: LlamaConfig, dtype, strict: bool, shardings) -> dict:
    """jax params, each leaf read onto its sharding (see ``convert.load_pretrained``)."""
    rename = _check_checkpoint(src, cfg, strict)
    src = _unfused(src, cfg, rename)
    shapes = param_shapes(cfg)
    shardings = _leaf_shardings(shardings, shapes)
    params: dict = {}
    for leaf in _leaves(cfg, rename):
        shape, sharding = _at(shapes, leaf.path).shape, _at(shardings, leaf.path)
        dt = np.dtype(dtype) if dtype is not None else _file_dtype(src, leaf.names[0])
        onto = _stacked_onto if leaf.stacked else _matrix_onto
        _set_path(params, leaf.path, onto(src, leaf, shape, dt, sharding))
    return params


@functools.lru_cache(maxsize=64)
def _filler(shape, dt, sharding, axis: int):
    """``(zeros(), write(a, x, start))``: an array on ``sharding``, and the in-place
    (donated) write of a block ``x`` at ``start`` along ``axis`` (a stacked
    leaf's layer, without its leading axis, for ``axis=None``). Cached: leaves
    of one shape, dtype and sharding (and later loads) share the compiled pair."""

    def put(a, x, i):
        if axis is None:
            return lax.dynamic_update_index_in_dim(a, x, i, 0)
        return lax.dynamic_update_slice_in_dim(a, x, i, axis)

    zeros = jax.jit(lambda: jnp.zeros(shape, dt), out_shardings=sharding)
    write = jax.jit(put, donate_argnums=0, out_shardings=sharding)
    return zeros, write


def _reader(src: _Source, leaf: _Leaf, name: str, dt, offset=None):
    """A ``make_array_from_callback`` callback reading ``name``'s part for a
    device's index, once per distinct index (devices holding the same part,
    e.g. replicas on another mesh axis, share one read). ``offset``: a block's
    ``(axis, start, size)`` in the whole tensor."""
    cache: dict = {}

    def read(idx):
        if offset is not None:
            axis, start, size = offset
            idx = list(idx) + [slice(None)] * (axis + 1 - len(idx))
            lo, hi, step = idx[axis].indices(size)
            idx[axis] = slice(start + lo, start + hi, step)
            idx = tuple(idx)
        key = tuple((sl.start, sl.stop, sl.step) for sl in idx)
        if key not in cache:
            cache[key] = _read(src, name, leaf.transpose, idx, dt)
        return cache[key]

    return read


def _stacked_onto(src: _Source, leaf: _Leaf, shape, dt, sharding) -> jax.Array:
    """An ``[L, ...]`` array on ``sharding``, filled layer by layer; each layer is
    read only for the shards this process's devices hold."""
    zeros, write = _filler(tuple(shape), np.dtype(dt), sharding, None)
    layer_sharding = _without_leading_axis(sharding)
    arr = zeros()
    for i, name in enumerate(leaf.names):
        x = jax.make_array_from_callback(shape[1:], layer_sharding, _reader(src, leaf, name, dt))
        arr = write(arr, x, np.int32(i))
        del x
        _give_back_freed_host_memory()
    return arr


def _give_back_freed_host_memory() -> None:
    """Return freed heap pages to the OS (glibc's ``malloc_trim``; a no-op
    elsewhere). glibc's mmap threshold grows with every large ``free``, so a
    load's later ~8 MiB read buffers come from the heap, which keeps their
    pages after they are freed: on a CPU backend that held ~0.1-0.3 GB on top
    of the model."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _matrix_onto(src: _Source, leaf: _Leaf, shape, dt, sharding) -> jax.Array:
    """An unstacked leaf (embedding, head, final norm) on ``sharding``. A matrix
    whose checkpoint rows are not split over devices is written in blocks of
    about ``_CHUNK_BYTES`` of them (host memory holds one block's shards, not
    the tensor); otherwise each device's shard is read whole. Either way only
    this process's devices' shards are read."""
    name = leaf.names[0]
    axis = 1 if leaf.transpose else 0  # the checkpoint's rows
    if len(shape) != 2 or _is_split(sharding, axis, len(shape)):
        return jax.make_array_from_callback(shape, sharding, _reader(src, leaf, name, dt))
    step = max(1, safetensors_load._CHUNK_BYTES // (shape[1 - axis] * max(4, dt.itemsize)))
    zeros, write = _filler(tuple(shape), np.dtype(dt), sharding, axis)
    arr = zeros()
    for start in range(0, shape[axis], step):
        block = list(shape)
        block[axis] = min(step, shape[axis] - start)
        x = jax.make_array_from_callback(tuple(block), sharding,
                                         _reader(src, leaf, name, dt, (axis, start, block[axis])))
        arr = write(arr, x, np.int32(start))
        del x
    return arr


def _is_split(sharding, axis: int, ndim: int) -> bool:
    """Whether ``sharding`` may split ``axis`` (any sharding but a named or
    single-device one counts as splitting)."""
    if isinstance(sharding, SingleDeviceSharding):
        return False
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * ndim
        return spec[axis] is not None and spec[axis] != ()
    return True


def _leaf_shardings(shardings, shapes) -> dict:
    """One sharding per params leaf from ``load_pretrained``'s ``shardings``."""
    if shardings is None:
        shardings = SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, Mesh):
        return param_shardings(shapes, shardings)
    if isinstance(shardings, Sharding):
        return jax.tree.map(lambda _: shardings, shapes)
    want, got = jax.tree.structure(shapes), jax.tree.structure(
        shardings, is_leaf=lambda x: isinstance(x, Sharding))
    if want != got:
        raise ValueError(f"load_pretrained: shardings has the structure {got}, but the params "
                         f"have {want} (pass a Mesh, one Sharding, or a tree like the params).")
    return shardings


def _without_leading_axis(sharding):
    """The sharding of one layer ``a[i]`` of an array on ``sharding``."""
    if isinstance(sharding, SingleDeviceSharding):
        return sharding
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    raise TypeError(f"load_pretrained: a stacked leaf's sharding must be a NamedSharding or "
                    f"SingleDeviceSharding, got {type(sharding).__name__}.")
