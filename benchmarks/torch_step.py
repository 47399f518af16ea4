"""Wall-clock time of one LOMO / AdaLomo training step: lomo_torch vs lomo-optim 0.1.1.

The model is a stack of ``--blocks`` residual blocks ``x + gelu(LayerNorm(Linear(x)))``
(4 parameter tensors each, so a few hundred tensors by default), which is where
per-parameter overhead shows: lomo-optim's hooks each scan all parameters
(quadratic in the number of tensors), lomo_torch runs one post-accumulate-grad
hook per tensor.

Two steps are timed for each optimizer:

* ``fwd + fused_backward``            (no norm clipping, one backward pass)
* ``fwd + grad_norm + fused_backward`` (``clip_grad_norm=1.0``, two passes)

Both implementations start from the same weights and see the same batches;
calls alternate between them (so drift affects both alike); the table shows
the median of ``--repeats`` timed steps after ``--warmup`` steps, the speed-up
(lomo-optim time / lomo_torch time) and the largest relative difference
between the two models' parameters at the end (they must agree).

Run:  python benchmarks/torch_step.py [--blocks 100 --dim 64 --batch 16 --repeats 7 --threads 1]
(about 20 s on 2 CPU cores with the defaults)
"""

from __future__ import annotations

import argparse
import copy
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


def import_lomo_optim(device):
    if device.type != "cuda":
        # lomo-optim's AdaLomo allocates its state with .cuda(); keep it on the CPU.
        torch.Tensor.cuda = lambda self, *a, **k: self
    import lomo_optim

    return lomo_optim


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(model, opt, two_pass, lr, device):
    def step(x, y):
        sync(device)
        t0 = time.perf_counter()
        loss = model(x, y)
        if two_pass:
            opt.grad_norm(loss)
        opt.fused_backward(loss, lr)
        sync(device)
        return time.perf_counter() - t0

    return step


@torch.no_grad()
def max_rel_diff(a, b):
    worst = 0.0
    for p, q in zip(a.parameters(), b.parameters()):
        worst = max(worst, float((p - q).norm() / q.norm().clamp_min(1e-30)))
    return worst


def bench(opt_name, two_pass, base, batches, args, lomo_optim, device):
    ours_model, ref_model = copy.deepcopy(base), copy.deepcopy(base)
    kw = {"clip_grad_norm": 1.0} if two_pass else {}
    lr = 1e-3
    ours = make_step(ours_model, getattr(lomo_torch, opt_name)(ours_model, lr=lr, **kw), two_pass, lr, device)
    ref = make_step(ref_model, getattr(lomo_optim, opt_name)(ref_model, lr=lr, **kw), two_pass, lr, device)
    times = {"ours": [], "ref": []}
    for i, (x, y) in enumerate(batches):
        order = [("ours", ours), ("ref", ref)] if i % 2 == 0 else [("ref", ref), ("ours", ours)]
        for key, fn in order:
            t = fn(x, y)
            if i >= args.warmup:
                times[key].append(t)
    return (statistics.median(times["ref"]) * 1e3, statistics.median(times["ours"]) * 1e3,
            max_rel_diff(ours_model, ref_model))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=100, help="residual blocks (4 tensors each)")
    ap.add_argument("--dim", type=int, default=64, help="width of each block")
    ap.add_argument("--batch", type=int, default=16, help="rows per batch")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--repeats", type=int, default=7, help="timed steps (median reported)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: these small ops gain nothing from "
                         "more, and a busy machine makes OpenMP waits dominate); 0 = torch default")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lomo_optim = import_lomo_optim(device)

    torch.manual_seed(0)
    base = Stack(args.blocks, args.dim).to(device)
    n_tensors = len(list(base.parameters()))
    n_params = sum(p.numel() for p in base.parameters())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, args.dim, generator=g).to(device),
                torch.randn(args.batch, args.dim, generator=g).to(device))
               for _ in range(args.warmup + args.repeats)]

    print(f"model: {args.blocks} x (Linear {args.dim}x{args.dim} + LayerNorm {args.dim}) = "
          f"{n_tensors} parameter tensors, {n_params:,} parameters; batch {args.batch}")
    print(f"device: {device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"median of {args.repeats} steps after {args.warmup} warm-up")
    header = (f"{'optimizer':<9} {'step':<34} {'lomo-optim ms':>13} {'lomo_torch ms':>13} "
              f"{'speed-up':>8} {'max rel diff':>12}")
    print(header)
    print("-" * len(header))
    for opt_name in ("Lomo", "AdaLomo"):
        for two_pass in (False, True):
            label = "fwd + grad_norm + fused_backward" if two_pass else "fwd + fused_backward"
            ref_ms, ours_ms, diff = bench(opt_name, two_pass, base, batches, args, lomo_optim, device)
            print(f"{opt_name:<9} {label:<34} {ref_ms:>13.1f} {ours_ms:>13.1f} "
                  f"{ref_ms / ours_ms:>7.1f}x {diff:>12.1e}", flush=True)


if __name__ == "__main__":
    main()
