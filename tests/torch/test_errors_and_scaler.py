"""Clear errors for bad input, and DynamicLossScaler against lomo-optim's rules."""

import logging

import pytest
import torch
from torch import nn

import lomo_torch
from lomo_torch import AdaLomo, DynamicLossScaler, Lomo
from tests.torch.helpers import MLP, mlp_batches

BOTH = pytest.mark.parametrize("cls", [Lomo, AdaLomo])


@BOTH
def test_no_trainable_parameters(cls):
    frozen = MLP().requires_grad_(False)
    with pytest.raises(ValueError, match="MLP has no trainable parameters"):
        cls(frozen)
    with pytest.raises(ValueError, match="no trainable parameters"):
        cls(nn.ReLU())


@BOTH
def test_model_must_be_a_module(cls):
    with pytest.raises(TypeError, match=r"takes the model \(an nn.Module\), got list"):
        cls(list(MLP().parameters()))


@BOTH
@pytest.mark.parametrize("kw,match", [
    ({"lr": 0.0}, "lr must be positive, got 0.0"),
    ({"lr": -1e-3}, "lr must be positive"),
    ({"clip_grad_norm": 0.0}, "clip_grad_norm must be positive, got 0.0"),
    ({"clip_grad_norm": -1.0}, "clip_grad_norm must be positive"),
    ({"clip_grad_value": 0}, "clip_grad_value must be positive, got 0"),
    ({"clip_grad_value": -0.5}, "clip_grad_value must be positive"),
    ({"weight_decay": -0.1}, "weight_decay must be non-negative, got -0.1"),
])
def test_bad_hyperparameters(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(MLP(), **kw)


def test_bad_adalomo_hyperparameters():
    with pytest.raises(ValueError, match="clip_threshold must be positive"):
        AdaLomo(MLP(), clip_threshold=0)
    with pytest.raises(ValueError, match="decay_rate must be <= 0"):
        AdaLomo(MLP(), decay_rate=0.5)
    with pytest.raises(ValueError, match="eps must be two non-negative numbers"):
        AdaLomo(MLP(), eps=(1e-30,))
    with pytest.raises(ValueError, match="loss_scale must be positive"):
        AdaLomo(MLP(), loss_scale=-4)
    with pytest.raises(TypeError, match="loss_scale_args must be a dict"):
        Lomo(MLP(), loss_scale_args=[("init_scale", 2)])


@BOTH
def test_clip_grad_norm_without_grad_norm(cls):
    model = MLP()
    opt = cls(model, clip_grad_norm=1.0)
    batch = mlp_batches(1)[0]
    msg = r"call grad_norm\(loss\) before every fused_backward\(loss, lr\): clip_grad_norm=1.0 is set"
    with pytest.raises(RuntimeError, match=msg):
        opt.fused_backward(model(*batch), 0.01)
    loss = model(*batch)
    opt.grad_norm(loss)
    opt.fused_backward(loss, 0.01)
    with pytest.raises(RuntimeError, match=msg):  # again on the next step: the norm is per step
        opt.fused_backward(model(*batch), 0.01)


@BOTH
def test_loss_must_be_scalar(cls):
    model = nn.Linear(3, 4)
    opt = cls(model, clip_grad_norm=1.0)
    out = model(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"scalar loss, got a tensor of shape \(2, 4\)"):
        opt.grad_norm(out)
    with pytest.raises(ValueError, match=r"scalar loss, got a tensor of shape \(2, 4\)"):
        opt.fused_backward(out, 0.1)
    with pytest.raises(TypeError, match="loss as a torch.Tensor, got float"):
        opt.fused_backward(1.0, 0.1)
    with torch.no_grad():
        detached = model(torch.randn(2, 3)).sum()
    with pytest.raises(ValueError, match="does not require grad"):
        opt.grad_norm(detached)


@BOTH
def test_bad_step_lr(cls):
    model = MLP()
    opt = cls(model)
    with pytest.raises(ValueError, match="lr must be non-negative, got -0.1"):
        opt.fused_backward(model(*mlp_batches(1)[0]), -0.1)
    opt.fused_backward(model(*mlp_batches(1)[0]), 0.0)  # zero (warm-up start) is fine


def test_sparse_gradients_are_rejected():
    model = nn.Embedding(5, 3, sparse=True)
    opt = Lomo(model)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.fused_backward(model(torch.tensor([1, 2])).sum(), 0.1)


# ------------------------------------------------------------------ DynamicLossScaler
def test_scaler_public_names_and_defaults():
    s = DynamicLossScaler()
    assert s.loss_scale == 2**32 and s.scale_window == 1000 and s.min_scale == 1
    assert s.has_overflow_serial is False and s.dtype is torch.half
    assert lomo_torch.DynamicLossScaler is DynamicLossScaler
    assert DynamicLossScaler.has_inf_or_nan(torch.tensor([1.0, float("nan")]))
    assert DynamicLossScaler.has_inf_or_nan(torch.tensor([float("-inf")], dtype=torch.half))
    assert not s._has_inf_or_nan(torch.tensor([65504.0, 65504.0], dtype=torch.half))


@pytest.mark.parametrize("kw", [
    {"init_scale": 2**8, "scale_window": 3},
    {"init_scale": 2**8, "scale_window": 2, "delayed_shift": 2},
    {"init_scale": 2**8, "scale_window": 2, "delayed_shift": 3, "consecutive_hysteresis": True},
    {"init_scale": 16, "scale_factor": 4.0, "scale_window": 2, "min_scale": 2,
     "raise_error_at_min_scale": False},
])
def test_scaler_follows_lomo_optim(monkeypatch, kw):
    """Same scale after every update as lomo-optim's scaler (its dist.get_rank patched to 0)."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    import lomo_optim.lomo as original

    monkeypatch.setattr(original.torch.distributed, "get_rank", lambda: 0)
    ours, ref = DynamicLossScaler(**kw), original.DynamicLossScaler(**kw)
    pattern = [True, False, False, True, True, False, False, False, False, True, False, False,
               False, True, True, True, False, False, False, False, False]
    for overflow in pattern:
        ours.update_scale(overflow)
        ref.update_scale(overflow)
        assert (ours.cur_scale, ours.cur_iter, ours.last_overflow_iter, ours.cur_hysteresis) == \
            (ref.cur_scale, ref.cur_iter, ref.last_overflow_iter, ref.cur_hysteresis)


def test_scaler_needs_no_process_group_and_logs(caplog):
    assert not torch.distributed.is_initialized()
    s = DynamicLossScaler(init_scale=4, scale_window=2)
    with caplog.at_level(logging.WARNING, logger="lomo_torch"):
        s.update_scale(True)
    assert s.loss_scale == 2
    assert "skipping step; loss scale 4 -> 2" in caplog.text
    s.update_scale(True)
    with pytest.raises(RuntimeError, match="already at its minimum"):
        s.update_scale(True)


def test_scaler_state_dict_roundtrip():
    s = DynamicLossScaler(init_scale=2**10, scale_window=3, delayed_shift=2)
    for overflow in [True, False, True, True, False]:
        s.update_scale(overflow)
    t = DynamicLossScaler()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    for overflow in [False, False, True, False]:
        s.update_scale(overflow)
        t.update_scale(overflow)
        assert t.loss_scale == s.loss_scale


def test_scaler_bad_arguments():
    with pytest.raises(ValueError, match="scale_window must be >= 1"):
        DynamicLossScaler(scale_window=0)
    with pytest.raises(ValueError, match="scale_factor must be > 1"):
        DynamicLossScaler(scale_factor=1.0)


@BOTH
@pytest.mark.parametrize("kw,match", [
    ({"lr": float("inf")}, "lr must be finite, got inf"),
    ({"clip_grad_norm": float("inf")}, "clip_grad_norm must be finite"),
    ({"weight_decay": float("inf")}, "weight_decay must be finite"),
])
def test_non_finite_hyperparameters(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(MLP(), **kw)
    with pytest.raises(TypeError, match="lr must be a real number, got nan"):
        cls(MLP(), lr=float("nan"))


@BOTH
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_lr_from_a_scheduler_is_refused(cls, bad):
    """An LR scheduler writes ``param_groups[i]["lr"]``; a non-finite value there is an
    error at the next fused_backward, before any parameter changes."""
    model = MLP()
    opt = cls(model, lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 if t == 0 else bad)
    batch = mlp_batches(1)[0]
    opt.fused_backward(model(*batch))
    sched.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises((ValueError, TypeError), match=r"lr \(param_groups\[0\]\['lr'\], as an LR "
                                                      r"scheduler sets it\) must be"):
        opt.fused_backward(model(*batch))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="lr must be finite, got inf"):
        opt.fused_backward(model(*batch), float("inf"))


@BOTH
def test_complex_and_integer_parameters_are_refused(cls):
    class Complex(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 2))
            self.z = nn.Parameter(torch.randn(4, dtype=torch.complex64))

    with pytest.raises(TypeError, match=r"parameter 'z' has dtype torch.complex64"):
        cls(Complex())
    frozen = Complex()
    frozen.z.requires_grad_(False)
    cls(frozen)  # a frozen complex buffer-like parameter is fine
    # integer tensors cannot require grad in torch at all
    with pytest.raises(RuntimeError, match="floating point"):
        nn.Parameter(torch.ones(3, dtype=torch.int32))


@pytest.mark.parametrize("name", ["Lomo", "AdaLomo"])
def test_same_constructor_signature_as_lomo_optim(name, lomo_optim):
    """A lomo-optim user switches by changing the import: every lomo-optim argument
    exists with the same position and default (ours may add keyword-only extras),
    except AdaLomo's loss_scale: None, for the fp16 policy shared with lomo_jax
    (lomo-optim's 2**10 is lomo_torch.LOMO_OPTIM_LOSS_SCALE["AdaLomo"])."""
    import inspect

    theirs = inspect.signature(getattr(lomo_optim, name).__init__).parameters
    ours = inspect.signature(getattr(lomo_torch, name).__init__).parameters
    positional = [p for p in ours.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] == list(theirs), (list(ours), list(theirs))
    for p in theirs.values():
        if p.default == {}:  # lomo-optim's mutable `loss_scale_args={}`: ours is None, the same
            assert ours[p.name].default is None, p.name
        elif (name, p.name) == ("AdaLomo", "loss_scale"):
            assert ours[p.name].default is None
            assert lomo_torch.LOMO_OPTIM_LOSS_SCALE[name] == {p.name: p.default}
        else:
            assert ours[p.name].default == p.default, p.name
    assert all(p.kind is p.KEYWORD_ONLY for p in ours.values() if p.name not in theirs)
    for method in ("grad_norm", "fused_backward"):  # ours: fused_backward(loss, lr=None)
        theirs_m = inspect.signature(getattr(getattr(lomo_optim, name), method)).parameters
        ours_m = inspect.signature(getattr(getattr(lomo_torch, name), method)).parameters
        assert list(ours_m) == list(theirs_m), method


def test_loss_scaler_signature_as_lomo_optim(lomo_optim):
    import inspect

    theirs = inspect.signature(lomo_optim.lomo.DynamicLossScaler.__init__).parameters
    ours = inspect.signature(DynamicLossScaler.__init__).parameters
    assert {n: p.default for n, p in theirs.items()} == {
        n: p.default for n, p in ours.items() if n in theirs}
