"""Small models, batches and a plain reference implementation of the update rules."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """548 parameters: Linear and LayerNorm weights (2-D and 1-D)."""

    def __init__(self, d_in=8, d_hidden=16, d_out=4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.ln1 = nn.LayerNorm(d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.ln2 = nn.LayerNorm(d_hidden)
        self.head = nn.Linear(d_hidden, d_out)

    def forward(self, x, y):
        h = F.gelu(self.ln1(self.fc1(x)))
        h = F.gelu(self.ln2(self.fc2(h)))
        return F.mse_loss(self.head(h), y)


class TinyBlock(nn.Module):
    """A one-layer transformer-ish LM (~1.7k parameters), untied embedding and head."""

    def __init__(self, vocab=17, d=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d, bias=False)  # a key bias gets no gradient (softmax shift)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids, targets):
        h = self.embed(ids)
        a = self.ln1(h)
        q, k, v = self.q(a), self.k(a), self.v(a)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        mask = torch.ones(ids.shape[-1], ids.shape[-1], dtype=torch.bool).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        h = h + self.o(att @ v)
        h = h + self.down(F.gelu(self.up(self.ln2(h))))
        logits = self.head(h)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


class TiedLM(nn.Module):
    """Embedding tied to the output head: one Parameter used twice."""

    def __init__(self, vocab=13, d=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids, targets):
        h = torch.tanh(self.mix(self.embed(ids)))
        logits = self.head(self.norm(h))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class Params(nn.Module):
    """Free parameters of any shapes; ``forward(grads)`` = sum(p * g), so d loss/d p = g exactly."""

    def __init__(self, tensors: dict):
        super().__init__()
        for name, t in tensors.items():
            self.register_parameter(name, nn.Parameter(t.clone()))

    def forward(self, grads: dict):
        return sum((getattr(self, n) * g).sum() for n, g in grads.items())


class FailsInBackward(torch.autograd.Function):
    """The identity, whose backward raises ``RuntimeError("injected backward failure")``."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("injected backward failure")


def owns_storage(grad):
    """Whether ``grad`` (a tensor, or a DTensor's local shard) is the whole of its
    storage, not a view into a larger buffer (FSDP2's flat reduce-scatter output)."""
    t = getattr(grad, "_local_tensor", grad)
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()


def mlp_batches(steps, seed=1, batch=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 8, generator=g).to(dtype), torch.randn(batch, 4, generator=g).to(dtype))
            for _ in range(steps)]


def lm_batches(steps, seed=2, batch=4, seq=6, vocab=17):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (batch, seq), generator=g),
             torch.randint(0, vocab, (batch, seq), generator=g)) for _ in range(steps)]


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train(opt, model, batches, lrs, two_pass):
    """lomo-optim's loop; returns the parameters after every step."""
    history = []
    for batch, lr in zip(batches, lrs):
        loss = model(*batch)
        if two_pass:
            opt.grad_norm(loss)
        opt.fused_backward(loss, lr)
        history.append(snapshot(model))
    return history


def twins(model):
    return copy.deepcopy(model), copy.deepcopy(model)


# ---------------------------------------------------------------- reference rules
def ref_clip(grads: dict, clip_grad_value=None, clip_grad_norm=None, loss_scale=None):
    """Unscale, value-clip, then scale by the global-norm coefficient (of the raw grads)."""
    out = {}
    gs = {n: g.float() / loss_scale if loss_scale else g.float() for n, g in grads.items()}
    coef = None
    if clip_grad_norm is not None:
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs.values()]))
        coef = torch.clamp(clip_grad_norm / (total + 1e-6), max=1.0)
    for n, g in gs.items():
        if clip_grad_value is not None:
            g = g.clamp(-clip_grad_value, clip_grad_value)
        if coef is not None:
            g = g * coef
        out[n] = g
    return out


def ref_lomo(p, g, lr, weight_decay=0.0):
    w = p.float()
    if weight_decay > 0:
        w = w * (1 - lr * weight_decay)
    return (w - lr * g).to(p.dtype)


def ref_adalomo(p, g, state, t, lr, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
                weight_decay=0.0):
    """AdaLomo for one parameter, written from the paper's formula; mutates ``state``."""
    beta = 1.0 - t**decay_rate
    u = g * g + eps[0]
    if g.dim() >= 2:
        if not state:
            state["row"] = torch.zeros(g.shape[:-1])
            state["col"] = torch.zeros(g.shape[:-2] + g.shape[-1:])
        state["row"] = beta * state["row"] + (1 - beta) * u.mean(-1)
        state["col"] = beta * state["col"] + (1 - beta) * u.mean(-2)
        row_n = state["row"] / state["row"].mean(-1, keepdim=True)
        update = row_n.rsqrt()[..., None] * state["col"].rsqrt()[..., None, :] * g
    else:
        if not state:
            state["v"] = torch.zeros(g.shape)
        state["v"] = beta * state["v"] + (1 - beta) * u
        update = state["v"].rsqrt() * g
    rms = lambda x: x.norm() / math.sqrt(x.numel())  # noqa: E731
    update = update / torch.clamp(rms(update) / clip_threshold, min=1.0)
    w = p.float()
    lr_t = lr * max(eps[1], float(rms(w)))
    if weight_decay > 0:
        w = w * (1 - lr_t * weight_decay)
    return (w - lr_t * update).to(p.dtype)


def assert_close_rel(actual, expected, rtol=1e-6, msg=""):
    """Elementwise to ``rtol`` relative, with an absolute floor of ``rtol * max|expected|``
    (an element that has just crossed zero has no meaningful relative error)."""
    scale = float(expected.float().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale + 1e-30, msg=msg or None)
