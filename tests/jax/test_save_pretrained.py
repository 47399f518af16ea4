"""``convert.save_pretrained``: streaming, sharded safetensors from sharded and multi-process arrays.

Three cases of one tiny LLaMA (hidden 32, 2 layers, vocab 64; ~90 kB fp32
params): untied fp32 and tied cast to bf16 (``dtype=``) in shards of at most
20 kB (>= 3 shards), and untied cast to bf16 in one ``model.safetensors``
(the single-file writer). Saved by

* one process whose params are split over 8 CPU devices (``fsdp=8``), and
* two JAX processes of 4 CPU devices each, the params split over all 8 (no
  array fully addressable), both calling ``save_pretrained``; rank 1 passes a
  path of its own, which must never be created (only process 0 writes).

This file is the worker of both (``python this.py single OUT`` and
``python this.py RANK PORT OUT``). Checked here:

* every file loads in ``transformers`` (``AutoModelForCausalLM.from_pretrained``,
  in the test process, which has torch already) with a state dict bit-equal to
  ``params_to_hf``'s of the same values; the
  safetensors tensors bit-equal too; ``model.safetensors.index.json`` exact
  (``total_size``, ``weight_map``), each shard's tensors within
  ``max_shard_size``; tied embeddings written once;
* the two-process directory is byte-identical to the single-process one, and
  rank 1 wrote nothing and returned only once process 0 had written
  everything (the two-process run writes a stub ``config.json``:
  importing transformers would cost ~2 s of the CI budget; the
  single-process run writes the real one, with ``transformers`` but without
  torch, :func:`tests.jax.cpu_devices.hide_torch`);
* memory: each array gathered to the host is one tensor (a layer's slice of a
  stacked leaf or an unstacked leaf), never more than the largest such, and
  at most one gathered tensor is alive at a time (it is written before the
  next is gathered) - the model is never on the host;
* clear errors (bad ``max_shard_size``, params that do not match the config,
  a dtype safetensors cannot store), raised before anything is written;
* atomic saves: a save of new weights over an old export SIGKILLed before
  each tensor gather, each rename and each removal (a forked child of one
  worker, ``python this.py kill OUT``; three cases: shards over shards of the
  same names, shards over one file, one file over shards) leaves a directory
  that ``load_pretrained`` reads as the old export exactly or the new one
  exactly (old up to the entry point's rename, new after), and a save into it
  afterwards leaves the new export and nothing else; ``write_atomically``
  moves nothing on an error and leaves unchanged files in place.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from tests.jax.cpu_devices import (QUICK_COMPILE_FLAGS, cpu_devices_env, hide_torch,
                                    join_processes, marked_json, run_processes,
                                    script_env)
from tests.once_per_run import once_per_run

REPO = Path(__file__).resolve().parents[2]
MARK = "SAVE_RESULT "
SHARD = 20_000
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
CASES = {  # name: (tied, dtype=, max_shard_size=); fp32 params (one set of compiles)
    "untied_f32_shards": (False, None, SHARD),
    "tied_bf16_shards": (True, "bfloat16", SHARD),
    "untied_bf16_one_file": (False, "bfloat16", None),
}


def _cfg(tied):
    from lomo_jax.models import llama

    return llama.LlamaConfig(**TINY, tie_word_embeddings=tied)


def _values(cfg, seed: int = 0) -> dict:
    """fp32 numpy params of ``cfg`` (the same in every process), O(1) values."""
    import jax

    from lomo_jax.models import llama

    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32),
                        llama.param_shapes(cfg))


# --------------------------------------------------------------------------
# Workers (subprocesses)
# --------------------------------------------------------------------------


def _instrument(convert) -> dict:
    """Record each host gather (``_to_host``: bytes, fully addressable?) and
    the most bytes of gathered tensors (``_gather`` results) alive at once;
    ``rec.clear()`` starts afresh."""
    from lomo_jax.models import safetensors_save as sst

    rec: dict = {}
    to_host, gather = sst._to_host, sst._gather

    def recording_to_host(x):
        rec.setdefault("addressable", []).append(bool(getattr(x, "is_fully_addressable", True)))
        out = to_host(x)
        rec.setdefault("to_host", []).append(int(out.nbytes))
        return out

    def recording_gather(params, t):
        out = gather(params, t)
        rec["live"] = rec.get("live", 0) + out.nbytes
        rec["max_live"] = max(rec.get("max_live", 0), rec["live"])
        weakref.finalize(out, lambda n=out.nbytes: rec.__setitem__("live", rec["live"] - n))
        return out

    sst._to_host, sst._gather = recording_to_host, recording_gather
    return rec


def _save_cases(out_dir: str, mesh, done: str | None = None) -> dict:
    """Every case's params placed on ``mesh`` (fsdp), saved to ``out_dir/case``;
    ``done``: where process 0 writes, checked complete on return."""
    import jax
    import jax.numpy as jnp

    from lomo_jax import sharding as lsh
    from lomo_jax.models import convert, llama

    report = {}
    rec = _instrument(convert)
    for case, (tied, dtype, shard) in CASES.items():
        cfg = _cfg(tied)
        values = _values(cfg)
        shardings = lsh.param_shardings(llama.param_shapes(cfg), mesh, min_size=0)
        params = jax.tree.map(lambda v, s: jax.make_array_from_callback(v.shape, s, lambda i: v[i]),
                              values, shardings)
        rec.clear()
        t0 = time.perf_counter()
        convert.save_pretrained(params, cfg, os.path.join(out_dir, case), max_shard_size=shard,
                                dtype=None if dtype is None else jnp.dtype(dtype))
        report[case] = {k: rec[k] for k in ("to_host", "addressable", "max_live")}
        report[case]["seconds"] = time.perf_counter() - t0
        if done is not None:
            report[case]["complete_on_return"] = _complete(os.path.join(done, case))
        report[case]["split_leaves"] = sum(len(x.sharding.device_set) == 8 and
                                           not x.sharding.is_fully_replicated
                                           for x in jax.tree.leaves(params))
    return report


def _complete(path: str) -> bool:
    """Whether ``path`` holds a whole checkpoint: config, index and every shard."""
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        files = {"model.safetensors"}
    else:
        with open(index) as f:
            files = set(json.load(f)["weight_map"].values())
    return all(os.path.exists(os.path.join(path, f)) for f in files | {"config.json"})


def _single_worker(out: str) -> None:
    hide_torch()  # transformers writes the configs; torch is not needed here
    os.environ.update(cpu_devices_env(8, QUICK_COMPILE_FLAGS))
    import jax
    from jax.sharding import AxisType

    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    report = _save_cases(os.path.join(out, "single"), mesh)
    print(MARK + json.dumps(report), flush=True)


def _loaded(path) -> dict:
    """``{name: [dtype, shape, sha256 of the bytes]}`` of the state dict of
    ``AutoModelForCausalLM.from_pretrained(path)`` (its class too)."""
    import transformers

    from lomo_jax.models import convert

    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    out = {name: _digest(convert._to_numpy(t)) for name, t in hf.state_dict().items()}
    out["class"] = type(hf).__name__
    return out


def _digest(a: np.ndarray) -> list:
    return [a.dtype.name, list(a.shape), hashlib.sha256(_bits(a).tobytes()).hexdigest()]


def _stub_configs(cfg, hf_config, first_dtype, path):
    """Stands in for ``convert._write_configs`` in the two-process run: its
    ``config.json`` names the dtype (the single-process run writes the real ones)."""
    Path(path, "config.json").write_text(json.dumps({"stub": True,
                                                     "dtype": np.dtype(first_dtype).name}))
    Path(path, "generation_config.json").write_text("{}")


def _rank_worker(rank: int, port: int, out: str) -> None:
    join_processes(rank, port, 2, 4)
    import jax
    from jax.sharding import AxisType

    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    from lomo_jax.models import hf_config, safetensors_save as sst

    hf_config._write_configs = _stub_configs  # no transformers (+ torch) import: ~4 s saved
    if rank == 0:  # process 0 finishes late: the others must still wait for it
        write = sst._write_weights
        sst._write_weights = lambda *a: (write(*a), time.sleep(0.2))[0]
    # rank 1 names a directory of its own: it must never appear
    report = _save_cases(os.path.join(out, "multi" if rank == 0 else "rank1"), mesh,
                         done=os.path.join(out, "multi"))
    print(MARK + json.dumps(report), flush=True)
    jax.distributed.shutdown()


KILLS = {  # case: (the old export's max_shard_size, the new one's)
    "shards_over_shards": (SHARD, SHARD),
    "shards_over_one_file": (None, SHARD),
    "one_file_over_shards": (SHARD, None),
}


def _hooked(convert, hook) -> None:
    """Call ``hook(kind)`` before every tensor gather, rename and removal."""
    from lomo_jax.models import safetensors_save as sst

    gather, replace, remove = sst._gather, os.replace, os.remove
    sst._gather = lambda *a: (hook("gather"), gather(*a))[1]
    os.replace = lambda *a, **k: (hook("rename"), replace(*a, **k))[1]
    os.remove = lambda *a, **k: (hook("remove"), remove(*a, **k))[1]


def _killed_save(save, target) -> bool:
    """Run ``save()`` in a forked child that SIGKILLs itself just before call
    ``target = (kind, k)`` (the k-th of that kind); whether it died so."""
    from lomo_jax.models import convert

    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            seen: dict = {}

            def hook(kind):
                seen[kind] = seen.get(kind, 0) + 1
                if (kind, seen[kind]) == target:
                    os.kill(os.getpid(), signal.SIGKILL)

            _hooked(convert, hook)
            save()
        finally:
            os._exit(3)  # reached only if the target point never came
    status = os.waitpid(pid, 0)[1]
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _kill_worker(out: str) -> None:
    """Per case of :data:`KILLS`: an old export (seed 0) in ``OUT/case/old``; a
    save of the new weights (seed 1) over a copy of it, killed at each point
    in turn (before a first, a middle and the last tensor gather, each rename,
    each removal), in ``OUT/case/NN-kindK``; each killed directory copied and
    saved into again in ``.../NN-kindK-resaved``. Prints the points in order.
    The configs are ``OUT/configs.json``'s texts (no transformers import)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from lomo_jax import _files
    from lomo_jax.models import convert, hf_config

    jax.process_index, jax.process_count = (lambda: 0), (lambda: 1)  # the fork stays JAX-free
    # fsync makes the files durable across a power cut; a killed process's writes are in
    # the page cache either way (and 200 saves' fsyncs cost ~15 s here)
    _files._fsync_file = _files._fsync_dir = lambda path: None
    texts = json.loads(Path(out, "configs.json").read_text())
    hf_config._write_configs = lambda cfg, hf, dt, path: [
        Path(path, n).write_text(t) for n, t in texts.items()]
    cfg = _cfg(False)
    old, new = _values(cfg, 0), _values(cfg, 1)
    report = {}
    for case, (old_shard, new_shard) in KILLS.items():
        base = Path(out, case)
        convert.save_pretrained(old, cfg, str(base / "old"), max_shard_size=old_shard)
        save = lambda d: convert.save_pretrained(new, cfg, str(d), max_shard_size=new_shard)  # noqa: E731
        report[case] = []
        for i, target in enumerate(_kill_points(convert, base, save)):
            d = base / f"{i:02d}-{target[0]}{target[1]}"
            shutil.copytree(base / "old", d)
            killed = _killed_save(functools.partial(save, d), target)
            shutil.copytree(d, f"{d}-resaved")
            save(f"{d}-resaved")
            report[case].append([d.name, killed])
    print(MARK + json.dumps(report), flush=True)


def _kill_points(convert, base: Path, save) -> list:
    """``(kind, k)`` of a first, a middle and the last gather, every rename and
    every removal of ``save`` over a copy of ``base/old`` (in ``base/count``)."""
    from lomo_jax.models import safetensors_save as sst

    counts: dict = {}
    shutil.copytree(base / "old", base / "count")
    original = (sst._gather, os.replace, os.remove)
    _hooked(convert, lambda kind: counts.__setitem__(kind, counts.get(kind, 0) + 1))
    try:
        save(base / "count")
    finally:
        sst._gather, os.replace, os.remove = original
    gathers = counts["gather"]
    return [("gather", k) for k in sorted({1, gathers // 2, gathers})] + [
        (kind, k) for kind in ("rename", "remove") for k in range(1, counts.get(kind, 0) + 1)]


# --------------------------------------------------------------------------
# The saves (one single-process and one two-process run, concurrently)
# --------------------------------------------------------------------------


def _save_all(out: Path) -> dict:
    """The single-process and the two-process saves into ``out``, concurrently."""
    single = subprocess.Popen([sys.executable, __file__, "single", str(out)], cwd=REPO,
                              env=script_env(8), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            ranks = pool.submit(run_processes, Path(__file__).resolve(), 2, str(out))
            importlib.import_module("lomo_jax.models.convert")  # while they run
            ranks = [marked_json(t, MARK) for t in ranks.result()]
        text = single.communicate(timeout=600)[0]
    finally:
        single.kill()
    assert single.returncode == 0, text[-6000:]
    return {"out": str(out), "single": marked_json(text, MARK), "ranks": ranks}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The saves' directory and reports (once per test run)."""
    _, result = once_per_run(tmp_path_factory, "save_pretrained", _save_all)
    return {**result, "out": Path(result["out"])}


def _tensors(path) -> dict:
    """``{name: (file, numpy array)}`` of a saved directory, read with safetensors."""
    from safetensors import safe_open

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), framework="np") as st:
                out.update({k: (f, st.get_tensor(k)) for k in st.keys()})
    return out


def _want(case):
    """``(cfg, params_to_hf of the case's values, as numpy, without a tied head)``."""
    import jax.numpy as jnp

    from lomo_jax.models import convert

    tied, dtype, _ = CASES[case]
    cfg = _cfg(tied)
    dt = None if dtype is None else jnp.dtype(dtype)
    return cfg, convert.params_to_hf(_values(cfg), cfg, include_tied=False, framework="np",
                                     dtype=dt)


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_save_is_params_to_hf_and_loads_in_transformers(saved, case):
    path = saved["out"] / "single" / case
    cfg, want = _want(case)
    got = _tensors(path)
    assert list(got) and set(got) == set(want), (sorted(got), sorted(want))
    for name, (_, a) in got.items():
        assert a.dtype == want[name].dtype and a.shape == want[name].shape, name
        np.testing.assert_array_equal(_bits(a), _bits(want[name]), err_msg=name)
    shard = CASES[case][2]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    # the export and nothing else (no staging directory or temporary file is left)
    assert set(os.listdir(path)) == set(files) | {"config.json", "generation_config.json"} | (
        set() if shard is None else {"model.safetensors.index.json"})
    if shard is None:
        assert files == ["model.safetensors"]
        assert not (path / "model.safetensors.index.json").exists()
    else:
        assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == {k: f for k, (f, _) in got.items()}
        assert index["metadata"]["total_size"] == sum(a.nbytes for a in want.values())
        for f in files:  # every shard within max_shard_size (no tensor is larger here)
            assert sum(a.nbytes for g, a in got.values() if g == f) <= shard, f

    # transformers loads it: its state dict is params_to_hf's (with the tied head)
    loaded = _loaded(path)
    assert loaded.pop("class") == "LlamaForCausalLM"
    if cfg.tie_word_embeddings:
        want["lm_head.weight"] = want["model.embed_tokens.weight"]
    assert loaded == {k: _digest(v) for k, v in want.items()}


def test_two_processes_write_once_and_match_one_process(saved):
    out = saved["out"]
    assert not (out / "rank1").exists()  # the other process created nothing
    for case in CASES:
        single, multi = out / "single" / case, out / "multi" / case
        names = sorted(os.listdir(single))
        assert names == sorted(os.listdir(multi)) and "config.json" in names
        assert "generation_config.json" in names
        for f in names:
            if not f.endswith("config.json"):  # the two-process run writes stub configs
                assert (single / f).read_bytes() == (multi / f).read_bytes(), (case, f)
        dtype = json.loads((multi / "config.json").read_text())["dtype"]
        assert dtype == (CASES[case][1] or "float32"), (case, dtype)
        for rank, report in enumerate(saved["ranks"]):
            r = report[case]
            assert r["split_leaves"] == 12 - CASES[case][0], (rank, case)
            # every tensor all-gathered from arrays spread over both processes
            assert r["addressable"] and not any(r["addressable"]), (rank, case, r["addressable"])
            # no process returns before process 0 has written everything
            assert r["complete_on_return"], (rank, case)


def test_streaming_gathers_and_holds_one_tensor_at_a_time(saved):
    for case in CASES:
        _, want = _want(case)
        tensors = [a.size * 4 for a in want.values()]  # bytes in the params' dtype (fp32)
        largest_out = max(a.nbytes for a in want.values())
        for who, r in [("single", saved["single"][case])] + [
                (f"rank{k}", rep[case]) for k, rep in enumerate(saved["ranks"])]:
            ctx = (who, case)
            # one gather per tensor, each exactly one tensor: a layer of a stacked leaf
            # or an unstacked leaf, never a whole [L, ...] leaf, let alone the model
            assert sorted(r["to_host"]) == sorted(tensors), ctx
            assert max(r["to_host"]) < sum(tensors) / 4, ctx
            # each gathered tensor is written (and dropped) before the next is gathered
            assert r["max_live"] == largest_out, (ctx, r["max_live"], largest_out)


def test_errors_are_clear_and_nothing_is_written(tmp_path):
    import jax.numpy as jnp

    from lomo_jax.models import convert

    cfg = _cfg(False)
    params = _values(cfg)
    path = tmp_path / "never"
    for bad in (0, -5, 1.5, True, "1MB"):
        with pytest.raises(ValueError, match=r"max_shard_size must be a positive number"):
            convert.save_pretrained(params, cfg, str(path), max_shard_size=bad)
    wrong = _values(_cfg(True))  # no lm_head
    with pytest.raises(ValueError, match=r"missing .*lm_head"):
        convert.save_pretrained(wrong, cfg, str(path))
    wrong = _values(cfg.replace(intermediate_size=48))
    with pytest.raises(ValueError, match=r"gate_proj.*expected"):
        convert.save_pretrained(wrong, cfg, str(path))
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight would be complex64"):
        convert.save_pretrained(params, cfg, str(path), dtype=jnp.complex64)
    # an hf_config of another model: a size, a norm's epsilon, a family switch (Qwen3's
    # q/k norms on the same sizes); how the model is computed (dtype) is not compared
    for other, field in ((cfg.replace(num_key_value_heads=1), "num_key_value_heads"),
                         (cfg.replace(rms_norm_eps=1e-5), "rms_norm_eps"),
                         (cfg.replace(model_type="qwen3", qk_norm=True), "qk_norm")):
        with pytest.raises(ValueError, match=rf"hf_config.{field}=.* does not match"):
            convert.save_pretrained(params, cfg, str(path), hf_config=convert.config_to_hf(other))
    convert._check_hf_config(cfg, convert.config_to_hf(cfg.replace(dtype=jnp.bfloat16)))
    assert not path.exists()


def _export(path) -> tuple:
    """``(cfg, {leaf path: bytes})`` of ``load_pretrained(path, as_numpy=True)``."""
    import jax

    from lomo_jax.models import convert

    cfg, params = convert.load_pretrained(str(path), as_numpy=True)
    return cfg, {jax.tree_util.keystr(k): (v.dtype.name, v.shape, v.tobytes())
                 for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _only_the_export(path) -> set:
    """The names in ``path`` that are not the export its entry point names."""
    names = set(os.listdir(path))
    if "model.safetensors" in names:
        want = {"model.safetensors"}
    else:
        index = json.loads(Path(path, "model.safetensors.index.json").read_text())
        want = set(index["weight_map"].values()) | {"model.safetensors.index.json"}
    return names - want - {"config.json", "generation_config.json"}


def test_a_killed_save_leaves_the_old_export_or_the_new_one(tmp_path):
    from lomo_jax.models import convert

    cfg = _cfg(False)
    configs = tmp_path / "configs"  # the real configs, written here once for the worker
    convert._write_configs(cfg, None, np.dtype(np.float32), str(configs.mkdir() or configs))
    (tmp_path / "configs.json").write_text(json.dumps(
        {f.name: f.read_text() for f in configs.iterdir()}))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, "kill", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = marked_json(proc.stdout, MARK)
    for case, points in report.items():
        old = _export(tmp_path / case / "old")
        new = _export(tmp_path / case / "count")  # the save that ran to the end
        assert old[0] == new[0] and old[1] != new[1]
        assert not _only_the_export(tmp_path / case / "count")
        seen = []
        for name, killed in points:
            d = tmp_path / case / name
            assert killed, (case, name)  # the child died at that point, by SIGKILL
            got = _export(d)
            assert got in (old, new), (case, name, "neither the old export nor the new one")
            seen.append("old" if got == old else "new")
            # saved into again: the new export and nothing else (no staging, no stale shard)
            assert _export(f"{d}-resaved") == new, (case, name)
            assert not _only_the_export(f"{d}-resaved"), (case, name)
        # old during every write and rename; new once the entry point (the index, or
        # model.safetensors) is renamed in - or, over one file, once that is removed
        # (it is what transformers and load_pretrained read first): the last step
        commit_is_removal = case == "shards_over_one_file"
        want = ["new" if "-remove" in n and not commit_is_removal else "old" for n, _ in points]
        assert seen == want, (case, list(zip([n for n, _ in points], seen)))
    for case, points in report.items():  # every kind of point was reached
        assert [sum(f"-{kind}" in n for n, _ in points) > 0 for kind in ("gather", "rename")] \
            == [True, True], (case, points)


def test_write_atomically_moves_nothing_on_an_error_and_keeps_unchanged_files(tmp_path):
    from lomo_jax.models import convert

    (tmp_path / "a.json").write_text("old a")
    (tmp_path / "same.json").write_text("same")
    inode = (tmp_path / "same.json").stat().st_ino
    with pytest.raises(RuntimeError, match="killed"):
        with convert.write_atomically(str(tmp_path)) as tmp:
            Path(tmp, "a.json").write_text("new a")
            Path(tmp, "b.json").write_text("new b")
            raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["a.json", "same.json"]
    assert (tmp_path / "a.json").read_text() == "old a"
    stale = tmp_path / ".lomo_staging-left-by-a-killed-writer"
    stale.mkdir()
    (stale / "a.json").write_text("torn")
    order = []
    replace = os.replace
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", lambda a, b: (order.append(os.path.basename(b)), replace(a, b)))
        with convert.write_atomically(str(tmp_path), last=("a.json",)) as tmp:
            for name, text in (("a.json", "new a"), ("b.json", "new b"), ("same.json", "same")):
                Path(tmp, name).write_text(text)
    assert order == ["b.json", "a.json"]  # ``last`` last; the unchanged file not replaced
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.json", "same.json"]
    assert (tmp_path / "a.json").read_text() == "new a"
    assert (tmp_path / "same.json").stat().st_ino == inode
    with pytest.raises(ValueError, match=r"moves files only; \['sub'\]"):
        with convert.write_atomically(str(tmp_path)) as tmp:
            os.mkdir(os.path.join(tmp, "sub"))
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.json", "same.json"]


if __name__ == "__main__":
    if sys.argv[1] == "kill":
        _kill_worker(sys.argv[2])
    elif sys.argv[1] == "single":
        _single_worker(sys.argv[2])
    else:
        _rank_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
