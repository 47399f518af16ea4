"""``convert.load_pretrained``: lazy, chunked safetensors reads placed onto shardings.

Checked here:

* a tiny transformers checkpoint (``save_pretrained`` in several shards) loads
  bit-exactly to the arrays ``convert.from_hf_model`` gives, untied and tied,
  in the file's dtype and cast to bf16, as jax arrays and as numpy;
* with a tiny ``_CHUNK_BYTES`` every Linear weight (transposed) and the
  embedding are assembled from many chunks, bit-exactly, and so is a part of
  a tensor (``_read`` with an index that is not the whole tensor);
* ``shardings=`` as a ``Mesh``, one ``Sharding`` and pytrees, in two JAX
  processes of 4 CPU devices each (``jax.distributed``; this file is the
  worker): every leaf has exactly that sharding and the same values; no read
  covers more than one device's shard; each process reads exactly the
  distinct parts its own devices hold, once (half of every tensor on an
  8-way split; both halves, not four copies, with ``data=4 x fsdp=2``);
* peak host memory of the numpy path on a ~120 MB checkpoint (a fresh
  process): at most the model + one layer + 10% of the model;
* clear errors for a wrong shardings tree and ``as_numpy`` with ``shardings``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.jax.cpu_devices import hide_torch, join_processes, marked_json, run_processes

REPO = Path(__file__).resolve().parents[2]
MARK = "LOAD_RESULT "


def _write_tiny(path, tied=False, seed=0):
    """A tiny transformers LLaMA written in several safetensors shards; returns the model."""
    from tests.jax.tiny_llama import hf_model

    hf = hf_model("llama", seed=seed, tie_word_embeddings=tied)
    hf.save_pretrained(str(path), max_shard_size="40KB", safe_serialization=True)
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 2
    return hf


def _flat(tree):
    import jax

    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_bit_exact(got, want):
    got, want = _flat(got), _flat(want)
    assert got.keys() == want.keys()
    for k in want:
        g, w = np.asarray(got[k]), np.asarray(want[k])
        assert g.dtype == w.dtype and g.shape == w.shape, (k, g.dtype, w.dtype, g.shape, w.shape)
        np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8), err_msg=k)


def _assert_is_state_dict(params, cfg, hf, dtype=None):
    """``params`` map back (``params_to_hf``: transposes and unstacking, no
    ``_read``) to ``hf``'s weights, bit-exactly (cast to ``dtype`` by torch)."""
    import torch

    from lomo_jax.models import convert

    got = convert.params_to_hf(params, cfg, include_tied=False, framework="pt")
    for name, t in got.items():
        w = hf.state_dict()[name]
        w = w if dtype is None else w.to(torch.bfloat16)
        assert t.dtype == w.dtype and torch.equal(t.view(torch.int16 if dtype else torch.int32),
                                                   w.view(torch.int16 if dtype else torch.int32)), name


# --------------------------------------------------------------------------
# One process, one device
# --------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_loads_the_same_arrays_as_from_hf_model(tmp_path, tied):
    import jax
    import jax.numpy as jnp

    from lomo_jax.models import convert

    hf = _write_tiny(tmp_path, tied=tied, seed=3 + tied)
    for dtype in (None, jnp.bfloat16):
        cfg_ref, want = convert.from_hf_model(hf, dtype=dtype)
        cfg, params = convert.load_pretrained(str(tmp_path), dtype=dtype)
        assert cfg == cfg_ref and cfg.tie_word_embeddings == tied
        assert ("lm_head" in params["head"]) != tied
        assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
        _assert_bit_exact(params, want)
        _assert_is_state_dict(params, cfg, hf, dtype)
        _, host = convert.load_pretrained(str(tmp_path), dtype=dtype, as_numpy=True)
        assert all(type(x) is np.ndarray for x in jax.tree.leaves(host))
        _assert_bit_exact(host, want)


def _recording_source(convert, monkeypatch, log):
    """Make ``load_safetensors`` return sources whose reads are logged as ``(name, index)``."""
    original = convert.load_safetensors

    def load(path):
        src = original(path)
        inner = src._read

        def read(name, index):
            log.append((name, index))
            return inner(name, index)

        src._read = read
        return src

    monkeypatch.setattr(convert, "load_safetensors", load)


def test_chunked_reads_are_bit_exact(tmp_path, monkeypatch):
    import jax.numpy as jnp

    from lomo_jax.models import convert

    hf = _write_tiny(tmp_path, seed=5)
    from lomo_jax.models import safetensors_load

    monkeypatch.setattr(safetensors_load, "_CHUNK_BYTES", 300)
    log = []
    _recording_source(convert, monkeypatch, log)
    _, want = convert.from_hf_model(hf)
    for as_numpy in (False, True):
        log.clear()
        cfg, params = convert.load_pretrained(str(tmp_path), as_numpy=as_numpy)
        _assert_bit_exact(params, want)
        _assert_is_state_dict(params, cfg, hf)
        counts = {}
        for name, _ in log:
            counts[name] = counts.get(name, 0) + 1
        # embedding [128, 64] fp32: rows of 256 B -> one row per chunk; transposed
        # q_proj [64, 64] and mlp.down_proj [64, 128] likewise
        for name in ("model.embed_tokens.weight", "lm_head.weight",
                     "model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
            assert counts[name] >= 64, (name, counts[name])
    _, want16 = convert.from_hf_model(hf, dtype=jnp.bfloat16)
    _, params16 = convert.load_pretrained(str(tmp_path), dtype=jnp.bfloat16, as_numpy=True)
    _assert_bit_exact(params16, want16)

    # a part of a tensor, in the params layout ([in, out] for a Linear weight)
    src = convert.load_safetensors(str(tmp_path))
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    q = "model.layers.1.self_attn.q_proj.weight"
    idx = (slice(3, 50), slice(10, 37))
    np.testing.assert_array_equal(convert._read(src, q, True, idx), sd[q].T[idx])
    emb = "model.embed_tokens.weight"
    idx = (slice(100, 128), slice(8, 16))
    np.testing.assert_array_equal(convert._read(src, emb, False, idx), sd[emb][idx])
    part = convert._read(src, emb, False, (slice(5, 9),), dtype=jnp.bfloat16)
    np.testing.assert_array_equal(part, sd[emb][5:9].astype(jnp.bfloat16))
    # reads of a part touch only rows of that part
    log.clear()
    convert._read(src, q, True, (slice(None), slice(16, 24)), dtype=np.float32)
    assert log and all(ix[0] == slice(16 + k, 17 + k, 1) for k, (_, ix) in enumerate(log))


def test_errors_name_the_problem(tmp_path):
    import jax
    from jax.sharding import SingleDeviceSharding

    from lomo_jax.models import convert, llama

    _write_tiny(tmp_path, seed=9)
    one = SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(ValueError, match=r"as_numpy=True.*shardings"):
        convert.load_pretrained(str(tmp_path), as_numpy=True, shardings=one)
    cfg, _ = convert.load_pretrained(str(tmp_path), as_numpy=True)
    tree = jax.tree.map(lambda _: one, llama.param_shapes(cfg))
    del tree["head"]["norm"]
    with pytest.raises(ValueError, match=r"shardings has the structure .* but the params have"):
        convert.load_pretrained(str(tmp_path), shardings=tree)
    with pytest.raises(ValueError, match=r"shardings has the structure"):
        convert.load_pretrained(str(tmp_path), shardings={"embed": one})


def _poke(file, name, flat_index, value) -> None:
    """Overwrite element ``flat_index`` of tensor ``name`` in safetensors ``file``
    with ``value`` (raw bytes: what a corrupted disk or download does)."""
    with open(file, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(n))[name]
        dtype = {"F32": np.float32, "BF16": np.dtype("bfloat16")}[entry["dtype"]]
        f.seek(8 + n + entry["data_offsets"][0] + flat_index * np.dtype(dtype).itemsize)
        f.write(np.asarray([value], np.float32).astype(dtype).tobytes())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, dtype):
    """A NaN or an infinity in the file's bytes (every chunk is checked as it is
    read) is an error naming the tensor, its file, the index and the value, for
    the placed and the numpy load; check_finite=False loads them."""
    import torch

    from lomo_jax.models import convert

    hf = _write_tiny(tmp_path, seed=13)
    if dtype == "bfloat16":
        hf.to(torch.bfloat16).save_pretrained(str(tmp_path), max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    k_proj = "model.layers.1.self_attn.k_proj.weight"  # [32, 64]: row 9, column 40
    file = tmp_path / index[k_proj]
    monkey = pytest.MonkeyPatch()
    from lomo_jax.models import safetensors_load

    monkey.setattr(safetensors_load, "_CHUNK_BYTES", 1024)  # the bad row is in a later chunk
    try:
        for value, shown in ((float("nan"), "nan"), (float("-inf"), "-inf")):
            _poke(file, k_proj, 9 * 64 + 40, value)
            for as_numpy in (False, True):
                with pytest.raises(ValueError, match=(
                        rf"{k_proj} \(in {re.escape(str(file))}\) holds a non-finite value, {shown} at index "
                        rf"\[9, 40\] of its {dtype} \[32, 64\]: the checkpoint looks corrupted. "
                        r"Pass check_finite=False")):
                    convert.load_pretrained(str(tmp_path), as_numpy=as_numpy)
            _, params = convert.load_pretrained(str(tmp_path), as_numpy=True, check_finite=False)
            got = np.asarray(params["layers"]["self_attn"]["k_proj"]["kernel"][1, 40, 9], np.float32)
            assert np.isnan(got) if shown == "nan" else got == -np.inf
    finally:
        monkey.undo()
    # a state dict in memory (params_from_hf, from_hf_model) alike
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    sd["model.norm.weight"][3] = float("inf")
    cfg = convert.config_from_hf(hf.config)
    with pytest.raises(ValueError, match=r"model.norm.weight holds a non-finite value, inf at "
                                         r"index \[3\]"):
        convert.params_from_hf(sd, cfg)
    assert np.isinf(convert.params_from_hf(sd, cfg, check_finite=False)["head"]["norm"][3])


def test_finite_check_on_the_bits_of_16_bit_floats():
    """float16/bfloat16 are checked on their exponent bits: every infinity and NaN
    (any sign, any payload) is caught; the largest finite values, subnormals and
    zeros are not."""
    import ml_dtypes

    from lomo_jax.models import convert

    for dt in (np.float16, ml_dtypes.bfloat16):
        info = ml_dtypes.finfo(dt)
        ok = np.array([0.0, -0.0, float(info.max), float(info.min), float(info.smallest_subnormal),
                       1.0, -3.5], np.float32).astype(dt)
        assert convert._all_finite(ok) and convert._all_finite(ok[:0])
        bits = ok.view(np.uint16)
        exponent = {np.dtype(np.float16): 0x7C00, np.dtype(ml_dtypes.bfloat16): 0x7F80}[np.dtype(dt)]
        for bad in (exponent, exponent | 0x8000, exponent | 1, exponent | 0x8000 | (exponent >> 1)):
            b = bits.copy()
            b[4] = bad
            assert not convert._all_finite(b.view(dt)), (np.dtype(dt).name, hex(bad))
    assert convert._all_finite(np.array([1, 2**31 - 1], np.int32))  # integers: nothing to check
    assert not convert._all_finite(np.array([1.0, np.nan], np.float64))


# --------------------------------------------------------------------------
# Shardings: two JAX processes of 4 CPU devices each (this file as the worker)
# --------------------------------------------------------------------------


def _read_size(shape, index):
    """Elements of ``index`` (a tuple of slices) of an array of ``shape``."""
    index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
    return math.prod(len(range(*sl.indices(n))) for sl, n in zip(index, shape))


def _reads(convert, src_shapes, log, shardings, cfg):
    """``[name, largest read / one device's shard, all reads / tensor, this
    process's distinct shards / tensor]`` per checkpoint tensor (elements;
    one-element dtype probes left out)."""
    from lomo_jax.models import llama

    shapes = llama.param_shapes(cfg)
    per: dict = {}
    for name, index in log:
        if _read_size(src_shapes[name], index) > 1:
            per.setdefault(name, []).append(_read_size(src_shapes[name], index))
    out = []
    for leaf in convert._leaves(cfg, lambda n: n):
        shape, sh = convert._at(shapes, leaf.path).shape, convert._at(shardings, leaf.path)
        layers = len(leaf.names) if leaf.stacked else 1
        shard, full = math.prod(sh.shard_shape(shape)) // layers, math.prod(shape) // layers
        local = {tuple((s.start, s.stop) for s in ix)
                 for ix in sh.addressable_devices_indices_map(shape).values()}
        for name in leaf.names:
            got = per.get(name, [0])
            out.append([name, max(got) / shard, sum(got) / full, len(local) * shard / full])
    return out


def _worker(rank: int, port: int, path: str) -> None:
    """All sharded loads in one process of two; prints a JSON report."""
    hide_torch()  # transformers reads the config; torch is not needed here
    join_processes(rank, port, 2, 4)
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P, SingleDeviceSharding

    import lomo_jax
    from lomo_jax import sharding as lsh
    from lomo_jax.models import convert, llama

    want = dict(np.load(os.path.join(path, "expected.npz")))
    log: list = []
    original = convert.load_safetensors

    def load(p):
        src = original(p)
        inner = src._read
        src._read = lambda name, index: (log.append((name, index)), inner(name, index))[1]
        return src

    convert.load_safetensors = load
    from lomo_jax.models import safetensors_load

    safetensors_load._CHUNK_BYTES = 4096  # several row blocks per matrix whose rows are not split
    src_shapes = {k: original(path).shape(k) for k in original(path).keys}
    auto = lambda n: (AxisType.Auto,) * n  # noqa: E731
    mesh8 = jax.make_mesh((8,), ("fsdp",), axis_types=auto(1))
    mesh42 = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=auto(2))
    cfg = convert.load_pretrained(path, as_numpy=True)[0]
    shapes = llama.param_shapes(cfg)
    rows_split = lsh.param_shardings(shapes, mesh8, min_size=0)
    rows_split["embed"]["embedding"] = NamedSharding(mesh8, P("fsdp", None))  # V split
    rows_split["head"]["lm_head"] = NamedSharding(mesh8, P(None, "fsdp"))  # V split
    one = SingleDeviceSharding(jax.local_devices()[1])
    cases = {  # name: (shardings=, the leaves' expected shardings, dtypes)
        "mesh": (mesh8, lsh.param_shardings(shapes, mesh8), (None,)),
        "one_sharding": (one, jax.tree.map(lambda _: one, shapes), (None,)),
        "tree_fsdp8": ((t := lsh.llama_shardings(cfg, mesh8, lomo_jax.adalomo(1e-3),
                                                 min_size=0).params), t, (None, jnp.bfloat16)),
        "tree_data4_fsdp2": ((t := lsh.param_shardings(shapes, mesh42, min_size=0)), t, (None,)),
        "tree_rows_split": (rows_split, rows_split, (None,)),
    }
    report = {}
    for case, (given, expected, dtypes) in cases.items():
        for dtype in dtypes:
            log.clear()
            _, params = convert.load_pretrained(path, shardings=given, dtype=dtype)
            got, exp = _flat(params), _flat(expected)
            bad_value = []
            for k, x in got.items():
                w = want[k] if dtype is None else want[k].astype(jnp.bfloat16)
                for s in x.addressable_shards:
                    if not np.array_equal(np.asarray(s.data).view(np.uint8), w[s.index].view(np.uint8)):
                        bad_value.append(k)
            report[f"{case}/{'bf16' if dtype else 'file'}"] = {
                "bad_sharding": [k for k in exp if got[k].sharding != exp[k]],
                "bad_value": bad_value,
                "split_leaves": sum(not s.is_fully_replicated for s in exp.values()),
                "spanning": sum(not x.is_fully_addressable for x in got.values()),
                "reads": _reads(convert, src_shapes, log, expected, cfg),
            }
    print(MARK + json.dumps(report), flush=True)
    jax.distributed.shutdown()


def _run_two_processes(path) -> list:
    outputs = run_processes(Path(__file__).resolve(), 2, str(path))
    return [marked_json(text, MARK) for text in outputs]


def test_shardings_place_every_leaf_and_each_process_reads_its_shards(tmp_path):
    from lomo_jax.models import convert

    hf = _write_tiny(tmp_path, seed=11)
    cfg, want = convert.from_hf_model(hf)
    _assert_is_state_dict(want, cfg, hf)  # the reference, checked without _read
    np.savez(tmp_path / "expected.npz", **{k: np.asarray(v) for k, v in _flat(want).items()})
    for rank, report in enumerate(_run_two_processes(tmp_path)):
        assert len(report) == 6
        for key, r in report.items():
            assert not r["bad_sharding"], (rank, key, r["bad_sharding"])
            assert not r["bad_value"], (rank, key, r["bad_value"])
            tree = key.startswith("tree")
            assert r["split_leaves"] == (12 if tree else 0), (key, r["split_leaves"])
            assert r["spanning"] == (12 if key.split("/")[0] != "one_sharding" else 0), key
            assert len(r["reads"]) == 2 * 9 + 3  # every tensor
            for name, largest, total, local in r["reads"]:
                ctx = (rank, key, name, largest, total, local)
                assert largest <= 1, ctx  # no read beyond one device's shard
                assert total == local, ctx  # each of this process's parts read once
                if key.startswith(("tree_fsdp8", "tree_rows_split")):
                    assert local == 0.5, ctx  # half of each tensor: only its devices'
                if key.startswith("tree_data4_fsdp2"):
                    assert local == 1, ctx  # both halves, each on two of its devices


# --------------------------------------------------------------------------
# Peak host memory (a fresh process)
# --------------------------------------------------------------------------


def _bench_load():
    spec = importlib.util.spec_from_file_location("_bench_load", REPO / "benchmarks" / "load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_numpy_load_peak_memory_within_model_plus_one_layer(tmp_path):
    from lomo_jax.models import llama

    bench = _bench_load()
    cfg = llama.LlamaConfig(vocab_size=12000, hidden_size=1024, intermediate_size=2816,
                            num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                            tie_word_embeddings=False)
    total = bench.write_checkpoint(cfg, str(tmp_path), shard_bytes=40 * 2**20)
    assert 100e6 < total < 200e6
    one_layer = bench.layer_bytes(cfg)
    r = bench.measure_in_subprocess(str(tmp_path), "numpy")
    assert r["params_bytes"] == total
    rise = r["peak"] - r["before"]
    assert rise <= total + one_layer + 0.1 * total, (
        f"peak RSS rise {rise / 1e6:.0f} MB > model {total / 1e6:.0f} MB + one layer "
        f"{one_layer / 1e6:.0f} MB + 10%")


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
