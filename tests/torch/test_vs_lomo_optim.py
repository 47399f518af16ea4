"""lomo_torch against the original lomo-optim 0.1.1, parameter by parameter, step by step.

Untied fp32 models with only 1-D and 2-D parameters (all lomo-optim supports),
identical weights and batches, a changing learning rate. lomo-optim registers
``Tensor.register_hook`` hooks and scans all parameters in each; lomo_torch
uses post-accumulate-grad hooks. On an untied model both update each
parameter once with its full gradient, so the numbers must agree.
"""

import pytest
import torch

import lomo_torch
from tests.torch.helpers import (
    MLP, TinyBlock, lm_batches, mlp_batches, train, twins,
)

STEPS = 4
SETTINGS = {
    "plain": {},
    "weight_decay": {"weight_decay": 0.1},
    "clip_value": {"clip_grad_value": 0.02},
    "clip_norm": {"clip_grad_norm": 0.1},
    "combined": {"weight_decay": 0.1, "clip_grad_value": 0.02, "clip_grad_norm": 0.1},
}
MODELS = {"mlp": (MLP, mlp_batches), "block": (TinyBlock, lm_batches)}


def lrs_for(name):
    base = 0.05 if name == "Lomo" else 0.02
    return [base * 0.7**t for t in range(STEPS)]


def run_pair(lomo_optim, opt_name, model_name, kw):
    model_cls, make_batches = MODELS[model_name]
    torch.manual_seed(0)
    ours_model, ref_model = twins(model_cls())
    batches = make_batches(STEPS)
    lrs = lrs_for(opt_name)
    two_pass = "clip_grad_norm" in kw
    ours = train(getattr(lomo_torch, opt_name)(ours_model, lr=lrs[0], **kw), ours_model,
                 batches, lrs, two_pass)
    ref = train(getattr(lomo_optim, opt_name)(ref_model, lr=lrs[0], **kw), ref_model,
                batches, lrs, two_pass)
    return ours, ref, batches


def clipping_bites(model_name, kw, batch):
    model_cls, _ = MODELS[model_name]
    torch.manual_seed(0)
    model = model_cls()
    model(*batch).backward()
    grads = [p.grad for p in model.parameters()]
    ok = True
    if "clip_grad_norm" in kw:
        ok &= float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) > kw["clip_grad_norm"]
    if "clip_grad_value" in kw:
        ok &= max(float(g.abs().max()) for g in grads) > kw["clip_grad_value"]
    return ok


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_matches_lomo_optim(lomo_optim, opt_name, model_name, setting):
    kw = SETTINGS[setting]
    ours, ref, batches = run_pair(lomo_optim, opt_name, model_name, kw)
    assert clipping_bites(model_name, kw, batches[0]), "the clipping setting would not bite"
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert a.keys() == b.keys()
        for name in a:  # elementwise, every element: |ours - theirs| <= 1e-6 |theirs|
            torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=0,
                                       msg=lambda m: f"step {step}, {name}: {m}")
    torch.manual_seed(0)
    initial = dict(MODELS[model_name][0]().named_parameters())
    still = [n for n in initial if torch.equal(initial[n], ours[-1][n])]
    assert not still, f"parameters that never moved: {still}"


@pytest.mark.parametrize("setting", ["plain", "weight_decay", "clip_value"])
@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_bit_identical_without_norm_clipping(lomo_optim, opt_name, setting):
    """Without the global norm (whose summation order differs) the fp32 ops are the same."""
    ours, ref, _ = run_pair(lomo_optim, opt_name, "block", SETTINGS[setting])
    for a, b in zip(ours, ref):
        for name in a:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_same_norm_as_lomo_optim(lomo_optim, opt_name):
    """grad_norm returns the global norm; lomo-optim keeps it only inside clip_coef."""
    torch.manual_seed(0)
    a, b = twins(MLP())
    batch = mlp_batches(1)[0]
    ours = getattr(lomo_torch, opt_name)(a, clip_grad_norm=0.1)
    ref = getattr(lomo_optim, opt_name)(b, clip_grad_norm=0.1)
    total = ours.grad_norm(a(*batch))
    ref.grad_norm(b(*batch))
    torch.testing.assert_close(ours.clip_coef, ref.clip_coef, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.clip_coef, torch.clamp(0.1 / (total + 1e-6), max=1.0))
    # grad_norm changes nothing and leaves no gradient behind
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        assert p.grad is None


@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_tied_model_matches_lomo_optim(lomo_optim, opt_name):
    """A leaf's tensor hook also sees the summed gradient, so lomo-optim agrees on ties too."""
    from tests.torch.helpers import TiedLM

    torch.manual_seed(0)
    a, b = twins(TiedLM())
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randint(0, 13, (3, 5), generator=g), torch.randint(0, 13, (3, 5), generator=g))
               for _ in range(3)]
    lrs = lrs_for(opt_name)[:3]
    kw = {"weight_decay": 0.05, "clip_grad_norm": 0.5}
    ours = train(getattr(lomo_torch, opt_name)(a, lr=lrs[0], **kw), a, batches, lrs, True)
    ref = train(getattr(lomo_optim, opt_name)(b, lr=lrs[0], **kw), b, batches, lrs, True)
    for step, (x, y) in enumerate(zip(ours, ref)):
        for name in x:
            torch.testing.assert_close(x[name], y[name], rtol=1e-6, atol=0,
                                       msg=lambda m: f"step {step}, {name}: {m}")
