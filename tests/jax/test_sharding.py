"""The fused step sharded FSDP-style over 8 CPU devices (lomo_jax.sharding).

The pytest process has already started JAX with one CPU device, and
``--xla_force_host_platform_device_count`` only acts before JAX starts, so the
8-device checks run in a subprocess: this file run as a script
(``python tests/jax/test_sharding.py DIR``) with ``XLA_FLAGS`` set, both cases
in one process (one import of JAX, one warm-up of its small programs; the
initial parameters come from this process, in ``DIR/params.pkl``). The
subprocess measures and prints one JSON line; the assertions are made here.

For each case a tiny LLaMA (:mod:`lomo_jax.models.llama`, every leaf split:
``min_size=0``) takes 3 steps on one device and 3 steps on each of two meshes,
``data=2 x fsdp=4`` and ``fsdp=8``, and we check that

* parameters, optimizer state and losses agree to 1e-5 (relative, per leaf):
  AdaLomo's row/column statistics and RMS, and the global norm of
  ``clip_grad_norm``, are reductions over split axes;
* every parameter/state array has exactly the intended ``NamedSharding``
  before and after the steps (and the compiled step's output shardings are
  those), each device holds a ``1/n`` slice of every split axis, and the
  split axes are the ones the rules promise (hand-written below);
* per device, ``memory_analysis().argument_size_in_bytes`` is exactly this
  device's shards of params + state + batch (``~1/n`` of the single-device
  figure) and ``alias_size_in_bytes`` is exactly its params + state: every
  output is written into its donated input; the donated inputs are deleted.

Compiles use ``QUICK_COMPILE_FLAGS`` (the same for the
single-device reference and the sharded steps) to keep this file fast.
"""

from __future__ import annotations

import json
import math
import pickle
import sys
import time
from pathlib import Path

import pytest

from tests.jax.cpu_devices import run_json
from tests.once_per_run import once_per_run
from tests.jax.tiny_llama import TINY

N_DEVICES = 8
MARK = "SHARDING_RESULT "
MESHES = {"data2_fsdp4": ((2, 4), ("data", "fsdp")), "fsdp8": ((8,), ("fsdp",))}
CASES = ("adalomo", "lomo_clip_tied")
N_STEPS = 3
RTOL = 1e-5


def _case(case: str):
    """``(LlamaConfig, transform, fused_train_step keywords)`` of a case."""
    import lomo_jax
    from lomo_jax.models import llama

    if case == "adalomo":
        return llama.LlamaConfig(**TINY), lomo_jax.adalomo(1e-2, weight_decay=0.01), {}
    if case == "lomo_clip_tied":
        return (llama.LlamaConfig(**TINY, tie_word_embeddings=True),
                lomo_jax.lomo(0.1, weight_decay=0.01), {"clip_grad_norm": 0.5})
    raise ValueError(case)


# --------------------------------------------------------------------------
# The subprocess (8 devices)
# --------------------------------------------------------------------------


def _spec_list(sharding, ndim):
    spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def _worker(case: str, params: dict) -> dict:
    """The measurements of one case, from ``params`` (numpy) on one device and each mesh."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType

    import lomo_jax
    from lomo_jax import sharding as lsh
    from lomo_jax.models import llama

    assert jax.device_count() == N_DEVICES, jax.devices()
    ks = jax.tree_util.keystr

    cfg, tx, kw = _case(case)
    lm = llama.llama_layered_model(cfg)
    rng = np.random.default_rng(0)
    mask = np.ones((8, 16), np.int32)
    mask[1, :5] = 0  # left padding in one row
    batch = {
        "input_ids": rng.integers(0, cfg.vocab_size, (8, 16)).astype(np.int32),
        "attention_mask": mask,
    }
    p_abs = llama.param_shapes(cfg)
    s_abs = jax.eval_shape(lambda p: lomo_jax.fused_init(tx, p), p_abs)
    b_abs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)

    def leaves(tree):
        return [(ks(k), v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]]

    def nbytes(x, shape=None):
        return math.prod(x.shape if shape is None else shape) * jnp.dtype(x.dtype).itemsize

    def mem(compiled):
        m = compiled.memory_analysis()
        return {
            "args": m.argument_size_in_bytes,
            "out": m.output_size_in_bytes,
            "alias": m.alias_size_in_bytes,
            "temp": m.temp_size_in_bytes,
        }

    def run(compiled, p, s, b):
        losses, norms = [], []
        for _ in range(N_STEPS):
            old = jax.tree.leaves((p, s))
            p, s, m = compiled(p, s, b)
            losses.append(float(m["loss"]))
            if "grad_norm" in m:
                norms.append(float(m["grad_norm"]))
            deleted = all(x.is_deleted() for x in old)
        return p, s, losses, norms, deleted

    t0 = time.time()
    ref = lomo_jax.fused_train_step(lm, tx, **kw).lower(p_abs, s_abs, b_abs).compile()
    p1 = jax.tree.map(jnp.copy, params)
    p1, s1, ref_losses, ref_norms, _ = run(ref, p1, lomo_jax.fused_init(tx, p1), batch)
    ref_p, ref_s = jax.device_get((p1, s1))
    out = {"ref": {"mem": mem(ref), "losses": ref_losses, "norms": ref_norms,
                   "params_state_bytes": sum(nbytes(x) for x in jax.tree.leaves((p_abs, s_abs))),
                   "seconds": time.time() - t0},
           "meshes": {}}

    for name, (shape, names) in MESHES.items():
        t0 = time.time()
        mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
        sh = lsh.llama_shardings(cfg, mesh, tx, min_size=0)
        step = lomo_jax.fused_train_step(lm, tx, shardings=sh, **kw)
        compiled = step.lower(
            lsh.abstract_like(sh.params, p_abs),
            lsh.abstract_like(sh.opt_state, s_abs),
            lsh.abstract_like(sh.batch, b_abs),
        ).compile()

        p = jax.device_put(params, sh.params)
        s = jax.jit(lambda q: lomo_jax.fused_init(tx, q), out_shardings=sh.opt_state)(p)
        b = jax.device_put(batch, sh.batch)
        want = sh.params, sh.opt_state
        bad_before = [k for (k, x), (_, w) in zip(leaves((p, s)), leaves(want)) if x.sharding != w]
        p, s, losses, norms, deleted = run(compiled, p, s, b)
        bad_after = [k for (k, x), (_, w) in zip(leaves((p, s)), leaves(want)) if x.sharding != w]
        bad_compiled = [
            k for (k, c), w, x in zip(leaves(compiled.output_shardings[:2]),
                                      jax.tree.leaves(want), jax.tree.leaves((p_abs, s_abs)))
            if not c.is_equivalent_to(w, x.ndim)
        ]

        # Each device holds a 1/n slice of every split axis, and n distinct slices exist.
        bad_shards = []
        shard_bytes = 0
        for (k, x), (_, w) in zip(leaves((p, s)), leaves(want)):
            spec = _spec_list(w, x.ndim)
            expect = tuple(
                d if e is None else d // math.prod(mesh.shape[a] for a in ([e] if isinstance(e, str) else e))
                for d, e in zip(x.shape, spec)
            )
            n_split = math.prod(x.shape) // max(math.prod(expect), 1) if math.prod(expect) else 1
            shapes = {sd.data.shape for sd in x.addressable_shards}
            distinct = {tuple((i.start, i.stop) for i in sd.index) for sd in x.addressable_shards}
            if shapes != {expect} or len(x.addressable_shards) != N_DEVICES or (
                math.prod(x.shape) and len(distinct) != n_split
            ):
                bad_shards.append(f"{k}: {x.shape} {spec} -> {shapes}, {len(distinct)} distinct")
            shard_bytes += nbytes(x, expect)
        batch_bytes = sum(nbytes(x, sh.batch.shard_shape(x.shape)) for x in jax.tree.leaves(b_abs))

        got_p, got_s = jax.device_get((p, s))
        rel, not_close = {}, {}
        for (k, a), (_, g) in zip(leaves((ref_p, ref_s)), leaves((got_p, got_s))):
            a64, g64 = np.asarray(a, np.float64), np.asarray(g, np.float64)
            scale = np.max(np.abs(a64), initial=0.0)
            err = np.max(np.abs(a64 - g64), initial=0.0)
            rel[k] = 0.0 if err == 0 else float(err / max(scale, 1e-30))
            # and elementwise: |got - ref| <= 1e-5 |ref| + 1e-7
            if not np.allclose(g64, a64, rtol=1e-5, atol=1e-7):
                not_close[k] = float(np.max(np.abs(g64 - a64) / (np.abs(a64) + 1e-7)))
        moved = float(sum(
            np.sum(np.abs(np.asarray(a, np.float64) - np.asarray(x, np.float64)))
            for a, x in zip(jax.tree.leaves(ref_p), jax.tree.leaves(params))
        ))
        out["meshes"][name] = {
            "n_fsdp": mesh.shape["fsdp"],
            "rel": rel,
            "not_close": not_close,
            "moved": moved,
            "losses": losses,
            "norms": norms,
            "deleted": deleted,
            "bad_before": bad_before,
            "bad_after": bad_after,
            "bad_compiled": bad_compiled,
            "bad_shards": bad_shards,
            "expect_args": shard_bytes + batch_bytes,
            "expect_alias": shard_bytes,
            "mem": mem(compiled),
            "param_specs": {k: _spec_list(w, len(x.shape)) for (k, x), (_, w)
                            in zip(leaves(p_abs), leaves(sh.params))},
            "state_specs": {k: _spec_list(w, len(x.shape)) for (k, x), (_, w)
                            in zip(leaves(s_abs), leaves(sh.opt_state))},
            "batch_spec": _spec_list(sh.batch, 1),
            "default_min_size_split": sorted({
                str(e)
                for w in jax.tree.leaves(tuple(lsh.llama_shardings(cfg, mesh, tx))[:2])
                for e in w.spec if e is not None
            }),
            "seconds": time.time() - t0,
        }

    # The state rule on a transform whose state is shaped like the params (AdamW).
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    adamw = optax.adamw(1e-3)
    a_sh = lsh.llama_shardings(cfg, mesh, adamw, min_size=0)
    mu = a_sh.opt_state.layers.inner_state[0].mu
    out["adamw_mu_follows_params"] = jax.tree.all(
        jax.tree.map(lambda m, q: m == q, mu, a_sh.params["layers"])
    )
    try:
        lsh.llama_shardings(cfg, jax.make_mesh((8,), ("fsdp",)), tx)  # Explicit axes
        out["explicit_error"] = None
    except ValueError as e:
        out["explicit_error"] = str(e)
    return out


# --------------------------------------------------------------------------
# The tests (one subprocess for both cases, once per test run)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """``{case: measurements}`` from one 8-device subprocess (once per test run)."""

    def compute(directory):
        import jax
        import numpy as np

        from lomo_jax.models import llama

        params = {case: jax.tree.map(np.asarray, llama.init_params(_case(case)[0], 0))
                  for case in CASES}
        (directory / "params.pkl").write_bytes(pickle.dumps(params))
        return run_json([str(Path(__file__).resolve()), str(directory)], MARK, N_DEVICES)

    return once_per_run(tmp_path_factory, "sharding", compute)[1]


L_ = ".layers.inner_state[0]"
# Hand-written: for layer leaves the first (most major) non-layer axis divisible
# by the fsdp size (so one layer's all-gather needs no transpose of the stack);
# the embedding and the LM head their smallest (the model dimension D, so a
# vocabulary chunk is a local slice); others the largest; AdaLomo's v_row keeps axes [:-1], v_col
# axes [:-2] + [-1:], so a square kernel split on rows has a split v_row and a
# replicated v_col.
EXPECTED_PARAM_SPECS = {
    "['embed']['embedding']": [None, "fsdp"],
    "['layers']['self_attn']['q_proj']['kernel']": [None, "fsdp", None],
    "['layers']['self_attn']['k_proj']['kernel']": [None, "fsdp", None],
    "['layers']['self_attn']['o_proj']['kernel']": [None, "fsdp", None],
    "['layers']['mlp']['gate_proj']['kernel']": [None, "fsdp", None],
    "['layers']['mlp']['down_proj']['kernel']": [None, "fsdp", None],
    "['layers']['input_layernorm']['scale']": [None, "fsdp"],
    "['head']['norm']": ["fsdp"],
}
EXPECTED_ADALOMO_STATE_SPECS = {
    ".embed[0].count": [],
    ".embed[0].v_row['embedding']": [None],
    ".embed[0].v_col['embedding']": ["fsdp"],
    f"{L_}.count": [None],
    f"{L_}.v_row['self_attn']['q_proj']['kernel']": [None, "fsdp"],
    f"{L_}.v_col['self_attn']['q_proj']['kernel']": [None, None],
    f"{L_}.v_row['mlp']['gate_proj']['kernel']": [None, "fsdp"],
    f"{L_}.v_col['mlp']['gate_proj']['kernel']": [None, None],
    f"{L_}.v_row['mlp']['down_proj']['kernel']": [None, "fsdp"],
    f"{L_}.v_col['mlp']['down_proj']['kernel']": [None, None],
    f"{L_}.v['input_layernorm']['scale']": [None, "fsdp"],
    f"{L_}.v_row['input_layernorm']['scale']": [None, None],
    ".head[0].v_row['lm_head']": ["fsdp"],
    ".head[0].v_col['lm_head']": [None],
    ".head[0].v['norm']": ["fsdp"],
}


def _check(res: dict, *, clip: bool, state_specs=None):
    ref = res["ref"]
    for name, r in res["meshes"].items():
        n = r["n_fsdp"]
        where = f"[{name}]"
        # -- the same numbers as one device --------------------------------
        assert r["moved"] > 0, where
        worst = max(r["rel"].items(), key=lambda kv: kv[1])
        assert worst[1] <= RTOL, f"{where} {worst[0]}: relative error {worst[1]:.2e}"
        assert len(r["rel"]) >= len(r["param_specs"]), where  # every leaf compared
        assert r["not_close"] == {}, f"{where} not elementwise within 1e-5: {r['not_close']}"
        for a, b in zip(ref["losses"], r["losses"], strict=True):
            assert abs(a - b) <= RTOL * abs(a), (where, ref["losses"], r["losses"])
        assert ref["losses"][-1] < ref["losses"][0], ref["losses"]
        if clip:
            assert len(r["norms"]) == N_STEPS
            assert min(ref["norms"]) > 0.5, ref["norms"]  # the clip is active
            for a, b in zip(ref["norms"], r["norms"], strict=True):
                assert abs(a - b) <= RTOL * abs(a), (where, ref["norms"], r["norms"])
        # -- the intended shardings, kept by the step -----------------------
        assert r["bad_before"] == [] and r["bad_after"] == [], where
        assert r["bad_compiled"] == [], where
        assert r["bad_shards"] == [], where
        for k, spec in EXPECTED_PARAM_SPECS.items():
            if k in r["param_specs"]:
                assert r["param_specs"][k] == spec, (where, k, r["param_specs"][k])
        for k, spec in (state_specs or {}).items():
            assert r["state_specs"][k] == spec, (where, k, r["state_specs"][k])
        axes = MESHES[name][1]  # the batch is split over every mesh axis
        assert r["batch_spec"] == [axes[0] if len(axes) == 1 else list(axes)], r["batch_spec"]
        # the default min_size replicates this tiny model's leaves
        assert r["default_min_size_split"] == [], r["default_min_size_split"]
        # -- per-device memory: only this device's shards, updated in place --
        m, m1 = r["mem"], ref["mem"]
        assert m["args"] == r["expect_args"], (where, m, r["expect_args"])
        assert m["alias"] == r["expect_alias"], (where, m, r["expect_alias"])
        assert m1["alias"] == ref["params_state_bytes"], m1
        assert m1["args"] / m["args"] >= 0.9 * n, (where, m1["args"], m["args"], n)
        assert m1["alias"] / m["alias"] >= 0.9 * n, (where, m1["alias"], m["alias"], n)
        assert r["deleted"], where


def test_adalomo_sharded_step_matches_single_device(results):
    res = results["adalomo"]
    _check(res, clip=False, state_specs=EXPECTED_ADALOMO_STATE_SPECS)
    assert res["adamw_mu_follows_params"]
    assert res["explicit_error"] is not None and "Auto" in res["explicit_error"]


def test_lomo_clip_tied_sharded_step_matches_single_device(results):
    res = results["lomo_clip_tied"]
    _check(res, clip=True)
    for r in res["meshes"].values():
        assert "['head']['lm_head']" not in r["param_specs"]  # tied: no LM head


def test_explicit_mesh_and_bad_shardings_are_refused():
    import jax

    import lomo_jax
    from lomo_jax import sharding as lsh
    from lomo_jax.models import llama

    cfg = llama.LlamaConfig(**TINY)
    tx = lomo_jax.adalomo(1e-3)
    with pytest.raises(ValueError, match="Auto"):
        lsh.llama_shardings(cfg, jax.make_mesh((1,), ("fsdp",)), tx)
    auto = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match="no axis 'model'"):
        lsh.param_shardings(llama.param_shapes(cfg), auto, fsdp_axis="model")
    with pytest.raises(TypeError, match=r"\(params, opt_state, batch\)"):
        lomo_jax.fused_train_step(llama.llama_layered_model(cfg), tx, shardings=(1, 2))


if __name__ == "__main__":
    initial = pickle.loads((Path(sys.argv[1]) / "params.pkl").read_bytes())
    print(MARK + json.dumps({case: _worker(case, initial[case]) for case in CASES}), flush=True)
