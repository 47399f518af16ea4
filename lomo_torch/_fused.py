"""Machinery shared by :class:`~lomo_torch.Lomo` and :class:`~lomo_torch.AdaLomo`.

Each trainable parameter (tied parameters once) gets one
``Tensor.register_post_accumulate_grad_hook``. Autograd calls it right after
the parameter's gradient is complete, i.e. after every use of the parameter
in the graph has contributed, so a tied weight sees its summed gradient. The
hook takes the gradient off the parameter (``p.grad = None``) and, depending
on the pass, either adds its norm to the global norm (``grad_norm``) or
updates the parameter in place (``fused_backward``). At most one parameter's
gradient is alive at a time; no hook scans other parameters.

:class:`FusedOptimizer` holds the hooks and the two passes. Beside it, one
concept a module: gradient reduction over processes (one process, DDP,
FSDP2/DTensor: :mod:`lomo_torch._reduction`), the checks before a backward
(:mod:`lomo_torch._graph_checks`), fp16 loss scaling
(:mod:`lomo_torch._loss_scaling`), ``state_dict`` (:mod:`lomo_torch._state_dict`),
argument checks (:mod:`lomo_torch._arguments`), the adaptive per-tensor
clipping applied in the hook before the update (:mod:`lomo_torch._adaptive_clip`)
and the parameters left unhooked for another optimizer (``exclude=``,
:mod:`lomo_torch._exclude`).

Example (a subclass; :class:`~lomo_torch.Lomo` is one)::

    class Sgd(FusedOptimizer):
        def _update(self, name, p, g):            # g: fp32, unscaled, clipped
            w = self._fp32_view(self._local(name, p))
            w.add_(g, alpha=-self._step_lr)
            self._write_back(name, p, w)
"""

from __future__ import annotations

import copy
import enum
import weakref

import torch
from torch import nn
from torch.optim import Optimizer

from ._adaptive_clip import AdaptiveClip
from ._arguments import MIRRORED as _MIRRORED
from ._arguments import _check_flags, _check_number, _same, check_mirrored, sync_mirrored
from ._exclude import excluded_params, split_excluded
from ._graph_checks import HookSites, check_graph, check_loss, mark_spent
from ._loss_scaling import _FP16_SEED_CAP, LossScalingMixin, warn_fp16_clip
from ._reduction import (_all_reduce_sum, _ddp_type, _dtensor_type, _ShardSpec,
                         _sum_over_groups, attach_ddp, make_reduction, shard_specs)
from ._state_dict import STATE_FORMAT, StateDictMixin
from .loss_scaler import DynamicLossScaler
from .rounding import RoundingNoise, is_low_precision

# names other modules and tests import from here
__all__ = ["FusedOptimizer", "STATE_FORMAT", "DynamicLossScaler", "warn_fp16_clip",
           "_FP16_SEED_CAP", "_MIRRORED", "_ShardSpec", "_all_reduce_sum", "_check_number",
           "_ddp_type", "_dtensor_type", "_same", "_sum_over_groups", "check_graph"]


def _adaptive_clip_rule(args, clip_grad_norm):
    """The :class:`AdaptiveClip` of ``args`` = ``(adaptive_clip, adaptive_clip_decay,
    adaptive_clip_warmup_steps, adaptive_clip_absolute)``, or None when off."""
    rule = AdaptiveClip.build(*args)
    if rule is not None and clip_grad_norm is not None:
        raise ValueError(
            f"adaptive_clip={args[0]!r} and clip_grad_norm={clip_grad_norm!r} cannot be combined: "
            f"adaptive_clip clips each tensor against its own norm history in one backward, "
            f"clip_grad_norm clips the global norm with a second one; choose one")
    return rule


class _Pass(enum.Enum):
    IDLE = "idle"      # a backward not driven by this optimizer: leave .grad alone
    NORM = "norm"      # grad_norm(): accumulate per-parameter norms, update nothing
    UPDATE = "update"  # fused_backward(): update each parameter in its hook
    SKIP = "skip"      # fused_backward() after an fp16 overflow: drop gradients only


def _remove_handles(handles):
    for h in handles:
        h.remove()
    handles.clear()


class FusedOptimizer(LossScalingMixin, StateDictMixin, Optimizer):
    """Base class: hook registration and the two backward passes.

    Subclasses implement :meth:`_update` (one parameter, fp32 gradient already
    unscaled and clipped), :meth:`_enable_fp16` and optionally :meth:`_begin_step`,
    :meth:`_fp16_settings` and :meth:`_extra_settings`.

    Every pass checks before its backward, so that a refusal changes nothing: the
    graph (not already freed by a fused_backward, no reentrant checkpointing, no
    compiled region yielding several gradients), that the hooked parameters are
    still the model's (identity checks), that fp16 - also after ``model.half()``
    mid-run - has loss scaling on, and that ``param_groups`` hold the settings
    the update applies. A grad_norm() that raises arms nothing.
    """

    def __init__(self, model, defaults, *, lr, clip_grad_norm, clip_grad_value, weight_decay,
                 skip_nonfinite=False, stochastic_rounding=False, seed=None,
                 adaptive_clip=(None, 0.98, 100, 1.0), exclude=None):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} takes the model (an nn.Module), got {type(model).__name__}"
            )
        lr = _check_number("lr", lr, positive=True)
        clip_grad_norm = _check_number("clip_grad_norm", clip_grad_norm, positive=True,
                                       optional=True)
        clip_grad_value = _check_number("clip_grad_value", clip_grad_value, positive=True,
                                        optional=True)
        weight_decay = _check_number("weight_decay", weight_decay, non_negative=True)
        _check_flags(skip_nonfinite=skip_nonfinite, stochastic_rounding=stochastic_rounding,
                     seed=seed)
        #: the adaptive clipping rule and its state (:mod:`lomo_torch._adaptive_clip`), or None
        self.adaptive_clipping = _adaptive_clip_rule(adaptive_clip, clip_grad_norm)
        source, dp_group = attach_ddp(model, type(self).__name__)
        named, excluded = self._trainable(model, source, exclude)
        self.model = model
        self.lr = lr
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.weight_decay = weight_decay
        #: :class:`DynamicLossScaler` once fp16 is detected, else None.
        self.loss_scaler = None
        #: min(1, clip_grad_norm / (norm + 1e-6)) from the last grad_norm(), a 0-d tensor.
        self.clip_coef = None
        #: completed (not skipped) optimizer steps.
        self.step_num = 0
        #: skip a step whose gradient norm is not finite (bf16/fp32; fp16 always skips).
        self.skip_nonfinite = skip_nonfinite
        #: steps skipped by ``skip_nonfinite`` (not counting fp16 loss-scale overflows).
        self.nonfinite_steps = 0
        #: round new values stochastically into bf16/fp16 parameters (see lomo_torch.rounding)
        self.stochastic_rounding = stochastic_rounding
        # The constructor's settings, all but lr and seed, as given (a state_dict
        # must have been written with the same ones: see load_state_dict).
        self._settings = copy.deepcopy({
            "clip_grad_norm": clip_grad_norm, "clip_grad_value": clip_grad_value,
            "weight_decay": weight_decay, "skip_nonfinite": skip_nonfinite,
            "stochastic_rounding": stochastic_rounding, **AdaptiveClip.settings(*adaptive_clip),
            **self._extra_settings()})
        super().__init__([p for _, p in named], defaults)
        self._index_params(named, source, model, dp_group, excluded)
        self._noise = RoundingNoise(self._agreed_seed(seed)) if stochastic_rounding else None
        self._pass = _Pass.IDLE
        self._precision_checked = False
        self._coef_by_device = {}
        self._norm_ready = False   # grad_norm() ran since the last fused_backward()
        self._norm_loss = None     # a weak reference to the loss grad_norm() was given
        self._norm_failed = None   # why the last grad_norm() does not count (it raised...)
        self._skip_step = False    # grad_norm() found an fp16 overflow
        self._scale = None         # loss scale of the running pass (None: unscaled)
        self._updated = 0          # parameters updated by the running UPDATE pass
        self._step_lr = lr
        self._register_hooks(named)

    def _trainable(self, model, source, exclude):
        """``([(name, parameter)] to train, [(name, parameter)] excluded)``: those to
        train real floating point, requires_grad, not excluded, tied ones once."""
        named = [(n, p) for n, p in source.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                f"{type(model).__name__} has no trainable parameters (no parameter has "
                f"requires_grad=True); there is nothing for {type(self).__name__} to optimize"
            )
        named, excluded = split_excluded(type(self).__name__, named, exclude)
        not_real = [(n, p.dtype) for n, p in named if not p.is_floating_point()]
        if not_real:
            n, dtype = not_real[0]
            raise TypeError(
                f"{type(self).__name__} updates real floating-point parameters; parameter "
                f"{n!r} has dtype {dtype} ({len(not_real)} such parameter(s)). Freeze it "
                f"(requires_grad_(False)) or keep its real and imaginary parts as two real "
                f"parameters")
        return named, excluded

    def _index_params(self, named, source, model, dp_group, excluded):
        """Name lookups, DTensor layouts, the gradient reduction and the hook sites
        checked on every pass."""
        self._named_params = named
        self._param_index = {n: i for i, (n, _) in enumerate(named)}
        self._name_by_id = {id(p): n for n, p in named}
        #: name -> _ShardSpec for DTensor (FSDP2 / sharded) parameters.
        self._specs = shard_specs(named)
        self._reduction = make_reduction(model, dp_group, self._specs, type(self).__name__)
        #: the parameters left to another optimizer (``exclude=``; :mod:`lomo_torch._exclude`)
        self.excluded = excluded_params(self, excluded, self._specs)
        self._hook_sites = HookSites(type(self).__name__, source, named, self._specs,
                                     known=self.excluded.ids)

    def _register_hooks(self, named):
        self_ref = weakref.ref(self)

        def make_hook(name):
            def hook(param):
                opt = self_ref()
                if opt is not None:
                    opt._on_grad_ready(name, param)
            return hook

        self._hook_handles = [p.register_post_accumulate_grad_hook(make_hook(n)) for n, p in named]
        self._hook_handles += self.excluded.handles
        # Drop the hooks when the optimizer is garbage collected.
        self._hook_finalizer = weakref.finalize(self, _remove_handles, self._hook_handles)

    def _extra_settings(self):
        """A subclass's own constructor settings (name -> value), checked on resume."""
        return {}

    # ------------------------------------------------------------------ hooks
    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (its backward hooks are removed)."""
        self._hook_finalizer()

    @property
    def hooks_removed(self) -> bool:
        return not self._hook_handles

    def _on_grad_ready(self, name, p):
        mode = self._pass
        if mode is _Pass.IDLE:
            return
        grad = p.grad
        if grad is None:
            return
        p.grad = None  # free the gradient now; we hold the only reference
        if mode is _Pass.SKIP:
            return
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                               f"(parameter {name!r})")
        self._reduction.receive(name, p, grad, self._use_grad)

    def _use_grad(self, name, p, grad):
        """The running pass on parameter ``name``'s (reduced, local) gradient."""
        with torch.no_grad():
            g = grad.float()  # the gradient itself if already fp32, else an fp32 copy
            del grad
            if self._scale is not None:
                g.div_(self._scale)
            if self._pass is _Pass.NORM:
                self._reduction.add_norm(name, g)
                return
            if self.adaptive_clipping is not None:  # first, as optax.chain(adaptive_clip, lomo)
                self.adaptive_clipping.clip_(name, g, self._reduction.tensor_norm(name, g))
            if self.clip_grad_value is not None:
                g.clamp_(min=-self.clip_grad_value, max=self.clip_grad_value)
            if self.clip_grad_norm is not None and self.clip_coef is not None:
                g.mul_(self._coef_on(g.device))
            self._update(name, p, g)
            self._updated += 1

    def _pass_updates(self):
        """Whether the running backward is an updating one (the excluded gradients' hooks)."""
        return self._pass is _Pass.UPDATE

    def _coef_on(self, device):
        coef = self._coef_by_device.get(device)
        if coef is None:
            coef = self._coef_by_device[device] = self.clip_coef.to(device)
        return coef

    def _local(self, name, p):
        """The tensor to update in place: ``p``, or this rank's shard of a DTensor ``p``."""
        return p.to_local() if name in self._specs else p

    @staticmethod
    def _fp32_view(p):
        """The fp32 tensor to do the update on: ``p`` itself, or an fp32 copy."""
        return p if p.dtype == torch.float32 else p.float()

    def _write_back(self, name, p, w):
        """Store the new fp32 value ``w`` of parameter ``name`` in ``p`` (the tensor
        updated in place: the parameter or this rank's shard), rounded to
        ``p``'s dtype: to nearest, or stochastically (``RoundingNoise.round_into``)."""
        if w is p:
            return
        if self._noise is not None and is_low_precision(p.dtype):
            spec = self._specs.get(name)
            self._noise.round_into(p, w, self.step_num, self._param_index[name],
                                   shard=spec.shard if spec is not None else 0)  # w: scratch
        else:
            p.copy_(w)

    def _agreed_seed(self, seed):
        """``seed``, or one drawn from torch's default generator; with several
        processes (DDP, FSDP2) the group's first rank's, so that replicas draw
        the same bits."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        return int(self._reduction.agree_seed(int(seed)))

    # -------------------------------------------------------------- subclass API
    def _update(self, name, p, g):  # pragma: no cover - abstract
        """Update ``p`` in place from its fp32 gradient ``g`` (runs under no_grad)."""
        raise NotImplementedError

    def _begin_step(self):
        """Called by fused_backward right before the updating backward pass."""

    # ------------------------------------------------------------ the passes
    def _check_loss(self, loss, method):
        check_loss(type(self).__name__, loss, method, hooks_on=bool(self._hook_handles))

    def _check_precision(self, loss):
        """On every pass, before any backward: the hooked tensors must still be the
        model's parameters (:meth:`HookSites.check`), FSDP2 must reduce in this pass
        (``check_ready``), and fp16 - the loss or any
        parameter, also one converted later (``model.half()`` after fp32 steps) -
        turns on dynamic loss scaling from this pass on. Returns True if it did now."""
        self._hook_sites.check()
        self._reduction.check_ready(type(self).__name__)
        self._precision_checked = True
        return self._detect_fp16(loss)

    def _backward(self, loss, mode, scale, retain_graph=False):
        for _, p in self._named_params:  # stale gradients from a plain loss.backward()
            if p.grad is not None:
                p.grad = None
        scale = self._seed_scale(scale, loss)
        self._scale = scale
        self._pass = mode
        self._reduction.start()
        self._updated = 0
        # with excluded parameters, only an updating pass adds to their .grad
        inputs = self.excluded.backward_inputs(mode is _Pass.UPDATE,
                                               [p for _, p in self._named_params])
        try:
            self.excluded.before_backward()
            (loss if scale is None else loss.float() * scale).backward(
                retain_graph=retain_graph, inputs=inputs)
            self._reduction.flush(self._use_grad)
            self.excluded.finish(self._reduction)  # DDP's bucket; FSDP2's shards
        except BaseException as e:
            self._note_partial_update(e)
            raise
        finally:
            self._reduction.abandon()
            self.excluded.abandon()
            self._pass = _Pass.IDLE
            self._scale = None
            if not retain_graph:  # freed: refuse it next time
                mark_spent(loss)
        self._reduction.after_backward()

    def _note_partial_update(self, e):
        """An updating backward that raised midway (e.g. in a custom autograd Function,
        out of memory) has already stepped the parameters done before it: say so."""
        if self._updated and hasattr(e, "add_note"):
            e.add_note(f"{type(self).__name__}.fused_backward failed after updating "
                       f"{self._updated} of {len(self._named_params)} parameters: the model "
                       f"is partly stepped (restore it from a checkpoint)")

    def grad_norm(self, loss):
        """First pass: the global L2 norm of all gradients; no parameter changes.

        Runs ``backward(retain_graph=True)`` so that :meth:`fused_backward` can
        reuse the graph. Each gradient is unscaled, its norm kept and the
        gradient freed in its hook; ``total = ||(||g_1||, ..., ||g_n||)||_2``.
        With ``clip_grad_norm`` set this fixes
        ``clip_coef = min(1, clip_grad_norm / (total + 1e-6))`` for the next
        :meth:`fused_backward`. With fp16 it is also the overflow check: a
        non-finite ``total`` lowers the loss scale and makes the next
        :meth:`fused_backward` skip the step (at the minimum scale it raises).
        A ``grad_norm`` that raises arms nothing: the next
        :meth:`fused_backward` that needs the norm refuses until one succeeds.

        Returns the global norm as a 0-d fp32 tensor (not synchronised, except
        in fp16 where the overflow check reads it). Under DDP it is the norm of
        the rank-averaged gradient; under FSDP2 the norm over all shards; either
        way the same on every rank, so all ranks clip and skip alike.

        The norm covers the hooked parameters only: parameters left out by
        ``exclude=`` are neither in it nor clipped by it, and this pass does not
        backpropagate to them (``backward(inputs=hooked)``; under FSDP2 it does and
        drops what arrives), so their ``.grad`` stays bit-for-bit as it was
        (``None`` too).
        """
        self._norm_ready = self._skip_step = False
        self._norm_loss = self.clip_coef = None
        self._coef_by_device = {}
        try:
            total, skip = self._norm_pass(loss)
        except BaseException as e:
            self._norm_failed = f"it raised {type(e).__name__}: {e}"
            raise
        if not skip and self.clip_grad_norm is not None:
            self.clip_coef = torch.clamp(float(self.clip_grad_norm) / (total + 1e-6), max=1.0)
        self._skip_step = skip
        self._norm_loss = weakref.ref(loss)  # fused_backward must get this same tensor
        self._norm_failed = None
        self._norm_ready = True  # last: a grad_norm() that raised leaves it False
        return total

    def _norm_pass(self, loss):
        """Checks, the norm backward, the overflow / non-finite verdict: ``(total, skip)``."""
        self._check_loss(loss, "grad_norm")
        check_graph(type(self).__name__, loss, self._name_by_id)
        self._check_precision(loss)
        self._backward(loss, _Pass.NORM, self._loss_scale(), retain_graph=True)
        total = self._reduction.total_norm(loss.device)
        if self.loss_scaler is not None:
            return total, self._fp16_overflow(total)
        if self.skip_nonfinite and not self._finite(total, loss):
            self.nonfinite_steps += 1
            return total, True
        return total, False

    def _finite(self, total, loss):
        """Whether this step is finite. The global norm is the same on every rank
        (DDP/FSDP2), the loss is not: single-process only, the loss is checked too."""
        finite = torch.isfinite(total)
        if self._reduction.single_process:
            finite = finite & torch.isfinite(loss.detach()).to(finite.device)
        return bool(finite)

    def fused_backward(self, loss, lr=None):
        """Second pass: backward that updates every parameter as its gradient completes.

        Args:
            loss: the scalar loss (the same tensor given to :meth:`grad_norm`).
            lr: learning rate for this step; None uses ``param_groups[0]["lr"]``
                (so a ``torch.optim.lr_scheduler`` attached to this optimizer works).

        Returns True if the parameters were updated, False if the step was
        skipped because :meth:`grad_norm` found an fp16 overflow (then no
        parameter and no optimizer state changes; the gradients are still freed),
        or, with ``skip_nonfinite=True``, because the loss or the gradient norm
        was not finite. Every check runs before the backward: a call that
        refuses changes nothing (a loss whose graph an earlier call freed is
        refused too). Parameters left out by ``exclude=``: an update adds their
        gradient (unscaled, averaged over DDP or FSDP2 ranks) to their ``.grad``; a skip leaves
        their ``.grad`` as it was, and their optimizer should skip this step too.
        """
        self._check_loss(loss, "fused_backward")
        if not self._norm_ready:  # else grad_norm() checked this step's graph
            check_graph(type(self).__name__, loss, self._name_by_id)
        elif self._norm_loss() is not loss:
            raise RuntimeError(
                "fused_backward(loss) got another tensor than the loss given to grad_norm(loss) "
                "this step: the norm (clipping, the fp16 overflow check) was computed for that "
                "one. Pass the same tensor to both (loss = model(batch); opt.grad_norm(loss); "
                "opt.fused_backward(loss, lr)); nothing has been updated")
        step_lr = self._resolve_lr(lr)
        if self._check_precision(loss) and self._norm_ready:
            self._norm_ready = False  # fp16 appeared after grad_norm(), whose pass was unscaled
            self._norm_failed = "fp16 appeared after it ran, so its pass was not loss-scaled"
        self._check_groups()
        self._require_norm()
        if lr is not None:
            for group in self.param_groups:
                group["lr"] = step_lr
        self.lr = step_lr
        self._norm_ready = False
        self._opt_called = True  # tells torch LR schedulers that a step happened

        if self._skip_step:  # fp16 overflow found by grad_norm(): free the graph, change nothing
            self._skip_step = False
            self._backward(loss, _Pass.SKIP, None)
            return False

        self._step_lr = step_lr
        self._begin_step()
        self._backward(loss, _Pass.UPDATE, self._loss_scale())
        self.step_num += 1
        if self.adaptive_clipping is not None:
            self.adaptive_clipping.end_step()
        if self.loss_scaler is not None:
            self.loss_scaler.update_scale(False)
        return True

    def _resolve_lr(self, lr):
        """This step's lr, checked (``lr``, or ``param_groups[0]["lr"]`` when None)."""
        if lr is None:
            return _check_number("lr (param_groups[0]['lr'], as an LR scheduler sets it)",
                                 self.param_groups[0]["lr"], non_negative=True)
        return _check_number("lr", lr, non_negative=True)

    def _check_groups(self):
        """``param_groups`` mirror the settings the update reads; refuse one changed there."""
        check_mirrored(self)

    def _sync_groups(self):
        """Write the settings the update reads into ``param_groups``."""
        sync_mirrored(self)

    def step(self, closure=None):
        raise RuntimeError(
            f"{type(self).__name__} updates the parameters during backward: replace "
            f"`loss.backward(); optimizer.step()` by `optimizer.fused_backward(loss, lr)` "
            f"(preceded by `optimizer.grad_norm(loss)` when clipping by norm or in fp16)"
        )

    def __repr__(self):
        return (f"{type(self).__name__}(lr={self.lr}, clip_grad_norm={self.clip_grad_norm}, "
                f"clip_grad_value={self.clip_grad_value}, weight_decay={self.weight_decay}, "
                f"skip_nonfinite={self.skip_nonfinite}, "
                f"stochastic_rounding={self.stochastic_rounding}, "
                f"params={len(self._named_params)}, step={self.step_num})")

