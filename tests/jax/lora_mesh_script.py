"""A LoRA + AdaLomo fused step on 8 host-platform CPU devices vs one device.

A tiny LLaMA with adapters on q/v/down_proj (:func:`initial_params`) takes
``N_STEPS`` fused steps (``lora.optimizer(base=adalomo, adapters=adamw)``,
:func:`batches`). :func:`one_device_run` makes them on one device, in the test
process (``tests/jax/test_lora.py``, which also checks them against the unfused
step), and pickles the result; this script, run by the test with
``cpu_devices_env(8, ...)`` as ``python tests/jax/lora_mesh_script.py RUN``,
makes them on an ``fsdp=8`` mesh with every leaf split (``min_size=0,
adapter_min_size=0``), compares, and prints one ``LORA_MESH {json}`` line; the
test makes the assertions. The specs with the default ``adapter_min_size`` are
reported too.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

import lomo_jax  # noqa: E402
from lomo_jax import models  # noqa: E402
from lomo_jax import sharding as lsh  # noqa: E402
from lomo_jax.models import llama, lora  # noqa: E402
from tests.jax.tiny_llama import TINY  # noqa: E402

N_STEPS = 3
ks = jax.tree_util.keystr


def _leaves(tree):
    return [(ks(k), v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _specs(tree):
    return {k: [list(e) if isinstance(e, tuple) else e for e in s.spec] for k, s in _leaves(tree)}


def config():
    """The base model's config and the adapted one."""
    cfg0 = llama.LlamaConfig(**TINY)
    return cfg0, cfg0.replace(lora=lora.LoraConfig(4, 8, ("q_proj", "v_proj", "down_proj")))


def transform():
    return lora.optimizer(base=lomo_jax.adalomo(1e-2, weight_decay=0.01),
                          adapters=optax.adamw(1e-2, weight_decay=0.0))


def initial_params() -> dict:
    """The base model's and the adapters' initial values (numpy)."""
    cfg0, cfg = config()
    params = lora.add_adapters(cfg, llama.init_params(cfg0, 0), rng=jax.random.key(7))
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(  # B != 0: the adapters matter from step 0
        lambda p, x: jnp.asarray(rng.normal(size=x.shape) * 0.1, x.dtype)
        if ks(p).endswith("['lora_b']") else x, params)
    return jax.tree.map(np.asarray, params)


def batches() -> list:
    """One batch per step: 8 rows (one per device of the mesh) of 16 tokens."""
    out = []
    for i in range(N_STEPS):
        ids = np.random.default_rng(i).integers(0, TINY["vocab_size"], (8, 16)).astype(np.int32)
        out.append({"input_ids": ids, "labels": ids})
    return out


def one_device_run() -> dict:
    """``initial`` params, and after the fused steps on one device the ``params``,
    ``state`` (numpy) and the ``losses``."""
    cfg, tx, initial = config()[1], transform(), initial_params()
    step = lomo_jax.fused_train_step(models.layered_model(cfg), tx)
    p, s, losses = jax.tree.map(jnp.asarray, initial), lomo_jax.fused_init(tx, initial), []
    for batch in batches():
        p, s, m = step(p, s, batch)
        losses.append(float(m["loss"]))
    params, state = jax.device_get((p, s))
    return {"initial": initial, "params": params, "state": state, "losses": losses}


def _compare(ref, got):
    """Per leaf: max |got - ref| / max |ref| and the leaves not elementwise within 1e-5."""
    rel, not_close = {}, {}
    for (k, a), (_, g) in zip(_leaves(ref), _leaves(got), strict=True):
        a64, g64 = np.asarray(a, np.float64), np.asarray(g, np.float64)
        err = np.max(np.abs(a64 - g64), initial=0.0)
        rel[k] = 0.0 if err == 0 else float(err / max(np.max(np.abs(a64)), 1e-30))
        if not np.allclose(g64, a64, rtol=1e-5, atol=1e-7):
            not_close[k] = float(np.max(np.abs(g64 - a64) / (np.abs(a64) + 1e-7)))
    return rel, not_close


def main(run_file: str) -> dict:
    ref = pickle.loads(Path(run_file).read_bytes())  # one_device_run()'s
    cfg, tx, params = config()[1], transform(), ref["initial"]
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    sh = lsh.llama_shardings(cfg, mesh, tx, min_size=0, adapter_min_size=0)
    p = jax.device_put(params, sh.params)
    s = jax.jit(lambda q: lomo_jax.fused_init(tx, q), out_shardings=sh.opt_state)(p)
    step = lomo_jax.fused_train_step(models.layered_model(cfg), tx, shardings=sh)
    losses, bad = [], []
    for batch in batches():
        p, s, m = step(p, s, jax.device_put(batch, sh.batch))
        losses.append(float(m["loss"]))
        bad += [k for (k, x), (_, w) in zip(_leaves((p, s)), _leaves((sh.params, sh.opt_state)))
                if not x.sharding.is_equivalent_to(w, x.ndim)]
    got_p, got_s = jax.device_get((p, s))
    rel, not_close = _compare((ref["params"], ref["state"]), (got_p, got_s))
    worst = max(rel.items(), key=lambda kv: kv[1])

    default = lsh.llama_shardings(cfg, mesh, tx, min_size=0)  # adapter_min_size: default
    moved = {k: bool(np.any(np.asarray(a) != np.asarray(b)))
             for (k, a), (_, b) in zip(_leaves(got_p), _leaves(params))}
    return {
        "devices": jax.device_count(),
        "worst_rel": worst[1], "worst": worst[0], "not_close": not_close,
        "compared": len(rel), "n_leaves": len(_leaves((ref["params"], ref["state"]))),
        "ref_losses": ref["losses"], "losses": losses,
        "adapters_moved": all(v for k, v in moved.items() if "lora" in k),
        "base_moved": all(v for k, v in moved.items() if "lora" not in k),
        "bad_shardings": bad,
        "split_specs": _specs(sh.params),
        "split_state_specs": _specs(sh.opt_state),
        "default_adapter_specs": _specs(default.params),
    }


if __name__ == "__main__":
    print("LORA_MESH " + json.dumps(main(sys.argv[1])), flush=True)
