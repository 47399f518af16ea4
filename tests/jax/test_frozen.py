"""Frozen leaves in the fused step (``lomo_jax.fused.frozen``): a leaf whose update
is a constant zero that reads no gradient gets no gradient, no updated copy and no
write, keeps every bit, and is outside ``clip_grad_norm``'s norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lomo_jax
from lomo_jax import models
from lomo_jax.fused.frozen import frozen_leaves
from lomo_jax.models import llama, lora
from tests.jax.builders import bits, reference_step, with_random_lora_b
from tests.jax.tiny_llama import TINY

LORA = lora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
UNIT = {"kernel": jnp.zeros((6, 5)), "lora_a": jnp.zeros((6, 2)), "lora_b": jnp.zeros((2, 5))}


def _by_name(fn):
    return lambda tree: {k: fn(k) for k in tree}


def _const(value):
    return optax.stateless(lambda u, p: jax.tree.map(lambda x: jnp.full_like(x, value), u))


@pytest.mark.parametrize("tx,frozen", [
    (lora.optimizer(base=None, adapters=optax.adamw(1e-3)), {"kernel"}),
    (lora.optimizer(base=lomo_jax.lomo(1e-3), adapters=optax.adamw(1e-3)), set()),
    (optax.multi_transform({"f": optax.set_to_zero(), "t": optax.sgd(1.0)},
                           _by_name(lambda k: "t" if "lora" in k else "f")), {"kernel"}),
    (optax.sgd(1.0), set()),
    (_const(1.0), set()),                                  # constant, not zero
    (optax.chain(optax.scale_by_adam(), optax.set_to_zero()), set()),  # state reads g
    (optax.chain(optax.set_to_zero(), optax.add_decayed_weights(0.1)), set()),  # reads params
])
def test_frozen_leaves_are_constant_zero_updates_that_read_no_gradient(tx, frozen):
    mask = frozen_leaves(tx, UNIT, tx.init(UNIT))
    assert {k for k, f in mask.items() if f} == frozen


def _lora_setup(seed=0):
    cfg0 = llama.LlamaConfig(**TINY)
    cfg = cfg0.replace(lora=LORA)
    p = lora.add_adapters(cfg, llama.init_params(cfg0, seed), rng=jax.random.key(7))
    return cfg, with_random_lora_b(p, scale=0.1)


def _batch(i, b=2, t=8):
    ids = jnp.asarray(np.random.default_rng(i).integers(0, TINY["vocab_size"], (b, t)), jnp.int32)
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("kw", [{}, {"clip_grad_norm": 1.0}, {"microbatches": 2}])
def test_frozen_base_has_no_gradient_and_no_copy(kw):
    """LoRA only, fp32, a vocabulary far wider than d_model: the step's
    temporaries stay below the embedding's own bytes (with the base updated by
    ``+ (-0.0)`` they held copies of the embedding and the head, and gradients of
    both: 4.4 MB against 0.35 MB at 8192 x 64)."""
    cfg = llama.LlamaConfig(**{**TINY, "vocab_size": 8192}, lora=LORA)
    params = jax.eval_shape(lambda: lora.add_adapters(
        cfg, llama.init_params(cfg.replace(lora=None), 0), rng=jax.random.key(0)))
    batch = jax.eval_shape(lambda: _batch(0, t=16))
    embed = params["embed"]["embedding"]
    tx = lora.optimizer(base=None, adapters=optax.adamw(1e-3, weight_decay=0.0))
    state = jax.eval_shape(lambda p: lomo_jax.fused_init(tx, p), params)
    step = lomo_jax.fused_train_step(models.layered_model(cfg), tx, **kw)
    m = step.lower(params, state, batch).compile().memory_analysis()
    assert m.temp_size_in_bytes < embed.size * embed.dtype.itemsize, m.temp_size_in_bytes


def test_clip_norm_covers_only_what_the_step_updates():
    """``clip_grad_norm`` with a frozen base: the norm of the adapters' gradients
    alone (== the unfused step with the base's gradients left out of the norm,
    to fp32 rounding); the whole gradient's norm clips differently."""
    cfg, p = _lora_setup()
    tx = lora.optimizer(base=None, adapters=optax.adamw(1e-2, weight_decay=0.0))
    lm = models.layered_model(cfg)

    def adapters(path):
        return lora.is_adapter(path)

    step = lomo_jax.fused_train_step(lm, tx, clip_grad_norm=0.05)
    runs = {}
    for name, fn in (("fused", step), ("adapters", reference_step(lm, tx, 0.05, norm_of=adapters)),
                     ("all", reference_step(lm, tx, 0.05))):
        params, state = jax.tree.map(jnp.copy, p), lomo_jax.fused_init(tx, p)
        for i in range(2):
            params, state, m = fn(params, state, _batch(i))
        runs[name] = (params, float(m["grad_norm"]))
    (fused, n), (ref, n_ref), (whole, n_all) = runs["fused"], runs["adapters"], runs["all"]
    np.testing.assert_allclose(n, n_ref, rtol=1e-5)
    assert n_all > 1.5 * n_ref and n_ref > 0.05  # the two norms clip differently
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), fused, ref)
    a = np.asarray(fused["layers"]["self_attn"]["q_proj"]["lora_a"])
    assert not np.allclose(a, whole["layers"]["self_attn"]["q_proj"]["lora_a"], rtol=1e-3)


def test_set_to_zero_leaves_keep_every_bit_in_the_fused_step():
    """``optax.set_to_zero()`` freezes too: a ``-0.0`` weight stays ``-0.0`` (the
    step no longer adds ``+0.0`` to it) and the frozen embedding keeps its bits."""
    cfg = llama.LlamaConfig(**TINY)
    p = llama.init_params(cfg, 0)
    p["embed"]["embedding"] = p["embed"]["embedding"].at[3, :4].set(-0.0)
    labels = jax.tree.map(lambda _: "train", p)
    labels["embed"] = jax.tree.map(lambda _: "freeze", p["embed"])
    tx = optax.multi_transform({"train": lomo_jax.lomo(1e-2), "freeze": optax.set_to_zero()},
                               labels)
    before = bits(p["embed"])
    params, state, _ = lomo_jax.fused_train_step(models.layered_model(cfg), tx, skip_nonfinite=True)(
        jax.tree.map(jnp.copy, p), lomo_jax.fused_init(tx, p, skip_nonfinite=True), _batch(0))
    assert bits(params["embed"]) == before
    assert np.signbit(np.asarray(params["embed"]["embedding"])[3, :4]).all()
    assert bits(params["layers"]) != bits(p["layers"])
