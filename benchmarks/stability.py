"""Gradient spikes and plain LOMO: no clipping vs global clipping vs adaptive clipping.

The shipped tiny LLaMA (``examples/data/pretrained``) is fine-tuned with plain
LOMO (``lomo_jax.lomo``, SGD) through the fused step on the main job's JSONL
data (``examples/data/finetune.jsonl``, packed), three ways:

* ``none``: no clipping;
* ``global``: ``clip_grad_norm=1.0``, LOMO's global-norm clipping (two
  backward passes: the norm first, then the update);
* ``adaptive``: ``optax.chain(lomo_jax.adaptive_clip(warmup_steps=W), lomo)``,
  per-tensor AdaGC clipping in one pass. Its warm-up is shortened from the
  library's 100 steps to ``--adaptive-warmup`` (default 10: a quarter of the
  default 40-step run), so the history has formed well before the first spike.

Each arm runs twice from the same checkpoint, with the same batches (the data
order is ``--seeds``'): a *clean* run, and a *spiked* run in which three batches
are spikes at known steps: one whose loss is scaled x100, one x1000 (each row
carries a ``loss_weight`` that the wrapped model's head multiplies its loss by;
1 everywhere else), and one whose tokens are replaced by random ids in range.

Figures, per arm (held-out figures: mean over seeds, ± their standard deviation):

* held-out loss (and multiple-choice accuracy) on ``examples/data/eval.jsonl``
  after the clean run (what clipping costs when nothing goes wrong) and after
  the spiked run (what a spike leaves behind);
* the largest relative parameter change, :math:`\\max_t \\|\\Delta w_t\\| /
  \\|w_t\\|` over the parameter tensors ``t`` (a stacked layer leaf counts as one),
  at each spike step, beside the median over the clean run's steps;
* the median step time.

Writes ``OUT/stability.md`` (the table) and ``OUT/stability.png`` (the spiked
runs' training loss and relative change per step, first seed).

Run:  python benchmarks/stability.py        (~5 min on 2 busy CPU cores)
      python benchmarks/stability.py --steps 8 --seeds 0 --out /tmp/s   (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lomo_jax  # noqa: E402
from lomo_jax import data  # noqa: E402
from lomo_jax.models import convert, llama, scoring  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = ROOT / "examples" / "data" / "pretrained"
TRAIN = ROOT / "examples" / "data" / "finetune.jsonl"
EVAL = ROOT / "examples" / "data" / "eval.jsonl"
ARMS = ("none", "global", "adaptive")
# the spikes, at these fractions of the run
SPIKES = (("corrupt tokens", 1 / 3), ("loss x100", 1 / 2), ("loss x1000", 2 / 3))


def spike_steps(steps: int) -> dict:
    """``{step index: spike name}``: the three spikes at fixed fractions of the run."""
    plan = {min(steps - 1, round(steps * f)): name for name, f in SPIKES}
    if len(plan) < len(SPIKES):
        raise ValueError(f"--steps {steps} is too few for {len(SPIKES)} spike steps")
    return plan


def loss_weighted(lm: lomo_jax.LayeredModel) -> lomo_jax.LayeredModel:
    """``lm`` whose loss is multiplied by the mean of ``batch["loss_weight"]``
    (one float a row): a spike is a batch with a weight of 100 or 1000."""
    head = lm.head

    def weighted_head(p, h, batch, **kw):
        return head(p, h, batch, **kw) * jnp.mean(batch["loss_weight"])

    return dataclasses.replace(lm, head=weighted_head)


def make_arm(lm, arm: str, lr, warmup: int):
    """``(init, step)`` of the fused LOMO step for one arm."""
    tx = lomo_jax.lomo(lr)
    if arm == "adaptive":
        tx = optax.chain(lomo_jax.adaptive_clip(warmup_steps=warmup), tx)
    step = lomo_jax.fused_train_step(loss_weighted(lm), tx,
                                     clip_grad_norm=1.0 if arm == "global" else None)
    return (lambda p: lomo_jax.fused_init(tx, p)), step


def spiked(batch: dict, name: str, rng, vocab: int) -> dict:
    """``batch`` made into the spike ``name``."""
    if name == "corrupt tokens":
        ids = rng.integers(0, vocab, batch["input_ids"].shape).astype(np.int32)
        labels = np.where(batch["labels"] == data.IGNORE_INDEX, data.IGNORE_INDEX, ids)
        return {**batch, "input_ids": ids, "labels": labels.astype(np.int32)}
    weight = float(name.rsplit("x", 1)[1])
    return {**batch, "loss_weight": np.full_like(batch["loss_weight"], weight)}


def make_batches(train, batch_size: int, steps: int, seed: int, vocab: int, spikes=None):
    """The run's batches (the order from ``seed``), the spikes of ``spikes`` put in."""
    it = data.packed_batches(train, batch_size, seed=seed)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(steps):
        b = {k: np.asarray(v) for k, v in next(it).items()}
        b["loss_weight"] = np.ones(batch_size, np.float32)
        if spikes and i in spikes:
            b = spiked(b, spikes[i], rng, vocab)
        out.append(b)
    return out


def relative_change(before, after) -> float:
    """:math:`\\max_t \\|\\Delta w_t\\| / \\|w_t\\|` over the parameter tensors (inf if any
    is not finite)."""
    ratios = [np.linalg.norm((b - a).ravel()) / max(np.linalg.norm(a.ravel()), 1e-30)
              for a, b in zip(before, after)]
    worst = max(ratios)
    return float(worst) if np.isfinite(worst) else float("inf")


def train(arm_fns, params0, batches) -> dict:
    """One run: ``{"params", "loss" (unweighted, per step), "change" (per step), "ms"}``."""
    init, step = arm_fns
    params = jax.tree.map(jnp.array, params0)
    # the state on the parameters' device, as the step returns it: a state left
    # uncommitted would make the second step compile the program again
    state = jax.device_put(init(params), jax.tree.leaves(params)[0].sharding)
    losses, changes, seconds = [], [], []
    for b in batches:
        before = [np.array(x) for x in jax.tree.leaves(params)]
        t0 = time.perf_counter()
        params, state, metrics = step(params, state, jax.tree.map(jnp.asarray, b))
        jax.block_until_ready(params)
        seconds.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]) / float(np.mean(b["loss_weight"])))
        changes.append(relative_change(before, [np.asarray(x) for x in jax.tree.leaves(params)]))
    return {"params": params, "loss": losses, "change": changes,
            "ms": 1e3 * statistics.median(seconds[1:] or seconds)}


def held_out(cfg, params, tokenizer, eval_data) -> tuple:
    """``(loss, accuracy)`` on the eval file (NaN for a model gone non-finite)."""
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params)):
        return float("nan"), float("nan")
    r = scoring.evaluate(cfg, params, tokenizer, eval_data)
    return r["loss"], r["accuracy"]


def run_arm(arm, fns, setup, args) -> dict:
    """Every seed's clean and spiked run of one arm: the per-seed figures."""
    cfg, params0, tokenizer, train_data, eval_data = setup
    plan = spike_steps(args.steps)
    out = {k: [] for k in ("clean", "spiked", "typical", "ms", "curves")}
    out["at_spike"] = {name: [] for name, _ in SPIKES}
    for seed in args.seeds:
        runs = {}
        for kind, spikes in (("clean", None), ("spiked", plan)):
            batches = make_batches(train_data, args.batch, args.steps, seed, cfg.vocab_size,
                                   spikes)
            runs[kind] = train(fns, params0, batches)
            out[kind].append(held_out(cfg, runs[kind]["params"], tokenizer, eval_data))
        out["typical"].append(statistics.median(runs["clean"]["change"]))
        out["ms"].append(runs["clean"]["ms"])
        out["curves"].append((runs["spiked"]["loss"], runs["spiked"]["change"]))
        for i, name in plan.items():
            out["at_spike"][name].append(runs["spiked"]["change"][i])
        print(f"  {arm}, seed {seed}: held-out loss clean {out['clean'][-1][0]:.4f}, "
              f"spiked {out['spiked'][-1][0]:.4f}", flush=True)
    return out


def setup_run(args):
    """``(cfg, params, tokenizer, train data, eval data)`` from the shipped files."""
    from transformers import AutoTokenizer

    cfg, params = convert.load_pretrained(str(PRETRAINED), dtype=jnp.float32,
                                          config_dtype=jnp.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(PRETRAINED))
    train_data = data.load(str(TRAIN), tokenizer, args.seq, vocab_size=cfg.vocab_size)
    eval_data = data.load_eval(str(EVAL), tokenizer, args.seq, vocab_size=cfg.vocab_size)
    return cfg, params, tokenizer, train_data, eval_data


def spread(values) -> str:
    """``mean ± sd`` over seeds (the mean alone for one seed)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {float(np.std(values, ddof=1)):.4f}"


def worst(values) -> str:
    """The largest of the seeds' figures (``inf``: the parameters went non-finite)."""
    return f"{max(values):.3g}"


HEADER = ("| clipping | backward passes | held-out loss, clean | accuracy, clean | "
          "held-out loss, spiked | accuracy, spiked | max rel. Δw, median step | "
          + " | ".join(f"max rel. Δw, {name}" for name, _ in SPIKES) + " | step ms |")


def table(results, before, args) -> str:
    """The Markdown table (one row an arm) and the paired adaptive-global difference."""
    lines = [HEADER, "|---|---:|" + "---:|" * (HEADER.count("|") - 3)]
    for arm, r in results.items():
        clean, spike = np.array(r["clean"]), np.array(r["spiked"])
        cells = [arm, "2" if arm == "global" else "1", spread(clean[:, 0]), spread(clean[:, 1]),
                 spread(spike[:, 0]), spread(spike[:, 1]), worst(r["typical"])]
        cells += [worst(r["at_spike"][name]) for name, _ in SPIKES]
        cells.append(f"{statistics.median(r['ms']):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    plan = ", ".join(f"{name} at step {i}" for i, name in spike_steps(args.steps).items())
    lines += ["", f"Before fine-tuning: held-out loss {before[0]:.4f}, accuracy {before[1]:.4f}. "
              f"{args.steps} steps of {args.batch} x {args.seq} tokens, LOMO lr {args.lr:g} "
              f"(warm-up + cosine), seeds {args.seeds}; adaptive warm-up "
              f"{args.adaptive_warmup} steps; spikes (0-based): {plan}."]
    if "global" in results and "adaptive" in results:
        lines.append(paired_difference(results))
    return "\n".join(lines) + "\n"


def paired_difference(results) -> str:
    """Adaptive minus global held-out loss, seed by seed (the same batches), beside
    the seed-to-seed spread of global's: the noise the difference is measured in."""
    diff = [a[0] - g[0] for a, g in zip(results["adaptive"]["clean"], results["global"]["clean"])]
    noise = np.std([g[0] for g in results["global"]["clean"]], ddof=1) if len(diff) > 1 else 0.0
    return (f"Adaptive - global held-out loss (clean runs, paired by seed): "
            f"{', '.join(f'{d:+.4f}' for d in diff)}; seed-to-seed sd of global: {noise:.4f}.")


COLORS = {"none": "#c44e52", "global": "#4c72b0", "adaptive": "#55a868"}


def plot(path: Path, results, steps: int) -> None:
    """The first seed's spiked runs: training loss (left) and the largest relative
    parameter change (right) per step, the spike steps marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for arm, r in results.items():
        loss, change = r["curves"][0]
        for ax, ys in zip(axes, (loss, change)):
            ax.plot(np.arange(len(ys)), np.where(np.isfinite(ys), ys, np.nan), lw=1.4,
                    color=COLORS[arm], label=arm)
    for ax in axes:
        for i, name in spike_steps(steps).items():
            ax.axvline(i, color="0.6", ls=":", lw=1)
            ax.text(i, 1.0, f" {name}", transform=ax.get_xaxis_transform(), fontsize=7,
                    rotation=90, va="top")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    axes[0].set(xlabel="step", ylabel="training loss (unweighted)",
                title="LOMO with gradient spikes: training loss")
    axes[1].set(xlabel="step", ylabel="max over tensors of |Δw| / |w|",
                title="largest relative parameter change per step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                    help="data orders (and corrupt-token draws); every arm runs each")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-2, help="LOMO's peak learning rate")
    ap.add_argument("--adaptive-warmup", type=int, default=10,
                    help="adaptive_clip's warm-up steps (must end before the first spike)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                    help="directory for stability.md and stability.png")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.steps < 2 * len(SPIKES) or args.batch < 1 or args.seq < 2:
        ap.error(f"--steps must be >= {2 * len(SPIKES)}, --batch >= 1, --seq >= 2")
    first = min(spike_steps(args.steps))
    if not 1 <= args.adaptive_warmup <= first:
        ap.error(f"--adaptive-warmup must be in [1, {first}] (the first spike is at step "
                 f"{first}), got {args.adaptive_warmup}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    setup = setup_run(args)
    cfg, params0, tokenizer, _, eval_data = setup
    before = held_out(cfg, params0, tokenizer, eval_data)
    lm = llama.llama_layered_model(cfg)
    lr = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 10), args.steps,
                                            end_value=args.lr / 10)
    results = {}
    for arm in args.arms:
        fns = make_arm(lm, arm, lr, args.adaptive_warmup)
        results[arm] = run_arm(arm, fns, setup, args)
    text = table(results, before, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/stability.py", *given])
    (out / "stability.md").write_text(
        f"`{command}` ({time.strftime('%Y-%m-%d')}, jax {jax.__version__}, "
        f"{jax.default_backend().upper()}, {os.cpu_count()} cores; "
        f"{time.time() - t0:.0f} s)\n\n" + text)
    if not args.no_plot:
        plot(out / "stability.png", results, args.steps)
    print("\n" + text + f"\nwrote {out / 'stability.md'}" + ("" if args.no_plot else
                                                             f" and {out / 'stability.png'}"))
    return results


if __name__ == "__main__":
    main()
