r"""Adaptive per-tensor gradient clipping (AdaGC) inside the fused optimizers' hook.

The rule of :func:`lomo_jax.adaptive_clip` -- its equations are in the
docstring of :mod:`lomo_jax.adaptive_clipping` -- applied to each parameter's
gradient in its post-accumulate-grad hook, so it needs no second backward pass.
Per parameter, with one fp32 scalar of state :math:`\gamma` (``+inf`` at first)
and :math:`t` the applied steps so far::

    limit = absolute if t < warmup_steps else relative * gamma   # absolute None: inf
    g_hat = g * min(1, limit / ||g||_2)
    gamma = min(gamma, ||g_hat||) if t < warmup_steps            # warm-up: the least norm
            else decay * gamma + (1 - decay) * ||g_hat||          # then its moving average

``||g||_2`` is the whole tensor's norm (under FSDP2 the shards' squares are
all-reduced; under DDP the gradient is averaged first). ``relative``,
``decay``, ``warmup_steps`` and ``absolute`` are the optimizers'
``adaptive_clip``, ``adaptive_clip_decay``, ``adaptive_clip_warmup_steps`` and
``adaptive_clip_absolute``. A zero norm does not enter the warm-up minimum; a
parameter without a non-zero gradient in warm-up starts its average at its
first non-zero norm, unclipped. A skipped step (fp16 overflow,
``skip_nonfinite``) changes neither :math:`t` nor any :math:`\gamma`.

Example::

    clip = AdaptiveClip.build(1.05, 0.98, 100, 1.0)   # None if adaptive_clip is None
    g = clip.clip_(name, g, norm)                      # in the hook, before the update
    clip.end_step()                                    # after the updating backward
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from ._arguments import _check_number

__all__ = ["AdaptiveClip", "DEFAULTS", "check_adaptive_clip"]

#: the keywords' defaults, as lomo_jax.adaptive_clip's (relative comes from adaptive_clip)
DEFAULTS = {"adaptive_clip_decay": 0.98, "adaptive_clip_warmup_steps": 100,
            "adaptive_clip_absolute": 1.0}


# each keyword's name in its errors, with the values it takes
_NAMES = {"relative": "adaptive_clip (the relative bound: a finite number > 0)",
          "decay": "adaptive_clip_decay (a number in [0, 1))",
          "warmup_steps": "adaptive_clip_warmup_steps (an int >= 1: the relative rule needs a "
                          "history)",
          "absolute": "adaptive_clip_absolute (None or a finite number > 0)"}


def check_adaptive_clip(relative, decay, warmup_steps, absolute):
    """Refuse bad adaptive-clipping arguments with :func:`_check_number`'s error naming
    the keyword and the values it takes; always a ValueError, as these keywords have
    been refused since they came (its TypeError is raised as a ValueError).

    Example: ``check_adaptive_clip(1.05, 1.0, 100, 1.0)`` raises "adaptive_clip_decay
    (a number in [0, 1)) must be below 1, got 1.0"."""
    if relative is None:
        given = {k: v for k, v in zip(DEFAULTS, (decay, warmup_steps, absolute))
                 if v != DEFAULTS[k] or type(v) is not type(DEFAULTS[k])}
        if given:
            raise ValueError(f"{', '.join(f'{k}={v!r}' for k, v in given.items())} has no effect "
                             f"without adaptive_clip (None: off); pass adaptive_clip=1.05 to turn "
                             f"adaptive clipping on")
        return
    try:
        _check_number(_NAMES["relative"], relative, positive=True, tensor=False)
        if not _check_number(_NAMES["decay"], decay, non_negative=True, tensor=False) < 1:
            raise ValueError(f"{_NAMES['decay']} must be below 1, got {decay}")
        _check_number(_NAMES["warmup_steps"], warmup_steps, positive=True, integer=True,
                      tensor=False)
        _check_number(_NAMES["absolute"], absolute, positive=True, optional=True, tensor=False)
    except TypeError as err:
        raise ValueError(str(err)) from None


class _Constants(NamedTuple):
    """:meth:`AdaptiveClip.clip_`'s fp32 constants on one device, made once."""

    one: torch.Tensor
    inf: torch.Tensor  # gamma before a parameter's first step
    absolute: torch.Tensor  # the warm-up bound (+inf when absolute is None)
    relative: torch.Tensor
    decay: torch.Tensor
    keep: torch.Tensor  # 1 - decay, rounded from float64 as ``x * (1 - decay)`` does


class AdaptiveClip:
    """The clipping state: ``count`` (applied steps) and ``norm_ema``, one 0-d fp32
    tensor :math:`\\gamma` per parameter name (on the gradient's device, ``+inf``
    until its first step)."""

    def __init__(self, relative, decay, warmup_steps, absolute):
        self.relative, self.decay = float(relative), float(decay)
        self.warmup_steps = int(warmup_steps)
        self.absolute = None if absolute is None else float(absolute)
        self.count = 0
        self.norm_ema = {}
        self._constants = {}  # device -> _Constants

    @classmethod
    def build(cls, relative, decay, warmup_steps, absolute):
        """Checked arguments -> an :class:`AdaptiveClip`, or None when ``relative`` is None."""
        check_adaptive_clip(relative, decay, warmup_steps, absolute)
        return None if relative is None else cls(relative, decay, warmup_steps, absolute)

    @staticmethod
    def settings(relative, decay, warmup_steps, absolute):
        """The constructor settings a resumed run must share (empty when off)."""
        if relative is None:
            return {}
        return {"adaptive_clip": relative, "adaptive_clip_decay": decay,
                "adaptive_clip_warmup_steps": warmup_steps, "adaptive_clip_absolute": absolute}

    def _on(self, device):
        """The :class:`_Constants` on ``device`` (made at its first use there)."""
        consts = self._constants.get(device)
        if consts is None:
            absolute = math.inf if self.absolute is None else self.absolute
            values = (1.0, math.inf, absolute, self.relative, self.decay, 1 - self.decay)
            consts = self._constants[device] = _Constants(
                *(torch.tensor(v, dtype=torch.float32, device=device) for v in values))
        return consts

    @torch.no_grad()
    def clip_(self, name, g, norm):
        """Scale fp32 gradient ``g`` in place by :math:`h_t` and update :math:`\\gamma`
        of parameter ``name``; ``norm`` is the whole tensor's :math:`\\|g\\|_2` (0-d fp32).

        The stored :math:`\\gamma` is replaced, never written: its new value is a new
        0-d tensor ``new``, and so are the scratch scalars ``mask``, ``scale`` and (after
        warm-up) ``ema``; every step of the rule writes into one of these (``out=``)."""
        c = self._on(norm.device)
        gamma = self.norm_ema.get(name, c.inf)
        warm = self.count < self.warmup_steps
        new = None if warm else torch.mul(gamma, c.relative)  # the bound, then ||g_hat||, then gamma
        limit = c.absolute if warm else new
        mask = torch.gt(norm, 0)
        scale = torch.where(mask, norm, c.one)  # the norm, 1 where it is 0
        torch.div(limit, scale, out=scale)
        torch.where(torch.gt(norm, limit, out=mask), scale, c.one, out=scale)  # h_t
        new = torch.mul(norm, scale, out=new)  # ||g_hat||
        g.mul_(scale.to(g.device))  # scale is scratch from here on
        torch.gt(new, 0, out=mask)  # a non-zero clipped norm: it enters gamma
        if warm:
            torch.where(mask, torch.minimum(gamma, new, out=new), gamma, out=new)
        else:
            ema = torch.mul(new, c.keep)
            torch.add(torch.mul(gamma, c.decay, out=scale), ema, out=ema)
            torch.where(mask, new, gamma, out=new)  # gamma +inf: starts at the first non-zero norm
            torch.eq(torch.abs(gamma, out=scale), math.inf, out=mask)  # torch.isinf(gamma)
            torch.where(mask, new, ema, out=new)
        self.norm_ema[name] = new
        return g

    def end_step(self):
        """An updating backward completed: one more applied step."""
        self.count += 1

    def state_dict(self):
        return {"count": self.count,
                "norm_ema": {n: t.detach().clone() for n, t in self.norm_ema.items()}}

    @staticmethod
    def checked_state(state, names, devices):
        """``(count, norm_ema)`` from :meth:`state_dict`'s output, checked (0-d
        entries for known names) and placed on ``devices[name]``; changes nothing."""
        if not isinstance(state, dict) or set(state) != {"count", "norm_ema"}:
            raise ValueError(f"state_dict['adaptive_clip'] must be a dict with 'count' and "
                             f"'norm_ema', got {state!r:.200}")
        count, ema = state["count"], state["norm_ema"]
        if not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"state_dict['adaptive_clip']['count'] must be an int >= 0, "
                             f"got {count!r}")
        unknown = sorted(set(ema) - set(names))
        if unknown:
            raise KeyError(f"state_dict['adaptive_clip'] has a norm average for parameters "
                           f"this model does not train: {unknown}")
        bad = sorted(n for n, t in ema.items() if not isinstance(t, torch.Tensor) or t.dim())
        if bad:
            raise ValueError(f"state_dict['adaptive_clip']['norm_ema'] entries must be 0-d "
                             f"tensors; not so for {bad}")
        return int(count), {n: t.detach().to(device=devices[n], dtype=torch.float32, copy=True)
                            for n, t in ema.items()}

    def restore(self, count, norm_ema):
        self.count, self.norm_ema = count, norm_ema
