"""Checks before a fused optimizer's backward: the loss, its autograd graph, the hooks.

Each parameter is updated in its post-accumulate-grad hook, so a backward must
fire every hook once, with the parameter's complete gradient, on tensors the
model still uses. These checks run before any backward, so a refusal changes
nothing:

* :func:`check_loss`: a scalar tensor that requires grad, hooks still on;
* :func:`check_graph`: not already backpropagated by ``fused_backward`` (which
  frees it), no reentrant activation checkpointing, no compiled region that
  yields several parameters' gradients at once;
* :class:`HookSites`: the hooked tensors are still the model's parameters.

Example::

    check_loss("Lomo", loss, "grad_norm", hooks_on=True)
    check_graph("Lomo", loss, {id(p): n for n, p in model.named_parameters()})
"""

from __future__ import annotations

import torch

__all__ = ["HookSites", "check_graph", "check_loss", "mark_spent"]

# Autograd nodes that break "one parameter's gradient at a time" (torch 2.13 names).
_REENTRANT_CHECKPOINT = "CheckpointFunctionBackward"  # torch.utils.checkpoint(use_reentrant=True)
_COMPILED_REGION = "CompiledFunctionBackward"         # a torch.compile'd (AOTAutograd) region
# Autograd-node metadata key: the graph was backpropagated (and freed) by fused_backward.
_SPENT = "lomo_torch.spent"


def check_loss(cls_name, loss, method, *, hooks_on):
    """Refuse a loss that is not a scalar tensor requiring grad, or hooks removed."""
    if not hooks_on:
        raise RuntimeError(f"{cls_name}.{method}: the hooks were removed "
                           f"(remove_hooks()); create a new optimizer")
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{method} expects the loss as a torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{method} expects a scalar loss, got a tensor of shape "
                         f"{tuple(loss.shape)}; reduce it first (e.g. loss.mean())")
    if not loss.requires_grad:
        raise ValueError(f"{method}: the loss does not require grad (was it computed under "
                         f"torch.no_grad(), or are all parameters frozen?)")


def mark_spent(loss):
    """Note on ``loss``'s graph that a backward freed it (:func:`check_graph` refuses it)."""
    if loss.grad_fn is not None:
        loss.grad_fn.metadata[_SPENT] = True


def _graph_nodes(loss):
    """Every node of ``loss``'s autograd graph, once each (iterative walk)."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(f for f, _ in node.next_functions)


def check_graph(cls_name, loss, param_names):
    """Refuse a graph whose backward would not update each parameter once, in turn.

    ``param_names`` maps ``id(parameter)`` to its name. Runs before any backward,
    so on refusal no parameter has changed.
    """
    for node in _graph_nodes(loss):
        if _SPENT in node.metadata:
            raise RuntimeError(
                f"{cls_name}: this loss's graph was already backpropagated by fused_backward, "
                f"which frees it; a second backward would update some parameters before "
                f"autograd fails. Compute a new loss (a new forward pass) for every step; "
                f"nothing has been updated")
        kind = type(node).__name__
        if kind == _REENTRANT_CHECKPOINT:
            raise RuntimeError(
                f"{cls_name}: the loss was computed with reentrant activation checkpointing "
                f"(torch.utils.checkpoint(..., use_reentrant=True), autograd node {kind}). Its "
                f"nested backward fires a parameter's hook once per checkpointed use, so a "
                f"parameter used in two segments would get two partial updates. Use "
                f"use_reentrant=False (transformers: model.gradient_checkpointing_enable() "
                f"without use_reentrant=True)")
        if kind == _COMPILED_REGION:
            _check_compiled(cls_name, node, param_names)


def _check_compiled(cls_name, node, param_names):
    """Refuse a compiled region whose backward yields several parameters' gradients at once."""
    kind = type(node).__name__
    inside = [param_names[id(f.variable)] for f, _ in node.next_functions
              if type(f).__name__ == "AccumulateGrad" and id(f.variable) in param_names]
    if len(inside) > 1:
        raise RuntimeError(
            f"{cls_name}: part of the model runs under torch.compile (autograd node "
            f"{kind}), whose backward produces the gradients of {len(inside)} "
            f"parameters ({inside[:3]}...) at once: the update would not be fused and "
            f"those gradients would all be alive together. Train the model uncompiled: "
            f"give the optimizer and call the module itself (for torch.compile(model): "
            f"its ._orig_mod) and do not call module.compile()")


def _hook_sites(source, hooked):
    """Where the hooked parameters sit: ``(module, key, parameter)`` for every slot
    (a tied parameter's too) holding one of ``hooked`` (ids), and ``(parent, key,
    child)`` for every submodule. Comparing them by identity on every pass finds a
    parameter or submodule replaced after the hooks were registered."""
    slots, edges = [], []
    for m in source.modules():
        slots += [(m, k, p) for k, p in m._parameters.items() if id(p) in hooked]
        edges += [(m, k, c) for k, c in m._modules.items() if c is not None]
    return slots, edges


class HookSites:
    """The hooked parameters of ``source`` (``[(name, p)]``; DTensor ones, named in
    ``sharded``, are left out: FSDP2 itself swaps unsharded ones in around forward
    and backward), and :meth:`check` that they are still the model's."""

    def __init__(self, cls_name, source, named, sharded, known=frozenset()):
        self.cls_name, self.source = cls_name, source
        self.hooked = [(n, p) for n, p in named if n not in sharded]
        # trainable but deliberately unhooked (``exclude=``): not "replaced"
        self.all_hooked = {id(p) for _, p in named} | set(known)
        self.sharded = sharded
        self._find()

    def _find(self):
        self.slots, self.edges = _hook_sites(self.source, {id(p) for _, p in self.hooked})

    def check(self):
        """Refuse if a hooked parameter is no longer in the model, or a trainable one
        in it is not hooked (replaced after the optimizer was created, e.g. by
        ``load_state_dict(..., assign=True)`` or ``fully_shard``): updates would go
        to tensors the model does not use. Identity checks only, unless a slot or
        submodule changed; the same parameters moved elsewhere (a wrapper) re-arm."""
        if (all(m._parameters.get(k) is p for m, k, p in self.slots)
                and all(m._modules.get(k) is c for m, k, c in self.edges)):
            return
        current = dict(self.source.named_parameters(remove_duplicate=False))
        ids = {id(p) for p in current.values()}
        replaced = [n for n, p in self.hooked if id(p) not in ids]
        replaced += [n for n, p in current.items() if p.requires_grad
                     and id(p) not in self.all_hooked and n not in self.sharded
                     and n not in replaced]
        if not replaced:  # the hooked parameters, in other places: check those from now on
            self._find()
            return
        raise RuntimeError(
            f"{self.cls_name}: the model's parameters {replaced[:3]} were replaced after "
            f"the optimizer was created ({len(replaced)} in all; e.g. by "
            f"model.load_state_dict(..., assign=True), fully_shard, or assigning a new "
            f"nn.Parameter or submodule), so its hooks sit on tensors the model no longer "
            f"uses and nothing would be updated. Load weights in place (load_state_dict "
            f"without assign=True), or create the optimizer after wrapping, sharding or "
            f"replacing (carry its state over with state_dict()/load_state_dict()); nothing "
            f"has been updated")
