"""The fused LOMO step on your own Flax NNX model: the pattern to copy.

    python examples/fused_finetune.py            # a few minutes on 2 CPU cores
    python examples/fused_finetune.py --tiny     # a few seconds (what CI runs)

A byte-level transformer LM written here in NNX (with dropout), trained on the
shipped corpus with ``lomo_jax.fused_train_step``. The three things to do for
any model:

1. **Stack the repeated blocks** on a leading axis (``nnx.split_rngs`` +
   ``nnx.vmap`` at construction, as ``nnx.scan``-style models already do).
2. **Name the parts and write three small functions** that get *modules*:
   ``embed_fn(embed, batch) -> h``, ``layer_fn(block, h, batch) -> h`` (ONE
   layer, rebuilt from its slice; its dropout stream reseeded from the
   per-layer key the step passes), ``head_fn(head, h, batch) -> loss``;
   ``lomo_jax.nnx.layered`` turns them into the ``{"embed", "layers", "head"}``
   params and the ``lomo_jax.LayeredModel``.
3. **Write the trained params back** with ``lomo_jax.nnx.update`` and use the
   module as before (here: its own ``__call__``, dropout off, on held-out text).

Then ``fused_train_step`` scans the layers forward keeping only each layer's
input, and in the reverse scan recomputes one layer (with the same dropout
mask), takes its gradient and updates that layer's slice in place: one
layer's gradient alive at a time.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lomo_jax

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"
PARTS = dict(embed="embed", blocks="blocks", head=("norm", "out"))  # attribute paths


class Block(nnx.Module):
    """Pre-norm causal self-attention + MLP (one layer), dropout on both branches."""

    def __init__(self, d: int, heads: int, dropout: float, *, rngs: nnx.Rngs):
        self.norm1, self.norm2 = nnx.RMSNorm(d, rngs=rngs), nnx.RMSNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, h):
        t = h.shape[1]
        h = h + self.drop(self.attn(self.norm1(h), mask=nnx.make_causal_mask(jnp.ones((1, t)))))
        return h + self.drop(self.down(jax.nn.gelu(self.up(self.norm2(h)))))


class ByteLM(nnx.Module):
    def __init__(self, d: int, heads: int, n_layers: int, dropout: float, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(256, d, rngs=rngs)

        @nnx.split_rngs(splits=n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):  # 1. every Block leaf gets a leading layer axis
            return Block(d, heads, dropout, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.norm = nnx.RMSNorm(d, rngs=rngs)
        self.out = nnx.Linear(d, 256, use_bias=False, rngs=rngs)

    def __call__(self, tokens):  # the module's own forward (evaluation, generation)
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def through(h, block):
            return block(h)

        return self.out(self.norm(through(self.embed(tokens), self.blocks)))


def next_byte_loss(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:]).mean()


def layered(lm: ByteLM):
    """2.: ``(params, LayeredModel)``; the functions get modules, not param dicts."""
    return lomo_jax.nnx.layered(
        lm, **PARTS,
        embed_fn=lambda embed, batch: embed(batch["tokens"][:, :-1]),
        layer_fn=lambda block, h, batch: block(h),
        head_fn=lambda head, h, batch: next_byte_loss(head[1](head[0](h)), batch["tokens"]),
    )


_module_loss = nnx.jit(lambda lm, tokens: next_byte_loss(lm(tokens[:, :-1]), tokens))


def held_out_loss(lm: ByteLM, tokens) -> float:
    """The loss through the module's own ``__call__``, dropout off."""
    return float(_module_loss(nnx.view(lm, deterministic=True), tokens))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--dropout", type=float, default=0.1, help="dropout rate in the blocks")
    ap.add_argument("--tiny", action="store_true", default=bool(os.environ.get("LOMO_EXAMPLES_TINY")),
                    help="a few steps of a small model (also: LOMO_EXAMPLES_TINY=1)")
    args = ap.parse_args(argv)
    d, heads, n_layers, batch_size, seq = (32, 2, 2, 4, 32) if args.tiny else (128, 4, 4, 16, 128)
    steps = 10 if args.tiny else args.steps

    data = np.frombuffer(CORPUS.read_bytes(), np.uint8).astype(np.int32)
    split = len(data) * 9 // 10  # the last 10% is held out
    rng = np.random.default_rng(0)

    def windows(lo, hi, n):
        starts = rng.integers(lo, hi - seq - 1, n)
        return jnp.asarray(np.stack([data[s:s + seq + 1] for s in starts]))

    held_out = windows(split, len(data), 2 * batch_size)
    lm = ByteLM(d, heads, n_layers, args.dropout, rngs=nnx.Rngs(0))
    before = held_out_loss(lm, held_out)
    params, model = layered(lm)  # params share lm's arrays (the step donates them)

    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, steps // 10 + 1, steps)
    tx = lomo_jax.adalomo(schedule, weight_decay=0.01)  # any leaf-wise optax transform
    # rng: each step draws the dropout keys (layer i: fold_in(step key, i)) from here
    opt_state = lomo_jax.fused_init(tx, params, rng=jax.random.key(1))
    step = lomo_jax.fused_train_step(model, tx, clip_grad_norm=1.0)  # jitted, donates params/state

    # Memory of the step before running it, from the compiled program:
    batch = {"tokens": windows(0, split, batch_size)}
    mem = step.lower(params, opt_state, batch).compile().memory_analysis()
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"{n / 1e6:.2f}M params, dropout {args.dropout}; step temporaries "
          f"{mem.temp_size_in_bytes / 2**20:.1f} MiB, "
          f"{mem.alias_size_in_bytes / 2**20:.1f} MiB updated in place")

    for i in range(steps):
        params, opt_state, metrics = step(params, opt_state, batch)  # always rebind: donated
        if i % max(1, steps // 10) == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {float(metrics['loss']):.3f}  "
                  f"grad_norm {float(metrics['grad_norm']):.3f}")
        batch = {"tokens": windows(0, split, batch_size)}

    lomo_jax.nnx.update(lm, params, **PARTS)  # 3. the trained weights, back in the module
    after = held_out_loss(lm, held_out)
    print(f"held-out loss (the module's own __call__, dropout off): {before:.3f} before "
          f"-> {after:.3f} after {steps} steps")
    return after


if __name__ == "__main__":
    main()
