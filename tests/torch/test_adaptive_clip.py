"""lomo_torch's adaptive per-tensor clipping (``Lomo/AdaLomo(adaptive_clip=...)``).

The rule against a numpy transcription of the equations in
lomo_torch._adaptive_clip's docstring (warm-up, a spike, a tensor without
gradient in warm-up), its state in state_dict (round trip, exact resume), the
refusals, fp16 (no clip_grad_norm=1.0; an overflow changes nothing) and the
argument checks. ``Params`` makes each gradient exactly the tensor given.
"""

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lomo_torch
from tests.torch.helpers import MLP, Params, mlp_batches, snapshot

SHAPES = {"w": (6, 5), "b": (5,), "c": (3, 4)}
SPIKE_STEP = 4


def _grads(steps, seed=0):
    """Per step: a gradient per tensor; x100 at SPIKE_STEP; ``c`` is zero in the
    first two steps (no gradient in warm-up)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        grads = {n: torch.randn(s, generator=g) * (0.3 + 0.1 * t) for n, s in SHAPES.items()}
        if t == SPIKE_STEP:
            grads = {n: v * 100 for n, v in grads.items()}
        if t < 2:
            grads["c"] = torch.zeros(SHAPES["c"])
        out.append(grads)
    return out


def _np_rule(grads, gammas, t, relative, decay, warmup, absolute):
    """The module docstring's equations, in numpy: ``(clipped grads, h, new gammas)``."""
    clipped, hs, new = {}, {}, {}
    for n, g in grads.items():
        g = g.numpy().astype(np.float32)
        norm = float(np.sqrt(np.sum(g.astype(np.float64) ** 2)))
        gamma = gammas.get(n, math.inf)
        bound = (math.inf if absolute is None else absolute) if t < warmup else relative * gamma
        h = min(1.0, bound / norm) if norm > 0 else 1.0
        clipped[n], hs[n] = g * np.float32(h), h
        n_hat = norm * h
        if t < warmup:
            new[n] = min(gamma, n_hat) if n_hat > 0 else gamma
        elif math.isinf(gamma):
            new[n] = n_hat if n_hat > 0 else gamma
        else:
            new[n] = decay * gamma + (1 - decay) * n_hat
    return clipped, hs, new


def _params(seed=1):
    g = torch.Generator().manual_seed(seed)
    return Params({n: torch.randn(s, generator=g) for n, s in SHAPES.items()})


RULE = dict(adaptive_clip=1.05, adaptive_clip_decay=0.9, adaptive_clip_warmup_steps=2)


@pytest.mark.parametrize("absolute", [0.5, None])
@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_rule_matches_the_equations(opt_name, absolute):
    """8 steps: warm-up (clipped to ``absolute`` or not), a x100 spike cut to
    ~1.05x the average, ``c`` starting its average late. Lomo: ``p -= lr * g_hat``;
    AdaLomo: equal to an unclipped AdaLomo fed the numpy-clipped gradients."""
    steps, lr = 8, 0.01
    model, ref_model = _params(), _params()
    cls = getattr(lomo_torch, opt_name)
    opt = cls(model, lr=lr, adaptive_clip_absolute=absolute, **RULE)
    ref_opt = cls(ref_model, lr=lr) if opt_name == "AdaLomo" else None
    gammas, clipped_at, want = {}, set(), snapshot(ref_model)
    for t, grads in enumerate(_grads(steps)):
        g_hat, hs, gammas = _np_rule(grads, gammas, t, 1.05, 0.9, 2, absolute)
        clipped_at |= {t for h in hs.values() if h < 1}
        assert opt.fused_backward(model(grads), lr)
        if ref_opt is not None:
            ref_opt.fused_backward(ref_model({n: torch.from_numpy(v) for n, v in g_hat.items()}), lr)
            want = snapshot(ref_model)
        else:
            want = {n: want[n] - lr * torch.from_numpy(g_hat[n]) for n in SHAPES}
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), want[n], rtol=1e-5, atol=1e-6, msg=f"{n} @ {t}")
        ema = opt.adaptive_clipping.norm_ema
        for n, gamma in gammas.items():
            if math.isinf(gamma):
                assert math.isinf(ema[n].item()), (n, t)
            else:
                assert ema[n].item() == pytest.approx(gamma, rel=1e-5), (n, t)
    assert opt.adaptive_clipping.count == steps
    assert SPIKE_STEP in clipped_at  # the spike was cut
    assert (0 in clipped_at) == (absolute is not None)  # warm-up clipped iff absolute


def _train(model, opt, batches, start=0):
    for t, (x, y) in enumerate(batches, start):
        loss = model(x, y) * (100.0 if t == SPIKE_STEP else 1.0)
        opt.fused_backward(loss, 0.05)


@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_state_dict_round_trips_and_a_resumed_run_is_bit_exact(opt_name):
    cls = getattr(lomo_torch, opt_name)
    torch.manual_seed(0)
    model = MLP()
    resumed_model = copy.deepcopy(model)
    batches = mlp_batches(7)
    opt = cls(model, lr=0.05, **RULE)
    _train(model, opt, batches)

    first = cls(resumed_model, lr=0.05, **RULE)
    _train(resumed_model, first, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": resumed_model.state_dict(), "opt": first.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["opt"]["adaptive_clip"]["count"] == 3
    assert set(saved["opt"]["adaptive_clip"]["norm_ema"]) == {n for n, _ in model.named_parameters()}
    torch.manual_seed(0)
    fresh = MLP()
    fresh.load_state_dict(saved["model"])
    second = cls(fresh, lr=0.05, **RULE)
    second.load_state_dict(saved["opt"])
    assert second.adaptive_clipping.count == 3
    _train(fresh, second, batches[3:], start=3)

    for n, p in fresh.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[n]), n
    ema, ref = second.adaptive_clipping.norm_ema, opt.adaptive_clipping.norm_ema
    assert ema.keys() == ref.keys() and all(torch.equal(ema[n], ref[n]) for n in ref)
    assert second.adaptive_clipping.count == opt.adaptive_clipping.count == 7


def test_load_state_dict_refuses_other_clipping_and_loads_nothing():
    torch.manual_seed(0)
    model = MLP()
    plain = lomo_torch.Lomo(model, lr=0.05)
    clipping = lomo_torch.Lomo(copy.deepcopy(model), lr=0.05, **RULE)
    _train(clipping.model, clipping, mlp_batches(2))
    with pytest.raises(ValueError, match="adaptive_clip: missing from the state_dict"):
        clipping.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="adaptive_clip: state_dict 1.05, not set"):
        plain.load_state_dict(clipping.state_dict())
    other = lomo_torch.Lomo(copy.deepcopy(model), lr=0.05, **{**RULE, "adaptive_clip_decay": 0.5})
    with pytest.raises(ValueError, match="adaptive_clip_decay: state_dict 0.9, this optimizer 0.5"):
        other.load_state_dict(clipping.state_dict())
    sd = clipping.state_dict()
    for bad, match in ((None, "holds no adaptive clipping state"),
                       ({"count": 1, "norm_ema": {"nope": torch.tensor(1.0)}}, "does not train"),
                       ({"count": 1, "norm_ema": {"head.bias": torch.ones(2)}}, "0-d")):
        with pytest.raises((ValueError, KeyError), match=match):
            other = lomo_torch.Lomo(copy.deepcopy(model), lr=0.05, **RULE)
            other.load_state_dict({**sd, "adaptive_clip": bad})
        assert other.step_num == 0 and other.adaptive_clipping.count == 0
        assert other.adaptive_clipping.norm_ema == {}


@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_adaptive_clip_with_clip_grad_norm_is_refused(opt_name):
    with pytest.raises(ValueError, match=r"adaptive_clip=1.05 and clip_grad_norm=1.0 cannot"):
        getattr(lomo_torch, opt_name)(MLP(), lr=0.01, clip_grad_norm=1.0, adaptive_clip=1.05)


class _UpcastMLP(MLP):
    """fp16 parameters, an fp32 loss (as transformers' heads upcast)."""

    def forward(self, x, y):
        h = F.gelu(self.ln1(self.fc1(x)))
        h = F.gelu(self.ln2(self.fc2(h)))
        return F.mse_loss(self.head(h).float(), y.float())


def test_fp16_keeps_adaptive_clipping_and_an_overflow_changes_nothing():
    """fp16 with adaptive_clip: no clip_grad_norm=1.0 (and no warning about it);
    grad_norm stays the required overflow check; an overflowed step leaves every
    parameter, every clip scalar and the count bit for bit as they were."""
    torch.manual_seed(0)
    model = _UpcastMLP().half()
    opt = lomo_torch.Lomo(model, lr=0.01, adaptive_clip=1.05, adaptive_clip_warmup_steps=1)
    batches = mlp_batches(3, dtype=torch.float16)
    loss = model(*batches[0])
    with pytest.raises(RuntimeError, match="grad_norm"):
        opt.fused_backward(loss, 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.grad_norm(loss)
    assert opt.loss_scaler is not None and opt.clip_grad_norm is None
    assert opt.fused_backward(loss, 0.01)

    params = snapshot(model)
    ema = {n: t.clone() for n, t in opt.adaptive_clipping.norm_ema.items()}
    scale = opt.loss_scaler.loss_scale
    loss = model(*batches[1]) * 1e30  # overflows under any scale
    assert not torch.isfinite(opt.grad_norm(loss))
    assert opt.fused_backward(loss, 0.01) is False
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(torch.equal(t, ema[n]) for n, t in opt.adaptive_clipping.norm_ema.items())
    assert opt.adaptive_clipping.count == 1 and opt.loss_scaler.loss_scale < scale

    loss = model(*batches[2])
    opt.grad_norm(loss)
    assert opt.fused_backward(loss, 0.01)
    assert opt.adaptive_clipping.count == 2
    assert any(not torch.equal(t, ema[n]) for n, t in opt.adaptive_clipping.norm_ema.items())
    # resuming keeps it off clip_grad_norm too
    other = lomo_torch.Lomo(copy.deepcopy(model), lr=0.01, adaptive_clip=1.05,
                            adaptive_clip_warmup_steps=1)
    other.load_state_dict(opt.state_dict())
    assert other.clip_grad_norm is None and other.adaptive_clipping.count == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_and_bf16_need_one_backward(dtype):
    torch.manual_seed(0)
    model = MLP().to(dtype)
    opt = lomo_torch.AdaLomo(model, lr=0.01, adaptive_clip=1.05)
    before = snapshot(model)
    assert opt.fused_backward(model(*mlp_batches(1, dtype=dtype)[0]), 0.01)  # no grad_norm
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {t.dtype for t in opt.adaptive_clipping.norm_ema.values()} == {torch.float32}


def test_a_nonfinite_step_skipped_by_skip_nonfinite_changes_no_clip_state():
    torch.manual_seed(0)
    model = MLP()
    opt = lomo_torch.Lomo(model, lr=0.01, adaptive_clip=1.05, skip_nonfinite=True)
    x, y = mlp_batches(1)[0]
    loss = model(x, y)
    opt.grad_norm(loss)
    opt.fused_backward(loss, 0.01)
    params, ema = snapshot(model), dict(opt.adaptive_clipping.norm_ema)
    loss = model(x, y) * float("inf")
    opt.grad_norm(loss)
    assert opt.fused_backward(loss, 0.01) is False
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(torch.equal(t, ema[n]) for n, t in opt.adaptive_clipping.norm_ema.items())
    assert opt.adaptive_clipping.count == 1 and opt.nonfinite_steps == 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(adaptive_clip=0.0), "adaptive_clip .*finite number > 0"),
    (dict(adaptive_clip=-1.0), "adaptive_clip .*finite number > 0"),
    (dict(adaptive_clip=float("inf")), "adaptive_clip .*finite number > 0"),
    (dict(adaptive_clip="1.05"), "adaptive_clip .*finite number > 0"),
    (dict(adaptive_clip=torch.tensor(1.05)), "adaptive_clip .*real number"),
    (dict(adaptive_clip=1.05, adaptive_clip_decay=1.0), r"adaptive_clip_decay .*\[0, 1\)"),
    (dict(adaptive_clip=1.05, adaptive_clip_decay=-0.1), r"adaptive_clip_decay .*\[0, 1\)"),
    (dict(adaptive_clip=1.05, adaptive_clip_warmup_steps=0), "adaptive_clip_warmup_steps .*>= 1"),
    (dict(adaptive_clip=1.05, adaptive_clip_warmup_steps=2.0), "adaptive_clip_warmup_steps .*int"),
    (dict(adaptive_clip=1.05, adaptive_clip_absolute=0.0), "adaptive_clip_absolute .*> 0"),
    (dict(adaptive_clip=1.05, adaptive_clip_absolute=float("nan")), "adaptive_clip_absolute"),
    (dict(adaptive_clip_decay=0.9), "adaptive_clip_decay=0.9 has no effect without adaptive_clip"),
    (dict(adaptive_clip_absolute=None), "adaptive_clip_absolute=None has no effect"),
])
@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_bad_arguments_are_named(opt_name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(lomo_torch, opt_name)(MLP(), lr=0.01, **kwargs)


def test_defaults_are_lomo_jax_adaptive_clips():
    import inspect

    jax_clip = pytest.importorskip("lomo_jax.adaptive_clipping")
    jax_defaults = {k: v.default for k, v in inspect.signature(jax_clip.adaptive_clip).parameters.items()}
    for cls in (lomo_torch.Lomo, lomo_torch.AdaLomo):
        ours = inspect.signature(cls).parameters
        assert ours["adaptive_clip"].default is None  # off by default: lomo-optim's numbers
        assert ours["adaptive_clip_decay"].default == jax_defaults["decay"]
        assert ours["adaptive_clip_warmup_steps"].default == jax_defaults["warmup_steps"]
        assert ours["adaptive_clip_absolute"].default == jax_defaults["absolute"]


# ------------------------------------------------------------ DDP and FSDP2 (2 ranks, gloo)
# adaptive_clip=0.5 clips every tensor from step 1 on: the norms matter
DIST_RULE = dict(adaptive_clip=0.5, adaptive_clip_warmup_steps=1, adaptive_clip_absolute=None)


def _dist_run(engine, rank=0, world=1):
    """Lomo with DIST_RULE on dist_worker's model and batches; ``world`` > 1: under
    DDP (MLP) or FSDP2 (TinyBlock, Shard(0) DTensors), this rank's slice of each batch."""
    from tests.torch import dist_worker

    model = dist_worker.make_model(engine)
    if world > 1 and engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    elif world > 1:
        model = dist_worker.shard_model(model)
    opt = lomo_torch.Lomo(model, lr=dist_worker.LRS[0], **DIST_RULE)
    dist_worker.train(model, opt, dist_worker.make_batches(engine), False, rank, world)
    local = {n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
             for n, p in getattr(model, "module", model).named_parameters()}
    return {"local": local, "norm_ema": opt.state_dict()["adaptive_clip"]["norm_ema"]}


def _dist_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {engine: _dist_run(engine, rank, world) for engine in ("ddp", "fsdp")}
        torch.save(out, f"{out_dir}/{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_clip_with_whole_tensor_norms(tmp_path):
    """2 ranks, each half of every batch == one process on the full batch: the
    norm averages equal (on every rank) and so do the parameters (FSDP2: each
    rank's shard). A per-shard norm would be ~1/sqrt(2) of the whole one."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    for engine in ("ddp", "fsdp"):
        ref = _dist_run(engine)
        for rank, r in enumerate(ranks):
            got = r[engine]
            assert got["norm_ema"].keys() == ref["norm_ema"].keys()
            for n, gamma in ref["norm_ema"].items():
                torch.testing.assert_close(got["norm_ema"][n], gamma, rtol=1e-5, atol=0,
                                           msg=f"{engine} {n} rank {rank}")
            for n, full in ref["local"].items():
                want = full if engine == "ddp" else full.chunk(2, dim=0)[rank]
                torch.testing.assert_close(got["local"][n], want, rtol=1e-5, atol=1e-7,
                                           msg=f"{engine} {n} rank {rank}")
