r"""fp16 dynamic loss scaling in the fused optimizers (a mixin).

fp16 anywhere -- an fp16 loss or any fp16 parameter, also one converted later
(``model.half()`` after fp32 steps) -- turns on a
:class:`~lomo_torch.DynamicLossScaler` from that pass on (the subclass's
``_enable_fp16`` builds it). The backward then runs on ``loss * scale`` and
each gradient is divided by the scale in its hook; ``grad_norm`` is required
every step, and a non-finite global norm is an overflow: the scale shrinks
and the step is skipped. An fp16 loss's gradient seed is the scale itself in
fp16, where :math:`2^{16}` is inf, so it is capped at :math:`2^{15}` (the
largest power of two fp16 holds) and the gradients are unscaled by the same.

Example::

    scale = opt._seed_scale(opt._loss_scale(), loss)   # what multiplies the loss
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = ["LossScalingMixin", "warn_fp16_clip"]

# The largest power of two an fp16 loss's gradient holds (2**15), as lomo_jax derives it
_FP16_SEED_CAP = 2.0 ** math.floor(math.log2(torch.finfo(torch.float16).max))


def warn_fp16_clip(cls_name):
    warnings.warn(
        f"{cls_name}: fp16 detected, dynamic loss scaling is on and clip_grad_norm was None; "
        f"setting clip_grad_norm=1.0 (as lomo-optim does). Call grad_norm(loss) before every "
        f"fused_backward(loss, lr).",
        UserWarning,
        stacklevel=5,
    )


class LossScalingMixin:
    """fp16 detection, the loss scale of a pass and the overflow verdict."""

    def _enable_fp16(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _fp16_settings(self):
        """Settings fp16 implies (Lomo: ``clip_grad_norm=1.0`` if None); True if one changed."""
        return False

    def _loss_scale(self):
        """Scale for the loss of this step (None: no scaling)."""
        return None if self.loss_scaler is None else self.loss_scaler.loss_scale

    @staticmethod
    def _seed_scale(scale, loss):
        """``scale`` as the loss's gradient seed can hold it (an fp16 loss: at most 2**15)."""
        if scale is not None and loss.dtype == torch.float16:
            return min(scale, _FP16_SEED_CAP)
        return scale

    def _detect_fp16(self, loss):
        """Turn on dynamic loss scaling if the loss or any parameter is fp16 (and it
        is not on yet). Returns True if it did now."""
        if self.loss_scaler is not None:
            return False
        half = torch.float16
        if loss.dtype is half or any(p.dtype is half for _, p in self._named_params):
            self._enable_fp16()
            self._sync_groups()
            return True
        return False

    def _fp16_overflow(self, total):
        """The norm pass's verdict under loss scaling: whether ``total`` overflowed
        (then the scale shrinks; at its minimum the scaler raises)."""
        overflow = not bool(torch.isfinite(total))
        self.loss_scaler.has_overflow_serial = overflow
        if overflow:
            self.loss_scaler.update_scale(True)
        return overflow

    @property
    def _needs_norm_pass(self):
        return (self.clip_grad_norm is not None or self.loss_scaler is not None
                or self.skip_nonfinite)

    def _require_norm(self):
        """Refuse an update that needs this step's grad_norm() when none succeeded."""
        if not self._needs_norm_pass or self._norm_ready:
            return
        if self.loss_scaler is not None:
            why = ("fp16 training uses dynamic loss scaling, and grad_norm(loss) is its "
                   "overflow check")
        elif self.clip_grad_norm is not None:
            why = (f"clip_grad_norm={self.clip_grad_norm} is set, and grad_norm(loss) "
                   f"computes the global gradient norm")
        else:
            why = ("skip_nonfinite=True is set, and grad_norm(loss) checks the loss and the "
                   "gradient norm")
        failed = ("" if self._norm_failed is None else
                  f" (the last grad_norm(loss) does not count: {self._norm_failed})")
        raise RuntimeError(f"call grad_norm(loss) before every fused_backward(loss, lr): {why}"
                           f"{failed}; nothing has been updated")
