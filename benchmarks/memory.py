"""Compiled memory of one training step of the shipped LLaMA, for a GPU or this CPU.

Every figure is XLA's own ``compiled.memory_analysis()`` of the step compiled
ahead of time on abstract inputs (nothing is allocated, so 8B models compile
on a laptop), for one device of the target (see :mod:`lomo_jax.aot`):

* ``args``  = parameters + optimizer state + batch,
* ``temp``  = everything the step allocates itself (saved layer inputs,
  gradients, activations),
* ``total`` = args + outputs + temp - aliased (outputs written into donated
  inputs): the step's footprint.

Targets: ``rtx4090`` / ``h100`` compile for that GPU without one (needs the
CUDA plugin: ``pip install "lomo-jax[gpu-aot]"``; the script sets
``JAX_PLATFORMS=cpu`` itself); ``cpu`` compiles for this machine (XLA:CPU
upcasts bf16 weights around matmuls and hoists the upcasts out of the layer
loop, a full f32 copy of the model no GPU makes, so that one pass is switched
off unless ``--keep-licm``). Not included anywhere: the CUDA context, cuBLAS /
cuDNN workspaces, allocator fragmentation, JAX's preallocation.

Model: ``lomo_jax.models.llama`` in bf16 (parameters and compute), the same
code users train. Methods: inference (the loss, forward only), the fused step
with LOMO, AdaLomo, AdaLomo with ``clip_grad_norm=1.0`` (each with the batch in
``--microbatches`` micro-batches), and
``jax.value_and_grad`` (every layer rematerialised, as the fused step does)
followed by ``optax.adamw``; parameters and state donated throughout. LoRA
(``lomo_jax.models.lora``, rank 16 on every attention and MLP projection):
``fused LoRA`` (the base frozen, the adapters with AdamW) and ``fused LoRA +
LOMO`` (the base with LOMO, the adapters with AdamW), both through the fused
step; beside a ``fused LOMO`` row of the same setting, a second table shows
what they add to it next to the adapters' own bytes (their parameters and
AdamW's state, fp32 as `lora.add_adapters` makes them).

Run:  python benchmarks/memory.py --target rtx4090      (about 2 minutes)
LoRA and LoRA + LOMO beside LOMO, 7B at 8 x 512 and 8B at 1 x 1024:
      python benchmarks/memory.py --target rtx4090 --lora
The same with every model N layers deep (how a figure moves with depth):
      python benchmarks/memory.py --target rtx4090 --lora --unit MiB --layers 31
Micro-batches (gradient accumulation inside the fused step), 7B at 32 x 512:
      python benchmarks/memory.py --target rtx4090 --settings 7b-32x512 \\
          --methods "fused LOMO" "fused AdaLomo, clip 1.0" --microbatches 1 4 8 32
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin compiles without a GPU
# XLA:GPU's scheduler logs errors for programs larger than the card (AdamW at 7B/8B
# on a 24 GiB target: that is the point of the comparison); keep the table readable.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from _targets import default_target  # noqa: E402 (benchmarks/, no JAX)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import lomo_jax  # noqa: E402
from lomo_jax import aot  # noqa: E402
from lomo_jax.models import llama, lora  # noqa: E402

GIB = 1024**3

BF16 = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
MODELS = {
    "LLaMA-7B": llama.LlamaConfig(**BF16),
    "Llama-3-8B": llama.LlamaConfig(
        vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
        rope_theta=500000.0, **BF16),
    # a toy for smoke tests (CI): seconds to compile
    "tiny": llama.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, **BF16),
}
# (model, batch, sequence)
SETTINGS = {
    "7b-1x512": ("LLaMA-7B", 1, 512),
    "7b-8x512": ("LLaMA-7B", 8, 512),
    "7b-32x512": ("LLaMA-7B", 32, 512),
    # the largest batches that leave 2 GiB of a 24 GiB card free, at one row per micro-batch
    "7b-56x512": ("LLaMA-7B", 56, 512),
    "7b-14x2048": ("LLaMA-7B", 14, 2048),
    # with the saved inputs offloaded to host memory (16 GiB of it)
    "7b-128x512": ("LLaMA-7B", 128, 512),
    "8b-1x1024": ("Llama-3-8B", 1, 1024),
    "8b-4x1024": ("Llama-3-8B", 4, 1024),
    "tiny": ("tiny", 2, 64),
}
DEFAULT_SETTINGS = ["7b-1x512", "7b-8x512", "8b-1x1024", "8b-4x1024"]
# The methods that take micro-batches (the others are measured at M = 1 only).
MICROBATCHED = ("fused LOMO", "fused AdaLomo", "fused AdaLomo, clip 1.0",
                "fused AdaLomo, clip 1.0, offload")
# The LOMO paper (Lv et al. 2023, arXiv 2306.09782), Table 1: LLaMA-7B,
# 8 x 512 tokens, measured on GPU in mixed precision. GB as printed there.
PAPER = {("7b-8x512", "fused LOMO"): 14.58}
# LoRA (issue 30): rank 16 on every attention and MLP projection, adapters trained with
# AdamW; measured at 7B 8 x 512 and 8B 1 x 1024 beside fused LOMO (``--lora``).
LORA = lora.LoraConfig(rank=16, alpha=32, targets=tuple(lora.LORA_TARGETS))
LORA_METHODS = ("fused LoRA", "fused LoRA + LOMO")
LORA_RUN = {"settings": ["7b-8x512", "8b-1x1024"], "methods": ["fused LOMO", *LORA_METHODS]}
ADAPTERS_TX = optax.adamw(1e-4, weight_decay=0.0)
# The cpu target without XLA:CPU's loop-invariant code motion (unless ``--keep-licm``): a
# compile option of the measured programs only, so nothing is set before JAX starts.
CPU_NO_LICM = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def fused(tx, **kw):
    def build(model, params, batch, mesh, microbatches=1):
        state = aot.abstract(jax.eval_shape(lambda p: lomo_jax.fused_init(tx, p), params), mesh)
        step = lomo_jax.fused_train_step(model, tx, microbatches=microbatches, **kw)
        return step.lower(params, state, batch)

    return build


def value_and_grad_adamw(model, params, batch, mesh):
    tx = optax.adamw(1e-5)
    state = aot.abstract(jax.eval_shape(tx.init, params), mesh)

    def step(p, s, b):
        loss, g = jax.value_and_grad(lambda q: model.loss(q, b, remat=True))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, batch)


def inference(model, params, batch, mesh):
    return jax.jit(model.loss).lower(params, batch)


METHODS = {
    "inference": inference,
    "fused LOMO": fused(lomo_jax.lomo(1e-5)),
    "fused AdaLomo": fused(lomo_jax.adalomo(1e-5)),
    "fused AdaLomo, clip 1.0": fused(lomo_jax.adalomo(1e-5), clip_grad_norm=1.0),
    # the saved layer inputs in pinned host memory (not counted in "total")
    "fused AdaLomo, clip 1.0, offload": fused(lomo_jax.adalomo(1e-5), clip_grad_norm=1.0,
                                              offload_saved_inputs=True),
    "value_and_grad + AdamW": value_and_grad_adamw,
    "fused LoRA": fused(lora.optimizer(base=None, adapters=ADAPTERS_TX)),
    "fused LoRA + LOMO": fused(lora.optimizer(base=lomo_jax.lomo(1e-5), adapters=ADAPTERS_TX)),
}
DEFAULT_METHODS = [m for m in METHODS if m not in LORA_METHODS]


def model_config(setting: str, method: str) -> llama.LlamaConfig:
    """The model of ``setting``, with :data:`LORA`'s adapters for the LoRA methods."""
    cfg = MODELS[SETTINGS[setting][0]]
    return cfg.replace(lora=LORA) if method in LORA_METHODS else cfg


def with_layers(n: int) -> None:
    """Give every model of :data:`MODELS` ``n`` decoder layers (``--layers``)."""
    if n < 1:
        raise ValueError(f"--layers must be at least 1, got {n}")
    for name, cfg in MODELS.items():
        MODELS[name] = cfg.replace(num_hidden_layers=n)


def adapter_bytes(cfg: llama.LlamaConfig) -> int:
    """The adapters' own bytes: their parameters and AdamW's state for them (``mu``,
    ``nu`` in the adapters' dtype, the step count), from shapes alone."""
    leaves = [x for path, x in jax.tree_util.tree_leaves_with_path(llama.param_shapes(cfg))
              if lora.is_adapter(path)]
    state = jax.eval_shape(ADAPTERS_TX.init, leaves)
    return sum(x.size * x.dtype.itemsize for x in leaves + jax.tree.leaves(state))


def measure(setting: str, method: str, target: str, microbatches: int = 1,
            keep_licm: bool = False) -> aot.MemoryFigures:
    """Compiled memory of ``method`` at ``setting`` on ``target``; the fused
    methods with the batch in ``microbatches`` micro-batches."""
    _, b, t = SETTINGS[setting]
    cfg = model_config(setting, method)
    mesh = aot.target_mesh(target)
    params = aot.abstract(llama.param_shapes(cfg), mesh)
    batch = aot.abstract({"input_ids": jax.ShapeDtypeStruct((b, t), jnp.int32)}, mesh)
    build, model = METHODS[method], llama.llama_layered_model(cfg)
    if method in MICROBATCHED:
        lowered = build(model, params, batch, mesh, microbatches=microbatches)
    elif microbatches == 1:
        lowered = build(model, params, batch, mesh)
    else:
        raise ValueError(f"{method!r} has no micro-batches; measure it at microbatches=1.")
    options = CPU_NO_LICM if target == "cpu" and not keep_licm else None
    return aot.MemoryFigures.of(lowered.compile(compiler_options=options))


def print_lora_costs(figures: dict) -> None:
    """What each LoRA step adds to fused LOMO's at the same setting (``figures``: the
    M = 1 :class:`aot.MemoryFigures` by ``(setting, method)``), beside the adapters' own
    bytes; nothing without a LoRA row and its LOMO row."""
    rows = [(s, m) for s, m in figures if m in LORA_METHODS and (s, "fused LOMO") in figures]
    if not rows:
        return
    print("\nWhat LoRA adds to fused LOMO (rank 16 on q, k, v, o, gate, up, down; MiB): "
          "measured - LOMO is the LoRA step's total minus fused LOMO's; adapters + state are "
          "the adapters' parameters and their AdamW moments and count.\n")
    print("| model | batch | method | total | fused LOMO | measured - LOMO | adapters + state "
          "| difference |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for setting, method in rows:
        name, b, t = SETTINGS[setting]
        total, lomo = figures[setting, method].total, figures[setting, "fused LOMO"].total
        own = adapter_bytes(model_config(setting, method))
        print(f"| {name} | {b} x {t} | {method} | {total / 2**20:.2f} | {lomo / 2**20:.2f} | "
              f"{(total - lomo) / 2**20:.2f} | {own / 2**20:.2f} | "
              f"{(total - lomo - own) / 2**20:+.2f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", choices=("cpu",) + aot.GPU_TARGETS, default=None,
                    help="default: rtx4090 where the CUDA plugin is installed, else cpu")
    ap.add_argument("--settings", nargs="*", default=DEFAULT_SETTINGS,
                    choices=list(SETTINGS))
    ap.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, choices=list(METHODS),
                    help="default: all but the LoRA ones")
    ap.add_argument("--lora", action="store_true",
                    help=f"the LoRA comparison: settings {' '.join(LORA_RUN['settings'])}, "
                    f"methods {', '.join(LORA_RUN['methods'])} (overrides both)")
    ap.add_argument("--microbatches", nargs="*", type=int, default=[1], metavar="M",
                    help="micro-batch counts for the fused methods (others: M = 1 only)")
    ap.add_argument("--unit", choices=("GiB", "MiB"), default="GiB")
    ap.add_argument("--layers", type=int, default=None, metavar="N",
                    help="every model with N decoder layers instead of its own (how a figure "
                    "scales with depth)")
    ap.add_argument("--keep-licm", action="store_true",
                    help="cpu: keep XLA:CPU's loop-invariant code motion (hoisted f32 weight copies)")
    args = ap.parse_args(argv)
    if args.lora:
        args.settings, args.methods = LORA_RUN["settings"], LORA_RUN["methods"]
    target = args.target or default_target()
    if args.layers is not None:
        with_layers(args.layers)
    unit = GIB if args.unit == "GiB" else 2**20

    t0 = time.time()
    print(f"Compiled memory of one step, target {target}, jax {jax.__version__}, bf16 "
          f"lomo_jax.models.llama (compile only; nothing allocated). {args.unit}."
          + ("" if args.layers is None else f" Every model with {args.layers} layers.") + "\n")
    print("| model | batch | micro-batches | method | args | temp | total | host | paper (GB) |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    figures = {}
    for setting in args.settings:
        name, b, t = SETTINGS[setting]
        for method in args.methods:
            for mb in args.microbatches if method in MICROBATCHED else [1]:
                m = measure(setting, method, target, mb, args.keep_licm)
                if mb == 1:
                    figures[setting, method] = m
                paper = PAPER.get((setting, method)) if mb == 1 else None
                print(f"| {name} | {b} x {t} | {mb} | {method} | {m.arguments / unit:.2f} | "
                      f"{m.temporaries / unit:.2f} | {m.total / unit:.2f} | "
                      f"{m.host_temporaries / unit:.2f} | "
                      f"{'' if paper is None else f'{paper:.2f}'} |", flush=True)
    print(f"\n(compiled in {time.time() - t0:.0f} s. total = args + outputs + temp - aliased, "
          "device memory; host: pinned host memory (the offloaded saved layer inputs). The "
          "paper's figure is measured on a GPU: not the same measurement.)")
    print_lora_costs(figures)


if __name__ == "__main__":
    main()
