"""``exclude=``: parameters a fused optimizer leaves to another optimizer (LoRA + LOMO).

The excluded parameters get no hook: the fused optimizer never changes them,
their ``.grad`` accumulates (unscaled under fp16 loss scaling), the norm pass
leaves it bit-for-bit as it was and its global norm covers the hooked ones only.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lomo_torch
from tests.torch.helpers import MLP, mlp_batches, ref_adalomo, ref_clip, snapshot

HEAD = lambda n, p: n.startswith("head.")  # noqa: E731


def _grads(model, batch):
    loss = model(*batch)
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, list(model.parameters()))))


def test_norm_pass_leaves_excluded_grads_and_norms_the_hooked_only():
    """grad_norm: an excluded .grad stays bit-identical (also None); the norm is the
    hooked gradients' alone, computed by hand; clipping scales the hooked ones only."""
    torch.manual_seed(0)
    model, batch = MLP(), mlp_batches(1)[0]
    grads = _grads(model, batch)
    opt = lomo_torch.AdaLomo(model, lr=0.01, clip_grad_norm=0.05, exclude=HEAD)
    sentinel = torch.randn(4, 16)
    model.head.weight.grad = sentinel.clone()  # head.bias.grad stays None
    loss = model(*batch)
    total = opt.grad_norm(loss)
    assert model.head.bias.grad is None
    assert torch.equal(model.head.weight.grad, sentinel)
    hooked = [g for n, g in grads.items() if not n.startswith("head.")]
    by_hand = torch.linalg.vector_norm(torch.stack([g.norm() for g in hooked]))
    everything = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
    torch.testing.assert_close(total, by_hand, rtol=1e-6, atol=0)
    assert not torch.isclose(by_hand, everything, rtol=1e-3)  # the head's gradient is not small
    before = snapshot(model)
    opt.fused_backward(loss, 0.01)
    clipped = ref_clip({n: g for n, g in grads.items() if not n.startswith("head.")},
                       clip_grad_norm=0.05)
    for name, p in model.named_parameters():
        if name.startswith("head."):
            assert torch.equal(p, before[name]), name  # not the fused optimizer's to change
            continue
        expected = ref_adalomo(before[name], clipped[name], {}, 1, 0.01)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7, msg=name)
    # the updating pass added this step's gradient to the sentinel, the norm pass nothing
    torch.testing.assert_close(model.head.weight.grad, sentinel + grads["head.weight"],
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.head.bias.grad, grads["head.bias"], rtol=0, atol=0)


def test_hooked_update_equals_a_frozen_excluded_part_bitwise():
    """The hooked parameters step exactly as when the excluded ones are frozen (same
    norm, same clipping), over 3 steps with Lomo and AdaLomo."""
    for cls, kw in ((lomo_torch.Lomo, dict(clip_grad_norm=0.05, weight_decay=0.01)),
                    (lomo_torch.AdaLomo, dict(clip_grad_norm=0.05))):
        torch.manual_seed(0)
        a = MLP()
        b = copy.deepcopy(a)
        b.head.requires_grad_(False)
        opt_a, opt_b = cls(a, lr=0.05, exclude=HEAD, **kw), cls(b, lr=0.05, **kw)
        for batch in mlp_batches(3):
            for model, opt in ((a, opt_a), (b, opt_b)):
                loss = model(*batch)
                opt.grad_norm(loss)
                assert opt.fused_backward(loss, 0.05)
            a.head.zero_grad(set_to_none=True)
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(pa, pb), (cls.__name__, name)


def test_adamw_on_excluded_equals_a_reference_loop():
    """AdaLomo on the body + AdamW on the head stepped after fused_backward == a loop
    that computes all gradients with autograd.grad and applies both rules by hand."""
    torch.manual_seed(0)
    model = MLP()
    ref = copy.deepcopy(model)
    opt = lomo_torch.AdaLomo(model, lr=0.01, exclude=HEAD)
    adamw = torch.optim.AdamW(model.head.parameters(), lr=0.01)
    ref_adamw = torch.optim.AdamW(ref.head.parameters(), lr=0.01)
    states = {n: {} for n, _ in ref.named_parameters()}
    for t, batch in enumerate(mlp_batches(3), start=1):
        assert opt.fused_backward(model(*batch), 0.01)
        adamw.step()
        adamw.zero_grad()
        grads = _grads(ref, batch)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if name.startswith("head."):
                    p.grad = grads[name]
                else:
                    p.copy_(ref_adalomo(p, grads[name], states[name], t, 0.01))
        ref_adamw.step()
        ref_adamw.zero_grad()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert opt.state_dict()["state"].keys() == {n for n in states if not n.startswith("head.")}


class HalfBody(nn.Module):
    """An fp16 body and an fp32 head (as PEFT keeps adapters in fp32)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 16).half()
        self.head = nn.Linear(16, 4)

    def forward(self, x, y):
        return F.mse_loss(self.head(F.gelu(self.body(x.half())).float()), y)


def test_fp16_excluded_grads_are_unscaled_and_an_overflow_leaves_them():
    """fp16 loss scaling: the excluded gradient is the true (unscaled) one, bitwise;
    a step whose norm overflows returns False and leaves the excluded .grad as it was."""
    torch.manual_seed(0)
    model, (batch,) = HalfBody(), mlp_batches(1)
    grads = _grads(model, batch)
    with pytest.warns(UserWarning, match="fp16"):
        opt = lomo_torch.Lomo(model, lr=0.01, exclude=HEAD,
                              loss_scale_args={"init_scale": 2.0**10})
        loss = model(*batch)
        opt.grad_norm(loss)
    assert opt.loss_scaler.loss_scale == 2.0**10
    assert opt.fused_backward(loss, 0.01)
    assert torch.equal(model.head.weight.grad, grads["head.weight"])
    assert torch.equal(model.head.bias.grad, grads["head.bias"])

    model.head.zero_grad(set_to_none=True)
    model.head.bias.grad = torch.ones(4)
    opt.loss_scaler.cur_scale = 2.0**60  # the fp16 body's gradients overflow
    before = snapshot(model)
    loss = model(*batch)
    assert not torch.isfinite(opt.grad_norm(loss))
    assert opt.fused_backward(loss, 0.01) is False
    assert model.head.weight.grad is None and torch.equal(model.head.bias.grad, torch.ones(4))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_plain_backward_and_state_dict_with_adaptive_clip():
    """A plain backward fills every .grad as usual; adaptive clipping and state_dict
    cover the hooked parameters and resume into an optimizer with the same exclude."""
    torch.manual_seed(0)
    model, batches = MLP(), mlp_batches(2)
    opt = lomo_torch.AdaLomo(model, lr=0.01, adaptive_clip=1.05, exclude=HEAD)
    model(*batches[0]).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    opt.fused_backward(model(*batches[0]), 0.01)
    sd = opt.state_dict()
    names = {n for n, _ in model.named_parameters() if not n.startswith("head.")}
    assert sd["state"].keys() == names and set(sd["adaptive_clip"]["norm_ema"]) == names
    twin = copy.deepcopy(model)
    other = lomo_torch.AdaLomo(twin, lr=0.01, adaptive_clip=1.05, exclude=HEAD)
    other.load_state_dict(sd)
    for m, o in ((model, opt), (twin, other)):
        m.zero_grad(set_to_none=True)
        o.fused_backward(m(*batches[1]), 0.01)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name


def test_bad_exclude_is_refused():
    model = MLP()
    with pytest.raises(TypeError, match="exclude must be a callable"):
        lomo_torch.Lomo(model, exclude="head")
    with pytest.raises(ValueError, match="exclude leaves none of the 10 trainable"):
        lomo_torch.AdaLomo(model, exclude=lambda n, p: True)
    model.fc1.requires_grad_(False)  # frozen ones are not counted (or hooked)
    opt = lomo_torch.Lomo(model, exclude=HEAD)
    assert [n for n, _ in opt._named_params] == ["ln1.weight", "ln1.bias", "fc2.weight",
                                                 "fc2.bias", "ln2.weight", "ln2.bias"]


def test_wrapping_a_submodule_rearms_with_excluded_params():
    """The hook-site check, re-run after a submodule changed, knows the excluded
    parameters: trainable but deliberately unhooked, not replaced."""
    torch.manual_seed(0)
    model, (batch,) = MLP(), mlp_batches(1)
    opt = lomo_torch.Lomo(model, lr=0.01, exclude=HEAD)
    model.fc1 = nn.Sequential(model.fc1)  # the same parameters, somewhere else
    before = model.fc1[0].weight.detach().clone()
    assert opt.fused_backward(model(*batch), 0.01)
    assert not torch.equal(model.fc1[0].weight, before)
