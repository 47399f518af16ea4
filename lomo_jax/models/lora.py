r"""LoRA and LoRA + LOMO on lomo_jax's models: add adapters, train, merge, export.

A config with ``lora=LoraConfig(rank, alpha, targets)`` gives every targeted
projection :math:`y = x W + \frac{\alpha}{r} (x A) B` (see
:mod:`lomo_jax.models.lora_config`); the adapters live beside their kernels in
``params["layers"]`` (``lora_a`` ``[L, d_in, r]``, ``lora_b`` ``[L, r, d_out]``),
so ``models.logits``, ``models.layered_model``, ``models.generate`` and the
fused step run unchanged.

Example::

    from lomo_jax.models import lora
    cfg = cfg.replace(lora=lora.LoraConfig(rank=16, alpha=32, targets=("q_proj", "v_proj")))
    params = lora.add_adapters(cfg, params, rng=jax.random.key(0))
    tx = lora.optimizer(base=lomo_jax.adalomo(1e-3), adapters=optax.adamw(1e-4))
    ...                                      # the fused step, as for any model
    lora.save_adapter(cfg, params, "out/adapter")      # PEFT's format
    cfg, params = lora.merge(cfg, params)              # plain weights again
"""

from __future__ import annotations

import numbers
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from lomo_jax.models.config import LlamaConfig
from lomo_jax.models.lora_config import (LORA_TARGETS, LoraConfig, adapter_dtype,
                                          kaiming_uniform_a5, lora_path)
from lomo_jax.models.params import check_params, param_shapes
from lomo_jax.models.peft_adapter import _lora_of, load_adapter, save_adapter
from lomo_jax.sharding_params import is_adapter

__all__ = ["LORA_TARGETS", "LoraConfig", "add_adapters", "is_adapter", "load_adapter", "merge",
           "optimizer", "save_adapter"]


def _copy_tree(tree):
    """A fresh dict skeleton over the same leaves (the caller's dicts stay untouched)."""
    return {k: _copy_tree(v) if isinstance(v, dict) else v for k, v in tree.items()}


def add_adapters(cfg: LlamaConfig, params, *, rng) -> dict:
    r"""``params`` of the base model (``cfg`` without its lora) plus fresh adapters.

    PEFT's default initialisation: ``lora_a`` :math:`\sim U(\pm 1/\sqrt{d_\mathrm{in}})`
    (``kaiming_uniform_(a=sqrt(5))``), ``lora_b = 0``, so the logits are those
    of the base model. Each adapter is fp32, or its kernel's dtype if wider (PEFT's
    ``autocast_adapter_dtype``: a bf16 adapter would lose AdamW's small updates); the base
    arrays are shared, not copied.

    Example::

        cfg = cfg.replace(lora=LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj")))
        params = add_adapters(cfg, base_params, rng=jax.random.key(0))

    Raises:
      ValueError: ``cfg`` has no lora, or ``params`` is not the base model of
        ``cfg`` (names the missing, unexpected or misshapen leaf; params that
        already carry adapters are refused the same way).
    """
    lora = _lora_of(cfg, "add_adapters")
    check_params(cfg.replace(lora=None), params, "params")
    shapes = param_shapes(cfg)["layers"]
    out = _copy_tree(params)
    key = jax.random.key(int(rng)) if isinstance(rng, numbers.Integral) else rng
    for i, target in enumerate(lora.targets):
        branch, proj = lora_path(target)
        want = shapes[branch][proj]
        kernel = params["layers"][branch][proj]["kernel"]
        dt = adapter_dtype(kernel.dtype)
        a = kaiming_uniform_a5(jax.random.fold_in(key, i), want["lora_a"].shape, dt)
        out["layers"][branch][proj]["lora_a"] = a
        out["layers"][branch][proj]["lora_b"] = jnp.zeros(want["lora_b"].shape, dt)
    return out


def merge(cfg: LlamaConfig, params):
    r"""``(cfg without lora, params)`` with every adapter folded into its kernel:
    :math:`W \leftarrow W + \frac{\alpha}{r} A B` (computed in fp32, rounded once
    to the kernel's dtype), the adapter leaves dropped. The result saves with
    :func:`lomo_jax.models.convert.save_pretrained` and computes the same
    logits (up to that one rounding).

    Example::

        cfg, params = merge(cfg, params)
        convert.save_pretrained(params, cfg, "out/merged")
    """
    lora = _lora_of(cfg, "merge")
    check_params(cfg, params, "params")
    out = _copy_tree(params)
    for target in lora.targets:
        branch, proj = lora_path(target)
        p = out["layers"][branch][proj]
        a, b = p.pop("lora_a"), p.pop("lora_b")
        delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32))
        p["kernel"] = (p["kernel"].astype(jnp.float32) + lora.scale * delta).astype(p["kernel"].dtype)
    return cfg.replace(lora=None), out


def _labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "adapters" if is_adapter(path) else "base", params)


def _frozen() -> optax.GradientTransformation:
    r"""No state; every update ``-0.0``: :math:`\theta + (-0) = \theta` bit for bit
    in IEEE arithmetic, ``-0.0`` included (``optax.set_to_zero``'s ``+0.0`` turns a
    ``-0.0`` weight into ``+0.0``)."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizer(*, base: Optional[optax.GradientTransformation],
              adapters: optax.GradientTransformation) -> optax.GradientTransformation:
    r"""One optax transform for a model with LoRA adapters: ``base`` on the base
    weights, ``adapters`` on the adapters (the leaves :func:`is_adapter` names).

    * LoRA + LOMO: ``optimizer(base=lomo_jax.adalomo(1e-3), adapters=optax.adamw(1e-4))``.
    * LoRA only: ``base=None``. The base weights get a ``-0.0`` update
      (bit-identical after any number of steps, ``-0.0`` weights included) and
      no optimizer state.

    It is an ``optax.multi_transform`` labelled by leaf name, so it works in any
    optax loop and in :func:`lomo_jax.fused_train_step` (the labels are read
    from each unit the step updates; ``adapters`` must be leaf-wise there, as
    ``optax.adamw`` is). In the fused step the adapters' gradients live only as
    long as their layer's, like every other gradient, and
    ``clip_grad_norm``'s norm covers everything the step updates: the base
    weights' and the adapters' gradients, or with ``base=None`` the adapters'
    alone. A frozen base is never differentiated, copied or written there
    (:mod:`lomo_jax.fused.frozen`), so LoRA only costs inference plus the
    adapters.

    Example::

        tx = lora.optimizer(base=None, adapters=optax.adamw(1e-4, weight_decay=0.0))
        opt_state = lomo_jax.fused_init(tx, params)
    """
    base = _frozen() if base is None else base
    return optax.multi_transform({"base": base, "adapters": adapters}, _labels)
