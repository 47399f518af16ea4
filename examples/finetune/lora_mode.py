"""The main job's LoRA modes (``--lora RANK``): the adapters added to the loaded model, the
optimizer that trains them (and the base weights, unless ``--lora-only``), what the run
reports, and the two things it writes: the merged model and the adapter in PEFT's format.

Modes (the report's ``mode``): ``lomo`` (the fused ``--optimizer`` on every weight; ``adamw``
for the unfused baseline), ``lora`` (``--lora-only``: the base frozen, the adapters trained
with AdamW) and ``lora+lomo`` (the adapters with AdamW, every base weight with the fused
``--optimizer``, in the same backward), as the original LOMO repository offers them.
"""

from __future__ import annotations

from pathlib import Path

import jax
import optax

from lomo_jax.models import lora

ADAPTER_STREAM = 1  # the adapters' init key: fold_in(key(--seed), 1), apart from the step's key


def run_mode(args) -> str:
    """``lomo``, ``lora`` or ``lora+lomo`` (``adamw`` for the unfused baseline)."""
    if args.lora is None:
        return "adamw" if args.optimizer == "adamw" else "lomo"
    return "lora" if args.lora_only else "lora+lomo"


def lora_config(args):
    """The :class:`lomo_jax.models.lora.LoraConfig` of ``--lora``, or None without it."""
    if args.lora is None:
        return None
    return lora.LoraConfig(rank=args.lora, alpha=args.lora_alpha, targets=tuple(args.lora_targets))


def with_adapters(args, cfg, params):
    """``(cfg, params)`` with fresh adapters (PEFT's initialisation: ``lora_b = 0``, so the
    model computes what it did) for a ``--lora`` run; unchanged otherwise."""
    config = lora_config(args)
    if config is None:
        return cfg, params
    cfg = cfg.replace(lora=config)
    key = jax.random.fold_in(jax.random.key(args.seed), ADAPTER_STREAM)
    return cfg, lora.add_adapters(cfg, params, rng=key)


def lora_transform(args, base_tx, adapters_schedule):
    """``base_tx`` for a run without ``--lora``; else ``lora.optimizer``: AdamW (no weight
    decay, as PEFT with transformers' Trainer) on the adapters at ``adapters_schedule``, and
    ``base_tx`` on the base weights, or nothing with ``--lora-only`` (frozen: no update, no
    optimizer state)."""
    if args.lora is None:
        return base_tx
    adapters = optax.adamw(adapters_schedule, weight_decay=0.0)
    return lora.optimizer(base=None if args.lora_only else base_tx, adapters=adapters)


def adapter_count(params) -> int:
    """How many adapter parameters ``params`` holds (the leaves :func:`lora.is_adapter` names)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum(x.size for path, x in leaves if lora.is_adapter(path))


def step_label(args) -> str:
    """The memory table's name for a ``--lora`` run's step."""
    if args.lora_only:
        return f"fused LoRA (rank {args.lora})"
    return f"fused LoRA (rank {args.lora}) + {'AdaLomo' if args.optimizer == 'adalomo' else 'LOMO'}"


def describe_run(args) -> str:
    """The run in a few words: ``--optimizer``, or :func:`step_label`'s without "fused"."""
    return args.optimizer if args.lora is None else step_label(args).removeprefix("fused ")


def export_note(args) -> str:
    """What the job's last line adds about the adapter of a ``--lora`` run."""
    if args.lora is None:
        return ""
    if args.lora_only:
        return f"; the adapters merged in, and in PEFT's format in adapter/ (on {args.model})"
    return ("; the adapters merged in, and in PEFT's format in adapter/ (on this run's trained "
            "base, which only the merged model holds)")


def describe_mode(args, params) -> str:
    """What trains what, for the job's first line."""
    if args.lora is None:
        return f"optimizer: {args.optimizer}"
    base = "base frozen" if args.lora_only else f"{args.optimizer} on the base"
    return (f"{run_mode(args)}: {base}, AdamW at {args.lora_lr:g} on rank-{args.lora} adapters "
            f"(alpha {args.lora_alpha:g}) of {','.join(args.lora_targets)}, "
            f"{adapter_count(params):,} parameters")


def lora_report(args, params) -> dict:
    """The report's ``mode`` and ``lora`` (null without ``--lora``): rank, alpha, targets,
    the adapters' learning rate and parameter count, where the adapter was written and
    the base it applies to (:func:`adapter_base`)."""
    if args.lora is None:
        return {"mode": run_mode(args), "lora": None}
    return {"mode": run_mode(args),
            "lora": {"rank": args.lora, "alpha": args.lora_alpha,
                     "targets": list(args.lora_targets), "lr": args.lora_lr,
                     "frozen_base": bool(args.lora_only),
                     "adapter_parameters": adapter_count(params), "adapter_dir": "adapter",
                     "adapter_base": adapter_base(args)}}


def adapter_base(args):
    """The base model the adapter applies to (its ``base_model_name_or_path``): ``--model``
    with ``--lora-only``; None for LoRA + LOMO, whose base weights this run trained too
    (they are not written apart: the merged model in OUT holds base + adapter)."""
    return str(Path(args.model).resolve()) if args.lora_only else None


def split_for_export(args, out, cfg, params):
    """``(cfg, params)`` to save as the transformers checkpoint: a LoRA model's adapter is
    first written to ``out/adapter`` (``lora.save_adapter``: PEFT's format, on
    :func:`adapter_base`), then merged into its kernels (``lora.merge``); a model without
    adapters as it is."""
    if cfg.lora is None:
        return cfg, params
    lora.save_adapter(cfg, params, str(Path(out) / "adapter"),
                      base_model_name_or_path=adapter_base(args))
    return lora.merge(cfg, params)
