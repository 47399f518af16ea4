"""Reliability of the fused step: injected fp16 overflow (a huge loss, an inf
in one layer's gradient) skips the step bit-for-bit and the loss scale halves
and recovers - with the same skip/scale sequence in lomo_torch -; the
non-finite guard for bf16/fp32 with its counter; non-finite learning-rate
schedules; reusing donated arrays; remaining bad-input messages.

The model is tiny (3 layers of width 8) so that each compiled step is cheap.
Overflow is injected through the batch, so one compiled step serves clean and
poisoned steps alike:

* ``batch["loss_mult"]`` multiplies the (fp32) loss: ``1e30`` makes the loss
  huge but finite, and its fp16 cotangents overflow; ``nan`` makes the loss
  itself non-finite.
* ``batch["gscale"][i]`` multiplies the gradient of layer ``i``'s ``w1`` in the
  backward pass only (a custom VJP: the forward pass and every other gradient
  are untouched); ``inf`` puts an inf/NaN into that one layer's gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import lomo_jax
import lomo_torch
from lomo_jax.fused import LayeredModel, fused_init, fused_train_step

L, D, V, B, T = 3, 8, 11, 2, 4


# --------------------------------------------------------------------------
# The JAX model
# --------------------------------------------------------------------------


@jax.custom_vjp
def grad_scale(w, f):
    return w


def _gs_fwd(w, f):
    return w, f


def _gs_bwd(f, ct):
    return ct * f.astype(ct.dtype), jnp.zeros_like(f)


grad_scale.defvjp(_gs_fwd, _gs_bwd)


def embed(p, batch):
    return p["tok"][batch["ids"]], jnp.zeros([], jnp.float32)


def layer(p, h, batch):
    x, i = h
    w1 = grad_scale(p["w1"], batch["gscale"][i.astype(jnp.int32)])
    return x + jnp.tanh(x @ w1) @ p["w2"], i + 1.0


def head(p, h, batch):
    logits = (h[0] @ p["out"]).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return loss * batch["loss_mult"]


MODEL = LayeredModel(embed, layer, head)


def init_numpy(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "tok": rng.normal(size=(V, D)).astype(np.float32),
        "w1": (rng.normal(size=(L, D, D)) * 0.4).astype(np.float32),
        "w2": (rng.normal(size=(L, D, D)) * 0.4).astype(np.float32),
        "out": (rng.normal(size=(D, V)) * 0.4).astype(np.float32),
    }


def jax_params(dtype, seed=0):
    a = {k: jnp.asarray(v, dtype) for k, v in init_numpy(seed).items()}
    return {"embed": {"tok": a["tok"]}, "layers": {"w1": a["w1"], "w2": a["w2"]},
            "head": {"out": a["out"]}}


def batch_np(i, loss_mult=1.0, bad_layer=None):
    rng = np.random.default_rng(100 + i)
    gscale = np.ones((L,), np.float32)
    if bad_layer is not None:
        gscale[bad_layer] = np.inf
    return {
        "ids": rng.integers(0, V, size=(B, T)).astype(np.int32),
        "labels": rng.integers(0, V, size=(B, T)).astype(np.int32),
        "gscale": gscale,
        "loss_mult": np.float32(loss_mult),
    }


def jax_batch(b):
    return {k: jnp.asarray(v) for k, v in b.items()}


def bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


# Steps 1 (huge loss), 2 (inf in layer 1's gradient) and 5 (inf in layer 0's)
# overflow; window 2: the scale halves twice, doubles after steps 3-4, halves at
# 5 and doubles after 6-7.
INJECT = {1: dict(loss_mult=1e30), 2: dict(bad_layer=1), 5: dict(bad_layer=0)}
N_STEPS, WINDOW, SCALE0 = 8, 2, 2.0**10
EXPECTED_SKIPPED = [False, True, True, False, False, True, False, False]
EXPECTED_SCALES = [1024.0, 1024.0, 512.0, 256.0, 256.0, 512.0, 256.0, 256.0]


def test_fp16_injected_overflow_fused_step():
    tx = lomo_jax.adalomo(5e-2)
    params = jax_params(jnp.float16)
    state = fused_init(tx, params, loss_scale=SCALE0)
    step = fused_train_step(MODEL, tx, clip_grad_norm=1.0, loss_scale_window=WINDOW)
    skipped, scales = [], []
    for i in range(N_STEPS):
        before = bits((params, state._replace(loss_scale=None)))
        params, state, m = step(params, state, jax_batch(batch_np(i, **INJECT.get(i, {}))))
        skipped.append(bool(m["skipped"]))
        scales.append(float(m["loss_scale"]))
        after = bits((params, state._replace(loss_scale=None)))
        if skipped[-1]:
            assert after == before, f"step {i}: a skipped step changed params or state"
            assert not np.isfinite(float(m["grad_norm"]))
        else:
            assert after != before
        if i == 1:
            assert np.isfinite(float(m["loss"])) and float(m["loss"]) > 1e29  # huge, finite
    assert skipped == EXPECTED_SKIPPED
    assert scales == EXPECTED_SCALES
    assert float(state.loss_scale.scale) == 512.0  # recovered after the last window
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(params))


# --------------------------------------------------------------------------
# The same injection in lomo_torch
# --------------------------------------------------------------------------


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, f):
        ctx.f = f
        return w.view_as(w)

    @staticmethod
    def backward(ctx, ct):
        return ct * ctx.f, None


class TorchTiny(torch.nn.Module):
    """The JAX model above, parameter for parameter."""

    def __init__(self, arrays, dtype):
        super().__init__()
        t = lambda a: torch.nn.Parameter(torch.from_numpy(np.array(a)).to(dtype))  # noqa: E731
        self.tok = t(arrays["tok"])
        self.w1 = torch.nn.ParameterList([t(w) for w in arrays["w1"]])
        self.w2 = torch.nn.ParameterList([t(w) for w in arrays["w2"]])
        self.out = t(arrays["out"])

    def forward(self, b):
        x = self.tok[torch.from_numpy(b["ids"]).long()]
        for i in range(L):
            w1 = _GradScale.apply(self.w1[i], float(b["gscale"][i]))
            x = x + torch.tanh(x @ w1) @ self.w2[i]
        logits = (x @ self.out).float()
        labels = torch.from_numpy(b["labels"]).long()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1))
        return loss * float(b["loss_mult"])


def test_fp16_injected_overflow_lomo_torch_same_sequence():
    model = TorchTiny(init_numpy(), torch.float16)
    opt = lomo_torch.AdaLomo(model, lr=5e-2, clip_grad_norm=1.0, loss_scale=SCALE0,
                             loss_scale_args={"scale_window": WINDOW})
    skipped, scales = [], []
    for i in range(N_STEPS):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        before_state = {n: {k: v.clone() for k, v in s.items()}
                        for n, s in opt.state_dict()["state"].items()}
        loss = model(batch_np(i, **INJECT.get(i, {})))
        scale = None if opt.loss_scaler is None else float(opt.loss_scaler.loss_scale)
        opt.grad_norm(loss)
        updated = opt.fused_backward(loss, 5e-2)
        scales.append(scale if scale is not None else SCALE0)
        skipped.append(not updated)
        if not updated:
            for n, p in model.named_parameters():
                assert torch.equal(p, before[n]), (i, n)
            state = opt.state_dict()["state"]
            for n, s in before_state.items():
                for k, v in s.items():
                    assert torch.equal(state[n][k], v), (i, n, k)
    assert skipped == EXPECTED_SKIPPED
    assert scales == EXPECTED_SCALES
    assert opt.loss_scaler.loss_scale == 512.0
    assert opt.step_num == EXPECTED_SKIPPED.count(False)


# --------------------------------------------------------------------------
# The non-finite guard for bf16 / fp32
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_nonfinite_guard_skips_and_counts(dtype):
    tx = lomo_jax.adalomo(optax.linear_schedule(5e-2, 1e-2, 10), weight_decay=0.01)
    params = jax_params(dtype)
    state = fused_init(tx, params, skip_nonfinite=True)
    assert state.loss_scale is None and int(state.nonfinite_steps) == 0
    step = fused_train_step(MODEL, tx, skip_nonfinite=True)
    plan = [{}, dict(bad_layer=2), dict(loss_mult=np.nan), dict(loss_mult=np.inf), {}]
    skipped, counts = [], []
    for i, inject in enumerate(plan):
        before = bits((params, state._replace(nonfinite_steps=None)))
        params, state, m = step(params, state, jax_batch(batch_np(i, **inject)))
        skipped.append(bool(m["skipped"]))
        counts.append(int(m["nonfinite_steps"]))
        after = bits((params, state._replace(nonfinite_steps=None)))
        assert (after == before) == skipped[-1], i
    assert skipped == [False, True, True, True, False]
    assert counts == [0, 1, 2, 3, 3]
    assert int(state.nonfinite_steps) == 3
    # the AdaLomo step count advanced only on the two clean steps
    assert int(state.head[0].count) == 2
    assert all(x.dtype == dtype for x in jax.tree.leaves(params))


def test_nonfinite_guard_is_in_place_and_needs_the_counter():
    tx = lomo_jax.lomo(1e-2)
    params = jax_params(jnp.float32)
    step = fused_train_step(MODEL, tx, skip_nonfinite=True)
    with pytest.raises(ValueError, match=r"fused_init\(tx, params, skip_nonfinite=True\)"):
        step(params, fused_init(tx, params), jax_batch(batch_np(0)))
    state = fused_init(tx, params, skip_nonfinite=True)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          (params, state, jax_batch(batch_np(0))))
    mem = step.lower(*shapes).compile().memory_analysis()
    # every donated parameter and state buffer is reused for the outputs
    assert mem.alias_size_in_bytes == sum(x.nbytes for x in jax.tree.leaves((params, state)))
    with pytest.raises(TypeError, match="skip_nonfinite must be a bool"):
        fused_train_step(MODEL, tx, skip_nonfinite=1)


# --------------------------------------------------------------------------
# Learning-rate schedules that return non-finite values
# --------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lomo_jax.lomo, lomo_jax.adalomo])
def test_nonfinite_learning_rate_is_refused_eagerly(make):
    with pytest.raises(ValueError, match=r"schedule returned inf at step 0"):
        make(lambda count: 1e-2 / count)  # the step count starts at 0
    with pytest.raises(ValueError, match=r"schedule returned nan at step 1"):
        make(lambda count: jnp.where(count >= 1, jnp.nan, 1e-2))
    with pytest.raises(ValueError, match="learning_rate must be a finite number, got nan"):
        make(float("nan"))
    with pytest.raises(ValueError, match="learning_rate must be a finite number, got inf"):
        make(jnp.inf)
    make(optax.cosine_decay_schedule(1e-2, 100))  # fine schedules pass


def test_nonfinite_learning_rate_later_is_skipped_by_the_guard():
    """A schedule that turns NaN at step 3 (past the eager check, and in a
    plain optax transform that has none): the guard sees the head's update go
    non-finite before anything is written, skips and counts; the transform's
    count does not advance, so every later step is skipped too."""
    schedule = lambda count: jnp.where(count >= 3, jnp.nan, 1e-2)  # noqa: E731
    tx = optax.sgd(schedule, momentum=0.9)
    params = jax_params(jnp.float32)
    state = fused_init(tx, params, skip_nonfinite=True)
    step = fused_train_step(MODEL, tx, skip_nonfinite=True)
    skipped = []
    for i in range(5):
        before = bits(params)
        params, state, m = step(params, state, jax_batch(batch_np(i)))
        skipped.append(bool(m["skipped"]))
        assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
        if skipped[-1]:
            assert bits(params) == before
    assert skipped == [False, False, False, True, True]
    assert int(state.nonfinite_steps) == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


# --------------------------------------------------------------------------
# Donated arrays
# --------------------------------------------------------------------------


def test_reusing_donated_arrays_says_what_happened():
    tx = lomo_jax.adalomo(1e-2)  # a state with arrays (lomo(1e-2)'s state has none)
    params = jax_params(jnp.float32)
    state = fused_init(tx, params)
    step = fused_train_step(MODEL, tx)
    batch = jax_batch(batch_np(0))
    new_params, new_state, _ = step(params, state, batch)
    with pytest.raises(RuntimeError, match=(
            r"params\['embed'\]\['tok'\].* and \d+ more have been deleted: "
            r"params/opt_state were donated to "
            r"the previous step.*params, opt_state, metrics = step\(params, opt_state, batch\)")):
        step(params, state, batch)
    with pytest.raises(RuntimeError, match=r"opt_state.*deleted.*donated"):
        step(new_params, state, batch)
    batch["ids"].delete()
    with pytest.raises(RuntimeError, match=r"batch\['ids'\] has been deleted"):
        step(new_params, new_state, batch)
    # the returned values work; the wrapper forwards jit's API and works under tracing
    new_params, new_state, _ = step(new_params, new_state, jax_batch(batch_np(1)))
    assert callable(step.lower) and callable(step.trace) and callable(step.eval_shape)
    out = jax.eval_shape(lambda p, s, b: step(p, s, b), new_params, new_state,
                         jax_batch(batch_np(2)))
    assert jax.tree.structure(out[0]) == jax.tree.structure(new_params)


# --------------------------------------------------------------------------
# Bad input not covered in test_fused.py
# --------------------------------------------------------------------------


def test_layer_leaf_without_layer_axis_and_empty_layers():
    params = jax_params(jnp.float32)
    params["layers"]["gain"] = jnp.ones([], jnp.float32)
    with pytest.raises(ValueError, match=r"params\['layers'\]\['gain'\] is a scalar.*leading layer axis"):
        fused_init(lomo_jax.lomo(1e-2), params)
    params = jax_params(jnp.float32)
    params["layers"] = {}
    with pytest.raises(ValueError, match="params\\['layers'\\] has no arrays"):
        fused_init(lomo_jax.lomo(1e-2), params)
    with pytest.raises(ValueError, match="exactly the keys.*got list"):
        fused_init(lomo_jax.lomo(1e-2), [jax_params(jnp.float32)])
