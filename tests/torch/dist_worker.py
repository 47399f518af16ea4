"""Worker processes for test_distributed.py: DDP and FSDP2 training on the gloo backend.

``main(rank, world, init_file, out_dir)`` is the ``torch.multiprocessing.spawn``
target. Each rank trains the DDP cases, then the FSDP2 cases, as
``single_process(engine, case)`` does on one process but on its slice of every
batch, and saves what the tests compare (parameters, local shards, grad norms,
optimizer state) to ``out_dir/<rank>.pt``. One spawn serves both engines: most
of a worker's time is importing torch, torch._dynamo (DDP) and DTensor.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed as dist
from torch import nn

import lomo_torch
from tests.torch.helpers import (MLP, FailsInBackward, TinyBlock, lm_batches, mlp_batches,
                                 owns_storage, snapshot)

STEPS = 3
LRS = [0.05, 0.04, 0.03]

# name: (optimizer, kwargs, two-pass); the DDP cases train MLP, the FSDP2 ones TinyBlock.
DDP_CASES = {
    # clip_grad_norm well below the gradient norm, so the coefficient really clips
    "lomo_clip": ("Lomo", dict(clip_grad_norm=0.05, weight_decay=0.01), True),
    "adalomo_clip": ("AdaLomo", dict(clip_grad_norm=0.05, weight_decay=0.01), True),
    "adalomo": ("AdaLomo", dict(), False),
    # fp16 parameters: dynamic loss scaling; with this scale step 1 overflows (skipped):
    # the loss leaves the fp16 graph through a cast (train), whose gradient is the
    # scale in fp16 (an fp16 loss itself is seeded with at most 2**15)
    "lomo_fp16": ("Lomo", dict(clip_grad_norm=1.0, loss_scale_args={"init_scale": 2**16}), True),
    # stochastic rounding into the fp16 parameters, its seed drawn (per rank, from
    # differently seeded default generators: SEEDED_BY_RANK) and agreed on by rank 0
    "lomo_sr_fp16": ("Lomo", dict(clip_grad_norm=1.0, loss_scale_args={"init_scale": 2**16},
                                  stochastic_rounding=True), True),
}
SEEDED_BY_RANK = 1000
FSDP_CASES = {
    "adalomo_clip": ("AdaLomo", dict(clip_grad_norm=0.3, weight_decay=0.01), True),
    "adalomo": ("AdaLomo", dict(), False),
    "lomo_clip": ("Lomo", dict(clip_grad_norm=0.3, clip_grad_value=0.02, weight_decay=0.01), True),
}


def make_model(engine, case=""):
    torch.manual_seed(0)
    if engine == "ddp":
        return MLP().half() if case.endswith("fp16") else MLP()
    return TinyBlock()


def make_batches(engine, case=""):
    if engine == "ddp":
        dtype = torch.float16 if case.endswith("fp16") else torch.float32
        return mlp_batches(STEPS, batch=32, dtype=dtype)
    return lm_batches(STEPS, batch=4)


def cases(engine):
    return DDP_CASES if engine == "ddp" else FSDP_CASES


def train(model, opt, batches, two_pass, rank=0, world=1):
    """Rank ``rank`` of ``world`` feeds its contiguous slice of every batch."""
    norms, taken = [], []
    for (x, y), lr in zip(batches, LRS):
        loss = model(x.chunk(world)[rank], y.chunk(world)[rank]).float()
        if two_pass:
            norms.append(opt.grad_norm(loss).item())
        taken.append(opt.fused_backward(loss, lr))
        if any(p.grad is not None for p in model.parameters()):
            raise AssertionError("a gradient survived fused_backward")
    return {"norms": norms, "taken": taken, "step": opt.step_num,
            "scaler": None if opt.loss_scaler is None else opt.loss_scaler.state_dict()}


def single_process(engine, case):
    """The reference: one process, the full batch (and rank 0's rounding seed)."""
    opt_name, kw, two_pass = cases(engine)[case]
    model = make_model(engine, case)
    torch.manual_seed(SEEDED_BY_RANK)
    opt = getattr(lomo_torch, opt_name)(model, lr=LRS[0], **kw)
    res = train(model, opt, make_batches(engine, case), two_pass)
    return {**res, "params": snapshot(model), "state": opt.state_dict()["state"]}


def exclude_run(model, rank=0, world=1):
    """LoRA + LOMO's pattern on the MLP: Lomo (norm clipping) on all but the head, the
    head excluded and stepped by AdamW after fused_backward. ``model``: bare or DDP."""
    module = getattr(model, "module", model)
    opt = lomo_torch.Lomo(model, lr=LRS[0], clip_grad_norm=0.05,
                          exclude=lambda n, p: n.startswith("head."))
    adamw = torch.optim.AdamW(module.head.parameters(), lr=0.01)
    head_grads, calls = [], []
    for (x, y), lr in zip(make_batches("ddp"), LRS):
        loss = model(x.chunk(world)[rank], y.chunk(world)[rank])
        opt.grad_norm(loss)
        with counted_all_reduces() as counted:
            opt.fused_backward(loss, lr)
        calls.append(len(counted))
        head_grads.append(module.head.weight.grad.clone())
        adamw.step()
        adamw.zero_grad()
    hooked = sum(1 for n, _ in module.named_parameters() if not n.startswith("head."))
    return {"params": snapshot(module), "head_grads": head_grads,
            "all_reduces": calls, "hooked": hooked}


@contextlib.contextmanager
def counted_all_reduces():
    """The sizes of the ``torch.distributed.all_reduce`` calls made inside."""
    real, sizes = torch.distributed.all_reduce, []

    def counting(tensor, *args, **kwargs):
        sizes.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    torch.distributed.all_reduce = counting
    try:
        yield sizes
    finally:
        torch.distributed.all_reduce = real


def run_ddp(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for case, (opt_name, kw, two_pass) in DDP_CASES.items():
        ddp = DDP(make_model("ddp", case))
        torch.manual_seed(SEEDED_BY_RANK + rank)  # ranks draw different seeds; rank 0's wins
        opt = getattr(lomo_torch, opt_name)(ddp, lr=LRS[0], **kw)
        res = train(ddp, opt, make_batches("ddp", case), two_pass, rank, world)
        out[case] = {**res, "params": snapshot(ddp.module), "state": opt.state_dict()["state"]}
    # Negative control: the bare module under the same data split is not averaged.
    opt_name, kw, two_pass = DDP_CASES["lomo_clip"]
    ddp = DDP(make_model("ddp"))
    opt = getattr(lomo_torch, opt_name)(ddp.module, lr=LRS[0], **kw)
    ddp.require_backward_grad_sync = False  # keep DDP's reducer out of it
    train(ddp, opt, make_batches("ddp"), two_pass, rank, world)
    out["unaveraged"] = {"params": snapshot(ddp.module)}
    # exclude=: the excluded head's gradients are averaged (DDP's reducer is off), AdamW's
    out["exclude"] = exclude_run(DDP(make_model("ddp")), rank, world)

    # DDP still broadcasts rank 0's buffers before every forward (its reducer is off).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append(m[1].running_mean.clone()))
    ddp = DDP(net)
    opt = lomo_torch.Lomo(ddp, lr=LRS[0])
    for x, y in make_batches("ddp"):
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.fused_backward(nn.functional.mse_loss(ddp(x), y), LRS[0])
    out["buffers_seen"] = seen

    try:  # DDP(static_graph=True) would all-reduce behind the optimizer's back
        lomo_torch.Lomo(DDP(make_model("ddp"), static_graph=True))
    except ValueError as e:
        out["static_graph_error"] = str(e)
    return out


def shard_model(model):
    from torch.distributed.fsdp import fully_shard

    for m in (model.q, model.k, model.v, model.o, model.up, model.down):
        fully_shard(m)
    fully_shard(model)
    return model


def run_fsdp(rank, world):
    from torch.distributed.tensor import DTensor

    out = {}
    batches = make_batches("fsdp")
    for case, (opt_name, kw, two_pass) in FSDP_CASES.items():
        model = shard_model(make_model("fsdp"))
        assert all(isinstance(p, DTensor) for p in model.parameters())
        cls = getattr(lomo_torch, opt_name)
        opt = cls(model, lr=LRS[0], **kw)
        res = train(model, opt, batches, two_pass, rank, world)
        res["local"] = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
        res["placements"] = {n: [(type(pl).__name__, getattr(pl, "dim", None)) for pl in p.placements]
                             for n, p in model.named_parameters()}
        sd = opt.state_dict()
        res["state_full"] = {n: {k: v.full_tensor() for k, v in st.items()}
                             for n, st in sd["state"].items()}
        res["state_local"] = {n: {k: v.to_local().clone() for k, v in st.items()}
                              for n, st in sd["state"].items()}
        if opt_name == "AdaLomo":
            # load_state_dict: from the DTensor state_dict, and from full tensors
            # (a single-process state_dict) that each rank slices to its part.
            for how, state in (("dtensor", sd["state"]), ("full", res["state_full"])):
                other = cls(shard_model(make_model("fsdp")), lr=LRS[0], **kw)
                other.load_state_dict({**sd, "state": state})
                res[f"reload_{how}"] = all(
                    torch.equal(v.to_local(), res["state_local"][n][k])
                    for n, st in other.state_dict()["state"].items() for k, v in st.items())
        out[case] = res

    out["hsdp_sr"] = run_hsdp_stochastic(rank, world, batches)

    out["exclude"] = fsdp_exclude_run(shard_model(make_model("fsdp")), rank, world)
    out["exclude_errors"] = exclude_mix_errors(world)
    out["sync_off"] = sync_off_errors(rank, world, batches)

    # The optimizer must be created after fully_shard (which replaces the parameters).
    model = make_model("fsdp")
    opt = lomo_torch.AdaLomo(model)
    shard_model(model)
    x, y = batches[0]
    try:
        opt.fused_backward(model(x.chunk(world)[rank], y.chunk(world)[rank]), LRS[0])
    except RuntimeError as e:
        out["sharded_after_error"] = str(e)
    return out


def _full(t):
    """The whole tensor: a DTensor's gathered from every rank, a plain one itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# what an excluded .grad holds before a step: a power of two well below the gradients
# (~1e-2), so .grad - BASE is the contribution to float32's last bits
BASE = 2.0**-12


def fsdp_exclude_run(model, rank=0, world=1):
    """LoRA + LOMO's pattern on TinyBlock (bare or fully_shard): AdaLomo (norm clipping,
    skip_nonfinite, a static loss scale) on all but ``o`` and ``down``, which AdamW steps after
    fused_backward. Steps after the first start from a ``.grad`` of BASE (accumulation);
    a last step with a NaN loss is skipped. Returns the final parameters, each step's
    excluded gradient contribution (``.grad`` - BASE), whether grad_norm left the
    ``.grad`` as it was (the same tensor), what fused_backward returned, and
    whether the first contribution owns its storage (FSDP2's reduce-scatter output
    is one flat buffer for a whole group: a view of it would keep it alive)."""
    excluded = lambda n, p: n.startswith(("o.", "down."))  # noqa: E731
    opt = lomo_torch.AdaLomo(model, lr=LRS[0], clip_grad_norm=0.3, skip_nonfinite=True,
                             loss_scale=2.0**10, exclude=excluded)  # unscaled for AdamW
    held = {n: p for n, p in model.named_parameters() if excluded(n, p)}
    adamw = torch.optim.AdamW(held.values(), lr=0.01)
    batches = make_batches("fsdp")
    out = {"grads": [], "kept_by_norm": [], "taken": []}
    # the user's own backward (no optimizer pass): the excluded gradients accumulate as usual
    (x, y) = batches[0]
    model(x.chunk(world)[rank], y.chunk(world)[rank]).backward()
    out["plain"] = {n: _full(p.grad) if p.grad is not None else None for n, p in held.items()}
    for step, ((x, y), lr) in enumerate(zip(batches + batches[:1], LRS + LRS[-1:])):
        base = 0.0 if step == 0 else BASE
        for p in held.values():
            p.grad = None if step == 0 else torch.full_like(p, base)
        before = {n: p.grad for n, p in held.items()}
        loss = model(x.chunk(world)[rank], y.chunk(world)[rank])
        if step == STEPS:
            loss = loss * float("nan")
        opt.grad_norm(loss)
        out["kept_by_norm"].append(all(p.grad is before[n] for n, p in held.items()))
        out["taken"].append(opt.fused_backward(loss, lr))
        out["grads"].append({n: _full(p.grad) - base for n, p in held.items()})
        if step == 0:
            out["own_storage"] = all(owns_storage(p.grad) for p in held.values())
        if out["taken"][-1]:
            adamw.step()
        adamw.zero_grad()
    out["params"] = {n: _full(p).detach().clone() for n, p in model.named_parameters()}
    # a pass whose backward raises puts every excluded .grad back (the same tensor)
    for p in held.values():
        p.grad = torch.full_like(p, BASE)
    before = {n: p.grad for n, p in held.items()}
    x, y = batches[0]
    try:
        opt.grad_norm(FailsInBackward.apply(model(x.chunk(world)[rank], y.chunk(world)[rank])))
    except RuntimeError as e:
        out["raised"] = str(e)
    out["kept_after_raise"] = all(p.grad is before[n] for n, p in held.items())
    return out


def exclude_mix_errors(world):
    """exclude= refuses a plain excluded tensor beside FSDP2's DTensors, and a DTensor
    excluded beside plain hooked parameters (the messages)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    errors = []
    sharded = shard_model(make_model("fsdp"))
    sharded.extra = nn.Parameter(torch.zeros(3))
    plain = make_model("fsdp")
    mesh = init_device_mesh("cpu", (world,))
    plain.o.weight = nn.Parameter(distribute_tensor(plain.o.weight.detach(), mesh, [Shard(0)]))
    for model, name in ((sharded, "extra"), (plain, "o.weight")):
        try:
            lomo_torch.AdaLomo(model, exclude=lambda n, p, name=name: n == name)
        except NotImplementedError as e:
            errors.append(str(e))
    return errors


def sync_off_errors(rank, world, batches):
    """FSDP2 gradient accumulation (sync off) refused: a pass with sync off, and a pass
    after a micro-batch backward with sync off (FSDP2 then holds an unreduced gradient);
    the parameters unchanged by both."""
    model = shard_model(make_model("fsdp"))
    opt = lomo_torch.AdaLomo(model, lr=LRS[0], clip_grad_norm=0.3)
    sharded = dict(model.named_parameters())  # (a forward swaps the root's unsharded ones in)
    before = {n: p.to_local().clone() for n, p in sharded.items()}
    x, y = (t.chunk(world)[rank] for t in batches[0])
    errors = []
    model.set_requires_gradient_sync(False)
    for sync in (False, True):
        loss = model(x, y)
        try:
            opt.fused_backward(loss, LRS[0]) if not sync else opt.grad_norm(loss)
        except RuntimeError as e:
            errors.append(str(e))
        if not sync:  # a micro-batch accumulated without sync, then sync back on
            model(x, y).backward()
            model.set_requires_gradient_sync(True)
    unchanged = all(torch.equal(p.to_local(), before[n]) for n, p in sharded.items())
    return {"errors": errors, "unchanged": unchanged}


def run_hsdp_stochastic(rank, world, batches):
    """HSDP (parameters replicated over the ranks, sharded over a size-1 dim) in bf16 with
    stochastic rounding: every rank must draw the same bits for its replica."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    model = make_model("fsdp").to(torch.bfloat16)
    for m in (model.q, model.k, model.v, model.o, model.up, model.down):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    before = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(SEEDED_BY_RANK + rank)
    opt = lomo_torch.AdaLomo(model, lr=1e-4, stochastic_rounding=True)
    train(model, opt, batches, False, rank, world)
    return {"local": {n: p.to_local().detach().clone() for n, p in model.named_parameters()},
            "before": before, "seed": opt.state_dict()["rounding_seed"],
            "placements": {n: [type(pl).__name__ for pl in p.placements]
                           for n, p in model.named_parameters()}}


def main(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {"ddp": run_ddp(rank, world), "fsdp": run_fsdp(rank, world)}
        torch.save(out, f"{out_dir}/{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
