"""Wall-clock time of the fused LOMO step vs the unfused path, side by side.

Unfused = ``jax.value_and_grad`` of the whole model with the *same* per-layer
rematerialisation (the scanned layer wrapped in ``jax.checkpoint`` with the same
``remat_policy``: the fused step recomputes each layer once in its backward
scan, so this is the like-for-like baseline), then the same transform: ``tx``
on embed/head and ``lomo_jax.per_layer(tx)`` on the layers. Both are jitted and
donate params and state.

Timing: compile, a few warm-up steps, then the two steps alternate (so drift
affects both alike) and the median of ``--steps`` timed calls each, every call
ended with ``block_until_ready``. The goal is fused / unfused <= 1.05.

With ``clip_grad_norm`` the fused step does LOMO's two backward passes (one
for the norm, one for the update) against one in the unfused path, so it is
slower by design; that row is informational.

Clipping's cost (``--clip-rows``, default all; ``--clip-rows`` alone skips
the table): the fused step with clipping against the same fused step without,
alternating as above. ``global``: ``clip_grad_norm=1.0``, two backward passes;
``adaptive``: ``optax.chain(lomo_jax.adaptive_clip(), tx)``, per-tensor
clipping inside the one pass. Goal for adaptive: <= 1.05.

Micro-batches (``--microbatches M``, default 4; 0 skips): one fused step with
``microbatches=M`` on a batch of ``M x --batch`` rows against the ``M`` fused
steps, ``microbatches=1``, on its micro-batches (rows ``k, k+M, ...``) one after
the other: the same tokens, one optimizer update instead of ``M``. Goal <= 1.05.

Model: the shipped ``lomo_jax.models.llama`` (fp32, a small config set by the
flags; untied head with its chunked cross-entropy).

Run:  python benchmarks/speed.py     (small LLaMA, ~5 min on 2 quiet CPU cores)
      python benchmarks/speed.py --rows --microbatches 0     (the clipping table alone)
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lomo_jax
from lomo_jax.models import llama


TRANSFORMS = {"lomo": lambda: lomo_jax.lomo(1e-3), "adalomo": lambda: lomo_jax.adalomo(1e-3),
              "adamw": lambda: optax.adamw(1e-3)}


@functools.lru_cache(maxsize=None)
def fused_pair(model, name, policy_name=None, clip=None):
    """``(init, step)`` of the fused step with transform ``name``; ``clip``: None,
    ``"global"`` (``clip_grad_norm=1.0``, two passes) or ``"adaptive"``
    (``adaptive_clip()`` chained in front, one pass). Cached: a step the tables
    share is compiled once."""
    tx = TRANSFORMS[name]()
    if clip == "adaptive":
        tx = optax.chain(lomo_jax.adaptive_clip(), tx)
    policy = getattr(jax.checkpoint_policies, policy_name) if policy_name else None
    step = lomo_jax.fused_train_step(model, tx, remat_policy=policy,
                                     clip_grad_norm=1.0 if clip == "global" else None)
    return (lambda p: lomo_jax.fused_init(tx, p)), step


def unfused_step(model, tx, remat_policy, clip_grad_norm=None):
    layer_tx = lomo_jax.per_layer(tx)

    def init(params):
        return {"embed": tx.init(params["embed"]), "layers": layer_tx.init(params["layers"]),
                "head": tx.init(params["head"])}

    def step(params, state, batch):
        loss, g = jax.value_and_grad(
            lambda p: model.loss(p, batch, remat=True, remat_policy=remat_policy))(params)
        if clip_grad_norm is not None:
            norm = optax.tree.norm(g)
            coef = jnp.minimum(1.0, clip_grad_norm / (norm + 1e-6))
            g = jax.tree.map(lambda x: x * coef.astype(x.dtype), g)
        new_p, new_s = {}, {}
        for k, t in (("embed", tx), ("layers", layer_tx), ("head", tx)):
            u, new_s[k] = t.update(g[k], state[k], params[k])
            new_p[k] = optax.apply_updates(params[k], u)
        return new_p, new_s, {"loss": loss}

    return init, jax.jit(step, donate_argnums=(0, 1))


def time_pair(fns, params, batch, steps, warmup):
    """fns: {name: (init, step)}. Alternate the steps; median seconds each."""
    state = {}
    for name, (init, step) in fns.items():
        p = jax.tree.map(jnp.copy, params)
        s = init(p)
        for _ in range(warmup):
            p, s, m = step(p, s, batch)
        jax.block_until_ready((p, s, m))
        state[name] = (p, s)
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, (_, step) in fns.items():
            p, s = state[name]
            t0 = time.perf_counter()
            p, s, m = step(p, s, batch)
            jax.block_until_ready((p, s, m))
            times[name].append(time.perf_counter() - t0)
            state[name] = (p, s)
    return {name: statistics.median(t) for name, t in times.items()}


def one_step_per_microbatch(step, m):
    """``step`` run on micro-batch ``k`` (rows ``k, k+m, ...``) for ``k < m``."""

    def run(params, state, batch):
        for k in range(m):
            params, state, metrics = step(params, state, jax.tree.map(lambda x: x[k::m], batch))
        return params, state, metrics

    return run


def microbatch_rows(model, params, batch, m, names, steps, warmup):
    """One ``microbatches=m`` step on ``batch`` against ``m`` single steps on its parts."""
    print(f"\nGradient accumulation inside the fused step: one step, microbatches={m}, on "
          f"{batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]} tokens vs {m} steps, "
          "microbatches=1, on its micro-batches\n")
    print(f"| transform | one step, M={m}, ms | {m} steps, M=1, ms | ratio |")
    print("|---|---:|---:|---:|")
    for name in names:
        init, single = fused_pair(model, name)
        tx = TRANSFORMS[name]()
        accumulated = lomo_jax.fused_train_step(model, tx, microbatches=m)
        separate = one_step_per_microbatch(single, m)
        t = time_pair({"acc": (init, accumulated), "sep": (init, separate)}, params, batch,
                      steps, warmup)
        print(f"| {name} | {t['acc'] * 1e3:.1f} | {t['sep'] * 1e3:.1f} | "
              f"{t['acc'] / t['sep']:.3f} |", flush=True)


CLIP_ROWS = (("lomo", "global"), ("lomo", "adaptive"), ("adalomo", "global"),
             ("adalomo", "adaptive"))


def clip_rows(model, params, batch, rows, steps, warmup):
    """The fused step with clipping (``CLIP_ROWS[i]`` for ``i`` in ``rows``)
    against the same fused step without."""
    print("\nClipping's cost: the fused step with clipping vs the same fused step without\n")
    print("| transform | clip | passes | clipped ms | unclipped ms | clipped / unclipped |")
    print("|---|---|---:|---:|---:|---:|")
    for name, clip in (CLIP_ROWS[i] for i in rows):
        t = time_pair({"clip": fused_pair(model, name, clip=clip), "none": fused_pair(model, name)},
                      params, batch, steps, warmup)
        print(f"| {name} | {clip} | {2 if clip == 'global' else 1} | {t['clip'] * 1e3:.1f} | "
              f"{t['none'] * 1e3:.1f} | {t['clip'] / t['none']:.3f} |", flush=True)


# (transform, remat policy, clip_grad_norm) of the fused vs unfused table
ROWS = (("lomo", None, None), ("adalomo", None, None), ("adamw", None, None),
        ("adalomo", "dots_saveable", None), ("adalomo", None, 1.0))


def fused_unfused_rows(model, params, batch, rows, steps, warmup):
    """The fused step against value_and_grad + the same transform (``ROWS[i]``)."""
    print("| transform | remat policy | clip | fused ms | unfused ms | fused / unfused |")
    print("|---|---|---|---:|---:|---:|")
    for name, policy_name, clip in (ROWS[i] for i in rows):
        policy = getattr(jax.checkpoint_policies, policy_name) if policy_name else None
        fused = fused_pair(model, name, policy_name, "global" if clip else None)
        unfused = unfused_step(model, TRANSFORMS[name](), policy, clip)
        t = time_pair({"fused": fused, "unfused": unfused}, params, batch, steps, warmup)
        note = " (2 passes, informational)" if clip else ""
        print(f"| {name} | {policy_name or 'None'} | {clip or '-'} | {t['fused'] * 1e3:.1f} | "
              f"{t['unfused'] * 1e3:.1f} | {t['fused'] / t['unfused']:.3f}{note} |", flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rows", type=int, nargs="*", default=list(range(len(ROWS))),
                    help="rows of the fused vs unfused table (0-based; none: skip it)")
    ap.add_argument("--clip-rows", type=int, nargs="*", default=list(range(len(CLIP_ROWS))),
                    help="rows of the clipping table (0-based, of lomo/adalomo x "
                    "global/adaptive; none: skip it)")
    ap.add_argument("--microbatches", type=int, default=4,
                    help="M for the gradient-accumulation table (0: skip it)")
    ap.add_argument("--microbatch-transforms", nargs="*", default=["lomo", "adalomo"],
                    choices=["lomo", "adalomo"], help="rows of the gradient-accumulation table")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    cfg = llama.LlamaConfig(vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.ffn,
                            num_hidden_layers=args.layers, num_attention_heads=args.heads)
    model = llama.llama_layered_model(cfg)
    params = llama.init_params(cfg, 0)
    rng = np.random.default_rng(1)
    batch = {"input_ids": jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq)), jnp.int32)}
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"fused step vs value_and_grad + same transform, same remat; fp32, {n / 1e6:.1f}M params "
          f"({args.layers} layers, d={args.d}, ffn={args.ffn}), batch {args.batch} x {args.seq}, "
          f"{jax.default_backend().upper()} ({os.cpu_count()} cores), jax {jax.__version__}; "
          f"median of {args.steps} alternating steps after {args.warmup} warm-up\n")
    if args.rows:
        fused_unfused_rows(model, params, batch, args.rows, args.steps, args.warmup)
    if args.clip_rows:
        clip_rows(model, params, batch, args.clip_rows, args.steps, args.warmup)
    if args.microbatches and args.microbatch_transforms:
        m = args.microbatches
        big = {"input_ids": jnp.asarray(rng.integers(0, args.vocab, (m * args.batch, args.seq)),
                                        jnp.int32)}
        microbatch_rows(model, params, big, m, args.microbatch_transforms, args.steps,
                        args.warmup)
    fused_pair.cache_clear()  # the compiled steps die with this run
    print(f"\n(total {time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
