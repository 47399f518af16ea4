"""Per-device memory of the fused AdaLomo step sharded FSDP-style over 1-8 devices.

Everything is compiled ahead of time on abstract ``jax.ShapeDtypeStruct``
inputs that carry their ``NamedSharding`` (nothing is allocated), on 8
host-platform CPU devices (``--xla_force_host_platform_device_count=8``, set
here before JAX starts), with the shardings of
:func:`lomo_jax.sharding.llama_shardings`: parameters and AdaLomo state split
over an ``fsdp`` mesh axis of 1, 2, 4, 8 devices, the batch split over the same
devices. The per-device batch is fixed (``--batch`` sequences of ``--seq``
tokens per device), so the global batch grows with the device count (weak
scaling): the parameter + state share of the memory should fall as ``1/n``
while the activation share stays put.

Columns are XLA's own per-device ``compiled.memory_analysis()`` (the SPMD
module is the per-device program):

* ``args``  = argument_size_in_bytes (this device's shards of params + state
  + its rows of the batch),
* ``temp``  = temp_size_in_bytes (activations, the saved layer inputs, the
  all-gathered layer being computed, collective buffers, ...),
* ``out``   = output_size_in_bytes, ``alias`` = alias_size_in_bytes (outputs
  written into the donated params/state),
* ``total`` = args + out + temp - alias.

The model is :mod:`lomo_jax.models.llama` itself (its ``LayeredModel``), not a
stand-in. As in ``benchmarks/memory.py``, XLA CPU's while-loop-invariant code
motion is disabled (it hoists an f32 upcast of every stacked bf16 weight out of
the layer loop, which a GPU never does), and LLVM's optimisation level is 0 to
shorten compiles (buffer assignment, hence every figure here, is decided on
HLO before LLVM runs).

Run:  python benchmarks/scaling.py            (prints a Markdown table)
      python benchmarks/scaling.py --sizes 1B 7B --dtypes float32 bfloat16
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_disable_hlo_passes=while-loop-invariant-code-motion"
    + " --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU runs all 8 devices' collectives on one pool; fewer threads than devices can
# deadlock: two per device (tests/jax/cpu_devices.py has the same rule).
os.environ["PJRT_NPROC"] = str(max(16, int(os.environ.get("PJRT_NPROC") or 0)))

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

import lomo_jax  # noqa: E402
from lomo_jax import sharding as lsh  # noqa: E402
from lomo_jax.models import llama  # noqa: E402

GIB = 1024**3

SIZES = {
    # LLaMA-architecture shapes: (layers, hidden, ffn, heads, kv heads, vocab)
    "1B": (22, 2048, 5632, 32, 4, 32000),  # TinyLlama-1.1B shapes
    "7B": (32, 4096, 11008, 32, 32, 32000),  # LLaMA-7B shapes
}


def config(size: str, dtype) -> llama.LlamaConfig:
    n_layers, d, f, h, kv, v = SIZES[size]
    return llama.LlamaConfig(
        vocab_size=v,
        hidden_size=d,
        intermediate_size=f,
        num_hidden_layers=n_layers,
        num_attention_heads=h,
        num_key_value_heads=kv,
        dtype=dtype,
        param_dtype=dtype,
    )


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def analyse(cfg, n_devices: int, batch: int, seq: int):
    mesh = jax.make_mesh(
        (n_devices,), ("fsdp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n_devices]
    )
    tx = lomo_jax.adalomo(1e-3)
    sh = lsh.llama_shardings(cfg, mesh, tx)
    params = lsh.abstract_like(sh.params, llama.param_shapes(cfg))
    state = lsh.abstract_like(
        sh.opt_state, jax.eval_shape(lambda p: lomo_jax.fused_init(tx, p), params)
    )
    tokens = {"input_ids": jax.ShapeDtypeStruct((batch * n_devices, seq), jnp.int32)}
    tokens = lsh.abstract_like(sh.batch, tokens)
    step = lomo_jax.fused_train_step(llama.llama_layered_model(cfg), tx, shardings=sh)
    mem = step.lower(params, state, tokens).compile().memory_analysis()
    return nbytes(params), nbytes(state), mem


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="*", default=["1B", "7B"], choices=list(SIZES))
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--devices", nargs="*", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--batch", type=int, default=1, help="sequences per device")
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()

    print("$ python " + " ".join(["benchmarks/scaling.py"] + sys.argv[1:]))
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} devices; "
          f"AdaLomo, fused step, FSDP over n devices, {args.batch} x {args.seq} tokens per device\n")
    print("| model | dtype | devices | global batch | params+state / device (ideal) "
          "| args | temp | out | alias | total | total x devices |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    t0 = time.time()
    for size in args.sizes:
        for dtype_name in args.dtypes:
            cfg = config(size, jnp.dtype(dtype_name))
            for n in args.devices:
                p_bytes, s_bytes, m = analyse(cfg, n, args.batch, args.seq)
                total = (m.argument_size_in_bytes + m.output_size_in_bytes
                         + m.temp_size_in_bytes - m.alias_size_in_bytes)
                g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
                print(f"| LLaMA-{size} | {dtype_name} | {n} | {args.batch * n} "
                      f"| {g((p_bytes + s_bytes) / n)} | {g(m.argument_size_in_bytes)} "
                      f"| {g(m.temp_size_in_bytes)} | {g(m.output_size_in_bytes)} "
                      f"| {g(m.alias_size_in_bytes)} | {g(total)} | {g(total * n)} |",
                      flush=True)
    print(f"\nGiB per device from compiled.memory_analysis(); compiled in {time.time() - t0:.0f} s.")


if __name__ == "__main__":
    main()
