"""Compiled memory of the fused LOMO/AdaLomo step vs value_and_grad + SGD/AdamW.

Everything is compiled ahead of time on abstract ``jax.ShapeDtypeStruct``
inputs (nothing is allocated, so LLaMA-7B shapes compile on a laptop) and the
figures are XLA's own ``compiled.memory_analysis()``:

* ``args``  = argument_size_in_bytes (params + optimizer state + batch),
* ``temp``  = temp_size_in_bytes (everything the step allocates internally:
  gradients, activations, saved layer inputs, ...),
* ``alias`` = alias_size_in_bytes (outputs written into donated inputs),
* ``total`` = args + out + temp - alias (the step's footprint; ``out`` is
  output_size_in_bytes and equals ``alias`` plus the metrics when every
  parameter/state output reuses its donated input).

The model is a LLaMA-like :class:`lomo_jax.LayeredModel` defined here (RMSNorm,
rotary causal attention, SwiGLU MLP, untied LM head, fp32 softmax/loss). Every
method uses the same per-layer rematerialisation (the fused step recomputes a
layer in its backward scan; the unfused baselines wrap the scanned layer in
``jax.checkpoint``), donates params and state, and runs one step on one batch
of ``--batch`` x ``--seq`` tokens.

bf16 on the CPU backend: XLA CPU has no native bf16 matmul and upcasts the
operands to f32; its while-loop-invariant code motion then hoists the upcast of
*every stacked weight* out of the layer loop, i.e. a full f32 copy of the
model in ``temp`` (25 GiB for 7B, in inference too) that a GPU never makes.
This script therefore disables that one pass (``--xla_disable_hlo_passes=
while-loop-invariant-code-motion``) before JAX starts; fp32 figures are the
same with or without it. ``--keep-licm`` shows the raw CPU figures.

Run:  python benchmarks/memory.py            (prints a Markdown table)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

if "--keep-licm" not in sys.argv:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_disable_hlo_passes=while-loop-invariant-code-motion"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lomo_jax  # noqa: E402

GIB = 1024**3

SIZES = {
    # name: (layers, d_model, ffn, heads, vocab)
    "LLaMA-like 160M": (12, 768, 2048, 12, 32000),
    "LLaMA-like 1.3B": (24, 2048, 5504, 16, 32000),
    "LLaMA-7B": (32, 4096, 11008, 32, 32000),
}

# The LOMO paper's own figures for LLaMA-7B (Lv et al. 2023, arXiv 2306.09782,
# Table 1): measured on GPU with mixed precision and the paper's own batch /
# sequence settings, so they are not the same measurement as the table above.
PAPER_7B_GB = {"AdamW": 102.20, "SGD": 51.99, "LOMO": 14.58}


def rms_norm(x, w):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope(x):
    _, t, _, dh = x.shape
    inv = 1.0 / (10000.0 ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    ang = jnp.arange(t, dtype=jnp.float32)[:, None] * inv[None, :]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


def make_model(n_heads):
    def embed(p, batch):
        return p["tok"][batch["ids"]]

    def layer(p, h, batch):
        b, t, d = h.shape
        dh = d // n_heads
        x = rms_norm(h, p["attn_norm"])
        q = rope((x @ p["wq"]).reshape(b, t, n_heads, dh))
        k = rope((x @ p["wk"]).reshape(b, t, n_heads, dh))
        v = (x @ p["wv"]).reshape(b, t, n_heads, dh)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(dh)
        mask = jnp.tril(jnp.ones((t, t), bool))
        a = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1).astype(h.dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, d)
        h = h + o @ p["wo"]
        x = rms_norm(h, p["mlp_norm"])
        return h + (jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]

    def head(p, h, batch):
        logits = (rms_norm(h, p["norm"]) @ p["out"]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    return lomo_jax.LayeredModel(embed, layer, head)


def param_shapes(n_layers, d, ffn, vocab, dtype):
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    return {
        "embed": {"tok": s(vocab, d)},
        "layers": {
            "attn_norm": s(n_layers, d),
            "wq": s(n_layers, d, d),
            "wk": s(n_layers, d, d),
            "wv": s(n_layers, d, d),
            "wo": s(n_layers, d, d),
            "mlp_norm": s(n_layers, d),
            "w_gate": s(n_layers, d, ffn),
            "w_up": s(n_layers, d, ffn),
            "w_down": s(n_layers, ffn, d),
        },
        "head": {"norm": s(d), "out": s(d, vocab)},
    }


def n_params(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def fused(model, tx):
    def build(params, batch):
        state = jax.eval_shape(lambda p: lomo_jax.fused_init(tx, p), params)
        return lomo_jax.fused_train_step(model, tx).lower(params, state, batch)

    return build


def unfused(model, tx):
    def build(params, batch):
        state = jax.eval_shape(tx.init, params)

        def step(p, s, b):
            loss, g = jax.value_and_grad(lambda q: model.loss(q, b, remat=True))(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, loss

        return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, batch)

    return build


def inference(model):
    def build(params, batch):
        return jax.jit(model.loss).lower(params, batch)

    return build


METHODS = {
    "inference (forward loss only)": lambda m: inference(m),
    "fused LOMO": lambda m: fused(m, lomo_jax.lomo(1e-3)),
    "fused AdaLomo": lambda m: fused(m, lomo_jax.adalomo(1e-3)),
    "value_and_grad + SGD": lambda m: unfused(m, optax.sgd(1e-3)),
    "value_and_grad + AdamW": lambda m: unfused(m, optax.adamw(1e-3)),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"])
    ap.add_argument("--keep-licm", action="store_true",
                    help="keep XLA CPU's loop-invariant code motion (hoists f32 upcasts of bf16 weights)")
    args = ap.parse_args()

    t0 = time.time()
    batch = {
        "ids": jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32),
        "labels": jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32),
    }
    print(f"Compiled memory of one training step, batch {args.batch} x {args.seq} tokens, "
          f"XLA {jax.default_backend().upper()} backend, jax {jax.__version__} "
          "(compile only; nothing allocated)"
          + ("" if args.keep_licm else ", loop-invariant code motion off (see docstring)")
          + ". GiB.\n")
    print("| model | params | dtype | method | args | temp | alias | total |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for size in args.sizes:
        n_layers, d, ffn, heads, vocab = SIZES[size]
        model = make_model(heads)
        for dtype_name in args.dtypes:
            dtype = jnp.dtype(dtype_name)
            params = param_shapes(n_layers, d, ffn, vocab, dtype)
            for method, make in METHODS.items():
                mem = make(model)(params, batch).compile().memory_analysis()
                args_b, temp = mem.argument_size_in_bytes, mem.temp_size_in_bytes
                alias, out = mem.alias_size_in_bytes, mem.output_size_in_bytes
                total = args_b + out + temp - alias
                print(f"| {size} | {n_params(params) / 1e9:.2f}B | {dtype_name} | {method} | "
                      f"{args_b / GIB:.2f} | {temp / GIB:.2f} | {alias / GIB:.2f} | "
                      f"{total / GIB:.2f} |", flush=True)
    print()
    print("For comparison, the LOMO paper's own LLaMA-7B figures (Lv et al. 2023, "
          "arXiv 2306.09782, Table 1; measured on GPU with mixed precision and the "
          "paper's batch settings, so not the same measurement):\n")
    print("| method (paper) | total GB |")
    print("|---|---:|")
    for k, v in PAPER_7B_GB.items():
        print(f"| {k} | {v:.2f} |")
    print(f"\n(compiled in {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
