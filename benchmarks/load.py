"""Host memory of loading a checkpoint: peak RSS of ``convert.load_pretrained``.

The script writes a bf16 LLaMA checkpoint of about ``--gb`` GB in
transformers' sharded safetensors layout (shard by shard, never the whole
model in memory), then loads it in a fresh process per mode and reports that
process's peak resident memory above its resident memory just before the
load (``VmHWM``, reset just before the load, against ``VmRSS``):

* ``jax``: ``load_pretrained(dir)`` -- arrays placed on the default device
  (on this CPU backend the arrays themselves are host memory, so the model's
  bytes count here; on a GPU they would not);
* ``numpy``: ``load_pretrained(dir, as_numpy=True)`` -- host arrays.

The goal (issue 15): peak <= the model's bytes / processes + one layer + 10%.

Run:  python benchmarks/load.py                  (2 GB; ~1 min on 2 CPU cores)
      python benchmarks/load.py --gb 0.3 --modes jax
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this checkout's lomo_jax, not an installed one
SHARD_BYTES = 500 * 2**20


def config(gb: float):
    """A LLaMA config (d=2048, GQA 16/4 heads, vocab 32000) with as many layers as
    make about ``gb`` GB in bf16 (at least 2)."""
    from lomo_jax.models import llama

    base = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    probe = llama.LlamaConfig(num_hidden_layers=1, **base)
    per_layer, rest = layer_bytes(probe), 2 * 2 * 32000 * 2048
    layers = max(2, round((gb * 1e9 - rest) / per_layer))
    return llama.LlamaConfig(num_hidden_layers=layers, **base)


def layer_bytes(cfg) -> int:
    """bf16 bytes of one decoder layer."""
    from lomo_jax.models import convert

    return 2 * sum(int(np.prod(s)) for n, s in convert.hf_parameter_shapes(cfg).items()
                   if n.startswith("model.layers.0."))


def write_checkpoint(cfg, path: str, shard_bytes: int = SHARD_BYTES) -> int:
    """Random bf16 weights (std 0.02) in ``path`` as transformers writes them:
    ``config.json``, shards and ``model.safetensors.index.json``; at most one
    shard in memory. Returns the weights' bytes."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from lomo_jax.models import convert

    os.makedirs(path, exist_ok=True)
    cfg.to_hf().save_pretrained(path)
    rng = np.random.default_rng(0)
    shapes = list(convert.hf_parameter_shapes(cfg).items())
    weight_map, shard, size = {}, {}, 0
    for name, shape in shapes:
        shard[name] = (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)
        size += shard[name].nbytes
        if size >= shard_bytes or name == shapes[-1][0]:
            fname = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in shard})
            shard, size = {}, 0
    total = 2 * sum(int(np.prod(s)) for _, s in shapes)
    with open(os.path.join(path, convert.SAFE_WEIGHTS_INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def _status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Start ``VmHWM`` afresh from the current resident size (Linux >= 4.0). Not
    ``ru_maxrss``: a child process's starts at its parent's peak (``execve``
    keeps the old address space's high-water mark)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(path: str, mode: str) -> dict:
    """In this process: load ``path`` in ``mode``; resident bytes before, peak."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from lomo_jax.models import convert

    # what any caller has loaded before (the backend, transformers' config classes,
    # flax) is not the loader's: up before the baseline
    import transformers

    from lomo_jax.models import llama

    jax.numpy.zeros(()).block_until_ready()
    llama.LlamaConfig.from_hf(transformers.AutoConfig.from_pretrained(path, local_files_only=True))
    _reset_peak()
    before = _status_bytes("VmRSS")
    _, params = convert.load_pretrained(path, as_numpy=(mode == "numpy"))
    jax.block_until_ready(params)
    peak = _status_bytes("VmHWM")
    nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
    return {"mode": mode, "before": before, "peak": peak, "params_bytes": int(nbytes)}


def measure_in_subprocess(path: str, mode: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", path, "--modes", mode],
                         capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="checkpoint size to write")
    ap.add_argument("--modes", nargs="*", default=["jax", "numpy"], choices=["jax", "numpy"])
    ap.add_argument("--dir", default=None, help="write (or reuse) the checkpoint here")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        return print(json.dumps(measure(args.measure, args.modes[0])))

    cfg = config(args.gb)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.dir or tmp
        total = write_checkpoint(cfg, path)
        one_layer = layer_bytes(cfg)
        bound = total + one_layer + 0.1 * total
        print(f"checkpoint: {total / 1e9:.2f} GB bf16, {cfg.num_hidden_layers} layers of "
              f"{one_layer / 1e6:.0f} MB, shards of {SHARD_BYTES / 2**20:.0f} MiB; "
              f"goal: peak <= model + one layer + 10% = {bound / 1e9:.2f} GB\n")
        print("| mode | peak RSS above the baseline, GB | ÷ checkpoint | within the goal |")
        print("|---|---:|---:|---|")
        for mode in args.modes:
            r = measure_in_subprocess(path, mode)
            rise = r["peak"] - r["before"]
            print(f"| {mode} | {rise / 1e9:.2f} | {rise / total:.2f} | "
                  f"{'yes' if rise <= bound else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
