"""PEFT models under ``LomoTrainer``: LoRA only, or LoRA + LOMO.

A ``peft.PeftModel`` (LoRA, or another adapter tuner: its adapter parameters'
names contain the tuner's prefix, ``"lora_"`` for LoRA) trains in one of two
modes, chosen from which parameters require grad:

* ``lora_only`` -- the base is frozen (only adapters require grad, as
  ``peft.get_peft_model`` leaves it): LOMO is not used. The adapters train
  through the plain ``transformers.Trainer`` path (backward, the Trainer's
  clipping, ``optimizer.step()``) with the Trainer's own optimizer:
  ``optim="adalomo"``/``"lomo"`` mean torch AdamW built as Trainer builds
  ``optim="adamw_torch"``; any other ``optim`` is the Trainer's as usual.
* ``lora_lomo`` -- the base is unfrozen too: AdaLomo/Lomo (``optim``) updates
  every base weight inside the backward (``exclude=`` the adapters, so the
  global norm and ``max_grad_norm`` clip the base's gradients), then the
  adapters, whose gradients the same backward left (averaged over DDP ranks),
  are clipped to ``max_grad_norm`` by their own norm and stepped by torch
  AdamW (built as above, at the scheduler's lr of the step); a skipped fp16
  step skips them too. The adapters' AdamW state is saved with the
  optimizer's ``state_dict()`` (key ``"adapter_optimizer"``). The Trainer
  saves only a PEFT model's adapters, so ``LomoTrainer`` also writes the
  full model (trained base and adapters) to ``lora_lomo_model.safetensors``
  in each checkpoint and in ``save_model``'s directory, and loads it on
  resume (and for ``load_best_model_at_end``); a LoRA + LOMO resume from a
  checkpoint without it is refused. Load a saved model into the same PEFT
  model with ``safetensors.torch.load_model(peft_model, path)``.

Example::

    model = peft.get_peft_model(llama, peft.LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    LomoTrainer(model=model, args=args, train_dataset=ds).train()      # lora_only
    for n, p in model.named_parameters():
        p.requires_grad_(True)                                         # LoRA + LOMO
    LomoTrainer(model=model, args=args, train_dataset=ds).train()
"""

from __future__ import annotations

import copy
import os
import types

import safetensors.torch
import torch
from transformers.training_args import OptimizerNames

from ._fused import FusedOptimizer

__all__ = ["FULL_WEIGHTS_NAME", "LORA_LOMO", "LORA_ONLY", "PeftAdapters", "adamw_args"]

LORA_ONLY, LORA_LOMO = "lora_only", "lora_lomo"
#: LoRA + LOMO: the full PEFT model's weights, saved beside the Trainer's adapter files
FULL_WEIGHTS_NAME = "lora_lomo_model.safetensors"


def adamw_args(args):
    """A copy of ``TrainingArguments`` ``args`` with ``optim="adamw_torch"`` (for the
    adapters) instead of ``"adalomo"``/``"lomo"`` (which Trainer reads as lomo-optim's)."""
    args = copy.copy(args)
    args.optim, args.optim_args = OptimizerNames.ADAMW_TORCH, None
    return args


def _adapter_prefix(model):
    """The adapter-parameter name prefix of a PEFT model (``"lora_"`` for LoRA), else None."""
    try:
        from peft import PeftModel
    except ImportError:  # no peft: no PEFT model
        return None
    if not isinstance(model, PeftModel):
        return None
    return getattr(model.base_model, "prefix", None)  # prompt-learning models have none


class PeftAdapters:
    """A PEFT model's trainable adapters, the training mode, and their AdamW.

    Use :meth:`of` (None for a model that is not a PEFT model with adapters in training).
    """

    def __init__(self, prefix, model):
        self.prefix = prefix
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n in trainable if prefix in n]
        self.mode = LORA_ONLY if len(self.names) == len(trainable) else LORA_LOMO
        self.optimizer = None  # the adapters' AdamW in lora_lomo mode

    @classmethod
    def of(cls, model):
        prefix = _adapter_prefix(model)
        adapters = None if prefix is None else cls(prefix, model)
        return adapters if adapters is not None and adapters.names else None

    def exclude(self, name, param):
        """``exclude=`` for the fused optimizer: the adapters are left to AdamW."""
        return self.prefix in name

    def build_adamw(self, trainer, model):
        """torch AdamW over ``model``'s trainable adapters, as ``Trainer`` builds
        ``optim="adamw_torch"``: ``args.learning_rate``, ``adam_beta1/2``,
        ``adam_epsilon``, ``weight_decay`` except on biases and norms."""
        args = adamw_args(trainer.args)
        cls, kwargs = trainer.get_optimizer_cls_and_kwargs(args, model)
        decay = set(trainer.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters()
                 if p.requires_grad and self.prefix in n]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        return cls([g for g in groups if g["params"]], **kwargs)

    def check_excluded(self, opt, cls_name):
        """A given fused optimizer must leave exactly the adapters to AdamW."""
        excluded = sorted(n for n, _ in opt.excluded.named)
        if excluded != sorted(self.names):
            raise ValueError(
                f"{cls_name}: the PEFT model trains its base and its adapters (LoRA + LOMO), but "
                f"the given {type(opt).__name__} excludes {excluded[:3]} ({len(excluded)} in "
                f"all) instead of the {len(self.names)} adapter parameters ({self.names[:3]}...): "
                f"build it with exclude=lambda n, p: {self.prefix!r} in n, or leave "
                f"optimizers=(None, ...)")

    def attach(self, opt, adamw):
        """Make ``adamw`` the adapters' optimizer, saved in ``opt.state_dict()``."""
        self.optimizer = adamw
        opt.state_dict = types.MethodType(_state_dict_with_adapters, opt)
        opt.load_state_dict = types.MethodType(_load_state_dict_with_adapters, opt)
        opt.adapter_optimizer = adamw

    def save_full(self, model, output_dir):
        """LoRA + LOMO: write ``model``'s full weights (its trained base too) to ``output_dir``."""
        if self.mode == LORA_LOMO:
            safetensors.torch.save_model(model, os.path.join(output_dir, FULL_WEIGHTS_NAME),
                                         metadata={"format": "pt"})

    def full_weights(self, checkpoint, who):
        """The full-weights file in ``checkpoint`` (None if absent); LoRA + LOMO needs it."""
        path = os.path.join(checkpoint, FULL_WEIGHTS_NAME)
        if os.path.isfile(path):
            return path
        if self.mode == LORA_LOMO:
            raise ValueError(
                f"{who}: the checkpoint {checkpoint} has no {FULL_WEIGHTS_NAME}, so it holds only "
                f"the PEFT adapters, but this LoRA + LOMO run trains the base too: loading it "
                f"would put the trained adapters on the untrained base. Use a checkpoint "
                f"LomoTrainer wrote in LoRA + LOMO mode, or load the trained base into the "
                f"model yourself and train without resume_from_checkpoint")
        return None

    def load_full(self, model, path, who):
        """Load the full weights at ``path`` (from :meth:`full_weights`) into ``model``."""
        missing, unexpected = safetensors.torch.load_model(model, path, strict=False)
        if missing or unexpected:
            raise ValueError(f"{who}: {path} does not match the model: missing "
                             f"{sorted(missing)[:3]} ({len(missing)}), unexpected "
                             f"{sorted(unexpected)[:3]} ({len(unexpected)}); the model is "
                             f"partly loaded, rebuild it before training")

    def step(self, stepped, lr, max_grad_norm):
        """After ``fused_backward`` (which returned ``stepped``): clip the adapters'
        gradients to ``max_grad_norm`` (if > 0), step AdamW at ``lr``; then free them."""
        opt = self.optimizer
        if stepped:
            if max_grad_norm and max_grad_norm > 0:
                params = [p for g in opt.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
        opt.zero_grad(set_to_none=True)


def _state_dict_with_adapters(self):
    state = FusedOptimizer.state_dict(self)
    state["adapter_optimizer"] = self.adapter_optimizer.state_dict()
    return state


def _load_state_dict_with_adapters(self, state_dict):
    state_dict = dict(state_dict)
    adapters = state_dict.pop("adapter_optimizer", None)
    if adapters is None:
        raise ValueError(f"{type(self).__name__}.load_state_dict: the state_dict holds no "
                         f"'adapter_optimizer' (the LoRA adapters' AdamW); nothing was loaded")
    FusedOptimizer.load_state_dict(self, state_dict)
    self.adapter_optimizer.load_state_dict(adapters)
