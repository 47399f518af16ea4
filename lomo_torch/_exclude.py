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

Under FSDP2 (``fully_shard``: the excluded parameters are DTensor shards, as the
hooked ones) FSDP2 itself averages an excluded gradient: its reduce-scatter
hands over this rank's shard after every backward, and autograd never reaches
the sharded parameter (so ``backward(inputs=...)`` cannot leave it out). The
excluded ``.grad`` is set aside for the pass; each arriving shard is copied
out of FSDP2's flat reduce-scatter buffer at once (kept, it would hold the
buffer of every hooked gradient of its group alive until the step ends) and,
in an updating pass, unscaled and added to the ``.grad`` set aside; in any
other pass (the norm, a skip) it is dropped and the ``.grad`` put back as it
was (the same tensor). The norm pass then costs the excluded gradients'
backward too. FSDP2 with gradient sync off (micro-batches accumulated in
FSDP2) is refused before any pass (``DTensorReduction.check_ready``).

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

from ._reduction import DDPReduction, shard_specs

__all__ = ["ExcludedParams", "ShardedExcluded", "split_excluded", "excluded_params"]


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


def excluded_params(opt, excluded, hooked_specs):
    """The handler of ``opt``'s ``excluded`` ``[(name, p)]``: :class:`ShardedExcluded`
    when they are DTensors (FSDP2) as the hooked parameters are (``hooked_specs``:
    their :func:`shard_specs`), else :class:`ExcludedParams`. Refuses a mix."""
    cls_name = type(opt).__name__
    sharded = shard_specs(excluded)
    if hooked_specs and len(sharded) < len(excluded):
        name = next(n for n, _ in excluded if n not in sharded)
        raise NotImplementedError(
            f"{cls_name}: exclude= picks {name!r}, a plain tensor, while the parameters "
            f"{cls_name} trains are DTensors (FSDP2): shard the module that holds it too "
            f"(fully_shard) or freeze it")
    if sharded and not hooked_specs:
        raise NotImplementedError(
            f"{cls_name}: exclude= picks the DTensor parameter {next(iter(sharded))!r} while "
            f"the parameters {cls_name} trains are plain tensors; shard the whole model "
            f"(fully_shard) or none of it")
    return ShardedExcluded(opt, excluded) if sharded else ExcludedParams(opt, excluded)


class ExcludedParams:
    """The excluded ``[(name, p)]`` of optimizer ``opt`` and the pre-accumulation hooks
    that unscale (fp16) their gradients in an updating pass and, under DDP, hold them
    back for one bucketed rank average when the backward ends (:meth:`finish`).

    ``opt`` provides ``_pass_updates()`` (whether the running backward updates),
    ``_scale`` (the running pass's loss scale or None) and ``_reduction``.
    """

    def __init__(self, opt, named):
        self.named = named
        self.ids = {id(p) for _, p in named}
        #: this backward's DDP contributions ``(param ref, g / world)``, for :meth:`finish`
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
                    return torch.zeros_like(grad)  # the rank average is added by finish()
            return hook

        #: the hooks' handles (the optimizer removes them with its own)
        self.handles = [p.register_hook(hook_of(weakref.ref(p))) for _, p in named]

    def __bool__(self):
        return bool(self.named)

    def backward_inputs(self, updates, hooked):
        """``inputs=`` of a backward: all (None) in an updating pass or with nothing
        excluded, else ``hooked``, so the excluded ``.grad`` is not reached."""
        return None if updates or not self.named else hooked

    def before_backward(self):
        """Before the optimizer's backward: nothing to set aside here."""

    def finish(self, reduction):
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
        """The backward ended (raised or not): drop what it left for :meth:`finish`."""
        self._pending.clear()


class ShardedExcluded:
    """Excluded DTensor (FSDP2) parameters: their ``.grad`` set aside for the
    optimizer's backward (:meth:`before_backward`); post-accumulate hooks take each
    shard FSDP2's reduce-scatter hands over, keep a copy of it (unscaled) in an
    updating pass and drop it in any other; :meth:`finish` adds what was kept to the
    ``.grad`` set aside and puts that back, :meth:`abandon` (a backward that raised)
    puts it back unchanged. Same interface as :class:`ExcludedParams`."""

    def __init__(self, opt, named):
        self.named = named
        self.ids = {id(p) for _, p in named}
        self._held = {}  # id -> the .grad set aside for the running backward
        self._new = new = {}  # id -> this backward's contribution (the hooks hold it)
        active = self._active = [False]  # set for our own backwards only
        opt_ref = weakref.ref(opt)

        def hook(param):
            opt = opt_ref()
            if opt is None or not active[0]:
                return  # a backward of the user's own: FSDP2 accumulates as usual
            grad, param.grad = param.grad, None
            if grad is None or not opt._pass_updates():
                return
            with torch.no_grad():  # a copy: the shard is a view of FSDP2's flat buffer
                g = grad.clone() if opt._scale is None else grad / opt._scale
                new[id(param)] = g if id(param) not in new else new[id(param)] + g

        self.handles = [p.register_post_accumulate_grad_hook(hook) for _, p in named]

    def __bool__(self):
        return bool(self.named)

    def backward_inputs(self, updates, hooked):
        """Every backward runs whole: FSDP2's sharded parameters are not the graph's."""
        return None

    def before_backward(self):
        """Set every excluded ``.grad`` aside (FSDP2 then assigns this pass's shard)."""
        for _, p in self.named:
            self._held[id(p)], p.grad = p.grad, None
        self._active[0] = True

    def finish(self, reduction):
        """After the backward: the ``.grad`` set aside plus what an updating pass kept."""
        with torch.no_grad():
            for _, p in self.named:
                old, g = self._held.pop(id(p)), self._new.pop(id(p), None)
                if g is None or old is None:
                    p.grad = old if g is None else g
                else:
                    p.grad = old.add_(g)
        self._active[0] = False

    def abandon(self):
        """The backward ended: put back any ``.grad`` still set aside, unchanged."""
        for _, p in self.named:
            if id(p) in self._held:
                p.grad = self._held.pop(id(p))
        self._new.clear()
        self._active[0] = False


def _across_ranks(reduction):
    return isinstance(reduction, DDPReduction) and reduction.size > 1
