"""PyTorch reference implementation of LOMO and AdaLomo.

A drop-in replacement for ``lomo_optim`` 0.1.1 (change the import): the same
constructor arguments, ``grad_norm(loss)`` and ``fused_backward(loss, lr)``,
and the same numbers, except the loss scales (AdaLomo's ``loss_scale`` defaults
to None; pass ``**LOMO_OPTIM_LOSS_SCALE[name]`` for lomo-optim's). Updates run
in ``register_post_accumulate_grad_hook`` hooks, so each parameter is updated
exactly once per step with its complete (for tied weights: summed) gradient,
which is freed right away.

Beyond lomo-optim: fp32 math for bf16/fp16 parameters; fp16 (loss or
parameters) turns on dynamic loss scaling for both optimizers (``FP16_POLICY``,
as in lomo_jax; ``LOMO_OPTIM_LOSS_SCALE`` gives lomo-optim's scales), with
overflowing steps skipped without touching parameters or state and no
``torch.distributed`` process group needed; AdaLomo on parameters of any
rank; ``state_dict()`` / ``load_state_dict()`` for exact resumption (into an
optimizer built with the same settings, else a ``ValueError`` naming them);
``grad_norm`` returns the global norm; ``fused_backward(loss)`` without an lr
uses ``param_groups[0]["lr"]`` (LR schedulers); ``remove_hooks()``;
``exclude=(name, param) -> bool`` leaves parameters (LoRA adapters) to another
optimizer stepped after ``fused_backward`` (:mod:`lomo_torch._exclude`).

Example::

    import lomo_torch

    opt = lomo_torch.AdaLomo(model, lr=1e-3, clip_grad_norm=1.0)
    loss = model(x).loss
    opt.grad_norm(loss)          # global norm (and fp16 overflow check)
    opt.fused_backward(loss, 1e-3)
"""

from .adalomo import AdaLomo
from .lomo import Lomo
from .loss_scaler import FP16_POLICY, LOMO_OPTIM_LOSS_SCALE, DynamicLossScaler
from . import checkpoint

__all__ = ["Lomo", "AdaLomo", "DynamicLossScaler", "FP16_POLICY", "LOMO_OPTIM_LOSS_SCALE",
           "checkpoint"]
