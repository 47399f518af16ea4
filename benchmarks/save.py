"""Host memory of saving a checkpoint: peak RSS of ``convert.save_pretrained``.

Builds bf16 LLaMA params of about ``--gb`` GB (the config of
``benchmarks/load.py``) as jax arrays on the default device, then, in a fresh
process per mode, reports the peak resident memory above the resident memory
just before the save (``VmHWM`` reset just before, against ``VmRSS``):

* ``shards``: ``save_pretrained(params, cfg, dir, max_shard_size=500 MiB)``;
* ``one-file``: ``save_pretrained(params, cfg, dir)`` (one ``model.safetensors``).

On this CPU backend the params themselves are host memory but were resident
before the baseline; the rise is what the save adds. The streaming save holds
one tensor at a time (its device copy and its host copy), so the rise should
be about twice the largest tensor (the embedding), not the model.

Run:  python benchmarks/save.py            (2 GB; ~1 min on 2 CPU cores)
      python benchmarks/save.py --gb 0.5 --modes shards
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from load import ROOT, SHARD_BYTES, _reset_peak, _status_bytes, config  # benchmarks/load.py


def measure(gb: float, mode: str, path: str) -> dict:
    """In this process: make the params, save them in ``mode``; resident bytes before, peak."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp

    from lomo_jax.models import convert, llama

    cfg = config(gb)
    shapes = llama.param_shapes(cfg)
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(shapes))))
    params = jax.tree.map(lambda s: 0.02 * jax.random.normal(next(keys), s.shape, jnp.bfloat16),
                          shapes)
    jax.block_until_ready(params)
    cfg.to_hf()  # transformers' config classes (and torch): loaded by any caller before
    shard = SHARD_BYTES if mode == "shards" else None
    _reset_peak()
    before = _status_bytes("VmRSS")
    convert.save_pretrained(params, cfg, path, max_shard_size=shard)
    peak = _status_bytes("VmHWM")
    plan = convert._save_plan(params, cfg, None)
    return {"mode": mode, "before": before, "peak": peak,
            "params_bytes": sum(t.nbytes for t in plan),
            "largest_tensor": max(t.nbytes for t in plan),
            "files": len([f for f in os.listdir(path) if f.endswith(".safetensors")])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="model size to save")
    ap.add_argument("--modes", nargs="*", default=["shards", "one-file"],
                    choices=["shards", "one-file"])
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        return print(json.dumps(measure(args.gb, args.modes[0], args.measure)))

    print("| mode | files | model, GB | largest tensor, MB | peak RSS above the baseline, MB "
          "| ÷ largest tensor |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in args.modes:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, __file__, "--measure", tmp, "--gb", str(args.gb),
                                  "--modes", mode], capture_output=True, text=True, check=True,
                                 cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rise = r["peak"] - r["before"]
        print(f"| {mode} | {r['files']} | {r['params_bytes'] / 1e9:.2f} | "
              f"{r['largest_tensor'] / 1e6:.0f} | {rise / 1e6:.0f} | "
              f"{rise / r['largest_tensor']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
