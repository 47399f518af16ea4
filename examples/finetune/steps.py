"""The main job's training steps: the schedule, the optimizer with ``--clip``, the fused or
unfused step compiled ahead of time, and their compiled memory."""

from __future__ import annotations

import jax
import optax

import lomo_jax
from lomo_jax import aot

from finetune.lora_mode import lora_transform, step_label


def make_schedule(kind, lr, steps, warmup=None):
    """Linear warmup from 0 over ``warmup`` steps (default ``max(1, steps // 10)``), then
    ``kind``: ``cosine``/``linear`` decay to ``lr / 10`` at the last step, or ``constant``."""
    warmup = max(1, steps // 10) if warmup is None else warmup
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr / 10)
    rest = max(1, steps - warmup)
    after = (optax.constant_schedule(lr) if kind == "constant"
             else optax.linear_schedule(lr, lr / 10, rest))
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def transform(name, schedule):
    if name == "adalomo":
        return lomo_jax.adalomo(schedule, weight_decay=0.0)
    if name == "lomo":
        return lomo_jax.lomo(schedule)
    return optax.adamw(schedule, weight_decay=0.01)


def adaptive_clip_warmup(args):
    """``--adaptive-clip-warmup``, or the learning rate's warmup steps (at least 1)."""
    if args.adaptive_clip_warmup is not None:
        return args.adaptive_clip_warmup
    warmup = args.warmup_steps if args.warmup_steps is not None else args.steps // 10
    return max(1, warmup)


def with_clip(args, tx, fused):
    """``(tx, clip_grad_norm)`` for ``args.clip``: ``adaptive`` chains ``adaptive_clip`` in
    front of ``tx`` (unfused, through ``per_layer`` on the stacked layers: one scalar a
    layer's tensor, as the fused step keeps); ``global`` gives the threshold (the fused
    step's two passes, or ``optax.clip_by_global_norm`` unfused); ``none`` neither."""
    if args.clip == "global":
        return tx, args.clip_grad_norm
    if args.clip == "none":
        return tx, None
    clip = lomo_jax.adaptive_clip(warmup_steps=adaptive_clip_warmup(args))
    if not fused:
        clip = optax.multi_transform(
            {"layers": lomo_jax.per_layer(clip), "single": clip},
            lambda p: {k: "layers" if k == "layers" else "single" for k in p})
    return optax.chain(clip, tx), None


def unfused_step(lm, tx, clip):
    """``jax.value_and_grad`` of the whole model, then ``tx`` (after global-norm clipping at
    ``clip``, if not None): every gradient is alive at once (the baseline the fused step is
    measured against)."""
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: lm.loss(p, batch, remat=True))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss}

    return jax.jit(step, donate_argnums=(0, 1)), tx.init


def run_transform(args, schedule):
    """``--optimizer``'s transform at ``schedule``; with ``--lora``, inside
    ``lora.optimizer`` beside the adapters' AdamW at ``--lora-lr`` (same schedule shape)."""
    tx = transform(args.optimizer, schedule)
    if args.lora is None:
        return tx
    adapters = make_schedule(args.schedule, args.lora_lr, args.steps, args.warmup_steps)
    return lora_transform(args, tx, adapters)


def build_step(args, lm, schedule):
    fused = args.optimizer != "adamw"
    tx, clip = with_clip(args, run_transform(args, schedule), fused)
    if not fused:
        return unfused_step(lm, tx, clip)
    step = lomo_jax.fused_train_step(lm, tx, clip_grad_norm=clip, rounding=args.rounding,
                                     microbatches=args.microbatches)
    key = jax.random.key(args.seed)
    return step, lambda p: lomo_jax.fused_init(tx, p, rng=key)


def compile_step(step, init, params, batch):
    """Compile ``step`` ahead of time on abstract shapes (nothing allocated)."""
    shapes = aot.abstract(params, None)
    return step.lower(shapes, jax.eval_shape(init, shapes), aot.abstract(batch, None)).compile()


def step_bytes(compiled):
    """``(total, temp)`` bytes of one compiled step from XLA's ``memory_analysis()``:
    total = arguments + outputs + temporaries - outputs aliased to donated inputs."""
    m = aot.MemoryFigures.of(compiled)
    return m.total, m.temporaries


def memory_report(args, lm, params, batch, schedule, compiled, base=None):
    """Compiled memory of the fused steps against whole-model gradients, each with
    ``args.clip`` (``compiled``: the training step already compiled for ``args.optimizer``).
    A ``--lora`` run passes ``base``, ``(lm, params)`` of the model without adapters: its
    own step comes first (:func:`step_label`), the other rows are the base model's."""
    rows = {}
    if base is not None:
        rows[step_label(args)] = step_bytes(compiled)
        lm, params = base
    for label, name in (("fused AdaLomo", "adalomo"), ("fused LOMO", "lomo")):
        if name == args.optimizer and base is None:
            rows[label] = step_bytes(compiled)
            continue
        tx, clip = with_clip(args, transform(name, schedule), fused=True)
        step = lomo_jax.fused_train_step(lm, tx, clip_grad_norm=clip,
                                         microbatches=args.microbatches)
        init = lambda p, tx=tx: lomo_jax.fused_init(tx, p)  # noqa: E731
        rows[label] = step_bytes(compile_step(step, init, params, batch))
    for label, name, tx in (("value_and_grad + SGD", "sgd", optax.sgd(schedule)),
                            ("value_and_grad + AdamW", "adamw", transform("adamw", schedule))):
        if name == args.optimizer:
            rows[label] = step_bytes(compiled)
            continue
        step, init = unfused_step(lm, *with_clip(args, tx, fused=False))
        rows[label] = step_bytes(compile_step(step, init, params, batch))
    return rows
