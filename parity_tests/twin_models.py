"""The same small models in PyTorch and in JAX, and the weight mapping between them.

PyTorch keeps ``nn.Linear`` weights as ``[out, in]``; the JAX twins use Flax's
layout, ``kernel: [in, out]`` and LayerNorm ``scale``. Feeding the two
frameworks the same numbers through different layouts is what proves the
factored AdaLomo statistics do not depend on the layout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------- MLP -------------------------------------


class TorchMLP(nn.Module):
    def __init__(self, d_in=8, d_hidden=16, d_out=4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.fc3 = nn.Linear(d_hidden, d_out)

    def forward(self, x, y):
        h = torch.tanh(self.fc1(x))
        h = F.gelu(self.fc2(h))
        return F.mse_loss(self.fc3(h), y)


def jax_mlp_loss(params, x, y):
    def dense(p, h):
        return h @ p["kernel"] + p["bias"]

    h = jnp.tanh(dense(params["fc1"], x))
    h = jax.nn.gelu(dense(params["fc2"], h), approximate=False)
    return jnp.mean((dense(params["fc3"], h) - y) ** 2)


def mlp_batches(n, batch=16, d_in=8, d_out=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, d_in, generator=g), torch.randn(batch, d_out, generator=g))
        for _ in range(n)
    ]


# --------------------------- transformer block ------------------------------


class TorchBlock(nn.Module):
    """Embedding -> pre-norm causal self-attention -> pre-norm MLP -> LM head."""

    def __init__(self, vocab=32, d=16, heads=2, ffn=32):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.q, self.v, self.o = (nn.Linear(d, d) for _ in range(3))
        # No key bias: its gradient is exactly zero in exact arithmetic (softmax
        # is shift-invariant per query), so AdaLomo would normalise rounding noise.
        self.k = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, ffn)
        self.down = nn.Linear(ffn, d)
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids, labels):
        b, t = ids.shape
        h = self.embed(ids)
        x = self.ln1(h)
        split = lambda z: z.view(b, t, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
        h = h + self.o(a)
        h = h + self.down(F.gelu(self.up(self.ln2(h))))
        logits = self.lm_head(self.ln_f(h))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def jax_block_loss(params, ids, labels, heads=2):
    def dense(p, h):
        out = h @ p["kernel"]
        return out + p["bias"] if "bias" in p else out

    def layer_norm(p, h, eps=1e-5):
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        return (h - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]

    b, t = ids.shape
    h = params["embed"]["embedding"][ids]
    x = layer_norm(params["ln1"], h)
    split = lambda z: z.reshape(b, t, heads, -1).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = (split(dense(params[n], x)) for n in ("q", "k", "v"))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    a = (jax.nn.softmax(scores, -1) @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
    h = h + dense(params["o"], a)
    h = h + dense(params["down"], jax.nn.gelu(dense(params["up"], layer_norm(params["ln2"], h)),
                                              approximate=False))
    logits = dense(params["lm_head"], layer_norm(params["ln_f"], h))
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.take_along_axis(logp, labels[..., None], -1).mean()


def block_batches(n, batch=4, seq=8, vocab=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        out.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    return out


# ----------------------------- weight mapping -------------------------------


def torch_to_jax(module: nn.Module, dtype=jnp.float32):
    """Map a torch module's parameters to the Flax-layout dict of the JAX twin."""
    params = {}
    for name, p in module.named_parameters():
        layer, kind = name.rsplit(".", 1)
        sub = type(module.get_submodule(layer))
        value = p.detach().to(torch.float32).numpy()
        if sub is nn.Linear and kind == "weight":
            key, value = "kernel", value.T  # [out, in] -> [in, out]
        elif sub is nn.LayerNorm and kind == "weight":
            key = "scale"
        elif sub is nn.Embedding:
            key = "embedding"
        else:
            key = kind
        params.setdefault(layer, {})[key] = jnp.asarray(np.ascontiguousarray(value), dtype)
    return params


def jax_to_torch_layout(module: nn.Module, params):
    """The JAX dict back in the torch module's names and layouts (float64 numpy)."""
    out = {}
    for name, p in module.named_parameters():
        layer, kind = name.rsplit(".", 1)
        sub = type(module.get_submodule(layer))
        if sub is nn.Linear and kind == "weight":
            value = np.asarray(params[layer]["kernel"], np.float64).T
        elif sub is nn.LayerNorm and kind == "weight":
            value = np.asarray(params[layer]["scale"], np.float64)
        elif sub is nn.Embedding:
            value = np.asarray(params[layer]["embedding"], np.float64)
        else:
            value = np.asarray(params[layer][kind], np.float64)
        out[name] = value
    return out


def assert_params_close(module: nn.Module, jax_params, rtol, atol, step=None):
    """Every parameter agrees elementwise and as a whole tensor (relative norm)."""
    ours = jax_to_torch_layout(module, jax_params)
    for name, p in module.named_parameters():
        t = p.detach().to(torch.float64).numpy()
        j = ours[name]
        where = f"parameter {name!r}" + (f" after step {step}" if step is not None else "")
        np.testing.assert_allclose(j, t, rtol=rtol, atol=atol, err_msg=where)
        rel = np.linalg.norm(j - t) / max(np.linalg.norm(t), 1e-30)
        assert rel <= rtol, f"{where}: relative error {rel:.3g} > {rtol}"
