"""fused_train_step(..., microbatches=M): gradient accumulation inside the layer scan.

The M-micro-batch step must equal the one-batch step (M = 1, itself tested
against value_and_grad in test_fused.py) on the same batch, for LOMO, AdaLomo
and AdamW, with and without clipping, tied and untied; the loss is the whole
batch's, token-weighted, also when padding leaves the micro-batches unequal;
fp16 loss scaling skips the whole step on one overflow anywhere; a mesh gives
the same numbers; and the layer working set shrinks with M.
"""

import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lomo_jax
from lomo_jax import aot
from lomo_jax.fused import fused_init, fused_train_step
from lomo_jax.models import llama
from tests.jax import builders as tf
from tests.jax.cpu_devices import QUICK_COMPILE_FLAGS, cpu_devices_env
from tests.jax.gpu_target import COMPILES_FOR_GPU, rtx4090_mesh

B = 8  # rows; micro-batches of 4, 2 and 1


def batch(seed):
    rng = np.random.default_rng(300 + seed)
    return {"ids": jnp.asarray(rng.integers(0, tf.V, size=(B, tf.T)), jnp.int32),
            "labels": jnp.asarray(rng.integers(0, tf.V, size=(B, tf.T)), jnp.int32)}


def run(name, clip, tied, m, steps=3):
    tx = tf.TRANSFORMS[name]()
    params = tf.make_params(tied=tied)
    state = fused_init(tx, params)
    step = fused_train_step(tf.make_model(tied), tx, clip_grad_norm=clip, microbatches=m)
    metrics = []
    for i in range(steps):
        params, state, met = step(params, state, batch(i))
        metrics.append(met)
    return params, state, metrics


# every pair of (transform, clip), (transform, tied) and (clip, tied) once, each
# with one micro-batch count (2, 4 and 8 among them): six cases of one
# comparison each, not twelve of two (CI time); each transform runs clipped and
# unclipped, tied and untied, and at two counts.
CASES = [("lomo", None, True, 2), ("lomo", 0.5, False, 8), ("adalomo", 0.5, True, 8),
         ("adalomo", None, False, 2), ("adamw", 0.5, False, 4), ("adamw", None, True, 8)]


@pytest.mark.parametrize("name,clip,tied,m", CASES)
def test_microbatches_equal_one_batch(name, clip, tied, m):
    ref_p, ref_s, ref_m = run(name, clip, tied, 1)
    p, s, met = run(name, clip, tied, m)
    for a, b in zip(met, ref_m):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
        if clip is not None:
            np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    chex.assert_trees_all_close(p, ref_p, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(s, ref_s, rtol=1e-5, atol=1e-6)


def test_each_layer_sees_one_microbatch():
    """The layer is called on B/M rows (its working set is one micro-batch's)."""
    seen = []

    def layer(p, h, b):
        seen.append(h.shape)
        return tf.layer(p, h, b)

    model = lomo_jax.LayeredModel(tf.embed, layer, tf.head)
    tx = lomo_jax.lomo(1e-2)
    params = tf.make_params()
    jax.eval_shape(fused_train_step(model, tx, microbatches=4), params, fused_init(tx, params),
                   batch(0))
    assert seen and all(s[0] == B // 4 for s in seen), seen


# --------------------------------------------------------------------------
# Padding: the loss is the whole batch's, not a mean of micro-batch means
# --------------------------------------------------------------------------

CFG = llama.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2)


def padded_batch():
    ids = jax.random.randint(jax.random.key(1), (8, 12), 0, 128)
    mask = np.ones((8, 12), np.int32)
    mask[0, :9] = 0   # micro-batches (rows k, k+4) of M=4 hold 14, 24, 24 and 15 targets
    mask[3, 4:] = 0
    return {"input_ids": ids, "attention_mask": jnp.asarray(mask)}


def test_loss_is_token_weighted_over_the_whole_batch():
    lm = llama.llama_layered_model(CFG)
    params = llama.init_params(CFG, 0)
    b = padded_batch()
    targets = llama.next_token_targets(llama.default_labels(b)) != llama.IGNORE_INDEX
    counts = [int(targets[k::4].sum()) for k in range(4)]
    assert len(set(counts)) > 1, counts  # the micro-batches are unequal
    tx = lomo_jax.adalomo(1e-2)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lm.loss))(params, b)
    loss = jax.jit(lm.loss)  # one compile: the four micro-batches have one shape
    mean_of_means = np.mean([float(loss(params, jax.tree.map(lambda x: x[k::4], b)))
                             for k in range(4)])
    # what a naive split would give: 100x the tolerance the fused step is held to below
    assert abs(mean_of_means - float(ref_loss)) > 100 * 1e-6 * float(ref_loss)
    step = fused_train_step(lm, tx, microbatches=4, clip_grad_norm=1e-3)
    _, _, met = step(jax.tree.map(jnp.copy, params), fused_init(tx, params), b)
    np.testing.assert_allclose(met["loss"], ref_loss, rtol=1e-6)
    # jitted: one program, not one per gradient leaf and op (1 s of dispatch)
    np.testing.assert_allclose(met["grad_norm"], jax.jit(optax.tree.norm)(ref_grads), rtol=1e-5)


# --------------------------------------------------------------------------
# fp16: one overflow in one micro-batch skips the whole step
# --------------------------------------------------------------------------


def test_fp16_overflow_in_one_microbatch_skips_everything():
    from tests.jax import test_reliability as tr

    def layer(p, h, b):  # per-row gradient scale: an inf in one row's scale
        x, i = h
        factor = jnp.prod(b["gscale"][:, i.astype(jnp.int32)])
        return x + jnp.tanh(x @ tr.grad_scale(p["w1"], factor)) @ p["w2"], i + 1.0

    model = lomo_jax.LayeredModel(tr.embed, layer, tr.head)
    rng = np.random.default_rng(5)
    gscale = np.ones((8, tr.L), np.float32)
    gscale[5, 1] = np.inf  # row 5: micro-batch 1 of 4, layer 1
    b = {"ids": jnp.asarray(rng.integers(0, tr.V, (8, tr.T)), jnp.int32),
         "labels": jnp.asarray(rng.integers(0, tr.V, (8, tr.T)), jnp.int32),
         "gscale": jnp.asarray(gscale), "loss_mult": jnp.float32(1.0)}
    params = tr.jax_params(jnp.float16)
    tx = lomo_jax.adalomo(1e-2)
    state = fused_init(tx, params, loss_scale=2.0**10)
    before = tr.bits((params, state.embed, state.layers, state.head))
    step = fused_train_step(model, tx, microbatches=4)
    params, state, met = step(params, state, b)
    assert bool(met["skipped"]) and float(state.loss_scale.scale) == 2.0**9
    assert tr.bits((params, state.embed, state.layers, state.head)) == before
    clean = dict(b, gscale=jnp.ones((8, tr.L), jnp.float32))
    params, state, met = step(params, state, clean)
    assert not bool(met["skipped"]) and tr.bits(params) != before[: len(tr.bits(params))]


def test_batch_that_does_not_split_is_named():
    tx = lomo_jax.lomo(1e-2)
    params = tf.make_params()
    step = fused_train_step(tf.make_model(), tx, microbatches=3)
    with pytest.raises(ValueError, match=r"batch\['ids'\] has 8 rows .* 3 equal micro-batches"):
        step(params, fused_init(tx, params), batch(0))
    with pytest.raises(ValueError, match="microbatches must be a positive int"):
        fused_train_step(tf.make_model(), tx, microbatches=0)


# --------------------------------------------------------------------------
# On a mesh (8 CPU devices, a subprocess)
# --------------------------------------------------------------------------

MESH_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
import lomo_jax
from jax.sharding import AxisType
from lomo_jax import sharding as lsh
from lomo_jax.models import llama
cfg = llama.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
lm = llama.llama_layered_model(cfg)
tx = lomo_jax.adalomo(1e-2)
ids = jax.random.randint(jax.random.key(1), (16, 8), 0, 128)
def run(step, params, state, batch):
    for _ in range(2):
        params, state, m = step(params, state, batch)
    return params, m
p0 = llama.init_params(cfg, 0)
ref, ref_m = run(lomo_jax.fused_train_step(lm, tx, clip_grad_norm=0.5),
                 jax.tree.map(jnp.copy, p0), lomo_jax.fused_init(tx, p0), {"input_ids": ids})
mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
sh = lsh.fused_shardings(tx, p0, mesh, min_size=0)
params = jax.device_put(jax.tree.map(jnp.copy, p0), sh.params)
state = jax.jit(lambda p: lomo_jax.fused_init(tx, p), out_shardings=sh.opt_state)(params)
step = lomo_jax.fused_train_step(lm, tx, clip_grad_norm=0.5, microbatches=2, shardings=sh)
out, m = run(step, params, state, jax.device_put({"input_ids": ids}, sh.batch))
np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-6)
for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * scale)
assert all(x.sharding == s for x, s in zip(jax.tree.leaves(out), jax.tree.leaves(sh.params)))
print("SAME")
"""


def test_sharded_microbatches_match_one_device():
    """data=2 x fsdp=4, micro-batches split along the data axis (each device holds
    rows of every micro-batch): equal to one device, M=1, to 1e-5; shardings kept."""
    env = cpu_devices_env(8, QUICK_COMPILE_FLAGS)
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "SAME" in proc.stdout, proc.stderr[-3000:]


# --------------------------------------------------------------------------
# Memory (RTX 4090 target, bf16)
# --------------------------------------------------------------------------


@COMPILES_FOR_GPU
def test_working_set_shrinks_with_microbatches():
    """At a fixed total batch B the temporaries fall with M, within

        temp(M, B) <= saved inputs(B) + layer working set(B / M) + head(B) + fp32 accumulator

    head(b): the head's VJP at batch b (its input h, temporaries and outputs),
    the whole-batch part of the step; layer working set(b): the one-batch
    step's temporaries at batch b less its saved inputs and head(b); the
    accumulator: one layer's gradient in fp32. RTX 4090 target, bf16, a
    4-layer d=1024 model, 16 x 512 tokens."""
    mesh = rtx4090_mesh()
    cfg = llama.LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816,
                            num_hidden_layers=4, num_attention_heads=8,
                            dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    lm = llama.llama_layered_model(cfg)
    tx = lomo_jax.adalomo(1e-5)
    params = aot.abstract(llama.param_shapes(cfg), mesh)
    state = aot.abstract(jax.eval_shape(lambda p: fused_init(tx, p), params), mesh)
    total, seq = 16, 512

    def ids(rows):
        return aot.abstract({"input_ids": jax.ShapeDtypeStruct((rows, seq), jnp.int32)}, mesh)

    def temp(rows, m):
        step = fused_train_step(lm, tx, microbatches=m)
        return aot.compiled_memory(step, params, state, ids(rows)).temporaries

    def head(rows):
        h = aot.abstract(jax.ShapeDtypeStruct((rows, seq, cfg.hidden_size), jnp.bfloat16), mesh)

        def vjp(p, h, b):
            return jax.vjp(lambda ph, hh: lm.head(ph, hh, b), p["head"], h)[1](jnp.float32(1))

        m = aot.compiled_memory(jax.jit(vjp), params, h, ids(rows))
        return rows * seq * cfg.hidden_size * 2 + m.temporaries + m.outputs

    def saved(rows):
        return cfg.num_hidden_layers * rows * seq * cfg.hidden_size * 2

    layer_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params["layers"]))
    accumulator = 4 * layer_params // cfg.num_hidden_layers  # one layer's gradient, fp32
    # M = 16 (one row a micro-batch) against one batch: the bound at the far end (an M
    # between, e.g. 4, takes three more GPU-target compiles and adds no other code path)
    temps = {m: temp(total, m) for m in (1, 16)}
    assert temps[16] - saved(total) < 0.6 * (temps[1] - saved(total)), temps
    b = total // 16
    layer_working_set = temp(b, 1) - saved(b) - head(b)
    bound = saved(total) + layer_working_set + head(total) + accumulator
    assert temps[16] <= bound, (temps[16], bound)
