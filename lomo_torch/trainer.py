"""``LomoTrainer``: a ``transformers.Trainer`` that trains with lomo_torch.

The one-line switch for a script that already uses ``Trainer``::

    from lomo_torch.trainer import LomoTrainer as Trainer

    args = TrainingArguments(..., optim="adalomo", learning_rate=1e-3)   # or optim="lomo"
    Trainer(model=model, args=args, train_dataset=ds).train()

A ``Trainer`` subclass (trl's ``SFTTrainer``, ``Seq2SeqTrainer``, your own)
opts in the same way, explicitly: ``lomo_trainer(SFTTrainer)`` returns
``LomoSFTTrainer``, the subclass with :class:`LomoTrainerMixin` first (or
write ``class MyTrainer(LomoTrainerMixin, SFTTrainer)``). Nothing in
transformers is patched: a plain ``Trainer`` with ``optim="lomo"`` still
runs transformers' own path (``lomo-optim``, see below).

What it does differently from ``Trainer``:

* the optimizer is :class:`lomo_torch.AdaLomo` (``optim="adalomo"``) or
  :class:`lomo_torch.Lomo` (``optim="lomo"``), built with
  ``lr=args.learning_rate``, ``weight_decay=args.weight_decay`` and
  ``clip_grad_norm=args.max_grad_norm`` (``max_grad_norm=0`` turns clipping
  off); ``args.optim_args`` may add ``clip_grad_value``,
  ``stochastic_rounding`` (``True``/``False``; seeded from ``args.seed``), and
  for AdaLomo ``loss_scale``, ``clip_threshold``, ``decay_rate``, ``eps0``,
  ``eps1`` (``"clip_threshold=1.0,decay_rate=-0.8,stochastic_rounding=True"``).
  Or pass your own lomo_torch optimizer as ``optimizers=(opt, None)``.
* :meth:`LomoTrainerMixin.training_step` runs ``grad_norm(loss)`` (when
  clipping by norm or in fp16) and then ``fused_backward(loss, lr)`` with the
  lr the Trainer's scheduler set for this step. The parameters are updated
  inside backward; the ``optimizer.step()`` the Trainer calls afterwards is a
  no-op. ``max_grad_norm > 0`` therefore costs a second backward pass per
  step (LOMO's clipping: the norm must be known before the first update); the
  trainer says so once in its log.
* the logged ``grad_norm`` is the global norm from ``grad_norm(loss)``.
* several processes (``torchrun``/``accelerate launch``): the model is wrapped
  in ``DistributedDataParallel`` (by accelerate, as ``Trainer`` does) *before*
  the optimizer is built on the wrapper, so lomo_torch averages each gradient
  over the ranks in its hook (see :mod:`lomo_torch._reduction`).

* a PEFT model (``peft.get_peft_model``): with its base frozen (PEFT's
  default) ``lora_only``, the plain ``Trainer`` path trains the adapters with
  AdamW, LOMO unused; with the base unfrozen LoRA + LOMO, the base by
  AdaLomo/Lomo (``exclude=`` the adapters) and the adapters by AdamW stepped
  after the fused backward (:mod:`lomo_torch._trainer_peft`). The log says
  which mode runs. LoRA + LOMO checkpoints (and ``save_model``) hold the full
  model in ``lora_lomo_model.safetensors`` besides the adapters, so resuming
  restores the trained base. The limits below are LOMO's; ``lora_only`` is
  the plain Trainer and skips their checks.

Limits: ``gradient_accumulation_steps`` must be 1 (a LOMO step consumes each
gradient the moment it is complete, so nothing can be accumulated; use a
larger batch with ``gradient_checkpointing_enable()``, or lomo_jax's fused
step with ``microbatches=M``, which accumulates one layer at a time); no
FSDP/DeepSpeed/``DataParallel`` (several GPUs in one process) under the
Trainer; under DDP the optimizer must be the one built from
``TrainingArguments``. ``fp16=True`` (autocast + GradScaler) is refused: load
the model in fp16 instead and the optimizer does dynamic loss scaling itself
(``bf16=True`` autocast works). Weight decay applies to every trainable
parameter (also biases and norms), as in lomo-optim.

transformers' own ``optim="lomo"/"adalomo"`` imports ``lomo_optim`` and
calls only ``fused_backward(loss, lr)``: it never runs the ``grad_norm``
pass, so ``max_grad_norm`` and ``weight_decay`` are not applied to the
update. ``LomoTrainer`` applies both.

``transformers`` (and ``accelerate``, which ``Trainer`` needs) are imported
here only: ``import lomo_torch`` does not need them.
"""

from __future__ import annotations

import functools
import logging
import types

import torch
from torch.nn.parallel import DistributedDataParallel

from ._fused import FusedOptimizer
from ._trainer_peft import LORA_ONLY, PeftAdapters, adamw_args
from .adalomo import AdaLomo
from .lomo import Lomo

try:
    from transformers import Trainer as _Trainer
    from transformers.training_args import ParallelMode
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "lomo_torch.trainer needs transformers (and accelerate): "
        "pip install 'transformers>=4.40' 'accelerate>=1.1'"
    ) from e

__all__ = ["LomoTrainer", "LomoTrainerMixin", "create_lomo_optimizer", "lomo_trainer"]

logger = logging.getLogger(__name__)

_OPTIMIZERS = {"adalomo": AdaLomo, "lomo": Lomo}
_COMMON_ARGS = {"clip_grad_value", "stochastic_rounding"}
_OPTIM_ARGS = {
    "lomo": _COMMON_ARGS,
    "adalomo": _COMMON_ARGS | {"loss_scale", "clip_threshold", "decay_rate", "eps0", "eps1"},
}
_BOOL_ARGS = {"stochastic_rounding"}
_BOOLS = {"true": True, "1": True, "false": False, "0": False}


def _optim_name(args) -> str:
    name = str(getattr(args.optim, "value", args.optim)).lower()
    if name not in _OPTIMIZERS:
        raise ValueError(
            f"LomoTrainer trains with lomo_torch: set TrainingArguments(optim='adalomo') or "
            f"optim='lomo' (got optim={name!r}), or pass optimizers=(lomo_torch_optimizer, None)"
        )
    return name


def _parse_optim_args(name: str, optim_args: str | None) -> dict:
    """``"a=1,b=2"`` -> ``{"a": 1.0, "b": 2.0}`` restricted to what ``name`` takes
    (``stochastic_rounding=True|False`` is a bool)."""
    kwargs = {}
    if not optim_args:
        return kwargs
    for item in optim_args.replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or key not in _OPTIM_ARGS[name]:
            raise ValueError(
                f"optim_args {optim_args!r}: {item!r} is not one of "
                f"{sorted(_OPTIM_ARGS[name])} (as key=value) for optim={name!r}"
            )
        if key in _BOOL_ARGS:
            if value.lower() not in _BOOLS:
                raise ValueError(f"optim_args: {key}={value!r} is not True or False")
            kwargs[key] = _BOOLS[value.lower()]
            continue
        try:
            kwargs[key] = float(value)
        except ValueError:
            raise ValueError(f"optim_args: {key}={value!r} is not a number") from None
    if "eps0" in kwargs or "eps1" in kwargs:
        kwargs["eps"] = (kwargs.pop("eps0", 1e-30), kwargs.pop("eps1", 1e-3))
    return kwargs


def create_lomo_optimizer(model: torch.nn.Module, args, exclude=None) -> FusedOptimizer:
    """The lomo_torch optimizer ``LomoTrainer`` builds from ``TrainingArguments``.

    ``optim="adalomo"`` -> :class:`~lomo_torch.AdaLomo`, ``optim="lomo"`` ->
    :class:`~lomo_torch.Lomo`, with ``lr=args.learning_rate``,
    ``weight_decay=args.weight_decay``, ``clip_grad_norm=args.max_grad_norm``
    (None when it is 0 or less), the keys of ``args.optim_args`` and ``exclude``
    (the parameters left to another optimizer).
    """
    name = _optim_name(args)
    max_norm = args.max_grad_norm
    kwargs = _parse_optim_args(name, args.optim_args)
    if kwargs.get("stochastic_rounding"):
        kwargs["seed"] = int(args.seed)
    return _OPTIMIZERS[name](
        model,
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        clip_grad_norm=max_norm if max_norm and max_norm > 0 else None,
        exclude=exclude,
        **kwargs,
    )


def _noop_step(self, closure=None):
    """The update already happened in ``fused_backward``; ``Trainer`` still calls ``step()``."""
    if closure is not None:
        raise RuntimeError(f"{type(self).__name__} under LomoTrainer cannot run a closure")
    self._opt_called = True  # what a torch LR scheduler's step() wrapper would record


_noop_step._lomo_trainer_noop = True
# torch LR schedulers wrap optimizer.step to check that it runs before scheduler.step()
# and warn when it was replaced; this no-op records the call itself.
_noop_step._wrapped_by_lr_sched = True


class LomoTrainerMixin:
    """lomo_torch's fused update for a ``transformers.Trainer`` class (see the module docstring).

    Put it first: ``class MyTrainer(LomoTrainerMixin, SomeTrainer)``, or
    ``lomo_trainer(SomeTrainer)``. It replaces ``training_step`` (the base
    class's ``compute_loss`` is used) and ``create_optimizer``. Set
    ``TrainingArguments(optim="adalomo")`` (or ``"lomo"``),
    ``gradient_accumulation_steps=1`` (the default); the lr scheduler
    (``lr_scheduler_type``, ``warmup_steps``, ...) works as usual. After
    :meth:`train`, :attr:`lomo_optimizer` is the lomo_torch optimizer; its
    ``state_dict()`` is what the Trainer's checkpoints save and restore.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lomo_grad_norm = None
        #: a PEFT model's adapters and mode (:mod:`lomo_torch._trainer_peft`), else None
        self.peft_adapters = PeftAdapters.of(self.model)
        if self._lora_only:  # the plain Trainer; its AdamW for optim="adalomo"/"lomo"
            if self.args.optim in _OPTIMIZERS:
                self.args = adamw_args(self.args)
            self._say_mode()
            return
        self._check_setup()
        if self.optimizer is not None:
            self._adopt(self.optimizer)
        else:
            _parse_optim_args(_optim_name(self.args), self.args.optim_args)  # fail early
        self._say_mode()

    @property
    def _lora_only(self) -> bool:
        """A PEFT model with its base frozen: the plain Trainer path, LOMO unused."""
        return self.peft_adapters is not None and self.peft_adapters.mode == LORA_ONLY

    def _say_mode(self):
        peft = self.peft_adapters
        if peft is None or not self.args.should_log:
            return
        if peft.mode == LORA_ONLY:
            logger.warning("%s: lora_only: the PEFT model's base is frozen, so its %d adapter "
                           "parameters train through the plain Trainer path with the Trainer's "
                           "own optimizer (AdamW for optim='adalomo'/'lomo'); LOMO is not used",
                           type(self).__name__, len(peft.names))
        else:
            logger.warning("%s: LoRA + LOMO: %s updates the PEFT model's base inside backward, "
                           "AdamW its %d adapter parameters after it", type(self).__name__,
                           str(getattr(self.args.optim, "value", self.args.optim)), len(peft.names))

    def _check_setup(self):
        a = self.args
        if a.gradient_accumulation_steps != 1:
            raise ValueError(
                f"{type(self).__name__} needs gradient_accumulation_steps=1 (got "
                f"{a.gradient_accumulation_steps}): LOMO/AdaLomo update each parameter inside "
                f"backward and free its gradient at once, so gradients cannot be accumulated over "
                f"micro-batches. Instead raise per_device_train_batch_size and call "
                f"model.gradient_checkpointing_enable() (activation checkpointing keeps one "
                f"layer's activations, so a larger batch fits), or fine-tune with lomo_jax's "
                f"fused step, which accumulates exactly: fused_train_step(..., microbatches=M)."
            )
        if a.fp16:
            raise ValueError(
                f"{type(self).__name__} does not support fp16=True (autocast with a GradScaler, "
                f"which needs the gradients that LOMO frees): load the model in float16 instead "
                f"(e.g. model.half()); lomo_torch then does dynamic loss scaling itself"
            )
        engine = ("DeepSpeed" if self.is_deepspeed_enabled else "FSDP" if self.is_fsdp_enabled
                  else f"DataParallel over n_gpu={a.n_gpu} GPUs" if a.n_gpu > 1 else None)
        if engine is not None:
            raise ValueError(
                f"{type(self).__name__} does not run under {engine}: lomo_torch updates each "
                f"parameter in its backward hook, which the Trainer's {engine} wrapping does not "
                f"call with the reduced gradient. Use one process per GPU with DDP "
                f"(torchrun / accelerate launch without FSDP or DeepSpeed; one visible GPU per "
                f"process), or FSDP2 in your own loop (lomo_torch supports fully_shard)"
            )

    # ----------------------------------------------------------- the optimizer
    @property
    def _data_parallel(self) -> bool:
        return self.args.parallel_mode == ParallelMode.DISTRIBUTED and self.args.world_size > 1

    def _adopt(self, opt):
        if not isinstance(opt, FusedOptimizer):
            raise TypeError(
                f"{type(self).__name__} needs a lomo_torch optimizer (Lomo or AdaLomo), "
                f"got {type(opt).__name__}"
            )
        if self.peft_adapters is not None:
            self.peft_adapters.check_excluded(opt, type(self).__name__)
        if self._data_parallel and not isinstance(opt.model, DistributedDataParallel):
            raise ValueError(
                f"{type(self).__name__} runs {self.args.world_size} processes, but the given "
                f"{type(opt).__name__} was built on the bare model, so it would not average the "
                f"gradients over the ranks: leave optimizers=(None, ...) and set optim= and "
                f"optim_args= in TrainingArguments; the trainer builds it on the "
                f"DistributedDataParallel wrapper"
            )
        # Trainer calls optimizer.step() after every training_step; lomo_torch's
        # step() raises (the update belongs in fused_backward), so make it a no-op
        # on this instance (a bound method, so torch LR schedulers can wrap it).
        if not getattr(opt.step, "_lomo_trainer_noop", False):
            opt.step = types.MethodType(_noop_step, opt)
        self._say_two_passes(opt)
        return opt

    def _say_two_passes(self, opt):
        """Once per trainer: clipping by norm is a second backward pass every step."""
        if opt.clip_grad_norm is None or getattr(self, "_said_two_passes", False):
            return
        self._said_two_passes = True
        if self.args.should_log:
            logger.warning(
                "%s: clip_grad_norm=%s (max_grad_norm > 0) runs two backward passes per step, "
                "grad_norm(loss) and then fused_backward(loss, lr): LOMO needs the global norm "
                "before its first update and keeps no gradient. Set max_grad_norm=0 for one pass.",
                type(self).__name__, opt.clip_grad_norm)

    def _ddp_model(self):
        """Under several processes, accelerate's ``DistributedDataParallel`` wrapper
        (made now, before the optimizer, which must be built on it); else the model.

        The Trainer then finds ``model_wrapped`` already wrapped and prepares only the
        optimizer.
        """
        if not self._data_parallel:
            return self.model
        if self.model_wrapped is self.model:
            self.model_wrapped = self.accelerator.prepare_model(self.model)
        if not isinstance(self.model_wrapped, DistributedDataParallel):
            raise TypeError(
                f"{type(self).__name__}: expected accelerate to wrap the model in "
                f"DistributedDataParallel for {self.args.world_size} processes, got "
                f"{type(self.model_wrapped).__name__}"
            )
        return self.model_wrapped

    def create_optimizer(self, model=None):
        """Build the lomo_torch optimizer from ``self.args`` (once; on the DDP wrapper
        when there are several processes). A PEFT model: ``lora_only``, the adapters'
        optimizer (AdamW for ``optim="adalomo"/"lomo"``); LoRA + LOMO, the fused one
        excluding the adapters, with the adapters' AdamW attached."""
        peft = self.peft_adapters
        if self._lora_only:
            return super().create_optimizer(model)
        if self.optimizer is None:
            self.optimizer = create_lomo_optimizer(self._ddp_model(), self.args,
                                                   exclude=peft and peft.exclude)
        self._adopt(self.optimizer)
        if peft is not None and peft.optimizer is None:
            peft.attach(self.optimizer, peft.build_adamw(self, self.model))
        return self.optimizer

    @property
    def lomo_optimizer(self) -> FusedOptimizer:
        """The lomo_torch optimizer itself (``self.optimizer`` may be accelerate's wrapper)."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, FusedOptimizer):
            opt = getattr(opt, "optimizer", None)
        if opt is None:
            raise RuntimeError("the optimizer is not created yet (call train() first)")
        return opt

    # ---------------------------------------------------------- the step
    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward, then ``grad_norm`` (if needed) and ``fused_backward`` (LoRA + LOMO:
        then the adapters' AdamW step); returns the detached loss. ``lora_only``: the
        plain Trainer step."""
        if self._lora_only:
            return super().training_step(model, inputs, num_items_in_batch)
        opt = self.lomo_optimizer
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        del inputs
        if loss.dim() > 0:
            loss = loss.mean()

        if self._needs_norm_pass(opt, loss):
            self._lomo_grad_norm = opt.grad_norm(loss).detach()
        else:
            self._lomo_grad_norm = None
        # The lr the Trainer's scheduler set for this step.
        updated = opt.fused_backward(loss, opt.param_groups[0]["lr"])
        if self.peft_adapters is not None:
            self.peft_adapters.step(updated, opt.param_groups[0]["lr"], self.args.max_grad_norm)
        # An fp16 overflow skipped the step: tell accelerate, so that the
        # Trainer does not advance the lr scheduler (as with a GradScaler).
        if hasattr(self.optimizer, "_is_overflow"):
            self.optimizer._is_overflow = not updated
        return loss.detach()

    @staticmethod
    def _needs_norm_pass(opt, loss):
        if opt.clip_grad_norm is not None or opt.loss_scaler is not None:
            return True
        # fp16 turns on dynamic loss scaling on the first pass; grad_norm is its overflow check.
        return loss.dtype == torch.float16 or any(
            p.dtype == torch.float16 for g in opt.param_groups for p in g["params"]
        )

    # The gradients are gone by the time the Trainer clips or measures them:
    # report the norm from grad_norm(loss) instead (transformers >= 5 calls these).
    def _clip_grad_norm(self, model):
        if self._lora_only:
            return super()._clip_grad_norm(model)
        return self._lomo_grad_norm

    def _get_grad_norm(self, model, grad_norm=None):
        if self._lora_only:
            return super()._get_grad_norm(model, grad_norm)
        return self._lomo_grad_norm if grad_norm is None else grad_norm

    # ---------------------------------------------------------- checkpoints
    def _save(self, output_dir=None, state_dict=None):
        """The Trainer's save (of a PEFT model: its adapters, PEFT's format). LoRA +
        LOMO: also the full model, trained base included, in ``lora_lomo_model.safetensors``
        (checkpoints and ``save_model`` alike; ``PeftModel.from_pretrained`` reads only
        the adapters, ``safetensors.torch.load_model(peft_model, path)`` everything)."""
        super()._save(output_dir, state_dict)
        if self.peft_adapters is not None and self.args.should_save:
            self.peft_adapters.save_full(self.model, output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """The Trainer's load, then a PEFT model's full weights if saved (LoRA + LOMO
        refuses a checkpoint without them before loading anything)."""
        peft, who = self.peft_adapters, type(self).__name__
        path = peft and peft.full_weights(resume_from_checkpoint, who)
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if path:
            peft.load_full(self.model if model is None else model, path, who)

    def _load_best_model(self):
        """The Trainer's load of the best checkpoint, then a PEFT model's full weights."""
        peft, who = self.peft_adapters, type(self).__name__
        path = peft and peft.full_weights(self.state.best_model_checkpoint, who)
        super()._load_best_model()
        if path:
            peft.load_full(self.model, path, who)


class LomoTrainer(LomoTrainerMixin, _Trainer):
    """``transformers.Trainer`` with lomo_torch's fused update: :class:`LomoTrainerMixin`
    on ``Trainer``. Takes exactly ``Trainer``'s arguments."""


@functools.cache
def lomo_trainer(base: type) -> type:
    """``base`` (a ``transformers.Trainer`` subclass) with lomo_torch's fused update.

    ``lomo_trainer(SFTTrainer)`` is ``class LomoSFTTrainer(LomoTrainerMixin, SFTTrainer)``,
    made once per ``base``; ``lomo_trainer(Trainer)`` is :class:`LomoTrainer`.
    """
    if not (isinstance(base, type) and issubclass(base, _Trainer)):
        raise TypeError(f"lomo_trainer takes a transformers.Trainer subclass, got {base!r}")
    if base is _Trainer:
        return LomoTrainer
    if issubclass(base, LomoTrainerMixin):
        return base
    return type(f"Lomo{base.__name__}", (LomoTrainerMixin, base),
                {"__doc__": f"{base.__name__} with lomo_torch's fused update (LomoTrainerMixin).",
                 "__module__": __name__})
