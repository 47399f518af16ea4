"""bf16 and fp16 parameters; fp16 dynamic loss scaling, overflow skipping and recovery."""

import copy
import logging

import pytest
import torch

import lomo_torch
from tests.torch.helpers import MLP, Params, mlp_batches, ref_adalomo, ref_lomo, snapshot


def fixed_regression(dtype, n=64):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 4, generator=g))
    return x.to(dtype), y.to(dtype)


@pytest.mark.parametrize("opt_name,lr", [("Lomo", 0.2), ("AdaLomo", 0.05)])
def test_bf16_trains(opt_name, lr):
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    opt = getattr(lomo_torch, opt_name)(model, lr=lr, clip_grad_norm=5.0)
    x, y = fixed_regression(torch.bfloat16)
    losses = []
    for _ in range(25):
        loss = model(x, y)
        opt.grad_norm(loss)
        opt.fused_backward(loss, lr)
        losses.append(loss.item())
    assert opt.loss_scaler is None  # no loss scaling for bf16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_bf16_math_in_fp32_rounded_once(opt_name):
    """The update is computed in fp32 from the upcast parameter and rounded to bf16 once."""
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(6, 5, generator=g).to(torch.bfloat16)
    grad = torch.randn(6, 5, generator=g).to(torch.bfloat16)
    model = Params({"w": p0})
    opt = getattr(lomo_torch, opt_name)(model, lr=0.05, weight_decay=0.1)
    opt.fused_backward(model({"w": grad}), 0.05)
    if opt_name == "Lomo":
        expected = ref_lomo(p0, grad.float(), 0.05, 0.1)
    else:
        expected = ref_adalomo(p0, grad.float(), {}, 1, 0.05, weight_decay=0.1)
    assert expected.dtype == torch.bfloat16
    assert torch.equal(model.w.detach(), expected)
    assert (model.w.detach() != p0).float().mean() > 0.5


def fp16_setup(opt_name, scale=2.0**8, window=3):
    torch.manual_seed(0)
    model = MLP().half()
    if opt_name == "Lomo":
        opt = lomo_torch.Lomo(model, lr=0.05, clip_grad_norm=1.0,
                              loss_scale_args={"init_scale": scale, "scale_window": window})
    else:
        opt = lomo_torch.AdaLomo(model, lr=0.01, loss_scale=scale,
                                 loss_scale_args={"scale_window": window})
    return model, opt


def step(model, opt, batch, lr):
    loss = model(*batch)
    opt.grad_norm(loss)
    return opt.fused_backward(loss, lr)


def frozen_copy(opt):
    sd = opt.state_dict()
    return copy.deepcopy({k: v for k, v in sd.items() if k != "param_groups"})


def states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "state":
            assert a[k].keys() == b[k].keys()
            for n in a[k]:
                for s in a[k][n]:
                    assert torch.equal(a[k][n][s], b[k][n][s]), (n, s)
        elif k != "loss_scaler":
            assert a[k] == b[k], k


@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_fp16_overflow_skips_step_and_recovers(opt_name, caplog):
    model, opt = fp16_setup(opt_name, scale=2.0**8, window=3)
    batches = mlp_batches(8, dtype=torch.float16)
    for b in batches[:2]:
        assert step(model, opt, b, 0.01) is True
    scaler = opt.loss_scaler
    assert isinstance(scaler, lomo_torch.DynamicLossScaler)
    assert scaler.loss_scale == 2.0**8
    params_before, state_before = snapshot(model), frozen_copy(opt)
    assert opt.step_num == 2

    # inject an overflow: one gradient becomes inf
    hook = model.fc2.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    loss = model(*batches[2])
    with caplog.at_level(logging.WARNING, logger="lomo_torch"):
        total = opt.grad_norm(loss)
    hook.remove()
    assert not torch.isfinite(total)
    assert scaler.has_overflow_serial
    assert scaler.loss_scale == 2.0**7, "the scale halves"
    assert "overflow" in caplog.text
    assert opt.fused_backward(loss, 0.01) is False
    for n, p in snapshot(model).items():
        assert bitwise_equal(p, params_before[n]), f"{n} changed on a skipped step"
    states_equal(frozen_copy(opt), state_before)  # statistics and step count untouched
    assert opt.step_num == 2
    assert all(p.grad is None for p in model.parameters())

    # clean steps: the scale comes back after scale_window of them
    for i, b in enumerate(batches[3:6]):
        assert step(model, opt, b, 0.01) is True
        assert scaler.loss_scale == (2.0**8 if i == 2 else 2.0**7)
    assert opt.step_num == 5
    assert not torch.equal(model.fc2.weight, params_before["fc2.weight"])


@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_fp16_loss_overflow_by_huge_loss(opt_name):
    """Multiplying the loss by 1e30 overflows fp16: skipped, nothing changes."""
    model, opt = fp16_setup(opt_name)
    batch = mlp_batches(1, dtype=torch.float16)[0]
    step(model, opt, batch, 0.01)
    before, state = snapshot(model), frozen_copy(opt)
    loss = model(*batch) * 1e30
    opt.grad_norm(loss)
    assert opt.fused_backward(loss, 0.01) is False
    assert all(bitwise_equal(p, before[n]) for n, p in snapshot(model).items())
    states_equal(frozen_copy(opt), state)
    assert opt.loss_scaler.loss_scale == 2.0**7


def bitwise_equal(a, b):
    """Same dtype, shape and bytes (``torch.equal`` would call -0.0 equal to +0.0)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
@pytest.mark.parametrize("inject", ["inf_grad", "nan_loss"])
def test_skip_nonfinite_guard(opt_name, dtype, inject):
    """bf16/fp32 with ``skip_nonfinite=True``: a step whose gradient norm or loss is not
    finite is skipped whole (parameters and state byte-identical), counted, and training
    goes on; without the guard the same step writes NaN/inf into the parameters."""
    torch.manual_seed(0)
    model = MLP().to(dtype)
    opt = getattr(lomo_torch, opt_name)(model, lr=0.01, skip_nonfinite=True)
    batches = mlp_batches(4, dtype=dtype)
    for b in batches[:2]:
        assert step(model, opt, b, 0.01) is True
    before, state = snapshot(model), frozen_copy(opt)

    def bad_step(m, o):
        if inject == "nan_loss":
            loss = m(*batches[2]) * float("nan")
            o.grad_norm(loss)
            return o.fused_backward(loss, 0.01)
        # an inf in one gradient, in both backward passes
        hook = m.fc1.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
        try:
            loss = m(*batches[2])
            o.grad_norm(loss)
            return o.fused_backward(loss, 0.01)
        finally:
            hook.remove()

    assert bad_step(model, opt) is False
    assert opt.nonfinite_steps == 1 and opt.step_num == 2
    for n, p in snapshot(model).items():
        assert bitwise_equal(p, before[n]), f"{n} changed on a skipped step"
    after = frozen_copy(opt)
    assert after.pop("nonfinite_steps") == 1 and state.pop("nonfinite_steps") == 0
    states_equal(after, state)
    assert all(p.grad is None for p in model.parameters())
    assert opt.state_dict()["nonfinite_steps"] == 1
    assert step(model, opt, batches[3], 0.01) is True  # and training goes on
    assert opt.step_num == 3 and all(torch.isfinite(p).all() for p in model.parameters())

    # the guard is what saved the parameters: without it the same step poisons them
    torch.manual_seed(0)
    unguarded = MLP().to(dtype)
    plain = getattr(lomo_torch, opt_name)(unguarded, lr=0.01, clip_grad_norm=1e9)
    for b in batches[:2]:
        step(unguarded, plain, b, 0.01)
    assert bad_step(unguarded, plain) is True
    assert not all(torch.isfinite(p).all() for p in unguarded.parameters())


def test_skip_nonfinite_needs_grad_norm():
    model = MLP()
    opt = lomo_torch.AdaLomo(model, skip_nonfinite=True)
    with pytest.raises(RuntimeError, match=r"skip_nonfinite=True is set, and grad_norm\(loss\) checks"):
        opt.fused_backward(model(*mlp_batches(1)[0]), 0.01)
    with pytest.raises(TypeError, match="skip_nonfinite must be a bool"):
        lomo_torch.Lomo(model, skip_nonfinite="yes")


def test_fp16_lomo_defaults_like_lomo_optim():
    """lomo-optim's init_scale 2**32 (LOMO_OPTIM_LOSS_SCALE) overflows fp16 at once
    (the fp32 loss's gradient, cast into the fp16 graph) and is halved until it
    fits; clip_grad_norm None becomes 1.0 with a warning."""
    torch.manual_seed(0)
    mlp = MLP().half()
    opt = lomo_torch.Lomo(mlp, lr=0.05, **lomo_torch.LOMO_OPTIM_LOSS_SCALE["Lomo"])

    def model(*batch):
        return mlp(*batch).float()

    batches = mlp_batches(30, dtype=torch.float16)
    with pytest.warns(UserWarning, match="clip_grad_norm=1.0"):
        loss = model(*batches[0])
        opt.grad_norm(loss)
    opt.fused_backward(loss, 0.05)
    assert opt.clip_grad_norm == 1.0
    applied = [step(model, opt, b, 0.05) for b in batches[1:]]
    assert not applied[0] and applied[-1]
    assert opt.loss_scaler.loss_scale < 65504
    assert opt.step_num == sum(applied)


def test_fp16_params_with_fp32_loss_enable_scaling():
    torch.manual_seed(0)
    model = MLP().half()
    opt = lomo_torch.AdaLomo(model, lr=0.01, **lomo_torch.LOMO_OPTIM_LOSS_SCALE["AdaLomo"])
    x, y = mlp_batches(1, dtype=torch.float16)[0]
    loss = model(x, y).float()
    opt.grad_norm(loss)
    assert opt.fused_backward(loss, 0.01) is True
    assert opt.loss_scaler is not None and opt.loss_scaler.loss_scale == 2**10


@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_fp16_requires_grad_norm_every_step(opt_name):
    model, opt = fp16_setup(opt_name)
    batch = mlp_batches(1, dtype=torch.float16)[0]
    with pytest.raises(RuntimeError, match=r"call grad_norm\(loss\) before every fused_backward.*fp16"):
        opt.fused_backward(model(*batch), 0.01)
    step(model, opt, batch, 0.01)
    with pytest.raises(RuntimeError, match="overflow check"):
        opt.fused_backward(model(*batch), 0.01)


@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_fp16_trains(opt_name):
    model, opt = fp16_setup(opt_name, scale=2.0**10, window=5)
    x, y = fixed_regression(torch.float16)
    losses = []
    for _ in range(25):
        loss = model(x, y)
        opt.grad_norm(loss)
        opt.fused_backward(loss, 0.2 if opt_name == "Lomo" else 0.05)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
