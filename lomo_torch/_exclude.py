r"""Parameters a fused optimizer leaves to another optimizer (``exclude=``).

``Lomo(model, lr, exclude=lambda name, p: "lora_" in name)`` hooks every
trainable parameter but those for which ``exclude(name, p)`` is true (names as
``model.named_parameters()`` gives them; under DDP those of ``model.module``).
An excluded parameter gets no update hook: its ``.grad`` accumulates as in a
plain ``loss.backward()`` and is never zeroed, clipped or freed by the fused
optimizer, for another optimizer (e.g. ``torch.optim.AdamW``) to step after
``fused_backward``. What the fused optimizer still does to it, per pass:

* ``grad_norm`` (norm clipping, the fp16 overflow check, ``skip_nonfinite``)
  backpropagates to the hooked parameters only (``backward(inputs=hooked)``):
  an excluded ``.grad`` is left exactly as it was (also ``None``) and the
  global norm :math:`\|(g_i)_{i\ \mathrm{hooked}}\|_2` leaves excluded gradients out.
* ``fused_backward`` that updates: each excluded gradient accumulates this
  backward's contribution ``g``, unscaled (``g / loss_scale`` under fp16 loss
  scaling, so the other optimizer sees true gradients) and, under DDP (whose
  reducer the fused optimizer switches off), averaged over the ranks
  (``g / world`` summed, as DDP does) before it is added: the contributions
  wait until the backward ends and go in one all-reduce per dtype and device
  (a bucket, as DDP's), not one per tensor (a LoRA on 7 projections of 32
  layers has 448 adapter tensors).
* ``fused_backward`` that skips (fp16 overflow, ``skip_nonfinite``; it returns
  False): the excluded ``.grad`` is left as it was; skip the other
  optimizer's step too.

Example::

    opt = AdaLomo(peft_model, lr=1e-3, exclude=lambda n, p: "lora_" in n)
    adapters = torch.optim.AdamW([p for n, p in peft_model.named_parameters() if "lora_" in n])
    loss = peft_model(**batch).loss
    if opt.fused_backward(loss):
        adapters.step()
    adapters.zero_grad()
"""

from __future__ import annotations

import weakref

import torch

from ._reduction import DDPReduction

__all__ = ["ExcludedParams", "split_excluded"]


def split_excluded(cls_name, named, exclude):
    """``(hooked, excluded)``: ``named`` (``[(name, p)]``, trainable) split by ``exclude``."""
    if exclude is None:
        return named, []
    if not callable(exclude):
        raise TypeError(f"{cls_name}: exclude must be a callable (name, param) -> bool that "
                        f"picks the parameters left to another optimizer, got "
                        f"{type(exclude).__name__} {exclude!r}")
    flags = [bool(exclude(n, p)) for n, p in named]
    hooked = [np for np, out in zip(named, flags) if not out]
    excluded = [np for np, out in zip(named, flags) if out]
    if not hooked:
        raise ValueError(
            f"{cls_name}: exclude leaves none of the {len(named)} trainable parameters to "
            f"{cls_name} (it picks all of them, e.g. {named[0][0]!r}); train them with another "
            f"optimizer alone, or exclude fewer")
    return hooked, excluded


class ExcludedParams:
    """The excluded ``[(name, p)]`` of optimizer ``opt`` and the pre-accumulation hooks
    that unscale (fp16) their gradients in an updating pass and, under DDP, hold them
    back for one bucketed rank average when the backward ends (:meth:`reduce`).

    ``opt`` provides ``_pass_updates()`` (whether the running backward updates),
    ``_scale`` (the running pass's loss scale or None) and ``_reduction``.
    """

    def __init__(self, opt, named):
        self.named = named
        self.ids = {id(p) for _, p in named}
        #: this backward's DDP contributions ``(param ref, g / world)``, for :meth:`reduce`
        self._pending = pending = []  # (the hooks hold the list, not self: no cycle)
        opt_ref = weakref.ref(opt)

        def hook_of(param_ref):
            def hook(grad):
                opt = opt_ref()
                if opt is None or not opt._pass_updates():
                    return grad
                with torch.no_grad():
                    grad = grad if opt._scale is None else grad / opt._scale
                    if not _across_ranks(opt._reduction):
                        return grad
                    pending.append((param_ref, grad / opt._reduction.size))
                    return torch.zeros_like(grad)  # the rank average is added by reduce()
            return hook

        #: the hooks' handles (the optimizer removes them with its own)
        self.handles = [p.register_hook(hook_of(weakref.ref(p))) for _, p in named]

    def __bool__(self):
        return bool(self.named)

    def reduce(self, reduction):
        """After an updating backward under DDP: sum the ranks' contributions, one
        all-reduce per (dtype, device) bucket, and add each into its ``.grad``
        (nothing to do on one process)."""
        pending = list(self._pending)
        self._pending.clear()
        buckets = {}
        for param_ref, g in pending:
            buckets.setdefault((g.dtype, g.device), []).append((param_ref(), g))
        with torch.no_grad():
            for items in buckets.values():
                flat = torch.cat([g.reshape(-1) for _, g in items])
                torch.distributed.all_reduce(flat, group=reduction.group)
                for (p, g), summed in zip(items, flat.split([g.numel() for _, g in items])):
                    p.grad.add_(summed.view_as(g))

    def abandon(self):
        """A backward that raised: drop what it left for :meth:`reduce`."""
        self._pending.clear()


def _across_ranks(reduction):
    return isinstance(reduction, DDPReduction) and reduction.size > 1
