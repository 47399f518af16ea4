"""Run one optimizer configuration through PyTorch and through JAX, step by step.

The PyTorch side is any LOMO-style optimizer with lomo-optim's loop
(``grad_norm(loss)`` when norm clipping, then ``fused_backward(loss, lr)``);
the JAX side is the equivalent optax chain:
``optax.clip_by_global_norm`` ahead of ``lomo_jax.lomo`` / ``lomo_jax.adalomo``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import lomo_jax

from parity_tests.twin_models import (
    TorchBlock, TorchMLP, block_batches, jax_block_loss, jax_mlp_loss, mlp_batches, torch_to_jax,
)

STEPS = 5

# Each setting is checked to really clip on the first batch (clipping_is_active).
SETTINGS = {
    "plain": {},
    "weight_decay": {"weight_decay": 0.1},
    "clip_value": {"clip_grad_value": 0.02},
    "clip_norm": {"clip_grad_norm": 0.1},
    "weight_decay+clip_norm": {"weight_decay": 0.1, "clip_grad_norm": 0.1},
    "weight_decay+clip_value": {"weight_decay": 0.1, "clip_grad_value": 0.02},
}

MODELS = {
    "mlp": (TorchMLP, jax_mlp_loss, mlp_batches),
    "block": (TorchBlock, jax_block_loss, block_batches),
}


def lrs_for(optimizer: str, steps: int = STEPS) -> tuple:
    """A decaying learning rate, per step (LOMO is SGD; AdaLomo's step is relative)."""
    base = 0.05 if optimizer == "lomo" else 0.02
    return tuple(base * 0.8**t for t in range(steps))


@dataclass(frozen=True)
class Config:
    """One optimizer setting, spelled the same for both frameworks."""

    optimizer: str  # "lomo" | "adalomo"
    lrs: tuple
    weight_decay: float = 0.0
    clip_grad_value: float | None = None
    clip_grad_norm: float | None = None
    extra: dict = field(default_factory=dict)

    def torch_kwargs(self):
        kw = dict(weight_decay=self.weight_decay, clip_grad_value=self.clip_grad_value,
                  clip_grad_norm=self.clip_grad_norm, lr=self.lrs[0])
        kw.update(self.extra)
        return kw

    def jax_tx(self):
        schedule = lambda count: jnp.asarray(self.lrs, jnp.float32)[count]  # noqa: E731
        factory = lomo_jax.lomo if self.optimizer == "lomo" else lomo_jax.adalomo
        rule = factory(schedule, weight_decay=self.weight_decay,
                       clip_grad_value=self.clip_grad_value)
        if self.clip_grad_norm is None:
            return rule
        return optax.chain(optax.clip_by_global_norm(self.clip_grad_norm), rule)


def run_torch(optimizer_cls, model, cfg: Config, batches):
    """Train a copy of ``model``; return the copy after each step (as models)."""
    model = copy.deepcopy(model)
    opt = optimizer_cls(model, **cfg.torch_kwargs())
    snapshots, losses = [], []
    for batch, lr in zip(batches, cfg.lrs):
        loss = model(*batch)
        if cfg.clip_grad_norm is not None:
            opt.grad_norm(loss)
        opt.fused_backward(loss, lr)
        losses.append(loss.item())
        snapshots.append(copy.deepcopy(model))
    return snapshots, losses


def run_jax(loss_fn, model, cfg: Config, batches, dtype=jnp.float32):
    """Train the JAX twin from ``model``'s weights; return params after each step."""
    params = torch_to_jax(model, dtype)
    tx = cfg.jax_tx()
    state = tx.init(params)

    @jax.jit
    def step(params, state, *batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    snapshots, losses = [], []
    for batch in batches:
        params, state, loss = step(params, state, *(jnp.asarray(b.numpy()) for b in batch))
        snapshots.append(params)
        losses.append(float(loss))
    return snapshots, losses


def clipping_is_active(loss_fn, model, cfg: Config, batch) -> bool:
    """Guard against a vacuous test: the configured clipping must really bite."""
    params = torch_to_jax(model)
    grads = jax.grad(loss_fn)(params, *(jnp.asarray(b.numpy()) for b in batch))
    active = True
    if cfg.clip_grad_norm is not None:
        active &= float(optax.tree.norm(grads)) > cfg.clip_grad_norm
    if cfg.clip_grad_value is not None:
        biggest = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
        active &= biggest > cfg.clip_grad_value
    return bool(active)


def as_numpy(module):
    return {n: p.detach().to(torch.float64).numpy() for n, p in module.named_parameters()}


def max_rel_diff(a, b):
    return max(
        float(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(b[k]), 1e-30)) for k in a
    )
