"""The sharded fused step across two JAX processes ("hosts"), as on a real cluster.

Two worker processes on this machine each start JAX with 4 CPU devices and
join one computation with ``jax.distributed.initialize`` (coordinator on
127.0.0.1, gloo collectives between the processes): 8 devices in all, a
``data=2 x fsdp=4`` mesh whose ``data`` axis spans the processes. Each process
builds only its half of every global batch (``jax.make_array_from_process_local_data``),
and its shards of the parameters and state; the step is the same
``lomo_jax.fused_train_step(..., shardings=lomo_jax.sharding.llama_shardings(...))``
as on one host.

Checked here, against a single-device run of the same steps in the test
process: parameters, optimizer state, losses and gradient norms agree
elementwise to 1e-5 relative; every array spans both processes (not fully
addressable) and each process holds only its 4 devices' shards; shardings are
kept and the donated inputs are deleted after every step (in place).

This file is also the worker: ``python tests/jax/test_multihost.py RANK PORT OUT``;
the initial parameters are the test process's, ``OUT/params.pkl``.
"""

from __future__ import annotations

import concurrent.futures
import json
import pickle
import sys
from pathlib import Path

import numpy as np

from tests.jax.cpu_devices import join_processes, run_processes
from tests.jax.tiny_llama import TINY

N_PROCESSES, LOCAL_DEVICES, N_STEPS = 2, 4, 3
GLOBAL_BATCH, SEQ = 8, 16


def _setup(out: Path):
    """Model, transform, initial params (``out/params.pkl``) and the global batches
    (the same in every process)."""
    import lomo_jax
    from lomo_jax.models import llama

    cfg = llama.LlamaConfig(**TINY)
    tx = lomo_jax.adalomo(1e-2, weight_decay=0.01)
    params = pickle.loads((out / "params.pkl").read_bytes())
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(N_STEPS):
        mask = np.ones((GLOBAL_BATCH, SEQ), np.int32)
        mask[1, :5] = 0  # left padding in one row
        batches.append({
            "input_ids": rng.integers(0, cfg.vocab_size, (GLOBAL_BATCH, SEQ)).astype(np.int32),
            "attention_mask": mask,
        })
    return cfg, tx, params, batches


def _worker(rank: int, port: int, out: Path) -> None:
    join_processes(rank, port, N_PROCESSES, LOCAL_DEVICES)
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType

    import lomo_jax
    from lomo_jax import sharding as lsh
    from lomo_jax.models import llama

    assert jax.process_count() == N_PROCESSES and jax.device_count() == 8
    cfg, tx, params, batches = _setup(out)
    lm = llama.llama_layered_model(cfg)
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    sh = lsh.llama_shardings(cfg, mesh, tx, min_size=0)
    step = lomo_jax.fused_train_step(lm, tx, clip_grad_norm=0.5, shardings=sh)

    def to_global(tree, shardings):  # every process holds the whole host value
        return jax.tree.map(
            lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: np.asarray(x)[idx]),
            tree, shardings)

    p = to_global(params, sh.params)
    s = jax.jit(lambda q: lomo_jax.fused_init(tx, q), out_shardings=sh.opt_state)(p)
    local_devices = set(jax.local_devices())
    report = {"losses": [], "norms": [], "deleted": [], "kept_sharding": [],
              "fully_addressable": [], "only_local_shards": [], "batch_ok": []}
    rows = GLOBAL_BATCH // N_PROCESSES
    for batch in batches:
        # this process's half of the global batch: its rows of the data axis
        local = {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}
        b = jax.tree.map(lambda x, s_: jax.make_array_from_process_local_data(s_, x),
                         local, {k: sh.batch for k in local})
        gathered = multihost_utils.process_allgather(b, tiled=True)
        report["batch_ok"].append(all(np.array_equal(gathered[k], batch[k]) for k in batch))
        old = jax.tree.leaves((p, s))
        p, s, metrics = step(p, s, b)
        report["losses"].append(float(metrics["loss"]))
        report["norms"].append(float(metrics["grad_norm"]))
        report["deleted"].append(all(x.is_deleted() for x in old))
        new = jax.tree.leaves((p, s))
        want = jax.tree.leaves((sh.params, sh.opt_state))
        report["kept_sharding"].append(all(x.sharding == w for x, w in zip(new, want)))
        report["fully_addressable"].append(any(x.is_fully_addressable for x in new if x.size > 1))
        report["only_local_shards"].append(all(
            {sh_.device for sh_ in x.addressable_shards} <= local_devices for x in new))
    final = multihost_utils.process_allgather((p, s), tiled=True)
    if rank == 0:
        leaves, _ = jax.tree_util.tree_flatten_with_path(final)
        np.savez(out / "final.npz", **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})
    (out / f"report{rank}.json").write_text(json.dumps(report))
    jax.distributed.shutdown()


def _reference(out: Path):
    """The same steps on one device in this process."""
    import jax

    import lomo_jax
    from lomo_jax.models import llama

    cfg, tx, params, batches = _setup(out)
    step = lomo_jax.fused_train_step(llama.llama_layered_model(cfg), tx, clip_grad_norm=0.5)
    p = jax.tree.map(np.asarray, params)
    s = lomo_jax.fused_init(tx, p)
    losses, norms = [], []
    for batch in batches:
        p, s, metrics = step(p, s, batch)
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get((p, s)))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}, losses, norms


def test_two_process_sharded_step_matches_single_device(tmp_path):
    import jax

    from lomo_jax.models import llama

    params0 = jax.tree.map(np.asarray, llama.init_params(llama.LlamaConfig(**TINY), 0))
    (tmp_path / "params.pkl").write_bytes(pickle.dumps(params0))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the reference while they run
        workers = pool.submit(run_processes, Path(__file__).resolve(), N_PROCESSES, str(tmp_path))
        ref, ref_losses, ref_norms = _reference(tmp_path)
        workers.result()
    got = dict(np.load(tmp_path / "final.npz"))
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-7, err_msg=k)
    initial = {k: v for k, v in ref.items() if k.startswith("[0]")}
    start = {"[0]" + jax.tree_util.keystr(k): np.asarray(v)
             for k, v in jax.tree_util.tree_flatten_with_path(params0)[0]}
    assert start.keys() == initial.keys()
    assert all(not np.array_equal(start[k], initial[k]) for k in start), "a parameter never moved"
    for rank in range(N_PROCESSES):
        r = json.loads((tmp_path / f"report{rank}.json").read_text())
        np.testing.assert_allclose(r["losses"], ref_losses, rtol=1e-5)
        np.testing.assert_allclose(r["norms"], ref_norms, rtol=1e-5)
        assert max(ref_norms) > 0.5, "clip_grad_norm=0.5 should clip at least once"
        assert all(r["batch_ok"]), "make_array_from_process_local_data built another batch"
        assert all(r["deleted"]), "donated params/state were not consumed (not in place)"
        assert all(r["kept_sharding"]), "an output left its input's sharding"
        assert not any(r["fully_addressable"]), "an array did not span both processes"
        assert all(r["only_local_shards"]), "a process held another process's shards"


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
