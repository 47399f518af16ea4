"""The fp16 loss-scaling policy shared with lomo_jax, and lomo-optim's scales on request."""

import pytest
import torch
import torch.nn.functional as F

import lomo_torch
from lomo_torch import FP16_POLICY, LOMO_OPTIM_LOSS_SCALE, DynamicLossScaler
from tests.torch.helpers import MLP, mlp_batches, snapshot

OPTIMIZERS = ["Lomo", "AdaLomo"]
POLICY = {"cur_scale": 2.0**16, "scale_factor": 2.0, "scale_window": 1000, "min_scale": 1,
          "raise_error_at_min_scale": True, "delayed_shift": 1}


class UpcastHead(MLP):
    """fp16 parameters, the loss computed in fp32 from upcast outputs (as
    transformers' heads do): the loss's gradient, the scale, need not fit fp16."""

    def forward(self, x, y):
        h = F.gelu(self.ln1(self.fc1(x)))
        h = F.gelu(self.ln2(self.fc2(h)))
        return F.mse_loss(self.head(h).float(), y.float())


def fp16_model(cls=UpcastHead):
    torch.manual_seed(0)
    return cls().half()


def fp32_loss(model, batch):
    return model(*batch)


@pytest.mark.filterwarnings("ignore:Lomo. fp16 detected:UserWarning")
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_defaults_are_the_policy(opt_name):
    model = fp16_model()
    opt = getattr(lomo_torch, opt_name)(model, lr=0.01)
    loss = fp32_loss(model, mlp_batches(1, dtype=torch.float16)[0])
    opt.grad_norm(loss)
    state = opt.loss_scaler.state_dict()
    assert {k: state[k] for k in POLICY} == POLICY
    assert opt.fused_backward(loss) is True, "2**16 fits an fp32 loss: the first step applies"


def test_policy_matches_lomo_jax():
    loss_scale = pytest.importorskip("lomo_jax._loss_scale")
    assert FP16_POLICY["init_scale"] == loss_scale.DEFAULT_INIT_SCALE == 2**16


def test_policy_doubles_after_1000_clean_steps_and_halves_on_overflow():
    s = DynamicLossScaler(**FP16_POLICY)
    for _ in range(999):
        s.update_scale(False)
    assert s.loss_scale == 2**16
    s.update_scale(False)
    assert s.loss_scale == 2**17
    s.update_scale(True)
    assert s.loss_scale == 2**16
    for _ in range(999):
        s.update_scale(False)
    assert s.loss_scale == 2**16, "999 clean steps after an overflow: not yet"
    s.update_scale(False)
    assert s.loss_scale == 2**17


@pytest.mark.filterwarnings("ignore:Lomo. fp16 detected:UserWarning")
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_overflow_halves_and_skips_bit_for_bit(opt_name):
    model = fp16_model()
    opt = getattr(lomo_torch, opt_name)(model, lr=0.01)
    before = snapshot(model)
    loss = fp32_loss(model, mlp_batches(1, dtype=torch.float16)[0]) * 1e30
    opt.grad_norm(loss)
    assert opt.fused_backward(loss) is False
    assert opt.loss_scaler.loss_scale == 2**15 and opt.step_num == 0 and not opt.state
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.filterwarnings("ignore:Lomo. fp16 detected:UserWarning")
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_overflow_at_minimum_raises_and_changes_nothing(opt_name):
    model = fp16_model()
    opt = getattr(lomo_torch, opt_name)(model, lr=0.01, loss_scale_args={"init_scale": 1})
    before = snapshot(model)
    loss = fp32_loss(model, mlp_batches(1, dtype=torch.float16)[0]) * float("inf")
    with pytest.raises(RuntimeError, match="loss scale already at its minimum"):
        opt.grad_norm(loss)
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.filterwarnings("ignore:Lomo. fp16 detected:UserWarning")
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_fp16_loss_seed(opt_name):
    """A loss computed in fp16 has an fp16 gradient, the scale itself: 2**16 (the
    policy's start) would be inf there and skip the step. It is seeded with 2**15
    and unscaled by the same, so the step applies, and equals a run that starts
    at 2**15 bit for bit (the scaler's own state stays at the policy's 2**16)."""
    batch = mlp_batches(1, dtype=torch.float16)[0]
    results = []
    for args in ({"init_scale": 2**15}, None):
        model = fp16_model(MLP)
        opt = getattr(lomo_torch, opt_name)(model, lr=0.01, loss_scale_args=args)
        before = snapshot(model)
        loss = model(*batch)
        assert loss.dtype == torch.float16
        opt.grad_norm(loss)
        assert opt.fused_backward(loss) is True
        after = snapshot(model)
        assert any(not torch.equal(before[n], after[n]) for n in before)
        results.append(after)
    assert opt.loss_scaler.loss_scale == 2**16
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


@pytest.mark.filterwarnings("ignore:Lomo. fp16 detected:UserWarning")
def test_lomo_optim_compatibility_scales(lomo_optim):
    """LOMO_OPTIM_LOSS_SCALE gives lomo-optim 0.1.1's numbers: Lomo's fp16 scaler
    starts where lomo-optim's does (2**32), AdaLomo scales by its default 2**10."""
    import inspect

    theirs_lomo = lomo_optim.lomo.DynamicLossScaler().loss_scale
    theirs_ada = inspect.signature(lomo_optim.AdaLomo.__init__).parameters["loss_scale"].default
    assert (theirs_lomo, theirs_ada) == (2**32, 2**10)

    for name, theirs in (("Lomo", theirs_lomo), ("AdaLomo", theirs_ada)):
        model = fp16_model()
        opt = getattr(lomo_torch, name)(model, lr=0.01, **LOMO_OPTIM_LOSS_SCALE[name])
        opt._check_precision(model(*mlp_batches(1, dtype=torch.float16)[0]))  # makes the scaler
        assert opt.loss_scaler.loss_scale == theirs, name

    fp32 = lomo_torch.AdaLomo(MLP(), lr=0.01, **LOMO_OPTIM_LOSS_SCALE["AdaLomo"])
    assert fp32._loss_scale() == theirs_ada, "lomo-optim scales fp32 losses too"
    assert lomo_torch.AdaLomo(MLP(), lr=0.01)._loss_scale() is None, "the default does not"

