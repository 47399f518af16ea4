"""Traps around the fused backward (issue 27, items 9-12): a grad_norm that raised
arms nothing; resuming needs the same settings and param_groups mirror what the
update applies; a freed graph is refused before any update; a dtype change or a
replaced parameter after the first step is caught on every pass."""

import io
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lomo_torch
from tests.torch.helpers import MLP, FailsInBackward, TiedLM, mlp_batches, snapshot

OPTIMIZERS = ["Lomo", "AdaLomo"]
fp16_clip_warning = pytest.mark.filterwarnings("ignore:Lomo. fp16 detected:UserWarning")


class UpcastHead(MLP):
    """fp16 parameters, the loss computed in fp32 from upcast outputs."""

    def forward(self, x, y):
        h = F.gelu(self.ln1(self.fc1(x)))
        h = F.gelu(self.ln2(self.fc2(h)))
        return F.mse_loss(self.head(h).float(), y.float())


class BiasLast(nn.Module):
    """A bias added last: in backward its gradient is complete (and its hook
    fires) before any node that needs a saved tensor runs."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3, bias=False)
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return (torch.tanh(self.lin(x)) + self.bias).sum()


def assert_unchanged(model, before):
    after = snapshot(model)
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name


def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------- item 9
@fp16_clip_warning
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_grad_norm_that_raised_at_minimum_scale_arms_nothing(opt_name):
    """The overflow at the minimum loss scale raises in grad_norm; a loop that catches
    it and calls fused_backward is refused (not NaN everywhere), nothing changes,
    and the next step with a fresh grad_norm trains."""
    torch.manual_seed(0)
    model = UpcastHead().half()
    opt = getattr(lomo_torch, opt_name)(model, lr=0.01, loss_scale_args={"init_scale": 1})
    batch = mlp_batches(1, dtype=torch.float16)[0]
    before = snapshot(model)
    loss = model(*batch) * float("inf")
    with pytest.raises(RuntimeError, match="loss scale already at its minimum"):
        opt.grad_norm(loss)
    with pytest.raises(RuntimeError, match=r"call grad_norm\(loss\) before every fused_backward.*"
                                           r"does not count: it raised RuntimeError: Gradient "
                                           r"overflow with the loss scale already at its minimum"):
        opt.fused_backward(loss, 0.01)
    assert_unchanged(model, before)
    assert opt.step_num == 0 and not opt.state
    loss = model(*batch)
    opt.grad_norm(loss)
    assert opt.fused_backward(loss, 0.01) is True
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- item 10
BASE = {
    "Lomo": dict(clip_grad_norm=0.5, clip_grad_value=0.05, weight_decay=0.01,
                 loss_scale_args={"scale_window": 4}),
    "AdaLomo": dict(clip_grad_norm=0.5, weight_decay=0.01, eps=(1e-30, 1e-3),
                    clip_threshold=1.0, decay_rate=-0.8, loss_scale=2.0**4),
}
CHANGED = [
    ("Lomo", "clip_grad_norm", 0.01), ("Lomo", "clip_grad_norm", None),
    ("Lomo", "clip_grad_value", None), ("Lomo", "weight_decay", 0.0),
    ("Lomo", "loss_scale_args", {}), ("Lomo", "skip_nonfinite", True),
    ("Lomo", "stochastic_rounding", True),
    ("AdaLomo", "eps", (1e-30, 1e-4)), ("AdaLomo", "clip_threshold", 2.0),
    ("AdaLomo", "decay_rate", -0.5), ("AdaLomo", "loss_scale", None),
    ("AdaLomo", "weight_decay", 0.1), ("AdaLomo", "clip_grad_norm", 0.01),
]


def trained(opt_name, steps=2, **kw):
    torch.manual_seed(0)
    model = MLP()
    opt = getattr(lomo_torch, opt_name)(model, lr=0.05, **{**BASE[opt_name], **kw})
    for batch in mlp_batches(steps):
        loss = model(*batch)
        opt.grad_norm(loss)
        opt.fused_backward(loss, 0.05)
    return model, opt


@pytest.mark.parametrize("opt_name,key,value", CHANGED,
                         ids=[f"{o}-{k}={v}" for o, k, v in CHANGED])
def test_resume_with_other_settings_is_refused(opt_name, key, value):
    """Any constructor setting that differs from the state_dict's is named, and
    nothing is loaded (not the constructor's 0.01 silently replaced by None)."""
    _, opt = trained(opt_name)
    sd = save_load(opt.state_dict())
    other = getattr(lomo_torch, opt_name)(MLP(), lr=0.05, **{**BASE[opt_name], key: value})
    groups_before = [dict(g, params=None) for g in other.param_groups]
    with pytest.raises(ValueError, match=rf"other settings \({key}: state_dict .*, this "
                                         rf"optimizer .*nothing was loaded"):
        other.load_state_dict(sd)
    assert other.step_num == 0 and not other.state and other.loss_scaler is None
    assert [dict(g, params=None) for g in other.param_groups] == groups_before
    assert getattr(other, key) == value


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_resume_with_the_same_settings_and_param_groups_mirror_them(opt_name):
    model, opt = trained(opt_name)
    sd = save_load(opt.state_dict())
    other = getattr(lomo_torch, opt_name)(MLP(), lr=1.0, **BASE[opt_name])
    other.load_state_dict(sd)
    assert other.step_num == 2 and other.lr == 0.05 and other.param_groups[0]["lr"] == 0.05
    for key in ("weight_decay", "clip_grad_norm", "clip_grad_value", "eps"):
        if key in other.param_groups[0]:
            assert other.param_groups[0][key] == getattr(other, key) == BASE[opt_name].get(key), key


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_to_change_a_setting_on_purpose_edit_the_state_dict(opt_name):
    _, opt = trained(opt_name)
    sd = save_load(opt.state_dict())
    sd["settings"]["weight_decay"] = 0.2
    other = getattr(lomo_torch, opt_name)(MLP(), lr=0.05, **{**BASE[opt_name], "weight_decay": 0.2})
    other.load_state_dict(sd)
    assert other.weight_decay == other.param_groups[0]["weight_decay"] == 0.2


def test_state_dict_without_settings_is_checked_against_its_param_groups():
    """A state_dict written before "settings" existed: its param_groups hold the
    constructor's clip_grad_norm, clip_grad_value and weight_decay."""
    _, opt = trained("Lomo")
    sd = save_load(opt.state_dict())
    del sd["settings"]
    wrong = lomo_torch.Lomo(MLP(), lr=0.05, **{**BASE["Lomo"], "weight_decay": 0.0})
    with pytest.raises(ValueError, match=r"weight_decay: state_dict 0.01, this optimizer 0.0.*"
                                         r"edit state_dict\['param_groups'\]"):
        wrong.load_state_dict(sd)
    right = lomo_torch.Lomo(MLP(), lr=0.05, **BASE["Lomo"])
    right.load_state_dict(sd)
    assert right.step_num == 2


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_changed_setting_in_param_groups_is_refused(opt_name):
    """param_groups hold the settings too, but the update reads the optimizer's:
    a value changed there is refused before anything changes."""
    model, opt = trained(opt_name, steps=1)
    opt.param_groups[0]["weight_decay"] = 0.5
    before = snapshot(model)
    loss = model(*mlp_batches(1)[0])
    opt.grad_norm(loss)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['weight_decay'\] is 0.5, but "
                                         rf"{opt_name} applies weight_decay=0.01"):
        opt.fused_backward(loss)
    assert_unchanged(model, before)
    assert opt.step_num == 1


@fp16_clip_warning
def test_fp16_clip_of_lomo_is_in_param_groups_and_restored():
    """fp16 without clip_grad_norm makes Lomo clip at 1.0 (as lomo-optim): param_groups
    say so, and a resumed optimizer built with the same arguments does the same."""
    torch.manual_seed(0)
    model = UpcastHead().half()
    opt = lomo_torch.Lomo(model, lr=0.01)
    for batch in mlp_batches(2, dtype=torch.float16):
        loss = model(*batch)
        opt.grad_norm(loss)
        opt.fused_backward(loss)
    assert opt.clip_grad_norm == opt.param_groups[0]["clip_grad_norm"] == 1.0
    other = lomo_torch.Lomo(UpcastHead().half(), lr=0.01)
    other.load_state_dict(save_load(opt.state_dict()))
    assert other.clip_grad_norm == other.param_groups[0]["clip_grad_norm"] == 1.0
    assert other.loss_scaler.state_dict() == opt.loss_scaler.state_dict()
    # written before "settings": param_groups held the requested None next to the 1.0 applied
    legacy = save_load(opt.state_dict())
    del legacy["settings"]
    legacy["param_groups"][0]["clip_grad_norm"] = None
    other = lomo_torch.Lomo(model, lr=0.01)
    other.load_state_dict(legacy)
    assert other.clip_grad_norm == other.param_groups[0]["clip_grad_norm"] == 1.0
    loss = model(*mlp_batches(1, dtype=torch.float16)[0])
    other.grad_norm(loss)
    assert other.fused_backward(loss) is True


# ---------------------------------------------------------------- item 11
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_second_fused_backward_on_the_same_loss_changes_nothing(opt_name):
    torch.manual_seed(0)
    model = BiasLast()
    opt = getattr(lomo_torch, opt_name)(model, lr=0.1)
    loss = model(torch.randn(5, 4))
    assert opt.fused_backward(loss) is True
    before = snapshot(model)
    for again in (lambda: opt.fused_backward(loss), lambda: opt.fused_backward(loss * 2),
                  lambda: opt.grad_norm(loss)):
        with pytest.raises(RuntimeError) as info:
            again()
        assert_unchanged(model, before)  # the bias used to be stepped before autograd failed
        assert "already backpropagated by fused_backward" in str(info.value)
        assert "nothing has been updated" in str(info.value)
    assert opt.step_num == 1
    assert opt.fused_backward(model(torch.randn(5, 4))) is True  # a new loss trains


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
def test_a_backward_that_fails_midway_says_what_was_updated():
    """Not preventable before the backward: the error then says the model is partly stepped."""
    torch.manual_seed(0)
    model = BiasLast()
    opt = lomo_torch.Lomo(model, lr=0.1)
    x = torch.randn(5, 4)
    loss = (FailsInBackward.apply(torch.tanh(model.lin(x))) + model.bias).sum()
    with pytest.raises(RuntimeError, match="injected backward failure") as info:
        opt.fused_backward(loss)
    assert any("failed after updating 1 of 2 parameters" in n for n in info.value.__notes__)
    assert opt.step_num == 0


# ---------------------------------------------------------------- item 12
@fp16_clip_warning
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_half_after_fp32_steps_turns_on_loss_scaling(opt_name):
    """model.half() after fp32 steps: the next pass turns dynamic loss scaling on, so an
    overflow skips the step (it used to write NaN into every parameter)."""
    model, opt = trained(opt_name)
    assert opt.loss_scaler is None
    model.half()
    x, y = mlp_batches(1, dtype=torch.float16)[0]
    before = snapshot(model)
    loss = model(x, y).float() * 1e30  # its fp16 gradients overflow
    opt.grad_norm(loss)
    assert opt.loss_scaler is not None
    assert opt.fused_backward(loss, 0.05) is False
    assert_unchanged(model, before)
    assert opt.step_num == 2


def test_half_after_fp32_steps_needs_grad_norm():
    """Without clipping fp32 needs no grad_norm; after model.half() it is the overflow check."""
    torch.manual_seed(0)
    model = UpcastHead()
    opt = lomo_torch.Lomo(model, lr=0.05, clip_grad_norm=0.5)
    loss = model(*mlp_batches(1)[0])
    opt.grad_norm(loss)
    model.half()  # between grad_norm and fused_backward: that norm pass was unscaled
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="fp16 training uses dynamic loss scaling.*fp16 appeared "
                                           "after it ran"):
        opt.fused_backward(loss)
    assert_unchanged(model, before)

    model = UpcastHead()
    opt = lomo_torch.AdaLomo(model, lr=0.05)
    opt.fused_backward(model(*mlp_batches(1)[0]))
    model.half()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"call grad_norm\(loss\) before every fused_backward.*"
                                           r"fp16 training uses dynamic loss scaling"):
        opt.fused_backward(model(*mlp_batches(1, dtype=torch.float16)[0]))
    assert_unchanged(model, before)
    assert opt.step_num == 1


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_load_state_dict_assign_after_steps_is_refused(opt_name):
    """model.load_state_dict(sd, assign=True) swaps in new Parameter objects; the hooks
    stay on the old ones, so fused_backward used to return True and update nothing."""
    model, opt = trained(opt_name)
    torch.manual_seed(1)
    model.load_state_dict(MLP().state_dict(), assign=True)
    before = snapshot(model)
    loss = model(*mlp_batches(1)[0])
    with pytest.raises(RuntimeError, match=r"parameters \['fc1.weight', 'fc1.bias', 'ln1.weight'\] "
                                           r"were replaced after the optimizer was created \(10 "
                                           r"in all; .*assign=True"):
        opt.grad_norm(loss)
    with pytest.raises(RuntimeError, match="were replaced after the optimizer was created"):
        opt.fused_backward(loss)
    assert_unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert opt.step_num == 2


def test_replaced_tied_slot_and_submodule_are_refused():
    """One slot of a tied weight, or a whole submodule, replaced after steps."""
    torch.manual_seed(0)
    model = TiedLM()
    opt = lomo_torch.Lomo(model, lr=0.1)
    ids = torch.randint(0, 13, (2, 5))
    assert opt.fused_backward(model(ids, ids))
    model.head.weight = nn.Parameter(model.embed.weight.detach().clone())
    with pytest.raises(RuntimeError, match=r"\['head.weight'\] were replaced .*\(1 in all"):
        opt.fused_backward(model(ids, ids))
    model.head.weight = model.embed.weight  # tied again: trains
    assert opt.fused_backward(model(ids, ids))
    model.mix = nn.Linear(8, 8)
    with pytest.raises(RuntimeError, match=r"\['mix.weight', 'mix.bias'\] were replaced .*"
                                           r"\(2 in all"):
        opt.fused_backward(model(ids, ids))


def test_same_parameters_moved_into_a_wrapper_still_train():
    """A wrapper added after the optimizer around the same Parameter objects is no
    replacement: the hooks are on the tensors the model uses, and it trains."""
    model, opt = trained("Lomo", steps=1)
    model.fc1 = nn.Sequential(model.fc1)
    before = snapshot(model)
    for batch in mlp_batches(2):
        loss = model(*batch)
        opt.grad_norm(loss)
        assert opt.fused_backward(loss, 0.05) is True
    after = snapshot(model)
    assert not torch.equal(before["fc1.0.weight"], after["fc1.0.weight"])
    assert opt.step_num == 3
