"""bf16 parameters that learn: fp32 vs bf16 round-to-nearest vs bf16 stochastic rounding.

A fine-tuning run on a 4-layer LLaMA (d=256, 8 heads / 4 key-value heads,
tied embeddings; byte-level vocabulary, so both frameworks share it with no
tokenizer), on the same split of the corpus as the main job's shipped
checkpoint (``examples/data/make_pretrained.py``): the script first pretrains it in fp32 (AdamW) on the stories and
notes of ``examples/data/corpus.txt``, then fine-tunes that checkpoint on text
it was not trained on (the corpus's arithmetic sentences) at a fine-tuning
learning rate, and reports the held-out loss on that text before and after.

Each fine-tuning run starts from the same checkpoint, sees the same batches and
is done three ways -- fp32 parameters, bf16 parameters rounded to nearest, bf16
parameters rounded stochastically -- in the lomo_jax fused step and in
lomo_torch, with AdaLomo (and LOMO with ``--optimizers``). Columns:

* reduction: held-out loss before minus after (evaluated in fp32);
* ÷ fp32: that reduction over the fp32 run's (same framework and optimizer);
* changed/step: the share of weights whose stored value changed, per step;
* step ms: median wall time of a training step (the three settings' steps
  interleaved in a rotating order, comparisons outside the timing);
  ÷ nearest: the median over steps of the step's time over the bf16
  round-to-nearest run's step on the same batch.

Run:  python benchmarks/precision.py           (~5 min on 2 CPU cores; LOMO too: ~10)
      python benchmarks/precision.py --optimizers adalomo lomo --plot docs/precision.png
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # CPU unless asked (and quiet with the CUDA plugin)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lomo_jax  # noqa: E402
from lomo_jax.models import convert, llama  # noqa: E402

CORPUS = Path(__file__).resolve().parents[1] / "examples" / "data" / "corpus.txt"
NUMBER_WORDS = set(("zero one two three four five six seven eight nine ten eleven twelve "
                    "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty").split())
SETTINGS = ("fp32", "bf16 nearest", "bf16 stochastic")


def config(dtype):
    return llama.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688,
                             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                             max_position_embeddings=128, tie_word_embeddings=True,
                             dtype=dtype, param_dtype=dtype)


# ------------------------------------------------------------------- data -----

def split_corpus(seq):
    """(pretraining windows, fine-tuning windows, held-out fine-tuning windows), uint8."""
    lines = CORPUS.read_text().splitlines()
    arithmetic = [ln for ln in lines if ln.split(" ", 1)[0].lower() in NUMBER_WORDS]
    other = [ln for ln in lines if ln.split(" ", 1)[0].lower() not in NUMBER_WORDS]
    rng = np.random.default_rng(0)
    rng.shuffle(arithmetic)
    cut = len(arithmetic) // 10

    def windows(text_lines):
        data = np.frombuffer("\n".join(text_lines).encode(), np.uint8)
        n = len(data) // seq
        return data[: n * seq].reshape(n, seq).astype(np.int32)

    return windows(other), windows(arithmetic[cut:]), windows(arithmetic[:cut])


def batches(windows, batch, steps, seed):
    rng = np.random.default_rng(seed)
    return [windows[rng.integers(0, len(windows), batch)] for _ in range(steps)]


# ----------------------------------------------------------- pretraining -----

def pretrain(windows, steps, batch):
    """fp32 AdamW from scratch: the checkpoint every fine-tuning run starts from."""
    cfg = config(jnp.float32)
    lm = llama.llama_layered_model(cfg)
    params = llama.init_params(cfg, 0)
    warmup = min(30, steps // 4)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup, max(steps, warmup + 1)),
                     weight_decay=0.01)
    state = tx.init(params)

    @jax.jit
    def step(p, s, ids):
        loss, g = jax.value_and_grad(lm.loss)(p, {"input_ids": ids})
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    for ids in batches(windows, batch, steps, seed=1):
        params, state, loss = step(params, state, jnp.asarray(ids))
    return jax.tree.map(np.asarray, params), float(loss)


@functools.lru_cache(maxsize=None)
def fp32_loss():
    """The fp32 model's jitted loss, built once (every evaluation shares one compile)."""
    return jax.jit(llama.llama_layered_model(config(jnp.float32)).loss)


def held_out_loss(params, windows):
    """Mean loss in fp32 on the held-out windows (the parameters upcast)."""
    p32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return float(fp32_loss()(p32, {"input_ids": jnp.asarray(windows)}))


# ------------------------------------------------------------ fine-tuning -----

def changed_share(old, new):
    n = sum(a.size for a in old)
    return sum(int(np.count_nonzero(a != b)) for a, b in zip(old, new)) / n


class JaxRun:
    """The lomo_jax fused step on one setting; :meth:`step` returns (seconds, changed share)."""

    def __init__(self, params0, setting, optimizer, lr):
        dtype = jnp.float32 if setting == "fp32" else jnp.bfloat16
        lm = llama.llama_layered_model(config(dtype))
        tx = lomo_jax.adalomo(lr) if optimizer == "adalomo" else lomo_jax.lomo(lr)
        self.params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params0)
        self.state = lomo_jax.fused_init(tx, self.params, rng=jax.random.key(0))
        rounding = "stochastic" if setting.endswith("stochastic") else "nearest"
        self._step = lomo_jax.fused_train_step(lm, tx, rounding=rounding)

    def step(self, ids):
        before = [np.array(x) for x in jax.tree.leaves(self.params)]
        t0 = time.perf_counter()
        self.params, self.state, _ = self._step(self.params, self.state,
                                                {"input_ids": jnp.asarray(ids)})
        jax.block_until_ready(self.params)
        seconds = time.perf_counter() - t0
        return seconds, changed_share(before, [np.asarray(x) for x in jax.tree.leaves(self.params)])

    def result(self):
        return jax.tree.map(np.asarray, self.params)


class TorchRun:
    """lomo_torch on a transformers LlamaForCausalLM holding the same weights."""

    def __init__(self, params0, setting, optimizer, lr):
        import torch
        import transformers

        import lomo_torch

        self.torch, self.lr = torch, lr
        self.cfg = config(jnp.float32)
        hf_cfg = self.cfg.to_hf()
        hf_cfg._attn_implementation = "eager"
        model = transformers.LlamaForCausalLM(hf_cfg)
        model.load_state_dict(convert.params_to_hf(params0, self.cfg))
        self.model = model.to(torch.float32 if setting == "fp32" else torch.bfloat16).train()
        cls = lomo_torch.AdaLomo if optimizer == "adalomo" else lomo_torch.Lomo
        self.opt = cls(self.model, lr=lr, stochastic_rounding=setting.endswith("stochastic"), seed=0)

    def step(self, ids):
        ids = self.torch.from_numpy(ids).long()
        before = [p.detach().clone() for p in self.model.parameters()]
        t0 = time.perf_counter()
        self.opt.fused_backward(self.model(input_ids=ids, labels=ids).loss, self.lr)
        seconds = time.perf_counter() - t0
        changed = sum(int((a != b).sum()) for a, b in zip(before, self.model.parameters()))
        return seconds, changed / sum(a.numel() for a in before)

    def result(self):
        back = {k: v.float().numpy() for k, v in self.model.state_dict().items()}
        return convert.params_from_hf(back, self.cfg)


def finetune(cls, params0, data, optimizer, lr):
    """The three settings side by side, their steps interleaved (so machine drift
    affects all alike) in an order that rotates every step (so no setting always
    runs right after another's allocations): {setting: (params, step seconds,
    changed shares)}."""
    runs = {setting: cls(params0, setting, optimizer, lr) for setting in SETTINGS}
    times = {k: [] for k in runs}
    changed = {k: [] for k in runs}
    for i, ids in enumerate(data):
        for setting in SETTINGS[i % 3:] + SETTINGS[:i % 3]:
            run = runs[setting]
            t, c = run.step(ids)
            times[setting].append(t)
            changed[setting].append(c)
    return {k: (run.result(), times[k], changed[k]) for k, run in runs.items()}


def paired_ratio(times, nearest_times):
    """The median over steps of this setting's step time over round-to-nearest's on
    the same batch (run back to back): drift between steps cancels in each ratio."""
    return statistics.median(t / n for t, n in zip(times, nearest_times))


# ------------------------------------------------------------------- main -----

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frameworks", nargs="*", default=["jax", "torch"], choices=["jax", "torch"])
    ap.add_argument("--optimizers", nargs="*", default=["adalomo"], choices=["adalomo", "lomo"])
    ap.add_argument("--lr", type=float, default=None,
                    help="fine-tuning lr (default: AdaLomo 2e-4, LOMO 5e-3)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--plot", default=None, help="write the held-out loss / changed-weights plot here")
    ap.add_argument("--json", default=None, help="write the rows (and per-step changed shares) here")
    ap.add_argument("--replot", default=None, metavar="JSON",
                    help="only redraw --plot from a --json file of an earlier run")
    args = ap.parse_args(argv)
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        return plot(args.plot, saved["rows"], saved["before"])

    t_start = time.time()
    pre, tune, held = split_corpus(args.seq)
    params0, pre_loss = pretrain(pre, args.pretrain_steps, 16)
    before = held_out_loss(params0, held)
    data = batches(tune, args.batch, args.steps, seed=2)
    print(f"pretrained {args.pretrain_steps} AdamW steps on stories/notes (last loss {pre_loss:.3f}); "
          f"fine-tuning {args.steps} steps of {args.batch} x {args.seq} bytes on arithmetic "
          f"sentences; held-out loss before: {before:.4f}; jax {jax.__version__}, "
          f"{os.cpu_count()} CPU cores\n")
    print("| framework | optimizer | lr | setting | held-out after | reduction | ÷ fp32 | "
          "changed/step | step ms | ÷ nearest |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for framework in args.frameworks:
        for optimizer in args.optimizers:
            lr = args.lr or (2e-4 if optimizer == "adalomo" else 5e-3)
            runs = finetune(JaxRun if framework == "jax" else TorchRun, params0, data,
                            optimizer, lr)
            results = {setting: (before - held_out_loss(params, held), times[2:], changed)
                       for setting, (params, times, changed) in runs.items()}
            for setting in SETTINGS:
                red, times, changed = results[setting]
                row = dict(framework=framework, optimizer=optimizer, lr=lr, setting=setting,
                           after=before - red, reduction=red, vs_fp32=red / results["fp32"][0],
                           changed=float(np.mean(changed)), ms=statistics.median(times) * 1e3,
                           vs_nearest=paired_ratio(times, results["bf16 nearest"][1]),
                           curve=changed)
                rows.append(row)
                print(f"| {framework} | {optimizer} | {lr:g} | {setting} | {row['after']:.4f} | "
                      f"{red:.4f} | {row['vs_fp32']:.2f} | {row['changed']:.1%} | "
                      f"{row['ms']:.1f} | {row['vs_nearest']:.3f} |", flush=True)
    print(f"\n(total {time.time() - t_start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"before": before, "rows": rows}))
    if args.plot:
        plot(args.plot, rows, before)


COLORS = {"fp32": "#4c72b0", "bf16 nearest": "#c44e52", "bf16 stochastic": "#55a868"}


def plot(path, rows, before):
    """Left: each run's held-out loss reduction (÷ fp32 written beside it); right:
    the share of weights that changed, per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 0.42 * len(rows) + 1.8),
                               gridspec_kw={"width_ratios": [1.1, 1]})
    labels = [f"{r['framework']} {r['optimizer']}, {r['setting']}" for r in rows]
    bars = a.barh(labels, [r["reduction"] for r in rows], color=[COLORS[r["setting"]] for r in rows])
    for bar, r in zip(bars, rows):
        a.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r['vs_fp32']:.2f} x fp32",
               va="center", fontsize=8)
    a.invert_yaxis()
    a.set_xlim(0, 1.2 * max(r["reduction"] for r in rows))
    a.set(xlabel=f"held-out loss reduction (loss before fine-tuning: {before:.3f})",
          title="what fine-tuning achieved")
    for r in rows:
        b.plot(np.asarray(r["curve"]) * 100, color=COLORS[r["setting"]],
               ls="-" if r["framework"] == "jax" else "--",
               lw=1.6 if r["optimizer"] == "adalomo" else 0.9,
               label=f"{r['framework']} {r['optimizer']}, {r['setting']}")
    b.set(xlabel="fine-tuning step", ylabel="% of weights whose stored value changed",
          yscale="log", title="weights changed per step")
    b.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
