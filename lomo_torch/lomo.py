"""LOMO: SGD fused into the backward pass (Lv et al., 2023, arXiv:2306.09782)."""

from __future__ import annotations

from ._fused import FusedOptimizer
from ._loss_scaling import warn_fp16_clip
from .loss_scaler import FP16_POLICY, DynamicLossScaler

__all__ = ["Lomo"]


class Lomo(FusedOptimizer):
    """LOMO: each parameter takes an SGD step the moment its gradient is complete.

    Per parameter ``p`` with gradient ``grad`` (math in fp32, the result cast
    back to ``p``'s dtype)::

        g = grad / loss_scale                          # loss_scale = 1 unless fp16
        g = g * min(1, adaptive_clip * ema(||g||) / ||g||)        # if set, see below
        g = clamp(g, -clip_grad_value, clip_grad_value)            # if set
        g = g * min(1, clip_grad_norm / (||all grads||_2 + 1e-6))  # if set
        p = p * (1 - lr * weight_decay) - lr * g

    The global norm needs every gradient before any update, so norm clipping
    takes two backward passes: :meth:`grad_norm` (norm only), then
    :meth:`fused_backward` (updates). fp16 (an fp16 loss or fp16 parameters)
    turns on a :class:`DynamicLossScaler` with :data:`~lomo_torch.FP16_POLICY`
    (start at 2**16; lomo-optim's 2**32 with
    ``**lomo_torch.LOMO_OPTIM_LOSS_SCALE["Lomo"]``), updated by ``loss_scale_args``, and,
    as in lomo-optim, ``clip_grad_norm=1.0`` if it was None; ``grad_norm``
    is then required every step and an overflow skips the step.

    Adaptive clipping (``adaptive_clip=1.05``; not in lomo-optim) protects from
    gradient spikes in ONE backward: each parameter's gradient is clipped to
    ``adaptive_clip`` times a moving average (decay ``adaptive_clip_decay``) of
    its own clipped norm, and to ``adaptive_clip_absolute`` during the first
    ``adaptive_clip_warmup_steps`` steps -- the rule of
    :func:`lomo_jax.adaptive_clip` (AdaGC; math in :mod:`lomo_torch._adaptive_clip`),
    one fp32 scalar per parameter, kept in ``state_dict()``. It replaces
    ``clip_grad_norm`` (together: ``ValueError``), also in fp16: there it is
    not set to 1.0; ``grad_norm`` stays required every step as the overflow
    check, and an overflowed step changes no parameter and no clipping state.

    Drop-in for ``lomo_optim.Lomo`` (same arguments and methods)::

        from lomo_torch import Lomo

        opt = Lomo(model, lr=1e-3, clip_grad_norm=1.0)
        for batch in loader:
            loss = model(**batch).loss
            opt.grad_norm(loss)            # only with clip_grad_norm / fp16
            opt.fused_backward(loss, lr=1e-3)

        opt = Lomo(model, lr=1e-3, adaptive_clip=1.05)   # one backward a step
        opt.fused_backward(model(**batch).loss, lr=1e-3)

    Args:
        model: the ``nn.Module`` to train; every parameter with
            ``requires_grad=True`` is updated (tied parameters once).
        lr: learning rate (also the default for ``fused_backward``).
        clip_grad_norm: clip the global gradient L2 norm to this (two passes).
        clip_grad_value: clamp each gradient element to ``[-v, v]``.
        weight_decay: decoupled weight decay, ``p *= 1 - lr * weight_decay``.
        loss_scale_args: keyword arguments of :class:`DynamicLossScaler` for fp16,
            over :data:`~lomo_torch.FP16_POLICY`.
        skip_nonfinite: (keyword only, not in lomo-optim) bf16/fp32 guard: a step
            whose loss or global gradient norm is not finite is skipped whole
            (nothing changes) and counted in ``nonfinite_steps``; makes
            :meth:`grad_norm` required every step. (fp16 always skips overflows.)
        stochastic_rounding: (keyword only, not in lomo-optim) round each new value
            into a bf16/fp16 parameter stochastically (unbiased: updates smaller than
            half a spacing still count in expectation; :mod:`lomo_torch.rounding`)
            instead of to nearest. fp32 parameters are unaffected.
        adaptive_clip: (keyword only) the relative bound, e.g. 1.05; None (default): off.
        adaptive_clip_decay: (keyword only) decay of the norm average, in [0, 1).
        adaptive_clip_warmup_steps: (keyword only) steps (int >= 1) clipped by
            ``adaptive_clip_absolute`` while the average forms.
        adaptive_clip_absolute: (keyword only) per-tensor norm bound in warm-up;
            None: warm-up steps unclipped. Defaults are lomo_jax.adaptive_clip's.
        seed: (keyword only) seed of the rounding noise; ``None`` draws one from
            torch's default generator (rank 0's under DDP/FSDP2). ``state_dict()``
            carries it, so a resumed run draws the same bits.
        exclude: (keyword only) a callable ``(name, param) -> bool`` (names as
            ``model.named_parameters()`` gives them; under DDP ``model.module``'s):
            parameters it picks get no hook and are left to another optimizer
            stepped after :meth:`fused_backward` (LoRA + LOMO: ``exclude=lambda n, p:
            "lora_" in n``). Their ``.grad`` accumulates as usual: never zeroed,
            clipped or freed here; :meth:`grad_norm` leaves it as it was and its
            norm covers the hooked parameters only (``clip_grad_norm`` clips
            those, not the excluded); an updating :meth:`fused_backward` adds the
            gradient unscaled (fp16) and averaged over DDP ranks (FSDP2: its shard,
            averaged by FSDP2's reduce-scatter); one that skips
            (returns False) leaves it as it was: skip the other optimizer's step
            too. Details: :mod:`lomo_torch._exclude`.

    Resuming: :meth:`load_state_dict` needs an optimizer built with the same
    settings as the one that wrote the state_dict (every argument but ``lr`` and
    ``seed``, which come from the state_dict); a difference raises ``ValueError``
    naming each setting and loads nothing. ``param_groups`` show
    ``clip_grad_norm``, ``clip_grad_value`` and ``weight_decay`` as applied (fp16's
    1.0 included); only ``lr`` is read from there, and a changed setting there is
    refused by the next :meth:`fused_backward`.
    """

    def __init__(self, model, lr=1e-3, clip_grad_norm=None, clip_grad_value=None,
                 weight_decay=0.0, loss_scale_args=None, *, skip_nonfinite=False,
                 stochastic_rounding=False, seed=None, adaptive_clip=None,
                 adaptive_clip_decay=0.98, adaptive_clip_warmup_steps=100,
                 adaptive_clip_absolute=1.0, exclude=None):
        if loss_scale_args is not None and not isinstance(loss_scale_args, dict):
            raise TypeError(f"loss_scale_args must be a dict, got {type(loss_scale_args).__name__}")
        self.loss_scale_args = dict(loss_scale_args or {})
        defaults = dict(lr=lr, clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value,
                        weight_decay=weight_decay)
        super().__init__(model, defaults, lr=lr, clip_grad_norm=clip_grad_norm,
                         clip_grad_value=clip_grad_value, weight_decay=weight_decay,
                         skip_nonfinite=skip_nonfinite, stochastic_rounding=stochastic_rounding,
                         seed=seed, adaptive_clip=(adaptive_clip, adaptive_clip_decay,
                                                   adaptive_clip_warmup_steps,
                                                   adaptive_clip_absolute),
                         exclude=exclude)

    def _extra_settings(self):
        return {"loss_scale_args": self.loss_scale_args}

    def _enable_fp16(self):
        self.loss_scaler = DynamicLossScaler(**{**FP16_POLICY, **self.loss_scale_args})
        if self._fp16_settings():
            warn_fp16_clip(type(self).__name__)

    def _fp16_settings(self):
        """As lomo-optim: fp16 without ``clip_grad_norm`` clips at 1.0 (not with
        ``adaptive_clip``, which replaces it)."""
        if self.clip_grad_norm is None and self.adaptive_clipping is None:
            self.clip_grad_norm = 1.0
            return True
        return False

    def _update(self, name, p, g):
        lr = self._step_lr
        p = self._local(name, p)  # this rank's shard of a DTensor (FSDP2) parameter
        w = self._fp32_view(p)
        if self.weight_decay > 0:
            w.mul_(1.0 - lr * self.weight_decay)
        w.add_(g, alpha=-lr)
        self._write_back(name, p, w)
