"""Dynamic loss scaling for fp16 training, without torch.distributed.

The loss is multiplied by ``loss_scale`` before backward so that small fp16
gradients do not flush to zero; gradients are divided by it again before the
update. A step whose gradients hold an inf or NaN is skipped and the scale is
divided by ``scale_factor``; after ``scale_window`` clean steps in a row it is
multiplied by ``scale_factor`` again. ``delayed_shift`` > 1 tolerates that many
overflows before the first reduction (hysteresis).

The same rules and defaults as ``lomo_optim.lomo.DynamicLossScaler`` (itself
after DeepSpeed's; :class:`~lomo_torch.Lomo` and :class:`~lomo_torch.AdaLomo`
build it from :data:`FP16_POLICY` instead), but it needs no process group and logs through
:mod:`logging` (logger ``"lomo_torch"``) instead of printing on rank 0.

Example::

    scaler = DynamicLossScaler(init_scale=2**16, scale_window=1000)
    (loss * scaler.loss_scale).backward()
    overflow = any(DynamicLossScaler.has_inf_or_nan(p.grad) for p in params)
    scaler.update_scale(overflow)
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("lomo_torch")

__all__ = ["DynamicLossScaler", "FP16_POLICY", "LOMO_OPTIM_LOSS_SCALE"]

#: The fp16 loss-scaling policy of lomo_torch's optimizers, the same as lomo_jax's:
#: start at 2**16; on a step whose gradients overflow, skip it (nothing changes)
#: and halve the scale; double it after 1000 consecutive clean steps; never
#: below 1, and an overflow at 1 raises ``RuntimeError``.
FP16_POLICY = {"init_scale": 2.0**16, "scale_factor": 2.0, "scale_window": 1000,
               "min_scale": 1, "raise_error_at_min_scale": True}

#: lomo-optim 0.1.1's loss scales, for reproducing its numbers:
#: ``Lomo(model, **LOMO_OPTIM_LOSS_SCALE["Lomo"])`` starts fp16 at 2**32 and
#: ``AdaLomo(model, **LOMO_OPTIM_LOSS_SCALE["AdaLomo"])`` scales every loss by
#: 2**10 (fp32 and bf16 too, statically; fp16 starts its dynamic scale there).
LOMO_OPTIM_LOSS_SCALE = {"Lomo": {"loss_scale_args": {"init_scale": 2**32}},
                         "AdaLomo": {"loss_scale": 2**10}}


class DynamicLossScaler:
    """Loss scale that halves on overflow and doubles after ``scale_window`` clean steps.

    Args:
        init_scale: starting scale.
        scale_factor: factor the scale is divided by on overflow and multiplied
            by after ``scale_window`` clean steps.
        scale_window: clean steps (since the last overflow) between increases.
        min_scale: the scale never goes below this.
        delayed_shift: overflows tolerated before the scale is reduced.
        consecutive_hysteresis: if True, every clean step restores the
            hysteresis budget (``delayed_shift``); otherwise only an increase does.
        raise_error_at_min_scale: raise ``RuntimeError`` on an overflow while the
            scale is already ``min_scale``.
        dtype: the dtype being protected; only used in log messages.
    """

    def __init__(
        self,
        init_scale=2**32,
        scale_factor=2.0,
        scale_window=1000,
        min_scale=1,
        delayed_shift=1,
        consecutive_hysteresis=False,
        raise_error_at_min_scale=True,
        dtype=torch.half,
    ):
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        if not scale_factor > 1:
            raise ValueError(f"scale_factor must be > 1, got {scale_factor}")
        if int(scale_window) < 1:
            raise ValueError(f"scale_window must be >= 1, got {scale_window}")
        if not min_scale > 0:
            raise ValueError(f"min_scale must be positive, got {min_scale}")
        if int(delayed_shift) < 1:
            raise ValueError(f"delayed_shift must be >= 1, got {delayed_shift}")
        self.cur_scale = init_scale
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.scale_factor = scale_factor
        self.scale_window = int(scale_window)
        self.min_scale = min_scale
        self.delayed_shift = int(delayed_shift)
        self.cur_hysteresis = int(delayed_shift)
        self.consecutive_hysteresis = consecutive_hysteresis
        self.raise_error_at_min_scale = raise_error_at_min_scale
        self.dtype = dtype
        #: True once an overflow was found in the current step's gradients.
        self.has_overflow_serial = False

    @property
    def loss_scale(self):
        """The factor the loss is multiplied by (and gradients divided by)."""
        return self.cur_scale

    @staticmethod
    def has_inf_or_nan(x: torch.Tensor) -> bool:
        """True if ``x`` holds an inf or a NaN (synchronises with the device)."""
        return not bool(torch.isfinite(x).all())

    # lomo-optim's spelling.
    _has_inf_or_nan = has_inf_or_nan

    def update_scale(self, overflow: bool) -> None:
        """Record one step: ``overflow=True`` for a skipped step, False for a clean one."""
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale and self.raise_error_at_min_scale:
                    raise RuntimeError(
                        f"Gradient overflow with the loss scale already at its minimum "
                        f"({self.min_scale}); cannot decrease it further. The loss or the "
                        f"gradients are inf/NaN regardless of scaling."
                    )
                next_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
                logger.warning(
                    "[lomo_torch] gradient overflow, skipping step; loss scale %s -> %s",
                    self.cur_scale, next_scale,
                )
                self.cur_scale = next_scale
            else:
                logger.warning(
                    "[lomo_torch] gradient overflow, skipping step; loss scale stays %s, "
                    "hysteresis %d -> %d",
                    self.cur_scale, self.cur_hysteresis, self.cur_hysteresis - 1,
                )
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
                logger.debug("[lomo_torch] loss scale raised to %s", self.cur_scale)
        self.cur_iter += 1

    _FIELDS = (
        "cur_scale", "cur_iter", "last_overflow_iter", "scale_factor", "scale_window",
        "min_scale", "delayed_shift", "cur_hysteresis", "consecutive_hysteresis",
        "raise_error_at_min_scale",
    )

    def state_dict(self) -> dict:
        """Everything needed to resume, as plain Python values."""
        state = {k: getattr(self, k) for k in self._FIELDS}
        state["dtype"] = str(self.dtype).replace("torch.", "")
        return state

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in self._FIELDS if k not in state]
        if missing:
            raise KeyError(f"DynamicLossScaler state is missing {missing}")
        for k in self._FIELDS:
            setattr(self, k, state[k])
        if "dtype" in state:
            self.dtype = getattr(torch, state["dtype"])
        self.has_overflow_serial = False

    @classmethod
    def from_state_dict(cls, state: dict) -> "DynamicLossScaler":
        scaler = cls()
        scaler.load_state_dict(state)
        return scaler

    def __repr__(self):
        return (f"DynamicLossScaler(loss_scale={self.cur_scale}, iter={self.cur_iter}, "
                f"scale_window={self.scale_window}, scale_factor={self.scale_factor})")
