r"""What a LoRA adapter is: :class:`LoraConfig`, and the layer that applies it.

A targeted projection :math:`y = x W + b` becomes

.. math:: y = x W + b + \frac{\alpha}{r} (x A) B, \qquad
          A \in \mathbb{R}^{d_\mathrm{in} \times r},\ B \in \mathbb{R}^{r \times d_\mathrm{out}}

(PEFT's ``LoraLayer`` with ``use_rslora=False``). :class:`LoraLinear` is
``nnx.Linear`` with the two extra Params ``lora_a`` and ``lora_b``; the
decoder builds it for the projections named in ``LoraConfig.targets``, so a
stacked model's adapters sit beside their kernels in ``params["layers"]``::

    params["layers"]["self_attn"]["q_proj"] == {"kernel": [L, D, H*d],
                                                "lora_a": [L, D, r], "lora_b": [L, r, H*d]}

Example::

    from lomo_jax.models.lora import LoraConfig
    cfg = cfg.replace(lora=LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj")))
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["LORA_TARGETS", "LoraConfig", "LoraLinear", "dropout", "lora_path",
           "set_dropout_keys"]

#: every projection a LoRA can target (the Hugging Face module name) -> its
#: branch in a decoder layer's params
LORA_TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    r"""A LoRA adapter on some projections of every decoder layer.

    Attributes:
      rank: :math:`r`, the adapter's inner size (a positive int).
      alpha: :math:`\alpha`; the adapter's output is scaled by :math:`\alpha / r`.
      targets: the Hugging Face module names of the adapted projections, as
        PEFT's ``target_modules`` (any of :data:`LORA_TARGETS`); stored sorted.
      dropout: PEFT's ``lora_dropout`` (carried to and from ``adapter_config.json``):
        in training, the adapter's input is :math:`m \odot x / (1 - p)` with a
        Bernoulli(:math:`1 - p`) mask :math:`m` per targeted projection, as
        PEFT's ``lora_dropout`` module; the base path :math:`x W` sees :math:`x`.
        It needs a key: :func:`lomo_jax.models.layered_model`'s layer then takes
        ``key`` (the fused step's ``key=`` or ``fused_init(..., rng=...)``).
        Inference (``models.logits``, ``generate``, ``llama_loss``) applies no
        dropout, as PyTorch's eval mode.
    """

    rank: int
    alpha: float
    targets: tuple
    dropout: float = 0.0

    def __post_init__(self):
        if not _is_number(self.rank, numbers.Integral) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be a positive int, got {self.rank!r}.")
        if not _is_number(self.alpha, numbers.Real) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise ValueError(f"LoraConfig.alpha must be a positive number, got {self.alpha!r}.")
        targets = _targets_tuple(self.targets)
        unknown = [t for t in targets if not isinstance(t, str) or t not in LORA_TARGETS]
        if not targets or unknown:
            raise ValueError(f"LoraConfig.targets={list(targets)}: each must be one of "
                             f"{sorted(LORA_TARGETS)} (unknown: {unknown}).")
        if not _is_number(self.dropout, numbers.Real) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "targets", tuple(sorted(set(targets))))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scale(self) -> float:
        r""":math:`\alpha / r`."""
        return self.alpha / self.rank


def _is_number(x, kind) -> bool:
    """``x`` is a ``kind`` number (``numbers.Integral``/``Real``), not a bool."""
    return isinstance(x, kind) and not isinstance(x, bool)


def _targets_tuple(targets) -> tuple:
    """``targets`` as a tuple: one name, or an iterable of names."""
    if isinstance(targets, str):
        return (targets,)
    try:
        return tuple(targets)
    except TypeError:
        raise ValueError(f"LoraConfig.targets must be a module name or a sequence of them "
                         f"(any of {sorted(LORA_TARGETS)}), got {targets!r}.") from None


#: the projections whose output :class:`LoraLinear` materialises (``xW + s(xA)B`` as
#: one array, ``lax.optimization_barrier``): the MLP's gate and up, which feed its
#: gating. Else XLA keeps the low-rank term apart until the gating's fused backward,
#: a ``[B, T, d_ff]`` array more: LoRA + LOMO at LLaMA-7B 8 x 512, rtx4090 target,
#: +151 -> +66 MiB beyond the adapters' bytes (LoRA only +55 either way; the same
#: barrier on q/k/v/o or down_proj gains nothing or costs 2 MiB), values unchanged.
SUMMED_AT_ONCE = ("gate_proj", "up_proj")


def lora_path(target: str) -> tuple:
    """The path of ``target``'s projection inside one decoder layer's params,
    e.g. ``("self_attn", "q_proj")``."""
    return (LORA_TARGETS[target], target)


def adapter_dtype(kernel_dtype) -> jnp.dtype:
    """An adapter's dtype beside a ``kernel_dtype`` kernel: fp32 at least (PEFT's
    ``autocast_adapter_dtype``: bf16/fp16 adapters would lose AdamW's small
    updates to rounding); the adapters are cast to the compute dtype in the forward."""
    return jnp.promote_types(kernel_dtype, jnp.float32)


def kaiming_uniform_a5(key, shape, dtype=jnp.float32):
    r"""PEFT's initialisation of ``lora_A`` (``kaiming_uniform_(a=sqrt(5))``):
    :math:`U(-1/\sqrt{d_\mathrm{in}}, 1/\sqrt{d_\mathrm{in}})` for a ``[d_in, r]`` factor."""
    bound = 1.0 / math.sqrt(shape[-2])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class LoraLinear(nnx.Linear):
    r""":math:`x W + b + \frac{\alpha}{r} (x A) B`: ``nnx.Linear`` plus ``lora_a`` ``[d_in, r]``
    (PEFT's Kaiming-uniform) and ``lora_b`` ``[r, d_out]`` (zero; both fp32 at least,
    see :func:`adapter_dtype`), so a fresh
    adapter leaves the output unchanged. The adapter is computed in the
    layer's ``dtype``."""

    def __init__(self, in_features, out_features, *, lora: LoraConfig, rngs: nnx.Rngs,
                 name=None, **kw):
        super().__init__(in_features, out_features, rngs=rngs, **kw)
        pdt = adapter_dtype(kw.get("param_dtype", jnp.float32))
        self.lora_scale = lora.scale
        self.lora_dropout = lora.dropout  # applied with a ``dropout_key`` (set_dropout_keys)
        self.materialized = name in SUMMED_AT_ONCE
        self.lora_a = nnx.Param(kaiming_uniform_a5(rngs.params(), (in_features, lora.rank), pdt))
        self.lora_b = nnx.Param(jnp.zeros((lora.rank, out_features), pdt))

    def __call__(self, x):
        y = super().__call__(x)
        dt = self.dtype or y.dtype
        a, b = self.lora_a[...].astype(dt), self.lora_b[...].astype(dt)
        x = dropout(x.astype(dt), self.lora_dropout, getattr(self, "dropout_key", None))
        y = y + ((x @ a) @ b) * jnp.asarray(self.lora_scale, dt)
        return jax.lax.optimization_barrier(y) if self.materialized else y


def dropout(x, rate: float, key):
    """Inverted dropout: ``x`` kept with probability ``1 - rate`` and scaled by
    ``1 / (1 - rate)`` (``torch.nn.Dropout`` in training); ``x`` itself when
    ``key`` is None or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def set_dropout_keys(module, key) -> None:
    """Give each :class:`LoraLinear` inside ``module`` (a merged branch, built for one
    call) its own key, ``fold_in(key, j)`` for the ``j``-th by path: independent masks
    per projection, as PEFT's one ``lora_dropout`` module per adapted layer."""
    adapted = sorted(((path, m) for path, m in nnx.iter_modules(module)
                      if isinstance(m, LoraLinear)), key=lambda pm: tuple(map(str, pm[0])))
    for j, (_, m) in enumerate(adapted):
        m.dropout_key = jax.random.fold_in(key, j)
