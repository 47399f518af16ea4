"""Argument checks of the fused optimizers, and the settings mirrored in ``param_groups``.

The optimizers apply the settings they were built with; ``param_groups`` show
them (as torch optimizers do) and only ``lr`` is read from there, so a
setting changed there is refused (:func:`check_mirrored`) rather than
silently ignored.

Example::

    lr = _check_number("lr", lr, positive=True)
    check_mirrored(opt)   # before an update: param_groups still show what it applies
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["MIRRORED", "check_mirrored", "sync_mirrored"]

# Settings kept in param_groups too (as torch optimizers do); the update reads the attributes.
MIRRORED = ("clip_grad_norm", "clip_grad_value", "weight_decay", "eps")


def _check_number(name, value, *, positive=False, non_negative=False, optional=False,
                  integer=False, tensor=True):
    """``value`` as a real number (``integer``: an int; a one-element tensor is read
    unless ``tensor`` is False), or a clear error."""
    if value is None and optional:
        return value
    if tensor and isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if integer:  # an int is finite (and may be too large for math.isnan)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    elif math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if non_negative and not value >= 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return value


def _check_flags(*, skip_nonfinite, stochastic_rounding, seed):
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}")
    if not isinstance(stochastic_rounding, bool):
        raise TypeError(f"stochastic_rounding must be a bool, got {stochastic_rounding!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")


def _same(a, b):
    """Whether two setting values agree (a tuple and a list of equal items do)."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, bool) != isinstance(b, bool):  # True == 1, but not as a setting
        return False
    return a == b


def check_mirrored(opt):
    """Refuse an entry of ``opt.param_groups`` that differs from the setting the
    update applies (the attribute of ``opt``, for the keys of :data:`MIRRORED`)."""
    for i, group in enumerate(opt.param_groups):
        for key in MIRRORED:
            if key in group and not _same(group[key], getattr(opt, key)):
                raise ValueError(
                    f"param_groups[{i}][{key!r}] is {group[key]!r}, but {type(opt).__name__} "
                    f"applies {key}={getattr(opt, key)!r}, set when it was built (it reads only 'lr' from "
                    f"param_groups). Build a new optimizer to change {key}; nothing has been "
                    f"updated")


def sync_mirrored(opt):
    """Write the settings the update applies into ``opt.param_groups``."""
    for group in opt.param_groups:
        for key in MIRRORED:
            if key in group:
                group[key] = getattr(opt, key)
