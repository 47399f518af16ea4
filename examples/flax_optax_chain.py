"""AdaLomo in a plain Flax NNX training loop: the unfused use of lomo_jax.

    python examples/flax_optax_chain.py            # ~20 s on a laptop CPU
    python examples/flax_optax_chain.py --tiny     # a few seconds (what CI runs)

``lomo_jax.adalomo`` is an ordinary optax transform: chain it after
``optax.clip_by_global_norm`` (LOMO's gradient-norm clipping), give it a
schedule, hand it to ``nnx.Optimizer``. Gradients of the whole model exist at
once here; for the memory saving use the fused step
(examples/fused_finetune.py).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lomo_jax


class MLP(nnx.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(d_in, d_hidden, rngs=rngs)
        self.norm = nnx.RMSNorm(d_hidden, rngs=rngs)
        self.down = nnx.Linear(d_hidden, d_out, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.norm(self.up(x))))


def make_data(key, n, d_in, d_out):
    """A fixed random teacher network gives the regression targets."""
    kx, kw1, kw2 = jax.random.split(key, 3)
    x = jax.random.normal(kx, (n, d_in))
    w1 = jax.random.normal(kw1, (d_in, 4 * d_out)) / jnp.sqrt(d_in)
    w2 = jax.random.normal(kw2, (4 * d_out, d_out)) / jnp.sqrt(4 * d_out)
    return x, jnp.tanh(x @ w1) @ w2


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tiny", action="store_true",
                        default=bool(os.environ.get("LOMO_EXAMPLES_TINY")),
                        help="a few steps of a small model (also: LOMO_EXAMPLES_TINY=1)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.hidden = 40, 32

    d_in, d_out, batch = 16, 4, 64
    x, y = make_data(jax.random.key(0), 4096, d_in, d_out)
    model = MLP(d_in, args.hidden, d_out, rngs=nnx.Rngs(0))

    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.steps // 10, args.steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), lomo_jax.adalomo(schedule, weight_decay=0.01))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(model, xb, yb):
        return jnp.mean((model(xb) - yb) ** 2)

    @nnx.jit
    def train_step(model, optimizer, xb, yb):
        loss, grads = nnx.value_and_grad(loss_fn)(model, xb, yb)
        optimizer.update(model, grads)
        return loss

    eval_loss = nnx.jit(loss_fn)
    start = float(eval_loss(model, x, y))
    for step in range(args.steps):
        i = (step * batch) % (x.shape[0] - batch)
        loss = train_step(model, optimizer, x[i:i + batch], y[i:i + batch])
        if step % max(1, args.steps // 5) == 0:
            print(f"step {step:4d}  loss {float(loss):.4f}  lr {float(schedule(step)):.2e}")
    end = float(eval_loss(model, x, y))
    print(f"full-data loss: {start:.4f} -> {end:.4f}")
    if not end < start:
        raise SystemExit("the loss did not go down")
    return start, end


if __name__ == "__main__":
    main()
