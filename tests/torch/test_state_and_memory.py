"""state_dict resume exactness, live-gradient memory, hooks, LR schedulers."""

import io

import pytest
import torch
from torch import nn

import lomo_torch
from tests.torch.helpers import MLP, TinyBlock, lm_batches, mlp_batches, snapshot

CONFIGS = {
    "Lomo": dict(weight_decay=0.01, clip_grad_norm=0.5, clip_grad_value=0.05),
    "AdaLomo": dict(weight_decay=0.01, clip_grad_norm=0.5),
}


def save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def run(model, opt, batches, lrs):
    for batch, lr in zip(batches, lrs):
        loss = model(*batch)
        opt.grad_norm(loss)
        opt.fused_backward(loss, lr)


@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_resume_is_bit_exact(opt_name):
    k, n = 3, 6
    batches = lm_batches(n)
    lrs = [0.03 * 0.9**t for t in range(n)]
    cls = getattr(lomo_torch, opt_name)

    torch.manual_seed(0)
    straight = TinyBlock()
    opt = cls(straight, lr=lrs[0], **CONFIGS[opt_name])
    run(straight, opt, batches, lrs)

    torch.manual_seed(0)
    first = TinyBlock()
    opt1 = cls(first, lr=lrs[0], **CONFIGS[opt_name])
    run(first, opt1, batches[:k], lrs[:k])
    ckpt = save({"model": first.state_dict(), "opt": opt1.state_dict()})
    del first, opt1

    torch.manual_seed(123)  # a different initialisation, overwritten by the checkpoint
    resumed = TinyBlock()
    opt2 = cls(resumed, lr=1.0, **CONFIGS[opt_name])
    loaded = torch.load(ckpt, weights_only=True)
    resumed.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["opt"])
    assert opt2.step_num == k
    if opt_name == "AdaLomo":
        assert len(loaded["opt"]["state"]) == len(list(resumed.parameters()))
    run(resumed, opt2, batches[k:], lrs[k:])

    a, b = snapshot(straight), snapshot(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    if opt_name == "AdaLomo":
        sa, sb = opt.state_dict()["state"], opt2.state_dict()["state"]
        for name in sa:
            for key in sa[name]:
                assert torch.equal(sa[name][key], sb[name][key])


def test_resume_carries_loss_scaler_and_clip_state():
    torch.manual_seed(0)
    model = MLP().half()
    scaling = {"init_scale": 2.0**20, "scale_window": 4}
    opt = lomo_torch.Lomo(model, lr=0.05, loss_scale_args=scaling)
    with pytest.warns(UserWarning):
        run(model, opt, mlp_batches(6, dtype=torch.float16), [0.05] * 6)
    sd = torch.load(save(opt.state_dict()), weights_only=True)
    other = lomo_torch.Lomo(MLP().half(), lr=0.05, loss_scale_args=scaling)  # the same settings
    other.load_state_dict(sd)
    assert other.clip_grad_norm == 1.0  # set by fp16 detection, restored
    assert other.loss_scaler is not None
    assert other.loss_scaler.state_dict() == opt.loss_scaler.state_dict()
    assert other.step_num == opt.step_num


def test_load_state_dict_errors():
    torch.manual_seed(0)
    model = MLP()
    opt = lomo_torch.AdaLomo(model)
    run(model, opt, mlp_batches(1), [0.01])
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="from AdaLomo, cannot load it into Lomo"):
        lomo_torch.Lomo(MLP()).load_state_dict(sd)
    with pytest.raises(KeyError, match="does not train.*fc1.weight"):
        frozen = MLP()
        frozen.fc1.requires_grad_(False)
        lomo_torch.AdaLomo(frozen).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"exp_avg_sq_row. of parameter .fc1.weight. has shape \(16,\), expected \(32,\)"):
        lomo_torch.AdaLomo(MLP(d_hidden=32)).load_state_dict(sd)
    with pytest.raises(ValueError, match="not a lomo_torch optimizer state_dict"):
        lomo_torch.AdaLomo(MLP()).load_state_dict(torch.optim.SGD(MLP().parameters(), 0.1).state_dict())


class GradMeter:
    """Sum of the bytes of every parameter's live ``.grad``, sampled in each hook.

    Registered before the optimizer, so its post-accumulate hook runs first and
    sees the parameter's gradient before the optimizer frees it.
    """

    def __init__(self, model):
        self.params = list(model.parameters())
        self.peak = 0
        self.calls = 0
        for p in self.params:
            p.register_post_accumulate_grad_hook(self.sample)
            p.register_hook(self.sample_pre)

    def live(self):
        return sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)

    def sample(self, _param):
        self.calls += 1
        self.peak = max(self.peak, self.live())

    def sample_pre(self, grad):
        self.peak = max(self.peak, self.live())


class Uneven(nn.Module):
    """Parameters of different sizes (8 ... 2304 elements), used in a chain."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 48)
        self.b = nn.Linear(48, 48)
        self.c = nn.Linear(48, 48)
        self.d = nn.Linear(48, 8)
        self.n = nn.LayerNorm(8)

    def forward(self, x, y):
        h = torch.relu(self.a(x))
        h = torch.relu(self.b(h))
        h = torch.relu(self.c(h))
        return (self.n(self.d(h)) - y).pow(2).mean()


@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peak_live_grad_bytes_is_one_parameter(opt_name, dtype):
    torch.manual_seed(0)
    model = Uneven().to(dtype)
    meter = GradMeter(model)
    opt = getattr(lomo_torch, opt_name)(model, lr=1e-3, clip_grad_norm=1.0)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    x, y = torch.randn(4, 16).to(dtype), torch.randn(4, 8).to(dtype)
    for _ in range(2):
        loss = model(x, y)
        opt.grad_norm(loss)
        opt.fused_backward(loss, 1e-3)
        assert all(p.grad is None for p in model.parameters())
    assert meter.calls == 2 * 2 * len(list(model.parameters()))  # two passes, two steps
    assert meter.peak == largest, (meter.peak, largest, total)
    assert meter.peak < total / 2  # vs all gradients at once with a plain backward


def test_plain_backward_keeps_all_grads_for_contrast():
    """The same meter on a plain backward sees all gradients at once."""
    torch.manual_seed(0)
    model = Uneven()
    meter = GradMeter(model)
    model(torch.randn(4, 16), torch.randn(4, 8)).backward()
    assert meter.peak == sum(p.numel() * p.element_size() for p in model.parameters())


def test_remove_hooks():
    torch.manual_seed(0)
    model = MLP()
    opt = lomo_torch.Lomo(model, lr=0.1)
    before = snapshot(model)
    opt.remove_hooks()
    assert opt.hooks_removed
    model(*mlp_batches(1)[0]).backward()  # an ordinary backward again
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(RuntimeError, match="hooks were removed"):
        opt.fused_backward(model(*mlp_batches(1)[0]), 0.1)
    opt.remove_hooks()  # idempotent


def test_garbage_collected_optimizer_detaches():
    import gc

    torch.manual_seed(0)
    model = MLP()
    lomo_torch.Lomo(model, lr=0.1)
    gc.collect()
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_lr_scheduler_drives_lr(recwarn):
    torch.manual_seed(0)
    model = MLP()
    opt = lomo_torch.Lomo(model, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    ref = MLP()
    ref.load_state_dict(model.state_dict())
    ref_opt = lomo_torch.Lomo(ref, lr=0.1)
    for t, batch in enumerate(mlp_batches(3)):
        opt.fused_backward(model(*batch))  # lr from param_groups
        ref_opt.fused_backward(ref(*batch), 0.1 * 0.5**t)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]


def test_step_is_not_the_api():
    opt = lomo_torch.Lomo(MLP())
    with pytest.raises(RuntimeError, match="fused_backward"):
        opt.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_cuda_matches_cpu(opt_name):
    torch.manual_seed(0)
    cpu = MLP()
    gpu = MLP().cuda()
    gpu.load_state_dict(cpu.state_dict())
    oc = getattr(lomo_torch, opt_name)(cpu, lr=0.01, clip_grad_norm=0.5, weight_decay=0.01)
    og = getattr(lomo_torch, opt_name)(gpu, lr=0.01, clip_grad_norm=0.5, weight_decay=0.01)
    for x, y in mlp_batches(3):
        run(cpu, oc, [(x, y)], [0.01])
        run(gpu, og, [(x.cuda(), y.cuda())], [0.01])
    for (n, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (measures the CUDA allocator)")
@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_cuda_peak_memory_against_adamw(opt_name):
    """Peak ``torch.cuda.max_memory_allocated`` of a training step, everything counted
    (parameters, gradients, optimizer state, activations): a fused step holds the
    parameters plus about one parameter's gradient (and AdaLomo's m+n statistics);
    ``loss.backward(); AdamW.step()`` holds parameters, all gradients and two moments."""
    d, depth = 1024, 8
    param_bytes, largest = depth * d * d * 4, d * d * 4
    x = torch.randn(8, d, device="cuda")
    activations = depth * x.numel() * 4

    def make():
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(d, d, bias=False) for _ in range(depth)]).cuda()

    def peak(run_step, steps=2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):  # the second step sees the optimizer state of the first
            run_step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    fused = make()
    opt = getattr(lomo_torch, opt_name)(fused, lr=1e-3)
    lomo_peak = peak(lambda: opt.fused_backward(fused(x).square().mean(), 1e-3))
    del fused, opt
    torch.cuda.empty_cache()

    plain = make()
    adamw = torch.optim.AdamW(plain.parameters(), lr=1e-3)

    def adamw_step():
        plain(x).square().mean().backward()
        adamw.step()
        adamw.zero_grad(set_to_none=True)

    adamw_peak = peak(adamw_step)
    x_bytes = x.numel() * 4
    assert lomo_peak <= x_bytes + param_bytes + 2 * largest + 4 * activations + (1 << 20), (
        lomo_peak, param_bytes, largest)
    assert adamw_peak >= x_bytes + 3.9 * param_bytes, (adamw_peak, param_bytes)
    assert lomo_peak < 0.4 * adamw_peak, (lomo_peak, adamw_peak)
