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
  (``g / world`` summed, as DDP does) before it is added.
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
    that unscale (fp16) and average (DDP) their gradients in an updating pass.

    ``opt`` provides ``_pass_updates()`` (whether the running backward updates),
    ``_scale`` (the running pass's loss scale or None) and ``_reduction``.
    """

    def __init__(self, opt, named):
        self.named = named
        self.ids = {id(p) for _, p in named}
        opt_ref = weakref.ref(opt)

        def hook(grad):
            opt = opt_ref()
            if opt is None or not opt._pass_updates():
                return grad
            return _unscaled_average(grad, opt._scale, opt._reduction)

        #: the hooks' handles (the optimizer removes them with its own)
        self.handles = [p.register_hook(hook) for _, p in named]

    def __bool__(self):
        return bool(self.named)


def _unscaled_average(grad, scale, reduction):
    """This backward's contribution ``grad`` divided by the loss scale and, over
    several DDP ranks, averaged (a blocking all-reduce: adapters are small)."""
    with torch.no_grad():
        if scale is not None:
            grad = grad / scale
        if isinstance(reduction, DDPReduction) and reduction.size > 1:
            grad = grad / reduction.size
            torch.distributed.all_reduce(grad, group=reduction.group)
    return grad
