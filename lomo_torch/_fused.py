"""Machinery shared by :class:`~lomo_torch.Lomo` and :class:`~lomo_torch.AdaLomo`.

Each trainable parameter (tied parameters once) gets one
``Tensor.register_post_accumulate_grad_hook``. Autograd calls it right after
the parameter's gradient is complete, i.e. after every use of the parameter
in the graph has contributed, so a tied weight sees its summed gradient. The
hook takes the gradient off the parameter (``p.grad = None``) and, depending
on the pass, either adds its norm to the global norm (``grad_norm``) or
updates the parameter in place (``fused_backward``). At most one parameter's
gradient is alive at a time; no hook scans other parameters.

Distributed data parallelism (see :mod:`lomo_torch` and the README):

* ``DistributedDataParallel``: the optimizer is given the DDP wrapper. DDP's
  own reducer cannot serve a fused optimizer (its bucketed all-reduce runs in
  autograd hooks *after* the parameter's post-accumulate hook, and only once
  per forward, while LOMO's norm clipping backpropagates twice through one
  forward), so the optimizer switches it off as ``DDP.no_sync()`` does and
  averages each gradient itself, in the parameter's hook: an asynchronous
  ``all_reduce`` is launched and the previous parameter (whose all-reduce has
  overlapped this parameter's backward) is finished and updated. Every rank
  then norms and updates with the same averaged gradient, so replicas stay
  bitwise identical. DDP still broadcasts the initial state and the buffers.
* FSDP2 (``fully_shard``): parameters are ``DTensor`` shards and FSDP2 calls
  the sharded parameter's post-accumulate-grad hooks after its
  reduce-scatter, so the hook gets this rank's shard of the averaged
  gradient. Elementwise work runs on the local shard; every reduction that
  spans a sharded dimension (the global norm, AdaLomo's row/column means and
  RMS values) sums the local part and all-reduces it over the mesh
  dimensions that shard it, so the numbers equal the unsharded ones.
"""

from __future__ import annotations

import copy
import enum
import math
import numbers
import sys
import warnings
import weakref

import torch
from torch import nn
from torch.optim import Optimizer

from .loss_scaler import DynamicLossScaler
from .rounding import RoundingNoise, is_low_precision

STATE_FORMAT = 1


class _Pass(enum.Enum):
    IDLE = "idle"      # a backward not driven by this optimizer: leave .grad alone
    NORM = "norm"      # grad_norm(): accumulate per-parameter norms, update nothing
    UPDATE = "update"  # fused_backward(): update each parameter in its hook
    SKIP = "skip"      # fused_backward() after an fp16 overflow: drop gradients only


def _check_number(name, value, *, positive=False, non_negative=False, optional=False):
    if value is None and optional:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if non_negative and not value >= 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return value


# The largest power of two an fp16 loss's gradient holds (2**15), as lomo_jax derives it
_FP16_SEED_CAP = 2.0 ** math.floor(math.log2(torch.finfo(torch.float16).max))

# Autograd nodes that break "one parameter's gradient at a time" (torch 2.13 names).
_REENTRANT_CHECKPOINT = "CheckpointFunctionBackward"  # torch.utils.checkpoint(use_reentrant=True)
_COMPILED_REGION = "CompiledFunctionBackward"         # a torch.compile'd (AOTAutograd) region
# Autograd-node metadata key: the graph was backpropagated (and freed) by fused_backward.
_SPENT = "lomo_torch.spent"
# Settings kept in param_groups too (as torch optimizers do); the update reads the attributes.
_MIRRORED = ("clip_grad_norm", "clip_grad_value", "weight_decay", "eps")


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


def _check_graph(cls_name, loss, param_names):
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


def _same(a, b):
    """Whether two setting values agree (a tuple and a list of equal items do)."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, bool) != isinstance(b, bool):  # True == 1, but not as a setting
        return False
    return a == b


class _ShardSpec:
    """How a ``DTensor`` parameter is laid out: which tensor dims are split over which groups."""

    __slots__ = ("mesh", "placements", "shape", "numel", "dim_groups", "all_groups", "shard")

    def __init__(self, name, p):
        self.mesh = p.device_mesh
        self.placements = tuple(p.placements)
        self.shape = tuple(p.shape)  # the global shape
        self.numel = p.numel()
        self.dim_groups = {}         # tensor dim -> [process groups that split it]
        all_groups = []
        from torch.distributed.tensor import Replicate, Shard

        for mesh_dim, pl in enumerate(self.placements):
            if type(pl) is Replicate:
                continue
            if type(pl) is not Shard:
                raise NotImplementedError(
                    f"parameter {name!r} has placement {pl} on mesh dim {mesh_dim}; lomo_torch "
                    f"supports DTensor parameters that are sharded (Shard) or replicated")
            group = self.mesh.get_group(mesh_dim)
            dim = pl.dim % len(self.shape)
            self.dim_groups.setdefault(dim, []).append(group)
            all_groups.append(group)
        self.all_groups = tuple(all_groups)
        # which shard this rank holds: its coordinates along the mesh dims that split p
        coord = self.mesh.get_coordinate() or ()
        self.shard = tuple(c for c, pl in zip(coord, self.placements) if type(pl) is Shard)

    def groups(self, dim):
        return self.dim_groups.get(dim % len(self.shape), ())


def _dtensor_type():
    # A parameter can only be a DTensor if torch.distributed.tensor was imported.
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def _all_reduce_sum(t, groups):
    """In-place sum of ``t`` over every group in ``groups`` (their ranks partition a mesh)."""
    for group in groups:
        torch.distributed.all_reduce(t, group=group)
    return t


def _sum_over_groups(items):
    """All-reduce (sum) each ``(tensor, groups)``; tensors sharing groups go in one collective.

    Returns the summed tensors in order (new tensors; the inputs may be reused).
    """
    out = [t for t, _ in items]
    pending = [i for i, (_, groups) in enumerate(items) if groups]
    while pending:
        groups = items[pending[0]][1]
        same = [i for i in pending if items[i][1] == groups]
        pending = [i for i in pending if items[i][1] != groups]
        if len(same) == 1:
            out[same[0]] = _all_reduce_sum(out[same[0]], groups)
            continue
        flat = torch.cat([out[i].reshape(-1) for i in same])
        _all_reduce_sum(flat, groups)
        for i, part in zip(same, flat.split([out[i].numel() for i in same])):
            out[i] = part.view_as(out[i])
    return out


def _check_flags(*, skip_nonfinite, stochastic_rounding, seed):
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}")
    if not isinstance(stochastic_rounding, bool):
        raise TypeError(f"stochastic_rounding must be a bool, got {stochastic_rounding!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")


def _remove_handles(handles):
    for h in handles:
        h.remove()
    handles.clear()


class FusedOptimizer(Optimizer):
    """Base class: hook registration, the two backward passes, loss scaling, state.

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
                 skip_nonfinite=False, stochastic_rounding=False, seed=None):
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
        source = self._attach_ddp(model)
        named = self._trainable(model, source)
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
            "stochastic_rounding": stochastic_rounding, **self._extra_settings()})
        super().__init__([p for _, p in named], defaults)
        self._index_params(named, source)
        self._noise = RoundingNoise(self._agreed_seed(seed)) if stochastic_rounding else None
        self._shard_sq = []        # (groups, local sum of squares) of sharded gradients
        self._inflight = None      # DDP: (name, param, grad, work) awaiting its all-reduce
        self._pass = _Pass.IDLE
        self._precision_checked = False
        self._norms = []
        self._coef_by_device = {}
        self._norm_ready = False   # grad_norm() ran since the last fused_backward()
        self._norm_loss = None     # a weak reference to the loss grad_norm() was given
        self._norm_failed = None   # why the last grad_norm() does not count (it raised...)
        self._skip_step = False    # grad_norm() found an fp16 overflow
        self._scale = None         # loss scale of the running pass (None: unscaled)
        self._updated = 0          # parameters updated by the running UPDATE pass
        self._step_lr = lr
        self._register_hooks(named)

    def _attach_ddp(self, model):
        """The module whose parameters are trained; under DistributedDataParallel its
        ``.module``, with DDP's reducer switched off (we average in our hooks, see the
        module doc)."""
        self._dp_group = None
        self._dp_size = 1
        ddp = _ddp_type()
        if ddp is None or not isinstance(model, ddp):
            return model
        if getattr(model, "static_graph", False):
            raise ValueError(f"{type(self).__name__} does not support DDP(static_graph=True): "
                             f"it averages gradients itself and switches DDP's reducer off")
        self._dp_group = model.process_group
        self._dp_size = torch.distributed.get_world_size(self._dp_group)
        model.require_backward_grad_sync = False  # what DDP.no_sync() sets
        return model.module  # parameter names as without the wrapper

    def _trainable(self, model, source):
        """``[(name, parameter)]`` to train: real floating point, requires_grad, tied ones once."""
        named = [(n, p) for n, p in source.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                f"{type(model).__name__} has no trainable parameters (no parameter has "
                f"requires_grad=True); there is nothing for {type(self).__name__} to optimize"
            )
        not_real = [(n, p.dtype) for n, p in named if not p.is_floating_point()]
        if not_real:
            n, dtype = not_real[0]
            raise TypeError(
                f"{type(self).__name__} updates real floating-point parameters; parameter "
                f"{n!r} has dtype {dtype} ({len(not_real)} such parameter(s)). Freeze it "
                f"(requires_grad_(False)) or keep its real and imaginary parts as two real "
                f"parameters")
        return named

    def _index_params(self, named, source):
        """Name lookups, DTensor layouts and the hook sites checked on every pass."""
        self._named_params = named
        self._param_index = {n: i for i, (n, _) in enumerate(named)}
        self._name_by_id = {id(p): n for n, p in named}
        self._param_source = source
        dtensor = _dtensor_type()
        #: name -> _ShardSpec for DTensor (FSDP2 / sharded) parameters.
        self._specs = {n: _ShardSpec(n, p) for n, p in named
                       if dtensor is not None and isinstance(p, dtensor)}
        if self._specs and self._dp_group is not None:
            raise NotImplementedError(f"{type(self).__name__}: DTensor parameters inside "
                                      f"DistributedDataParallel are not supported")
        # (DTensor parameters are left out: FSDP2 itself swaps unsharded ones in
        # around forward and backward.)
        self._slots, self._edges = _hook_sites(
            source, {id(p) for n, p in named if n not in self._specs})

    def _register_hooks(self, named):
        self_ref = weakref.ref(self)

        def make_hook(name):
            def hook(param):
                opt = self_ref()
                if opt is not None:
                    opt._on_grad_ready(name, param)
            return hook

        self._hook_handles = [p.register_post_accumulate_grad_hook(make_hook(n)) for n, p in named]
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
        if self._dp_group is not None:
            # DDP: average over ranks. Launch this gradient's all-reduce, then finish
            # the previous parameter, whose all-reduce overlapped this backward step.
            with torch.no_grad():
                grad.div_(self._dp_size)  # as DDP's own hook: divide, then sum
                work = torch.distributed.all_reduce(grad, group=self._dp_group, async_op=True)
            previous, self._inflight = self._inflight, (name, p, grad, work)
            if previous is not None:
                self._finish_inflight(previous, mode)
            return
        self._use_grad(name, p, grad, mode)

    def _finish_inflight(self, item, mode):
        name, p, grad, work = item
        work.wait()
        self._use_grad(name, p, grad, mode)

    def _use_grad(self, name, p, grad, mode):
        spec = self._specs.get(name)
        if spec is not None:  # FSDP2 / DTensor: work on this rank's shard
            if tuple(grad.placements) != spec.placements:
                grad = grad.redistribute(spec.mesh, spec.placements)
            grad = grad.to_local()
        with torch.no_grad():
            g = grad.float()  # the gradient itself if already fp32, else an fp32 copy
            del grad
            if self._scale is not None:
                g.div_(self._scale)
            if mode is _Pass.NORM:
                if spec is None:
                    self._norms.append(torch.linalg.vector_norm(g))
                elif spec.all_groups:
                    self._shard_sq.append((spec.all_groups, torch.linalg.vector_norm(g).square()))
                else:  # a replicated DTensor: the local tensor is the whole gradient
                    self._norms.append(torch.linalg.vector_norm(g))
                return
            if self.clip_grad_value is not None:
                g.clamp_(min=-self.clip_grad_value, max=self.clip_grad_value)
            if self.clip_grad_norm is not None and self.clip_coef is not None:
                g.mul_(self._coef_on(g.device))
            self._update(name, p, g)
            self._updated += 1

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

    def _write_back(self, name, p, w, finite=None):
        """Store the new fp32 value ``w`` of parameter ``name`` in ``p`` (the tensor
        updated in place: the parameter or this rank's shard), rounded to
        ``p``'s dtype: to nearest, or stochastically (``finite=True``: ``w`` is
        proven to lie within ``p``'s finite range, see ``RoundingNoise.round_into``)."""
        if w is p:
            return
        if self._noise is not None and is_low_precision(p.dtype):
            spec = self._specs.get(name)
            self._noise.round_into(p, w, self.step_num, self._param_index[name],
                                   shard=spec.shard if spec is not None else 0,
                                   finite=finite)  # w: scratch
        else:
            p.copy_(w)

    def _agreed_seed(self, seed):
        """``seed``, or one drawn from torch's default generator; with several
        processes (DDP, FSDP2) the group's first rank's, so that replicas draw
        the same bits."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        if self._dp_group is not None or self._specs:
            # DDP: its own group (which may be a subgroup); FSDP2 (and HSDP): every rank
            group = None if self._specs else self._dp_group
            backend = torch.distributed.get_backend(group)
            t = torch.tensor([int(seed)], dtype=torch.int64,
                             device="cuda" if backend == "nccl" else "cpu")
            torch.distributed.broadcast(t, group=group, group_src=0)
            seed = int(t.item())
        return int(seed)

    # -------------------------------------------------------------- subclass API
    def _update(self, name, p, g):  # pragma: no cover - abstract
        """Update ``p`` in place from its fp32 gradient ``g`` (runs under no_grad)."""
        raise NotImplementedError

    def _enable_fp16(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _fp16_settings(self):
        """Settings fp16 implies (Lomo: ``clip_grad_norm=1.0`` if None); True if one changed."""
        return False

    def _begin_step(self):
        """Called by fused_backward right before the updating backward pass."""

    def _loss_scale(self):
        """Scale for the loss of this step (None: no scaling)."""
        return None if self.loss_scaler is None else self.loss_scaler.loss_scale

    # ------------------------------------------------------------ the passes
    def _check_loss(self, loss, method):
        if not self._hook_handles:
            raise RuntimeError(f"{type(self).__name__}.{method}: the hooks were removed "
                               f"(remove_hooks()); create a new optimizer")
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"{method} expects the loss as a torch.Tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"{method} expects a scalar loss, got a tensor of shape "
                             f"{tuple(loss.shape)}; reduce it first (e.g. loss.mean())")
        if not loss.requires_grad:
            raise ValueError(f"{method}: the loss does not require grad (was it computed under "
                             f"torch.no_grad(), or are all parameters frozen?)")

    def _check_precision(self, loss):
        """On every pass, before any backward: the hooked tensors must still be the
        model's parameters (:meth:`_check_hooked`), and fp16 - the loss or any
        parameter, also one converted later (``model.half()`` after fp32 steps) -
        turns on dynamic loss scaling from this pass on. Returns True if it did now."""
        self._check_hooked()
        self._precision_checked = True
        if self.loss_scaler is not None:
            return False
        half = torch.float16
        if loss.dtype is half or any(p.dtype is half for _, p in self._named_params):
            self._enable_fp16()
            self._sync_groups()
            return True
        return False

    def _check_hooked(self):
        """Refuse if a hooked parameter is no longer in the model, or a trainable one
        in it is not hooked (replaced after the optimizer was created, e.g. by
        ``load_state_dict(..., assign=True)`` or ``fully_shard``): updates would go
        to tensors the model does not use. Identity checks only, unless a slot or
        submodule changed; the same parameters moved elsewhere (a wrapper) re-arm."""
        if (all(m._parameters.get(k) is p for m, k, p in self._slots)
                and all(m._modules.get(k) is c for m, k, c in self._edges)):
            return
        current = dict(self._param_source.named_parameters(remove_duplicate=False))
        ids = {id(p) for p in current.values()}
        hooked = {id(p) for _, p in self._named_params}
        replaced = [n for n, p in self._named_params if n not in self._specs and id(p) not in ids]
        replaced += [n for n, p in current.items() if p.requires_grad and id(p) not in hooked
                     and n not in self._specs and n not in replaced]
        if not replaced:  # the hooked parameters, in other places: check those from now on
            self._slots, self._edges = _hook_sites(
                self._param_source, {id(p) for n, p in self._named_params if n not in self._specs})
            return
        raise RuntimeError(
            f"{type(self).__name__}: the model's parameters {replaced[:3]} were replaced after "
            f"the optimizer was created ({len(replaced)} in all; e.g. by "
            f"model.load_state_dict(..., assign=True), fully_shard, or assigning a new "
            f"nn.Parameter or submodule), so its hooks sit on tensors the model no longer "
            f"uses and nothing would be updated. Load weights in place (load_state_dict "
            f"without assign=True), or create the optimizer after wrapping, sharding or "
            f"replacing (carry its state over with state_dict()/load_state_dict()); nothing "
            f"has been updated")

    @property
    def _needs_norm_pass(self):
        return (self.clip_grad_norm is not None or self.loss_scaler is not None
                or self.skip_nonfinite)

    def _backward(self, loss, mode, scale, retain_graph=False):
        for _, p in self._named_params:  # stale gradients from a plain loss.backward()
            if p.grad is not None:
                p.grad = None
        if scale is not None and loss.dtype == torch.float16:
            # an fp16 loss's gradient (the seed) is the scale itself, in fp16: 2**16 is
            # inf there, so it is seeded with at most 2**15 and unscaled by the same
            scale = min(scale, _FP16_SEED_CAP)
        self._scale = scale
        self._pass = mode
        self._inflight = None
        self._updated = 0
        try:
            (loss if scale is None else loss.float() * scale).backward(retain_graph=retain_graph)
            if self._inflight is not None:  # DDP: the last parameter's all-reduce
                item, self._inflight = self._inflight, None
                self._finish_inflight(item, mode)
        except BaseException as e:
            self._note_partial_update(e)
            raise
        finally:
            self._inflight = None
            self._pass = _Pass.IDLE
            self._scale = None
            if not retain_graph and loss.grad_fn is not None:  # freed: refuse it next time
                loss.grad_fn.metadata[_SPENT] = True
        if self._dp_group is not None:
            # DDP broadcasts buffers before a forward only after a synced forward; keep
            # its buffer broadcast (broadcast_buffers=True) although its reducer is off.
            self.model.require_forward_param_sync = True

    def _note_partial_update(self, e):
        """An updating backward that raised midway (e.g. in a custom autograd Function,
        out of memory) has already stepped the parameters done before it: say so."""
        if self._updated and hasattr(e, "add_note"):
            e.add_note(f"{type(self).__name__}.fused_backward failed after updating "
                       f"{self._updated} of {len(self._named_params)} parameters: the model "
                       f"is partly stepped (restore it from a checkpoint)")

    @torch.no_grad()
    def _total_norm(self, device):
        norms, self._norms = self._norms, []
        sharded, self._shard_sq = self._shard_sq, []
        if not sharded:
            if not norms:
                return torch.zeros((), device=device)
            device = norms[0].device
            return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
        # Sharded gradients: sum the local squares per group set, all-reduce once per set.
        device = sharded[0][1].device
        by_groups = {}
        for groups, sq in sharded:
            by_groups.setdefault(groups, []).append(sq.to(device))
        items = [(torch.stack(sqs).sum(), groups) for groups, sqs in by_groups.items()]
        total_sq = torch.stack(_sum_over_groups(items)).sum()
        if norms:
            total_sq = total_sq + torch.stack([n.to(device) for n in norms]).square().sum()
        return total_sq.sqrt()

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
        _check_graph(type(self).__name__, loss, self._name_by_id)
        self._check_precision(loss)
        self._norms = []
        self._backward(loss, _Pass.NORM, self._loss_scale(), retain_graph=True)
        total = self._total_norm(loss.device)
        if self.loss_scaler is not None:
            overflow = not bool(torch.isfinite(total))
            self.loss_scaler.has_overflow_serial = overflow
            if overflow:
                self.loss_scaler.update_scale(True)  # raises at the minimum scale
            return total, overflow
        if self.skip_nonfinite and not self._finite(total, loss):
            self.nonfinite_steps += 1
            return total, True
        return total, False

    def _finite(self, total, loss):
        """Whether this step is finite. The global norm is the same on every rank
        (DDP/FSDP2), the loss is not: single-process only, the loss is checked too."""
        finite = torch.isfinite(total)
        if self._dp_group is None and not self._specs:
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
        refused too).
        """
        self._check_loss(loss, "fused_backward")
        if not self._norm_ready:  # else grad_norm() checked this step's graph
            _check_graph(type(self).__name__, loss, self._name_by_id)
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
        if self.loss_scaler is not None:
            self.loss_scaler.update_scale(False)
        return True

    def _resolve_lr(self, lr):
        """This step's lr, checked (``lr``, or ``param_groups[0]["lr"]`` when None)."""
        if lr is None:
            return _check_number("lr (param_groups[0]['lr'], as an LR scheduler sets it)",
                                 self.param_groups[0]["lr"], non_negative=True)
        return _check_number("lr", lr, non_negative=True)

    def _require_norm(self):
        """Refuse an update that needs this step's grad_norm() when none succeeded."""
        if not self._needs_norm_pass or self._norm_ready:
            return
        if self.loss_scaler is not None:
            why = ("fp16 training uses dynamic loss scaling, and grad_norm(loss) is its "
                   "overflow check")
        elif self.clip_grad_norm is not None:
            why = (f"clip_grad_norm={self.clip_grad_norm} is set, and grad_norm(loss) "
                   f"computes the global gradient norm")
        else:
            why = ("skip_nonfinite=True is set, and grad_norm(loss) checks the loss and the "
                   "gradient norm")
        failed = ("" if self._norm_failed is None else
                  f" (the last grad_norm(loss) does not count: {self._norm_failed})")
        raise RuntimeError(f"call grad_norm(loss) before every fused_backward(loss, lr): {why}"
                           f"{failed}; nothing has been updated")

    def _check_groups(self):
        """``param_groups`` mirror the settings the update reads; refuse one changed there."""
        for i, group in enumerate(self.param_groups):
            for key in _MIRRORED:
                if key in group and not _same(group[key], getattr(self, key)):
                    raise ValueError(
                        f"param_groups[{i}][{key!r}] is {group[key]!r}, but "
                        f"{type(self).__name__} applies {key}={getattr(self, key)!r}, set when "
                        f"it was built (it reads only 'lr' from param_groups). Build a new "
                        f"optimizer to change {key}; nothing has been updated")

    def _sync_groups(self):
        """Write the settings the update reads into ``param_groups``."""
        for group in self.param_groups:
            for key in _MIRRORED:
                if key in group:
                    group[key] = getattr(self, key)

    def step(self, closure=None):
        raise RuntimeError(
            f"{type(self).__name__} updates the parameters during backward: replace "
            f"`loss.backward(); optimizer.step()` by `optimizer.fused_backward(loss, lr)` "
            f"(preceded by `optimizer.grad_norm(loss)` when clipping by norm or in fp16)"
        )

    # ------------------------------------------------------------------ state
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
        }

    def load_state_dict(self, state_dict):
        """Restore from :meth:`state_dict` (parameters are matched by name).

        One rule for resuming: the optimizer must be built with the settings the
        state_dict was written with - every constructor argument except ``lr``
        and ``seed`` (``clip_grad_norm``, ``clip_grad_value``, ``weight_decay``,
        ``skip_nonfinite``, ``stochastic_rounding``, ``loss_scale_args``, and
        AdaLomo's ``loss_scale``, ``eps``, ``clip_threshold``, ``decay_rate``);
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
        scaler = state_dict["loss_scaler"]
        scaler = None if scaler is None else DynamicLossScaler.from_state_dict(scaler)
        # every check passed: change the optimizer
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

    def __repr__(self):
        return (f"{type(self).__name__}(lr={self.lr}, clip_grad_norm={self.clip_grad_norm}, "
                f"clip_grad_value={self.clip_grad_value}, weight_decay={self.weight_decay}, "
                f"skip_nonfinite={self.skip_nonfinite}, "
                f"stochastic_rounding={self.stochastic_rounding}, "
                f"params={len(self._named_params)}, step={self.step_num})")


def _ddp_type():
    if not torch.distributed.is_available():
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel


def warn_fp16_clip(cls_name):
    warnings.warn(
        f"{cls_name}: fp16 detected, dynamic loss scaling is on and clip_grad_norm was None; "
        f"setting clip_grad_norm=1.0 (as lomo-optim does). Call grad_norm(loss) before every "
        f"fused_backward(loss, lr).",
        UserWarning,
        stacklevel=4,
    )
