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

Micro-batches (``--microbatches M``, default 4; 0 skips): one fused step with
``microbatches=M`` on a batch of ``M x --batch`` rows against the ``M`` fused
steps, ``microbatches=1``, on its micro-batches (rows ``k, k+M, ...``) one after
the other: the same tokens, one optimizer update instead of ``M``. Goal <= 1.05.

Model: the shipped ``lomo_jax.models.llama`` (fp32, a small config set by the
flags; untied head with its chunked cross-entropy).

Run:  python benchmarks/speed.py     (small LLaMA, ~3-4 min on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lomo_jax
from lomo_jax.models import llama


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


def microbatch_rows(model, params, batch, m, steps, warmup):
    """One ``microbatches=m`` step on ``batch`` against ``m`` single steps on its parts."""
    print(f"\nGradient accumulation inside the fused step: one step, microbatches={m}, on "
          f"{batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]} tokens vs {m} steps, "
          "microbatches=1, on its micro-batches\n")
    print(f"| transform | one step, M={m}, ms | {m} steps, M=1, ms | ratio |")
    print("|---|---:|---:|---:|")
    for name, make_tx in (("lomo", lambda: lomo_jax.lomo(1e-3)),
                          ("adalomo", lambda: lomo_jax.adalomo(1e-3))):
        tx = make_tx()
        init = lambda p, tx=tx: lomo_jax.fused_init(tx, p)  # noqa: E731
        accumulated = lomo_jax.fused_train_step(model, tx, microbatches=m)
        separate = one_step_per_microbatch(lomo_jax.fused_train_step(model, tx), m)
        t = time_pair({"acc": (init, accumulated), "sep": (init, separate)}, params, batch,
                      steps, warmup)
        print(f"| {name} | {t['acc'] * 1e3:.1f} | {t['sep'] * 1e3:.1f} | "
              f"{t['acc'] / t['sep']:.3f} |", flush=True)


def main():
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
    ap.add_argument("--microbatches", type=int, default=4,
                    help="M for the gradient-accumulation table (0: skip it)")
    ap.add_argument("--rows", type=int, nargs="*", default=None,
                    help="only these rows of the table (0-based; default: all)")
    args = ap.parse_args()

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
    print("| transform | remat policy | clip | fused ms | unfused ms | fused / unfused |")
    print("|---|---|---|---:|---:|---:|")
    configs = [
        ("lomo", lambda: lomo_jax.lomo(1e-3), None, None),
        ("adalomo", lambda: lomo_jax.adalomo(1e-3), None, None),
        ("adamw", lambda: optax.adamw(1e-3), None, None),
        ("adalomo", lambda: lomo_jax.adalomo(1e-3), "dots_saveable", None),
        ("adalomo", lambda: lomo_jax.adalomo(1e-3), None, 1.0),
    ]
    if args.rows is not None:
        configs = [configs[i] for i in args.rows]
    for name, make_tx, policy_name, clip in configs:
        tx = make_tx()
        policy = getattr(jax.checkpoint_policies, policy_name) if policy_name else None
        fused = (lambda p, tx=tx: lomo_jax.fused_init(tx, p),
                 lomo_jax.fused_train_step(model, tx, remat_policy=policy, clip_grad_norm=clip))
        unfused = unfused_step(model, tx, policy, clip)
        t = time_pair({"fused": fused, "unfused": unfused}, params, batch, args.steps, args.warmup)
        note = " (2 passes, informational)" if clip else ""
        print(f"| {name} | {policy_name or 'None'} | {clip or '-'} | {t['fused'] * 1e3:.1f} | "
              f"{t['unfused'] * 1e3:.1f} | {t['fused'] / t['unfused']:.3f}{note} |", flush=True)
    if args.microbatches:
        m = args.microbatches
        big = {"input_ids": jnp.asarray(rng.integers(0, args.vocab, (m * args.batch, args.seq)),
                                        jnp.int32)}
        microbatch_rows(model, params, big, m, args.steps, args.warmup)
    print(f"\n(total {time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
