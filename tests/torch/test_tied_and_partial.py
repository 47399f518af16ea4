"""Tied parameters get one update with the summed gradient; frozen and unused ones none."""

import copy

import pytest
import torch
from torch import nn

import lomo_torch
from tests.torch.helpers import (
    MLP, TiedLM, assert_close_rel, mlp_batches, ref_adalomo, ref_clip, ref_lomo, snapshot,
)


def tied_batches(steps, vocab=13, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (3, 5), generator=g), torch.randint(0, vocab, (3, 5), generator=g))
            for _ in range(steps)]


def count_updates(opt):
    """Wrap the per-parameter update to count calls per parameter name."""
    counts = {}
    inner = opt._update

    def counted(name, p, g):
        counts[name] = counts.get(name, 0) + 1
        return inner(name, p, g)

    opt._update = counted
    return counts


@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.05, "clip_grad_value": 0.05},
                                {"clip_grad_norm": 0.1, "weight_decay": 0.05}])
@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_tied_weights_one_update_with_summed_grad(opt_name, kw):
    torch.manual_seed(0)
    model = TiedLM()
    assert model.head.weight is model.embed.weight
    ref = copy.deepcopy(model)
    assert ref.head.weight is ref.embed.weight  # deepcopy keeps the tie
    names = [n for n, _ in ref.named_parameters()]
    assert names.count("embed.weight") == 1 and "head.weight" not in names

    opt = getattr(lomo_torch, opt_name)(model, lr=0.05, **kw)
    counts = count_updates(opt)
    ref_state = {n: {} for n in names}
    for t, (batch, lr) in enumerate(zip(tied_batches(3), [0.05, 0.04, 0.03]), start=1):
        # reference: full gradients by autograd.grad (the tied weight's is the sum of both uses)
        params = dict(ref.named_parameters())
        loss_ref = ref(*batch)
        grads = dict(zip(params, torch.autograd.grad(loss_ref, list(params.values()))))
        grads = ref_clip(grads, kw.get("clip_grad_value"), kw.get("clip_grad_norm"))
        with torch.no_grad():
            for n, p in params.items():
                if opt_name == "Lomo":
                    new = ref_lomo(p, grads[n], lr, kw.get("weight_decay", 0.0))
                else:
                    new = ref_adalomo(p, grads[n], ref_state[n], t, lr,
                                      weight_decay=kw.get("weight_decay", 0.0))
                p.copy_(new)

        loss = model(*batch)
        if "clip_grad_norm" in kw:
            opt.grad_norm(loss)
        opt.fused_backward(loss, lr)
        assert counts == {n: t for n in names}, "each parameter is updated exactly once per step"
        assert model.head.weight is model.embed.weight
        ours = snapshot(model)
        for n, p in ref.named_parameters():
            assert_close_rel(ours[n], p.detach(), rtol=1e-6, msg=f"step {t}: {n}")


def test_tied_gradient_is_the_sum_of_both_uses():
    """Guard against a vacuous tie: both uses contribute, and neither alone is the gradient."""
    torch.manual_seed(0)
    tied = TiedLM()
    untied = copy.deepcopy(tied)
    untied.head.weight = nn.Parameter(tied.embed.weight.detach().clone())
    batch = tied_batches(1)[0]
    tied(*batch).backward()
    untied(*batch).backward()
    as_input, as_head = untied.embed.weight.grad, untied.head.weight.grad
    torch.testing.assert_close(as_input + as_head, tied.embed.weight.grad)
    assert as_input.abs().max() > 1e-3 and as_head.abs().max() > 1e-3


class Branchy(nn.Module):
    """``used`` always contributes, ``maybe`` only when asked, ``frozen`` never trains."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.maybe = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.vec = nn.Parameter(torch.randn(4))

    def forward(self, x, use_maybe):
        h = self.frozen(self.used(x)) * self.vec
        if use_maybe:
            h = self.maybe(h)
        return h.pow(2).mean()


@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_frozen_and_unused_parameters(opt_name):
    torch.manual_seed(0)
    model = Branchy()
    opt = getattr(lomo_torch, opt_name)(model, lr=0.01, clip_grad_norm=1.0)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in [model.used.weight, model.used.bias, model.maybe.weight, model.maybe.bias,
                        model.vec]}
    x = torch.randn(8, 4)
    frozen0 = snapshot(model.frozen)

    loss = model(x, use_maybe=True)
    opt.grad_norm(loss)
    opt.fused_backward(loss, 0.01)
    state_after_1 = {n: {k: v.clone() for k, v in s.items()} for n, s in opt.state_dict()["state"].items()}
    maybe_after_1 = snapshot(model.maybe)
    used_after_1 = snapshot(model.used)

    loss = model(x, use_maybe=False)
    opt.grad_norm(loss)
    opt.fused_backward(loss, 0.01)
    state_after_2 = opt.state_dict()["state"]

    for n, p in snapshot(model.maybe).items():
        assert torch.equal(p, maybe_after_1[n]), "a parameter without gradient is not updated"
    for n, p in snapshot(model.used).items():
        assert not torch.equal(p, used_after_1[n])
    for n, p in snapshot(model.frozen).items():
        assert torch.equal(p, frozen0[n]) and model.frozen.weight.grad is None
    if opt_name == "AdaLomo":
        for n in ("maybe.weight", "maybe.bias"):
            for k, v in state_after_1[n].items():
                assert torch.equal(state_after_2[n][k], v), "its statistics are untouched too"
        assert not torch.equal(state_after_2["used.weight"]["exp_avg_sq_row"],
                               state_after_1["used.weight"]["exp_avg_sq_row"])
    assert all(p.grad is None for p in model.parameters())


def test_two_optimizers_on_disjoint_parts():
    """Hooks of an optimizer only act during its own passes."""
    torch.manual_seed(0)
    model = MLP()
    model.head.requires_grad_(False)
    opt = lomo_torch.Lomo(model, lr=0.01)
    # a plain backward outside the optimizer leaves .grad alone
    model(*mlp_batches(1)[0]).backward()
    assert model.fc1.weight.grad is not None
    before = snapshot(model)
    # ... and the next fused pass discards those stale gradients instead of adding to them
    ref = copy.deepcopy(model)
    loss = model(*mlp_batches(1)[0])
    opt.fused_backward(loss, 0.01)
    ref_opt = lomo_torch.Lomo(ref, lr=0.01)
    ref_opt.fused_backward(ref(*mlp_batches(1)[0]), 0.01)
    for n, p in model.named_parameters():
        assert torch.equal(p, dict(ref.named_parameters())[n])
    assert not torch.equal(before["fc1.weight"], model.fc1.weight)
