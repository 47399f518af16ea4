"""A LoRA + AdaLomo fused step on 8 host-platform CPU devices vs one device.

Run by ``tests/jax/test_lora.py`` with ``cpu_devices_env(8, ...)``; prints one
``LORA_MESH {json}`` line, and the test makes the assertions. A tiny LLaMA with
adapters on q/v/down_proj takes ``N_STEPS`` fused steps
(``lora.optimizer(base=adalomo, adapters=adamw)``) on one device and on an
``fsdp=8`` mesh with every leaf split (``min_size=0, adapter_min_size=0``);
the specs with the default ``adapter_min_size`` are reported too.
"""

from __future__ import annotations

import json
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

N_STEPS = 2
ks = jax.tree_util.keystr


def _leaves(tree):
    return [(ks(k), v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _specs(tree):
    return {k: [list(e) if isinstance(e, tuple) else e for e in s.spec] for k, s in _leaves(tree)}


def _setup():
    cfg0 = llama.LlamaConfig(**TINY)
    cfg = cfg0.replace(lora=lora.LoraConfig(4, 8, ("q_proj", "v_proj", "down_proj")))
    params = lora.add_adapters(cfg, llama.init_params(cfg0, 0), rng=jax.random.key(7))
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(  # B != 0: the adapters matter from step 0
        lambda p, x: jnp.asarray(rng.normal(size=x.shape) * 0.1, x.dtype)
        if ks(p).endswith("['lora_b']") else x, params)
    tx = lora.optimizer(base=lomo_jax.adalomo(1e-2, weight_decay=0.01),
                        adapters=optax.adamw(1e-2, weight_decay=0.0))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 16)).astype(np.int32)
    return cfg, params, tx, {"input_ids": ids, "labels": ids}


def _run(step, p, s, batch):
    losses = []
    for _ in range(N_STEPS):
        p, s, m = step(p, s, batch)
        losses.append(float(m["loss"]))
    return jax.device_get((p, s)), losses


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


def main() -> dict:
    cfg, params, tx, batch = _setup()
    lm = models.layered_model(cfg)
    (ref_p, ref_s), ref_losses = _run(lomo_jax.fused_train_step(lm, tx),
                                      jax.tree.map(jnp.copy, params),
                                      lomo_jax.fused_init(tx, params), batch)

    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    sh = lsh.llama_shardings(cfg, mesh, tx, min_size=0, adapter_min_size=0)
    p = jax.device_put(params, sh.params)
    s = jax.jit(lambda q: lomo_jax.fused_init(tx, q), out_shardings=sh.opt_state)(p)
    step, b = lomo_jax.fused_train_step(lm, tx, shardings=sh), jax.device_put(batch, sh.batch)
    losses, bad = [], []
    for _ in range(N_STEPS):
        p, s, m = step(p, s, b)
        losses.append(float(m["loss"]))
        bad += [k for (k, x), (_, w) in zip(_leaves((p, s)), _leaves((sh.params, sh.opt_state)))
                if not x.sharding.is_equivalent_to(w, x.ndim)]
    got_p, got_s = jax.device_get((p, s))
    rel, not_close = _compare((ref_p, ref_s), (got_p, got_s))
    worst = max(rel.items(), key=lambda kv: kv[1])

    default = lsh.llama_shardings(cfg, mesh, tx, min_size=0)  # adapter_min_size: default
    moved = {k: bool(np.any(np.asarray(a) != np.asarray(b)))
             for (k, a), (_, b) in zip(_leaves(got_p), _leaves(params))}
    return {
        "devices": jax.device_count(),
        "worst_rel": worst[1], "worst": worst[0], "not_close": not_close,
        "compared": len(rel), "n_leaves": len(_leaves((ref_p, ref_s))),
        "ref_losses": ref_losses, "losses": losses,
        "adapters_moved": all(v for k, v in moved.items() if "lora" in k),
        "base_moved": all(v for k, v in moved.items() if "lora" not in k),
        "bad_shardings": bad,
        "split_specs": _specs(sh.params),
        "split_state_specs": _specs(sh.opt_state),
        "default_adapter_specs": _specs(default.params),
    }


if __name__ == "__main__":
    print("LORA_MESH " + json.dumps(main()), flush=True)
