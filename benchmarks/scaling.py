"""The LOMO paper's multi-GPU table, compiled: memory, FLOPs and collectives per device.

The LOMO paper (Lv et al. 2023, arXiv 2306.09782, Table 2) fine-tunes LLaMA-7B
on 1 GPU, 13B on 2, 30B on 4 and 65B on 8 (RTX 3090, 24 GB, one 1024-token
sequence per GPU) and reports memory per GPU and TGS (tokens per GPU per
second). Here the same models (``lomo_jax.models.llama``, bf16) are compiled
for the same device counts, FSDP over an ``fsdp`` mesh axis
(:func:`lomo_jax.sharding.llama_shardings`), one sequence per device, on
abstract inputs (nothing is allocated), plus Llama-3-70B (vocabulary 128256,
GQA) on 8 devices at 1024 and 4096 tokens per device.

Per device, for the fused step with LOMO and with AdaLomo + ``clip_grad_norm=1``:

* ``memory``: arguments + outputs + temporaries - aliased, GiB, from
  ``compiled.memory_analysis()`` (buffers only; a real card adds the CUDA
  context, library workspaces and allocator slack: keep >= 2 GiB free);
* ``TFLOP``: matrix-product FLOPs of one step, counted in the compiled HLO
  through the loops (:func:`lomo_jax.hlo_cost.matmul_flops`; XLA's own
  ``cost_analysis()`` counts each loop body once);
* ``sent``: bytes this device sends in the step's collectives, GiB
  (:func:`lomo_jax.hlo_cost.bytes_sent`, ring algorithms);
* ``host``: bytes copied between this device and host memory per step, GiB
  (:func:`lomo_jax.hlo_cost.host_bytes`; only the ``offload`` method, which
  keeps the saved layer inputs in pinned host memory, has any);
* ``bound TGS``: tokens per device per second that the step cannot exceed on
  the target: ``tokens / max(FLOPs / peak, sent / link, host / host link)``,
  with the target's published dense bf16 peak, per-direction link and host
  link bandwidths (below; each resource counted as if alone, so that on an
  RTX 4090, whose collectives and host copies share PCIe, it is looser). It is a
  bound, not a measurement: it ignores memory traffic, kernel efficiency
  (often 40-60% of peak) and any overlap that is not perfect.

Targets (``--target``): ``rtx4090`` (165 TFLOP/s bf16 with fp32 accumulation,
PCIe 4.0 x16 at 32 GB/s per direction, for collectives and host copies alike:
consumer cards have no NVLink) and ``h100`` (H100 SXM: 989 TFLOP/s, NVLink 4 at
450 GB/s per direction, PCIe 5.0 x16 to the host at 64 GB/s) compile
for that GPU without one (needs the CUDA plugin, ``pip install
"lomo-jax[gpu-aot]"``); ``cpu`` compiles for 8 host devices of this machine
(XLA:CPU's bf16 figures include f32 weight copies no GPU makes; no bound).

Run:  python benchmarks/scaling.py --target rtx4090        (~10 min on 2 cores)
      python benchmarks/scaling.py --target h100 --rows 7b-1 70b-8x4096
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _targets import target_from  # noqa: E402 (benchmarks/, no JAX)

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin compiles without a GPU
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if target_from(sys.argv[1:], "rtx4090") == "cpu":  # 8 host devices, before JAX starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8"
                               + " --xla_disable_hlo_passes=while-loop-invariant-code-motion")
    os.environ["PJRT_NPROC"] = str(max(16, int(os.environ.get("PJRT_NPROC") or 0)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

import lomo_jax  # noqa: E402
from lomo_jax import aot, hlo_cost  # noqa: E402
from lomo_jax import sharding as lsh  # noqa: E402
from lomo_jax.models import llama  # noqa: E402

GIB = 1024**3
BF16 = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


def _llama(layers, d, ffn, heads, kv=None, vocab=32000, **kw):
    return llama.LlamaConfig(vocab_size=vocab, num_hidden_layers=layers, hidden_size=d,
                             intermediate_size=ffn, num_attention_heads=heads,
                             num_key_value_heads=kv or heads, **kw, **BF16)


MODELS = {
    "LLaMA-7B": _llama(32, 4096, 11008, 32),
    "LLaMA-13B": _llama(40, 5120, 13824, 40),
    "LLaMA-30B": _llama(60, 6656, 17920, 52),
    "LLaMA-65B": _llama(80, 8192, 22016, 64),
    "Llama-3-70B": _llama(80, 8192, 28672, 64, kv=8, vocab=128256, rope_theta=500000.0),
    "tiny": _llama(2, 256, 512, 4, vocab=1024),  # seconds to compile (smoke test)
}
# row: (model, devices, tokens per device, paper's LOMO memory GB, paper's TGS)
ROWS = {
    "7b-1": ("LLaMA-7B", 1, 1024, 13.61, 769.92),
    "13b-2": ("LLaMA-13B", 2, 1024, 15.92, 66.19),
    "30b-4": ("LLaMA-30B", 4, 1024, 19.78, 11.61),
    "65b-8": ("LLaMA-65B", 8, 1024, 19.18, 4.93),
    "70b-8": ("Llama-3-70B", 8, 1024, None, None),
    "70b-8x4096": ("Llama-3-70B", 8, 4096, None, None),
    "tiny-8": ("tiny", 8, 64, None, None),
}
DEFAULT_ROWS = [r for r in ROWS if r != "tiny-8"]
METHODS = {  # name: (transform, fused_train_step keywords)
    "LOMO": (lambda: lomo_jax.lomo(1e-5), {}),
    "AdaLomo, clip 1.0": (lambda: lomo_jax.adalomo(1e-5), {"clip_grad_norm": 1.0}),
    "AdaLomo, clip 1.0, offload": (lambda: lomo_jax.adalomo(1e-5),
                                   {"clip_grad_norm": 1.0, "offload_saved_inputs": True}),
}
# (dense bf16 FLOP/s, link and host-link bytes/s per direction) as published
TARGETS = {"rtx4090": (165.2e12, 32e9, 32e9), "h100": (989.4e12, 450e9, 64e9)}


def mesh_for(target: str, n: int):
    if target == "cpu":
        return jax.make_mesh((1, n), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2,
                             devices=jax.devices()[:n])
    return aot.target_mesh(target, (1, n), ("data", "fsdp"))


def compile_row(row: str, method: str, target: str):
    """The compiled fused step of ``method`` for ``row`` on ``target``."""
    name, n, seq = ROWS[row][:3]
    cfg, (make_tx, kw) = MODELS[name], METHODS[method]
    tx = make_tx()
    sh = lsh.llama_shardings(cfg, mesh_for(target, n), tx)
    params = lsh.abstract_like(sh.params, llama.param_shapes(cfg))
    state = lsh.abstract_like(
        sh.opt_state, jax.eval_shape(lambda p: lomo_jax.fused_init(tx, p), params))
    batch = lsh.abstract_like(sh.batch, {"input_ids": jax.ShapeDtypeStruct((n, seq), jnp.int32)})
    step = lomo_jax.fused_train_step(llama.llama_layered_model(cfg), tx, shardings=sh, **kw)
    return step.lower(params, state, batch).compile()


def figures(compiled, tokens: int, target: str) -> dict:
    """Memory, FLOPs, bytes sent and copied to/from the host, and the
    step-time bound of one compiled step."""
    flops, sent = hlo_cost.matmul_flops(compiled), hlo_cost.bytes_sent(compiled)
    host = hlo_cost.host_bytes(compiled)
    bound = None
    if target in TARGETS:
        peak, link, host_link = TARGETS[target]
        bound = tokens / max(flops / peak, sent / link, host / host_link)
    return {"memory": aot.MemoryFigures.of(compiled).total / GIB, "tflop": flops / 1e12,
            "sent": sent / GIB, "host": host / GIB, "bound": bound}


def fmt(x, spec=".2f"):
    return "–" if x is None else format(x, spec)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", choices=("cpu",) + aot.GPU_TARGETS, default="rtx4090")
    ap.add_argument("--rows", nargs="*", default=DEFAULT_ROWS, choices=list(ROWS))
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    args = ap.parse_args(argv)

    print("$ python " + " ".join(["benchmarks/scaling.py"] + (argv or sys.argv[1:])))
    print(f"target {args.target}, jax {jax.__version__}; fused step, bf16, FSDP over the "
          "devices, one sequence per device; per device. Compile only.\n")
    print("| model | devices | tokens / device | method | memory GiB | paper GB (LOMO) "
          "| TFLOP / step | sent GiB / step | host GiB / step | bound TGS | paper TGS |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    t0 = time.time()
    for row in args.rows:
        name, n, seq, paper_gb, paper_tgs = ROWS[row]
        for method in args.methods:
            f = figures(compile_row(row, method, args.target), seq, args.target)
            print(f"| {name} | {n} | {seq} | {method} | {f['memory']:.2f} | {fmt(paper_gb)} "
                  f"| {f['tflop']:.1f} | {f['sent']:.1f} | {f['host']:.1f} "
                  f"| {fmt(f['bound'], '.0f')} "
                  f"| {fmt(paper_tgs)} |", flush=True)
    print(f"\n(compiled in {time.time() - t0:.0f} s. Bound TGS: an upper bound from FLOPs, "
          "collective bytes and host copies on the target's published peak, link and host-link "
          "bandwidths, not a measurement; the paper's figures are measured on RTX 3090s. "
          "offload: fused_train_step(offload_saved_inputs=True), the saved layer inputs in "
          "pinned host memory.)")


if __name__ == "__main__":
    main()
