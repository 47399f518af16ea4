"""AdaLomo: LOMO with Adafactor-style factored second moments (arXiv:2310.10195)."""

from __future__ import annotations

import math

import torch

from ._arguments import _check_number
from ._fused import FusedOptimizer
from ._reduction import _sum_over_groups
from .loss_scaler import FP16_POLICY, DynamicLossScaler

__all__ = ["AdaLomo"]


def _rms(x):
    return torch.linalg.vector_norm(x) / math.sqrt(x.numel())


class AdaLomo(FusedOptimizer):
    """AdaLomo: an adaptive, factored step applied to each parameter inside backward.

    At step ``t`` (1 on the first step), per parameter ``p`` with gradient
    ``grad`` (math in fp32, result cast back to ``p``'s dtype)::

        g      = clip(grad / loss_scale)          # adaptive, value clip, global-norm coef
        beta   = 1 - t ** decay_rate
        u      = g**2 + eps[0]
        # ndim >= 2: factored over the last two dims
        row    = beta * row + (1 - beta) * u.mean(-1)          # shape[:-1]
        col    = beta * col + (1 - beta) * u.mean(-2)          # shape[:-2] + shape[-1:]
        update = rsqrt(row / row.mean(-1))[..., None] * rsqrt(col)[..., None, :] * g
        # ndim 0 or 1: full second moment
        v      = beta * v + (1 - beta) * u;   update = rsqrt(v) * g
        update = update / max(1, rms(update) / clip_threshold)
        lr_t   = lr * max(eps[1], rms(p))
        p      = p * (1 - lr_t * weight_decay) - lr_t * update

    with ``rms(x) = ||x||_2 / sqrt(numel(x))``. A ``loss_scale`` multiplies the
    loss statically (gradients divided by it). With fp16 (an fp16 loss or fp16
    parameters) the scale is dynamic: a :class:`DynamicLossScaler` with
    :data:`~lomo_torch.FP16_POLICY`, starting at ``loss_scale`` if given (else
    2**16); :meth:`grad_norm` is then required every step and an overflow skips
    the step (no parameter, statistic or ``t`` changes).

    Under FSDP2 (``fully_shard``; DTensor shards) the means and RMS values are
    global (local partial sums all-reduced over the sharding groups) and the
    state is DTensors laid out like the parameter (``exp_avg_sq_row`` sharded
    like its dims, ``exp_avg_sq_col`` replicated over a sharded row dim).

    Drop-in for ``lomo_optim.AdaLomo``::

        from lomo_torch import AdaLomo

        opt = AdaLomo(model, lr=1e-3, clip_grad_norm=1.0)
        for batch in loader:
            loss = model(**batch).loss
            opt.grad_norm(loss)            # only with clip_grad_norm / fp16
            opt.fused_backward(loss, lr=1e-3)

    Args:
        model: the ``nn.Module`` to train (trainable parameters, tied ones once).
        lr: learning rate, relative to each parameter's RMS.
        loss_scale: static loss scale (None, the default, or 0: none); the
            initial scale in fp16. lomo-optim's default is 2**10
            (``**lomo_torch.LOMO_OPTIM_LOSS_SCALE["AdaLomo"]``).
        eps: ``(eps added to g**2, floor of rms(p) in the step size)``.
        clip_threshold: the update's RMS is clipped to this.
        decay_rate: ``beta_t = 1 - t**decay_rate`` (<= 0).
        clip_grad_norm, clip_grad_value, weight_decay: as in :class:`~lomo_torch.Lomo`.
        loss_scale_args: (keyword only, not in lomo-optim) extra
            :class:`DynamicLossScaler` arguments for fp16, over
            :data:`~lomo_torch.FP16_POLICY`, e.g. ``scale_window``.
        skip_nonfinite: (keyword only) skip and count steps whose loss or gradient
            norm is not finite, as in :class:`~lomo_torch.Lomo`.
        stochastic_rounding, seed: (keyword only) round new values into bf16/fp16
            parameters stochastically, as in :class:`~lomo_torch.Lomo`.
        adaptive_clip, adaptive_clip_decay, adaptive_clip_warmup_steps,
        adaptive_clip_absolute: (keyword only) adaptive per-tensor clipping in one
            backward (AdaGC), as in :class:`~lomo_torch.Lomo`; off by default (the
            AdaLomo authors use no clipping: the update is RMS-clipped already).
            Not together with ``clip_grad_norm``.
        exclude: (keyword only) ``(name, param) -> bool``: the parameters left to
            another optimizer (no hook; their ``.grad`` accumulates, unscaled, not
            clipped, and the global norm leaves them out), as in
            :class:`~lomo_torch.Lomo`. LoRA + AdaLomo with PEFT::

                opt = AdaLomo(peft_model, lr, exclude=lambda n, p: "lora_" in n)
                adamw = torch.optim.AdamW(
                    [p for n, p in peft_model.named_parameters() if "lora_" in n])
                if opt.fused_backward(loss, lr):   # False: an fp16 overflow skipped it
                    adamw.step()
                adamw.zero_grad()

    Resuming, as :class:`~lomo_torch.Lomo`: :meth:`load_state_dict` needs the same
    settings (every argument but ``lr`` and ``seed``: also ``loss_scale``, ``eps``,
    ``clip_threshold``, ``decay_rate``) or raises ``ValueError`` naming them;
    ``param_groups`` show ``eps``, ``weight_decay`` and the clipping as applied.
    """

    def __init__(self, model, lr=1e-3, loss_scale=None, eps=(1e-30, 1e-3), clip_threshold=1.0,
                 decay_rate=-0.8, clip_grad_norm=None, clip_grad_value=None, weight_decay=0.0,
                 *, loss_scale_args=None, skip_nonfinite=False, stochastic_rounding=False,
                 seed=None, adaptive_clip=None, adaptive_clip_decay=0.98,
                 adaptive_clip_warmup_steps=100, adaptive_clip_absolute=1.0, exclude=None):
        if loss_scale:
            _check_number("loss_scale", loss_scale, positive=True)
        try:
            eps = tuple(float(e) for e in eps)
        except TypeError:
            raise TypeError(f"eps must be a pair of numbers, got {eps!r}") from None
        if len(eps) != 2 or eps[0] < 0 or eps[1] < 0:
            raise ValueError(f"eps must be two non-negative numbers, got {eps}")
        _check_number("clip_threshold", clip_threshold, positive=True)
        _check_number("decay_rate", decay_rate)
        if decay_rate > 0:
            raise ValueError(f"decay_rate must be <= 0 (beta_t = 1 - t**decay_rate), got {decay_rate}")
        if loss_scale_args is not None and not isinstance(loss_scale_args, dict):
            raise TypeError(f"loss_scale_args must be a dict, got {type(loss_scale_args).__name__}")
        self.loss_scale = loss_scale
        self.loss_scale_args = dict(loss_scale_args or {})
        self.eps = eps
        self.clip_threshold = clip_threshold
        self.decay_rate = decay_rate
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, clip_grad_norm=clip_grad_norm,
                        clip_grad_value=clip_grad_value)
        super().__init__(model, defaults, lr=lr, clip_grad_norm=clip_grad_norm,
                         clip_grad_value=clip_grad_value, weight_decay=weight_decay,
                         skip_nonfinite=skip_nonfinite, stochastic_rounding=stochastic_rounding,
                         seed=seed, adaptive_clip=(adaptive_clip, adaptive_clip_decay,
                                                   adaptive_clip_warmup_steps,
                                                   adaptive_clip_absolute),
                         exclude=exclude)
        self._beta = None

    def _extra_settings(self):
        return {"loss_scale": self.loss_scale, "eps": self.eps,
                "clip_threshold": self.clip_threshold, "decay_rate": self.decay_rate,
                "loss_scale_args": self.loss_scale_args}

    def _enable_fp16(self):
        init = FP16_POLICY["init_scale"] if self.loss_scale is None else self.loss_scale or 1.0
        self.loss_scaler = DynamicLossScaler(**{**FP16_POLICY, "init_scale": init,
                                                **self.loss_scale_args})

    def _loss_scale(self):
        if self.loss_scaler is not None:
            return self.loss_scaler.loss_scale
        return self.loss_scale or None

    def _begin_step(self):
        t = self.step_num + 1
        self._beta = 1.0 - math.pow(t, self.decay_rate)

    @staticmethod
    def _expected_state_shapes(p):
        shape = tuple(p.shape)
        if len(shape) >= 2:
            return {"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]}
        return {"exp_avg_sq": shape}

    @staticmethod
    def _state_placements(spec, key):
        """Placements of a DTensor state entry: the parameter's, with reduced dims dropped."""
        nd = len(spec.shape)
        if key == "exp_avg_sq":
            return spec.placements
        # exp_avg_sq_row drops dim nd-1; exp_avg_sq_col drops dim nd-2.
        gone = nd - 1 if key == "exp_avg_sq_row" else nd - 2
        out = []
        for pl in spec.placements:
            if pl.is_shard():
                dim = pl.dim % nd
                if dim == gone:
                    out.append(_replicate())
                    continue
                out.append(_shard(dim - 1 if dim > gone else dim))
            else:
                out.append(pl)
        return tuple(out)

    def _place_state(self, name, p, key, value):
        spec = self._specs.get(name)
        if spec is None:
            return super()._place_state(name, p, key, value)
        from torch.distributed.tensor import DTensor, distribute_tensor

        placements = self._state_placements(spec, key)
        if isinstance(value, DTensor):  # e.g. from torch.distributed.checkpoint
            value = value.redistribute(spec.mesh, placements)
            return value.to(dtype=torch.float32, copy=True)
        # A full tensor (the same on every rank, e.g. a single-process state_dict): keep our part.
        full = value.detach().to(device=p.to_local().device, dtype=torch.float32, copy=True)
        return distribute_tensor(full, spec.mesh, placements, src_data_rank=None)

    def _state_for(self, p, name=None):
        state = self.state[p]
        if not state:
            spec = self._specs.get(name)
            for key, shape in self._expected_state_shapes(p).items():
                if spec is None:
                    state[key] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                else:
                    from torch.distributed.tensor import zeros
                    state[key] = zeros(shape, dtype=torch.float32, device_mesh=spec.mesh,
                                       placements=self._state_placements(spec, key))
        return state

    def _update(self, name, p, g):
        """One AdaLomo step of ``p`` from its fp32 gradient ``g`` (this rank's shard
        of a DTensor ``p``; its reductions then span the shards, see :class:`_Sharded`)."""
        spec = self._specs.get(name)
        red = _Dense if spec is None else _Sharded(spec)
        local = self._local(name, p)
        state = {k: red.local(v) for k, v in self._state_for(p, name).items()}
        w = self._fp32_view(local)
        update, p_rms = self._scaled_update(g, state, w, red)
        self._apply(w, update, p_rms)
        self._write_back(name, local, w)

    def _scaled_update(self, g, state, w, red):
        """Update the second moments from ``g``; return ``(update, rms(w))``, the
        update already divided by ``max(1, rms(update) / clip_threshold)``."""
        beta = self._beta
        u = g.square().add_(self.eps[0])
        if g.dim() >= 2:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            u_row, u_col, p_rms = red.factored_means(u, w)
            del u
            row.mul_(beta).add_(u_row, alpha=1.0 - beta)
            col.mul_(beta).add_(u_col, alpha=1.0 - beta)
            r = (row / red.row_mean(row)).rsqrt_().unsqueeze(-1)
            c = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r, c).mul_(g)
        else:
            p_rms = red.rms(w)
            v = state["exp_avg_sq"]
            v.mul_(beta).add_(u, alpha=1.0 - beta)
            del u
            update = v.rsqrt().mul_(g)
        u_rms = red.rms(update)
        update.div_((u_rms / self.clip_threshold).clamp_(min=1.0))
        return update, p_rms

    def _apply(self, w, update, p_rms):
        """``w = w * (1 - lr_t * wd) - lr_t * update`` with ``lr_t = lr * max(eps[1], rms(p))``.

        0-d tensors (no host sync); the floor branch is computed in float64 and
        rounded once, as lomo-optim does.
        """
        lr, wd, eps1 = self._step_lr, self.weight_decay, self.eps[1]
        above = p_rms > eps1
        lr_t = torch.where(above, p_rms * lr, lr * eps1)
        if wd > 0:
            w.mul_(torch.where(above, 1.0 - lr_t * wd, 1.0 - lr * eps1 * wd))
        w.addcmul_(update, lr_t.neg())  # w - lr_t * update, rounded once


class _Dense:
    """AdaLomo's reductions over a whole (unsharded) tensor."""

    @staticmethod
    def local(t):
        return t

    @staticmethod
    def factored_means(u, w):
        """``(u.mean(-1), u.mean(-2), rms(w))``."""
        return u.mean(dim=-1), u.mean(dim=-2), _rms(w)

    @staticmethod
    def row_mean(row):
        return row.mean(dim=-1, keepdim=True)

    rms = staticmethod(_rms)


class _Sharded:
    """AdaLomo's reductions over a DTensor's shards: local sums all-reduced over
    the groups that split the reduced dims, divided by the global size.
    Sums over the same groups share one collective."""

    def __init__(self, spec):
        self.spec = spec
        self.root_n = math.sqrt(spec.numel)

    @staticmethod
    def local(t):
        return t.to_local()

    def factored_means(self, u, w):
        spec, nd = self.spec, u.dim()
        row_sum, col_sum, p_sq = _sum_over_groups([
            (u.sum(dim=-1), spec.groups(nd - 1)),
            (u.sum(dim=-2), spec.groups(nd - 2)),
            (w.square().sum(), spec.all_groups),
        ])
        p_rms = p_sq.sqrt_() / self.root_n
        return row_sum.div_(spec.shape[-1]), col_sum.div_(spec.shape[-2]), p_rms

    def row_mean(self, row):
        spec = self.spec  # row's last dim is the parameter's dim nd - 2
        groups = spec.groups(len(spec.shape) - 2)
        (total,) = _sum_over_groups([(row.sum(dim=-1, keepdim=True), groups)])
        return total.div_(spec.shape[-2])

    def rms(self, x):
        (sq,) = _sum_over_groups([(x.square().sum(), self.spec.all_groups)])
        return sq.sqrt_() / self.root_n


def _shard(dim):
    from torch.distributed.tensor import Shard

    return Shard(dim)


def _replicate():
    from torch.distributed.tensor import Replicate

    return Replicate()
