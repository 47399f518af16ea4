"""Wall-clock time of one LOMO / AdaLomo training step: lomo_torch vs lomo-optim 0.1.1,
and vs a plain ``backward()`` + ``torch.optim.SGD`` step.

Two models (``--model``):

* ``stack`` (default): ``--blocks`` residual blocks ``x + gelu(LayerNorm(Linear(x)))``
  (4 parameter tensors each, a few hundred tensors by default), where
  per-parameter overhead shows: lomo-optim's hooks each scan all parameters
  (quadratic in the number of tensors), lomo_torch runs one
  post-accumulate-grad hook per tensor.
* ``llama``: a transformers ``LlamaForCausalLM`` built from a ``LlamaConfig``
  (no download; 45M parameters by default), a causal-LM loss on random token
  ids: a real model, where the forward and backward dominate.

Two steps are timed for each optimizer:

* ``fwd + fused_backward``            (no norm clipping, one backward pass)
* ``fwd + grad_norm + fused_backward`` (``clip_grad_norm=1.0``, two passes)

and, in the Lomo one-pass comparison, ``fwd + backward + SGD.step()`` (the
same update with the whole gradient kept; ``zero_grad(set_to_none=True)``
after each step). All start from the same weights and see the same batches;
calls alternate between them (so drift affects all alike); the tables show
the median of ``--repeats`` timed steps after ``--warmup`` steps, the
speed-up (lomo-optim time / lomo_torch time), the largest difference between
the lomo-optim and lomo_torch models' parameters at the end relative to how
far they moved from the start (``diff/update``: they must agree), and
lomo_torch's time over the plain step's.

Run:  python benchmarks/torch_step.py [--blocks 100 --dim 64 --batch 16 --repeats 7 --threads 1]
      (about 20 s on 2 CPU cores with the defaults)
      python benchmarks/torch_step.py --model llama --threads 2 --repeats 5 --warmup 1
      (batch 4 x 128; a few minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import lomo_torch  # noqa: E402

LR = 1e-3


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return x + F.gelu(self.norm(self.linear(x)))


class Stack(nn.Module):
    def __init__(self, blocks, dim):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(blocks)])

    def forward(self, x, y):
        return F.mse_loss(self.blocks(x), y)


class CausalLM(nn.Module):
    """``LlamaForCausalLM`` with the ``Stack`` call signature: ``model(ids, ids) -> loss``."""

    def __init__(self, args):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                          intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                          num_attention_heads=args.heads, num_key_value_heads=args.heads,
                          max_position_embeddings=args.seq, tie_word_embeddings=False,
                          attn_implementation="sdpa")
        self.lm = LlamaForCausalLM(cfg)

    def forward(self, ids, labels):
        return self.lm(input_ids=ids, labels=labels).loss


def build(args):
    """(model, batches, description) for ``args.model``."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n = args.warmup + args.repeats
    if args.model == "llama":
        model = CausalLM(args)
        ids = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(n)]
        batches = [(x, x) for x in ids]
        what = (f"transformers LlamaForCausalLM: {args.layers} layers, d={args.hidden}, "
                f"ffn {args.intermediate}, {args.heads} heads, vocab {args.vocab}, untied")
        shape = f"{args.batch} x {args.seq} tokens"
    else:
        model = Stack(args.blocks, args.dim)
        batches = [(torch.randn(args.batch, args.dim, generator=g),
                    torch.randn(args.batch, args.dim, generator=g)) for _ in range(n)]
        what = f"{args.blocks} x (Linear {args.dim}x{args.dim} + LayerNorm {args.dim})"
        shape = f"{args.batch} rows"
    n_tensors = len(list(model.parameters()))
    n_params = sum(p.numel() for p in model.parameters())
    return model, batches, (f"model: {what} = {n_tensors} parameter tensors, "
                            f"{n_params:,} parameters; batch {shape}")


def import_lomo_optim(device):
    if device.type != "cuda":
        # lomo-optim's AdaLomo allocates its state with .cuda(); keep it on the CPU.
        torch.Tensor.cuda = lambda self, *a, **k: self
    import lomo_optim

    return lomo_optim


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn):
    """``fn`` as a function of the batch that returns its wall-clock seconds."""
    def step(x, y):
        sync(device)
        t0 = time.perf_counter()
        fn(x, y)
        sync(device)
        return time.perf_counter() - t0

    return step


def fused_step(model, opt, two_pass):
    def step(x, y):
        loss = model(x, y)
        if two_pass:
            opt.grad_norm(loss)
        opt.fused_backward(loss, LR)

    return step


def sgd_step(model):
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step(x, y):
        model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


@torch.no_grad()
def max_rel_diff(a, b, start):
    """max over tensors of ``||a - b|| / ||b - start||``: the two models' difference
    relative to how far training moved them (0 when equal, about 1 for another update;
    NaN when a tensor did not move)."""
    ratios = [float((p - q).norm() / (q - q0).norm())
              for p, q, q0 in zip(a.parameters(), b.parameters(), start.parameters())]
    return max(ratios) if not any(math.isnan(r) for r in ratios) else math.nan


def median_ms(steps, batches, warmup, device):
    """Median milliseconds per step of each ``steps[name]``, called in turn on every
    batch (the order rotates each batch); the first ``warmup`` batches are not timed."""
    names, times = list(steps), {name: [] for name in steps}
    for i, (x, y) in enumerate(batches):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t = timed(device, steps[name])(x, y)
            if i >= warmup:
                times[name].append(t)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def bench(opt_name, two_pass, base, batches, args, lomo_optim, device):
    """{"ref", "ours"[, "sgd"]: median ms} and the lomo-optim/lomo_torch parameter difference."""
    models = {key: copy.deepcopy(base) for key in ("ref", "ours")}
    kw = {"clip_grad_norm": 1.0} if two_pass else {}
    steps = {"ours": fused_step(models["ours"], getattr(lomo_torch, opt_name)(models["ours"], lr=LR, **kw),
                                two_pass),
             "ref": fused_step(models["ref"], getattr(lomo_optim, opt_name)(models["ref"], lr=LR, **kw),
                               two_pass)}
    if opt_name == "Lomo" and not two_pass:
        steps["sgd"] = sgd_step(copy.deepcopy(base))
    ms = median_ms(steps, batches, args.warmup, device)
    return ms, max_rel_diff(models["ours"], models["ref"], base)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["stack", "llama"], default="stack")
    ap.add_argument("--blocks", type=int, default=100, help="stack: residual blocks (4 tensors each)")
    ap.add_argument("--dim", type=int, default=64, help="stack: width of each block")
    ap.add_argument("--layers", type=int, default=4, help="llama: decoder layers")
    ap.add_argument("--hidden", type=int, default=512, help="llama: hidden size")
    ap.add_argument("--intermediate", type=int, default=1376, help="llama: MLP width")
    ap.add_argument("--heads", type=int, default=8, help="llama: attention heads")
    ap.add_argument("--vocab", type=int, default=32000, help="llama: vocabulary")
    ap.add_argument("--seq", type=int, default=128, help="llama: tokens per row")
    ap.add_argument("--batch", type=int, default=None, help="rows per batch (16 stack, 4 llama)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--repeats", type=int, default=7, help="timed steps (median reported)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: 1 for the stack, whose small ops gain "
                         "nothing from more; torch's default for llama); 0 = torch default")
    args = ap.parse_args(argv)
    if args.batch is None:
        args.batch = 4 if args.model == "llama" else 16
    if args.threads is None:
        args.threads = 0 if args.model == "llama" else 1
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lomo_optim = import_lomo_optim(device)
    base, batches, description = build(args)
    base.to(device)
    batches = [(x.to(device), y.to(device)) for x, y in batches]

    print(description)
    print(f"device: {device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"median of {args.repeats} steps after {args.warmup} warm-up")
    header = (f"{'optimizer':<9} {'step':<34} {'lomo-optim ms':>13} {'lomo_torch ms':>13} "
              f"{'speed-up':>8} {'diff/update':>12}")
    print(header)
    print("-" * len(header))
    plain = None
    for opt_name in ("Lomo", "AdaLomo"):
        for two_pass in (False, True):
            label = "fwd + grad_norm + fused_backward" if two_pass else "fwd + fused_backward"
            ms, diff = bench(opt_name, two_pass, base, batches, args, lomo_optim, device)
            print(f"{opt_name:<9} {label:<34} {ms['ref']:>13.1f} {ms['ours']:>13.1f} "
                  f"{ms['ref'] / ms['ours']:>7.2f}x {diff:>12.1e}", flush=True)
            if "sgd" in ms:
                plain = ms
    print(f"\nplain step, timed alternately with the Lomo fwd + fused_backward row:\n"
          f"fwd + backward + SGD.step {plain['sgd']:.1f} ms; lomo_torch Lomo {plain['ours']:.1f} ms "
          f"= {plain['ours'] / plain['sgd']:.2f}x the plain step; "
          f"lomo-optim Lomo {plain['ref']:.1f} ms = {plain['ref'] / plain['sgd']:.2f}x")


if __name__ == "__main__":
    main()
