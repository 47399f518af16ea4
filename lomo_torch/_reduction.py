r"""Gradient reduction for the fused optimizers: one process, DDP, or DTensor shards.

A strategy object receives each gradient in the parameter's hook and hands the
(reduced) gradient to ``use(name, param, grad)``; in the norm pass it keeps
each gradient's contribution and gives the global norm
:math:`\|g\|_2 = \sqrt{\sum_i \|g_i\|_2^2}`:

* :class:`LocalReduction`: one process; the gradient is used as it arrives.
* :class:`DDPReduction` (``DistributedDataParallel``): DDP's own reducer cannot
  serve a fused optimizer (its bucketed all-reduce runs in autograd hooks
  *after* the parameter's post-accumulate hook, and only once per forward,
  while LOMO's norm clipping backpropagates twice through one forward), so it
  is switched off as ``DDP.no_sync()`` does and each gradient is averaged in
  its hook: an asynchronous ``all_reduce`` is launched and the previous
  parameter (whose all-reduce overlapped this parameter's backward) is
  finished and used. Every rank then norms and updates with the same averaged
  gradient, so replicas stay bitwise identical.
* :class:`DTensorReduction` (FSDP2 ``fully_shard``): FSDP2 calls a sharded
  parameter's hook after its reduce-scatter, so the hook gets this rank's
  shard of the averaged gradient; the norm sums the local squares and
  all-reduces them over the mesh dimensions that shard each parameter.

:meth:`LocalReduction.tensor_norm` gives one parameter's whole-gradient norm
(adaptive clipping): the gradient's own norm locally and under DDP (averaged
before use), the all-reduced squares of the shards under FSDP2.

Example::

    reduction = make_reduction(model, specs, "Lomo")   # after attach_ddp(model, "Lomo")
    reduction.receive(name, p, grad, use)              # in the hook
    reduction.flush(use); total = reduction.total_norm(device)
"""

from __future__ import annotations

import sys

import torch

__all__ = ["DDPReduction", "DTensorReduction", "LocalReduction", "attach_ddp",
           "make_reduction"]


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


def shard_specs(named):
    """``{name: _ShardSpec}`` for the ``DTensor`` parameters among ``[(name, p)]``."""
    dtensor = _dtensor_type()
    return {n: _ShardSpec(n, p) for n, p in named
            if dtensor is not None and isinstance(p, dtensor)}


def _ddp_type():
    if not torch.distributed.is_available():
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel


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


def attach_ddp(model, cls_name):
    """``(module to train, DDP process group or None)``: under DistributedDataParallel
    its ``.module``, with DDP's reducer switched off (the optimizer averages in its
    hooks: :class:`DDPReduction`)."""
    ddp = _ddp_type()
    if ddp is None or not isinstance(model, ddp):
        return model, None
    if getattr(model, "static_graph", False):
        raise ValueError(f"{cls_name} does not support DDP(static_graph=True): "
                         f"it averages gradients itself and switches DDP's reducer off")
    model.require_backward_grad_sync = False  # what DDP.no_sync() sets
    return model.module, model.process_group  # parameter names as without the wrapper


def make_reduction(model, dp_group, specs, cls_name):
    """The strategy for ``model`` (as given to the optimizer): DDP when ``dp_group``
    is set, DTensor when ``specs`` (:func:`shard_specs`) is not empty, else local."""
    if specs and dp_group is not None:
        raise NotImplementedError(f"{cls_name}: DTensor parameters inside "
                                  f"DistributedDataParallel are not supported")
    if dp_group is not None:
        return DDPReduction(model, dp_group)
    if specs:
        return DTensorReduction(specs, fsdp_param_groups(model))
    return LocalReduction()


def _broadcast_seed(seed, group):
    """The first rank of ``group``'s ``seed`` (``None``: the default group), on every rank."""
    backend = torch.distributed.get_backend(group)
    t = torch.tensor([int(seed)], dtype=torch.int64, device="cuda" if backend == "nccl" else "cpu")
    torch.distributed.broadcast(t, group=group, group_src=0)
    return int(t.item())


class LocalReduction:
    """One process: each gradient is used in its hook as it arrives."""

    #: whether the loss is this process's alone (then skip_nonfinite checks it too)
    single_process = True

    def __init__(self):
        self._norms = []     # per-parameter norms of whole gradients
        self._shard_sq = []  # (groups, local sum of squares) of sharded gradients

    def start(self):
        """Before a backward pass: forget what an earlier one left."""
        self._norms, self._shard_sq = [], []

    def receive(self, name, p, grad, use):
        """Parameter ``name``'s gradient ``grad`` is complete: hand it to ``use``."""
        use(name, p, grad)

    def flush(self, use):
        """After the backward: hand over any gradient still held."""

    def abandon(self):
        """The backward ended (raised or not): drop what is still held."""

    def after_backward(self):
        """After a successful backward pass."""

    def check_ready(self, cls_name):
        """Before a pass: refuse what would make it silently wrong (nothing here)."""

    def add_norm(self, name, g):
        """Norm pass: keep fp32 gradient ``g``'s contribution to the global norm."""
        self._norms.append(torch.linalg.vector_norm(g))

    def tensor_norm(self, name, g):
        """The L2 norm (0-d) of parameter ``name``'s whole gradient, of which ``g``
        (fp32) is what this process holds: here all of it."""
        return torch.linalg.vector_norm(g)

    def agree_seed(self, seed):
        """The rounding seed every process uses: ``seed`` itself here."""
        return seed

    @torch.no_grad()
    def total_norm(self, device):
        """The global L2 norm of the gradients the norm pass saw (0-d, fp32)."""
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


class DDPReduction(LocalReduction):
    """DistributedDataParallel: each gradient averaged over the ranks in its hook,
    its all-reduce overlapping the next parameter's backward."""

    single_process = False

    def __init__(self, model, group):
        super().__init__()
        self.model, self.group = model, group
        self.size = torch.distributed.get_world_size(group)
        self._inflight = None  # (name, param, grad, work) awaiting its all-reduce

    def start(self):
        super().start()
        self._inflight = None

    def receive(self, name, p, grad, use):
        """Launch this gradient's all-reduce, then finish the previous parameter."""
        with torch.no_grad():
            grad.div_(self.size)  # as DDP's own hook: divide, then sum
            work = torch.distributed.all_reduce(grad, group=self.group, async_op=True)
        previous, self._inflight = self._inflight, (name, p, grad, work)
        if previous is not None:
            self._finish(previous, use)

    def flush(self, use):
        if self._inflight is not None:  # the last parameter's all-reduce
            item, self._inflight = self._inflight, None
            self._finish(item, use)

    @staticmethod
    def _finish(item, use):
        name, p, grad, work = item
        work.wait()
        use(name, p, grad)

    def abandon(self):
        self._inflight = None

    def after_backward(self):
        # DDP broadcasts buffers before a forward only after a synced forward; keep
        # its buffer broadcast (broadcast_buffers=True) although its reducer is off.
        self.model.require_forward_param_sync = True

    def agree_seed(self, seed):
        return _broadcast_seed(seed, self.group)  # its own group (may be a subgroup)


def fsdp_param_groups(model):
    """The FSDP2 parameter groups of ``model``'s ``fully_shard``-ed modules ([] if none)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - a torch without FSDP2
        return []
    return [group for m in model.modules() if isinstance(m, FSDPModule)
            for group in getattr(m._get_fsdp_state(), "_fsdp_param_groups", ())]


def _unsynced_gradient(group):
    """The name of a parameter of FSDP2 ``group`` holding a gradient a backward with
    sync off left unreduced (FSDP2 adds it into the next reduce-scatter), or None."""
    for fp in group.fsdp_params:
        unsharded = getattr(fp, "_unsharded_param", None)
        if getattr(fp, "unsharded_accumulated_grad", None) is not None or (
                unsharded is not None and unsharded.grad is not None):
            return fp._param_fqn
    return None


class DTensorReduction(LocalReduction):
    """FSDP2 / DTensor parameters: the hook gets this rank's shard of the averaged
    gradient; norms over sharded dimensions are all-reduced over their groups."""

    single_process = False

    def __init__(self, specs, fsdp_groups=()):
        super().__init__()
        self.specs = specs
        self.fsdp_groups = list(fsdp_groups)

    def check_ready(self, cls_name):
        """Before a pass: FSDP2 must reduce-scatter in it, and hold nothing a backward
        without sync left (the norm pass would drop it, an update take it in half)."""
        for group in self.fsdp_groups:
            if not (group.reduce_grads and group.all_reduce_grads):
                raise RuntimeError(
                    f"{cls_name}: FSDP2 gradient sync is off for module "
                    f"{group._module_fqn or '(root)'!r} (set_requires_gradient_sync(False) or "
                    f"set_requires_all_reduce(False)). {cls_name} updates each parameter in the "
                    f"backward from the gradient FSDP2 reduces in that same backward, so it cannot "
                    f"accumulate over micro-batches: turn sync back on "
                    f"(model.set_requires_gradient_sync(True)); nothing has been updated")
            name = _unsynced_gradient(group)
            if name is not None:
                raise RuntimeError(
                    f"{cls_name}: FSDP2 holds an unreduced gradient of {name!r} from a backward "
                    f"run with gradient sync off; this pass would drop it (the norm pass) or mix "
                    f"it into one update. {cls_name} cannot accumulate over micro-batches: run "
                    f"every backward of a step through it with sync on; nothing has been updated")

    def receive(self, name, p, grad, use):
        spec = self.specs.get(name)
        if spec is not None:  # work on this rank's shard
            if tuple(grad.placements) != spec.placements:
                grad = grad.redistribute(spec.mesh, spec.placements)
            grad = grad.to_local()
        use(name, p, grad)

    def add_norm(self, name, g):
        spec = self.specs.get(name)
        if spec is not None and spec.all_groups:
            self._shard_sq.append((spec.all_groups, torch.linalg.vector_norm(g).square()))
        else:  # a replicated DTensor: the local tensor is the whole gradient
            super().add_norm(name, g)

    def tensor_norm(self, name, g):
        """The whole tensor's norm from this rank's shard ``g``: the local squares
        all-reduced over the groups that shard the parameter (one collective)."""
        spec = self.specs.get(name)
        if spec is None or not spec.all_groups:
            return super().tensor_norm(name, g)
        (sq,) = _sum_over_groups([(g.square().sum(), spec.all_groups)])
        return sq.sqrt_()

    def agree_seed(self, seed):
        return _broadcast_seed(seed, None)  # FSDP2 (and HSDP): every rank
