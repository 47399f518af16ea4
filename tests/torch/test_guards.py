"""Graphs the fused update cannot serve are refused before any parameter changes
(torch.compile, reentrant activation checkpointing); non-reentrant checkpointing
trains exactly as without it; grad_norm and fused_backward must get the same loss."""

import pytest
import torch
import torch.utils.checkpoint as cp
from torch import nn

import lomo_torch
from tests.torch.helpers import MLP, mlp_batches, snapshot

OPTIMIZERS = ["Lomo", "AdaLomo"]


def assert_unchanged(model, before):
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


class SharedSegments(nn.Module):
    """One Linear used in two segments (a layer applied twice); ``reentrant``:
    checkpoint each segment with that ``use_reentrant``, None: no checkpointing."""

    def __init__(self, reentrant):
        super().__init__()
        self.inp = nn.Linear(6, 6)
        self.shared = nn.Linear(6, 6)
        self.reentrant = reentrant

    def segment(self, h):
        if self.reentrant is None:
            return torch.tanh(self.shared(h))
        return cp.checkpoint(lambda a: torch.tanh(self.shared(a)), h, use_reentrant=self.reentrant)

    def forward(self, x):
        return self.segment(self.segment(self.inp(x))).square().mean()


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
@pytest.mark.parametrize("clip", [None, 1.0], ids=["one_pass", "two_pass"])
def test_reentrant_checkpoint_refused_before_any_change(opt_name, clip):
    torch.manual_seed(0)
    model = SharedSegments(reentrant=True)
    opt = getattr(lomo_torch, opt_name)(model, lr=0.1, clip_grad_norm=clip)
    before = snapshot(model)
    loss = model(torch.randn(4, 6))
    first = opt.grad_norm if clip else opt.fused_backward
    with pytest.raises(RuntimeError,
                       match=r"reentrant activation checkpointing.*use_reentrant=False"):
        first(loss)
    assert_unchanged(model, before)
    assert opt.step_num == 0 and not opt.state


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_non_reentrant_checkpoint_equals_plain(opt_name):
    """The same model without checkpointing: bit-identical after 3 steps (the
    recomputed forward is the same computation, and each update reads only its
    own parameter's gradient)."""
    torch.manual_seed(0)
    models = [SharedSegments(reentrant=False), SharedSegments(reentrant=None)]
    models[1].load_state_dict(models[0].state_dict())
    initial = snapshot(models[0])
    xs = torch.randn(3, 4, 6)
    for model in models:
        opt = getattr(lomo_torch, opt_name)(model, lr=0.1)
        for x in xs:
            opt.fused_backward(model(x))
    a, b = snapshot(models[0]), snapshot(models[1])
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["shared.weight"], initial["shared.weight"])


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_llama_gradient_checkpointing_equals_plain():
    """transformers' gradient_checkpointing_enable() (non-reentrant): 3 AdaLomo
    steps give bit-identical parameters to the same model without it."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=8)
    torch.manual_seed(0)
    ckpt = transformers.LlamaForCausalLM(cfg)
    plain = transformers.LlamaForCausalLM(cfg)
    plain.load_state_dict(ckpt.state_dict())
    ckpt.gradient_checkpointing_enable()
    calls = []
    # a pre-hook: the recompute may stop early, before a module's forward returns
    ckpt.model.layers[0].self_attn.register_forward_pre_hook(lambda *a: calls.append(1))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32, (3, 2, 8), generator=g)
    for model in (ckpt, plain):
        model.train()
        opt = lomo_torch.AdaLomo(model, lr=1e-2)
        for batch in ids:
            opt.fused_backward(model(input_ids=batch, labels=batch).loss)
    assert len(calls) == 6, "checkpointing is on: layer 0 runs again in every backward"
    a, b = snapshot(ckpt), snapshot(plain)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
@pytest.mark.parametrize("how", ["torch.compile", "in_place"])
def test_torch_compile_refused_before_any_change(opt_name, how):
    """A compiled model's backward is one AOTAutograd node producing every
    gradient at once: refused, naming torch.compile, nothing changed."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()
    if how == "in_place":
        model.compile(backend="aot_eager")  # AOTAutograd, no C++ build
        compiled = model
    else:
        compiled = torch.compile(model, backend="aot_eager")
    opt = getattr(lomo_torch, opt_name)(compiled, lr=0.1)
    before = snapshot(model)
    x, y = mlp_batches(1)[0]
    with pytest.raises(RuntimeError,
                       match=r"torch\.compile.*gradients of 10 parameters.*_orig_mod"):
        opt.fused_backward(compiled(x, y))
    assert_unchanged(model, before)
    assert opt.step_num == 0 and not opt.state
    if how == "torch.compile":  # the uncompiled module itself trains
        opt.remove_hooks()
        assert lomo_torch.Lomo(model, lr=0.1).fused_backward(model(x, y))


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_fused_backward_needs_the_loss_given_to_grad_norm(opt_name):
    """The norm (clipping, the fp16 overflow check) belongs to grad_norm's loss: another
    tensor in fused_backward is refused with nothing changed, and the step can then be
    finished with the right one."""
    torch.manual_seed(0)
    model = MLP()
    opt = getattr(lomo_torch, opt_name)(model, lr=0.01, clip_grad_norm=1.0)
    (x1, y1), (x2, y2) = mlp_batches(2)
    loss1, loss2 = model(x1, y1), model(x2, y2)
    before = snapshot(model)
    opt.grad_norm(loss1)
    with pytest.raises(RuntimeError, match="another tensor than the loss given to grad_norm"):
        opt.fused_backward(loss2, 0.01)
    assert_unchanged(model, before)
    assert opt.step_num == 0
    assert opt.fused_backward(loss1, 0.01) is True
    assert opt.step_num == 1
