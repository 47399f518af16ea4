"""``state_dict`` / ``load_state_dict`` of the fused optimizers (a mixin).

A state_dict holds the step count, lr, the constructor's settings, the fp16
loss scaler, the rounding seed, the per-parameter state keyed by the
parameter's name and, with ``adaptive_clip``, the clipping's step count and
norm averages (``state_dict()["adaptive_clip"]``, keyed by name). Loading checks everything first (format, optimizer class,
settings, groups, state keys and shapes), then changes the optimizer: a
refused state_dict leaves it as it was.

Example::

    state = opt.state_dict()
    opt2 = lomo_torch.AdaLomo(model, lr=1e-3)   # built with the same settings
    opt2.load_state_dict(state)
"""

from __future__ import annotations

import copy

import torch

from ._arguments import _same
from .loss_scaler import DynamicLossScaler
from .rounding import RoundingNoise

__all__ = ["STATE_FORMAT", "StateDictMixin"]

STATE_FORMAT = 1


class StateDictMixin:
    """State saving and restoring for :class:`~lomo_torch._fused.FusedOptimizer`."""

    def _expected_state_shapes(self, p):
        """{state key: shape} a parameter's state may hold (subclasses)."""
        return {}

    def _place_state(self, name, p, key, value):
        """A loaded state tensor as this optimizer keeps it (fp32, on ``p``'s device)."""
        return value.detach().to(device=p.device, dtype=torch.float32, copy=True)

    def state_dict(self):
        """Step count, lr, the constructor's settings, loss scaler and per-parameter
        state keyed by name."""
        return {
            "format": STATE_FORMAT,
            "optimizer": type(self).__name__,
            "step": self.step_num,
            "nonfinite_steps": self.nonfinite_steps,
            "lr": self.lr,
            "settings": copy.deepcopy(self._settings),
            "clip_grad_norm": self.clip_grad_norm,
            "clip_grad_value": self.clip_grad_value,
            "precision_checked": self._precision_checked,
            "rounding_seed": None if self._noise is None else self._noise.seed,
            "loss_scaler": None if self.loss_scaler is None else self.loss_scaler.state_dict(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"}
                             for g in self.param_groups],
            "state": {n: dict(self.state[p]) for n, p in self._named_params if self.state.get(p)},
            "adaptive_clip": (None if self.adaptive_clipping is None
                              else self.adaptive_clipping.state_dict()),
        }

    def load_state_dict(self, state_dict):
        """Restore from :meth:`state_dict` (parameters are matched by name).

        One rule for resuming: the optimizer must be built with the settings the
        state_dict was written with - every constructor argument except ``lr``
        and ``seed`` (``clip_grad_norm``, ``clip_grad_value``, ``weight_decay``,
        ``skip_nonfinite``, ``stochastic_rounding``, ``loss_scale_args``, and
        AdaLomo's ``loss_scale``, ``eps``, ``clip_threshold``, ``decay_rate``);
        ``adaptive_clip`` and its ``adaptive_clip_*`` keywords;
        any difference raises ``ValueError`` naming each setting, and nothing is
        loaded. Restored from the state_dict: the step count, the lr and the
        other non-setting ``param_groups`` entries (what an LR scheduler
        keeps there), the rounding seed, the fp16 loss scaler (then fp16's
        ``clip_grad_norm=1.0`` for Lomo without one, as on the first fp16 pass)
        and the per-parameter state. The settings in ``param_groups`` always
        equal what the update applies.
        """
        if state_dict.get("format") != STATE_FORMAT or "state" not in state_dict:
            raise ValueError(f"not a lomo_torch optimizer state_dict (keys: {sorted(state_dict)})")
        if state_dict.get("optimizer") != type(self).__name__:
            raise ValueError(f"state_dict is from {state_dict.get('optimizer')}, "
                             f"cannot load it into {type(self).__name__}")
        self._check_settings(state_dict)
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, "
                             f"expected {len(self.param_groups)}")
        new_state = self._loaded_state(state_dict["state"])
        clip_state = self._loaded_clip_state(state_dict)
        scaler = state_dict["loss_scaler"]
        scaler = None if scaler is None else DynamicLossScaler.from_state_dict(scaler)
        # every check passed: change the optimizer
        self._restore(state_dict, new_state, scaler, saved_groups)
        if clip_state is not None:
            self.adaptive_clipping.restore(*clip_state)

    def _loaded_clip_state(self, state_dict):
        """The adaptive clipping's ``(count, norm_ema)`` from a state_dict, checked
        (None when adaptive clipping is off; the settings check matched them)."""
        if self.adaptive_clipping is None:
            return None
        if state_dict.get("adaptive_clip") is None:
            raise ValueError(f"{type(self).__name__}.load_state_dict: adaptive_clip is on but the "
                             f"state_dict holds no adaptive clipping state; nothing was loaded")
        names = [n for n, _ in self._named_params]
        devices = {n: p.device for n, p in self._named_params}
        return self.adaptive_clipping.checked_state(state_dict["adaptive_clip"], names, devices)

    def _restore(self, state_dict, new_state, scaler, saved_groups):
        """:meth:`load_state_dict` once every check passed: change the optimizer."""
        self.state.clear()
        self.state.update(new_state)
        self.step_num = int(state_dict["step"])
        self.nonfinite_steps = int(state_dict.get("nonfinite_steps", 0))
        self.lr = self._step_lr = state_dict["lr"]
        self._precision_checked = bool(state_dict["precision_checked"])
        seed = state_dict.get("rounding_seed")
        if self._noise is not None and seed is not None:
            self._noise = RoundingNoise(seed)
        self.loss_scaler = scaler
        self.clip_grad_norm = self._settings["clip_grad_norm"]
        if scaler is not None:
            self._fp16_settings()
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k not in self._settings})
        self._sync_groups()
        self.clip_coef = None
        self._norm_ready = self._skip_step = False

    def _check_settings(self, state_dict):
        """Refuse a state_dict written with other constructor settings (see load_state_dict)."""
        saved, where = state_dict.get("settings"), "settings"
        if saved is None:  # written before "settings": its param_groups hold some of them
            groups = state_dict.get("param_groups") or [{}]
            saved = {k: v for k, v in groups[0].items() if k in self._settings}
            where = "param_groups"
            missing = ()
        else:
            missing = [k for k in self._settings if k not in saved]
        diffs = [f"{k}: state_dict {saved[k]!r}, this optimizer {v!r}"
                 for k, v in self._settings.items() if k in saved and not _same(saved[k], v)]
        diffs += [f"{k}: missing from the state_dict" for k in missing]
        diffs += [f"{k}: state_dict {saved[k]!r}, not set in this optimizer"
                  for k in saved if k not in self._settings]
        if diffs:
            name = type(self).__name__
            raise ValueError(
                f"{name}.load_state_dict: the state_dict was written by an optimizer built with "
                f"other settings ({'; '.join(diffs)}). A run resumes with the settings it was "
                f"built with (every constructor argument but lr and seed); nothing was loaded. "
                f"Build {name} with the state_dict's values or, to change a setting on purpose, "
                f"edit state_dict[{where!r}] before loading")

    def _loaded_state(self, saved_state):
        """Per-parameter state from a state_dict, checked and placed (nothing is changed)."""
        by_name = dict(self._named_params)
        unknown = sorted(set(saved_state) - set(by_name))
        if unknown:
            raise KeyError(f"state_dict has state for parameters this model does not train: {unknown}")
        new_state = {}
        for name, entry in saved_state.items():
            p = by_name[name]
            shapes = self._expected_state_shapes(p)
            for key, value in entry.items():
                if key not in shapes:
                    raise KeyError(f"unexpected state {key!r} for parameter {name!r}")
                if tuple(value.shape) != tuple(shapes[key]):
                    raise ValueError(f"state {key!r} of parameter {name!r} has shape "
                                     f"{tuple(value.shape)}, expected {tuple(shapes[key])}")
            new_state[p] = {k: self._place_state(name, p, k, v) for k, v in entry.items()}
        return new_state
