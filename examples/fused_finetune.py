"""The fused LOMO step on your own Flax NNX model: the pattern to copy.

    python examples/fused_finetune.py            # ~1 min on a laptop CPU
    python examples/fused_finetune.py --tiny     # a few seconds (what CI runs)

A byte-level transformer LM written here in NNX, trained on the shipped corpus
with ``lomo_jax.fused_train_step``. The three things to do for any model:

1. **Stack the repeated blocks** on a leading axis (``nnx.vmap`` at
   construction, as ``nnx.scan``-style models already do).
2. **Split the parameters** into ``{"embed": ..., "layers": ..., "head": ...}``
   pure dicts (``nnx.state(..., nnx.Param)`` + ``nnx.to_pure_dict``).
3. **Write three pure functions** -- ``embed(p, batch) -> h``,
   ``layer(p_i, h, batch) -> h`` for ONE layer's slice (merge it into the
   block's ``graphdef`` and call the block's own code), ``head(p, h, batch) ->
   loss`` -- and wrap them in ``lomo_jax.LayeredModel``.

Then ``fused_train_step`` scans the layers forward keeping only each layer's
input, and in the reverse scan recomputes one layer, takes its gradient and
updates that layer's slice in place: one layer's gradient alive at a time.
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


class Block(nnx.Module):
    """Pre-norm causal self-attention + MLP (one layer)."""

    def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1, self.norm2 = nnx.RMSNorm(d, rngs=rngs), nnx.RMSNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, h):
        t = h.shape[1]
        h = h + self.attn(self.norm1(h), mask=nnx.make_causal_mask(jnp.ones((1, t))))
        return h + self.down(jax.nn.gelu(self.up(self.norm2(h))))


class ByteLM(nnx.Module):
    def __init__(self, d: int, heads: int, n_layers: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(256, d, rngs=rngs)

        @nnx.split_rngs(splits=n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):  # 1. every Block leaf gets a leading layer axis
            return Block(d, heads, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.norm = nnx.RMSNorm(d, rngs=rngs)
        self.out = nnx.Linear(d, 256, use_bias=False, rngs=rngs)


def layered(model: ByteLM, d: int, heads: int):
    """2. + 3.: plain-dict params and the LayeredModel view of ``model``."""
    pure = lambda m: nnx.to_pure_dict(nnx.state(m, nnx.Param))  # noqa: E731
    params = {
        "embed": pure(model.embed),
        "layers": pure(model.blocks),  # leaves [L, ...]
        "head": {"norm": pure(model.norm), "out": pure(model.out)},
    }
    # graphdefs to rebuild modules from slices (abstract: no arrays allocated)
    block_def, block_state = nnx.split(nnx.eval_shape(lambda: Block(d, heads, rngs=nnx.Rngs(0))))
    embed_def, embed_state = nnx.split(model.embed)
    norm_def, norm_state = nnx.split(model.norm)
    out_def, out_state = nnx.split(model.out)

    def merge(graphdef, template, p):
        state = jax.tree.map(lambda x: x, template)  # fresh copy of the template
        nnx.replace_by_pure_dict(state, p)
        return nnx.merge(graphdef, state)

    def embed(p, batch):
        return merge(embed_def, embed_state, p)(batch["tokens"][:, :-1])

    def layer(p, h, batch):  # p: ONE layer's slice of params["layers"]
        return merge(block_def, block_state, p)(h)

    def head(p, h, batch):
        norm, out = merge(norm_def, norm_state, p["norm"]), merge(out_def, out_state, p["out"])
        logits = out(norm(h)).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:]).mean()

    return params, lomo_jax.LayeredModel(embed, layer, head)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--tiny", action="store_true", default=bool(os.environ.get("LOMO_EXAMPLES_TINY")),
                    help="a few steps of a small model (also: LOMO_EXAMPLES_TINY=1)")
    args = ap.parse_args(argv)
    d, heads, n_layers, batch_size, seq = (32, 2, 2, 4, 32) if args.tiny else (128, 4, 4, 16, 128)
    steps = 10 if args.tiny else args.steps

    data = np.frombuffer(CORPUS.read_bytes(), np.uint8).astype(np.int32)
    rng = np.random.default_rng(0)

    def sample():
        starts = rng.integers(0, len(data) - seq - 1, batch_size)
        return {"tokens": jnp.asarray(np.stack([data[s:s + seq + 1] for s in starts]))}

    params, model = layered(ByteLM(d, heads, n_layers, rngs=nnx.Rngs(0)), d, heads)

    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, steps // 10 + 1, steps)
    tx = lomo_jax.adalomo(schedule, weight_decay=0.01)  # any leaf-wise optax transform
    opt_state = lomo_jax.fused_init(tx, params)
    step = lomo_jax.fused_train_step(model, tx, clip_grad_norm=1.0)  # jitted, donates params/state

    # Memory of the step before running it, from the compiled program:
    batch = sample()
    mem = step.lower(params, opt_state, batch).compile().memory_analysis()
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"{n / 1e6:.2f}M params; step temporaries {mem.temp_size_in_bytes / 2**20:.1f} MiB, "
          f"{mem.alias_size_in_bytes / 2**20:.1f} MiB updated in place")

    for i in range(steps):
        params, opt_state, metrics = step(params, opt_state, batch)  # always rebind: donated
        if i % max(1, steps // 10) == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {float(metrics['loss']):.3f}  "
                  f"grad_norm {float(metrics['grad_norm']):.3f}")
        batch = sample()
    return float(metrics["loss"])


if __name__ == "__main__":
    main()
