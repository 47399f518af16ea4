"""lomo_jax.rounding and rounding="stochastic" in the fused step.

Neighbours are computed independently here with numpy/ml_dtypes (``nextafter``
in the target dtype), not with the code under test.
"""


import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import lomo_jax
from lomo_jax import checkpoint
from lomo_jax.fused import LayeredModel, fused_init, fused_train_step
from lomo_jax.rounding import apply_updates, stochastic_round
from tests.jax.cpu_devices import cpu_devices_env


# values beyond the largest finite bf16/fp16 are made on purpose (overflow cases)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

DTYPES = {"bf16": (jnp.bfloat16, ml_dtypes.bfloat16), "fp16": (jnp.float16, np.float16)}


def neighbours(x, np_dtype):
    """(floor, ceil) of float32 ``x`` in ``np_dtype``, by round-to-nearest and nextafter."""
    near = x.astype(np_dtype)
    inf = np.array(np.inf, np_dtype)
    up_from_near = np.nextafter(near, inf)
    down_from_near = np.nextafter(near, -inf)
    f32 = near.astype(np.float32)
    floor = np.where(f32 > x, down_from_near, near)
    ceil = np.where(f32 < x, up_from_near, near)
    return floor, ceil


def samples(np_dtype, n=4000, seed=0):
    """Magnitudes over the whole range: subnormals, normals, near the largest finite."""
    rng = np.random.default_rng(seed)
    fi = ml_dtypes.finfo(np_dtype)
    lo, hi = np.log2(float(fi.smallest_subnormal)), np.log2(float(fi.max))
    x = np.exp2(rng.uniform(lo, hi, n)) * rng.choice([-1.0, 1.0], n)
    edge = [float(fi.max) * 0.9999, -float(fi.max) * 0.99999, float(fi.smallest_subnormal) * 0.7,
            float(fi.tiny) * 1.0001, 1.0 + 2.0**-12, -3.14159265]
    return np.concatenate([x, edge]).astype(np.float32)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_result_is_one_of_the_two_neighbours(name):
    jdt, ndt = DTYPES[name]
    x = samples(ndt)
    floor, ceil = neighbours(x, ndt)
    out = np.asarray(stochastic_round(x, jdt, jax.random.key(0))).astype(ndt)
    ok = (out == floor) | (out == ceil)
    assert ok.all(), (x[~ok][:5], out[~ok][:5], floor[~ok][:5], ceil[~ok][:5])
    # and both occur: a wrong floor/ceil would collapse to one of them
    strict = floor != ceil
    assert (out[strict] == floor[strict]).mean() > 0.2 and (out[strict] == ceil[strict]).mean() > 0.2


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_unbiased(name):
    """Mean over 20000 draws of each value equals it within 5 standard errors:
    sigma = spacing * sqrt(p (1 - p) / n). Round-to-nearest's error on the same
    values is up to half a spacing, ~140 sigma."""
    jdt, ndt = DTYPES[name]
    x = samples(ndt, n=64, seed=1)
    floor, ceil = (a.astype(np.float64) for a in neighbours(x, ndt))
    n = 20000
    keys = jax.random.split(jax.random.key(2), n)
    draws = jax.vmap(lambda k: stochastic_round(x, jdt, k).astype(jnp.float32))(keys)
    mean = np.asarray(draws, np.float64).mean(axis=0)
    spacing = np.where(ceil > floor, ceil - floor, 1.0)
    p = (x - floor) / spacing
    sigma = spacing * np.sqrt(np.maximum(p * (1 - p), 1e-12) / n)
    assert np.all(np.abs(mean - x) <= 5 * sigma + 1e-7 * np.abs(x)), np.max(np.abs(mean - x) / sigma)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_exact_values_special_values_and_overflow(name):
    jdt, ndt = DTYPES[name]
    fi = ml_dtypes.finfo(ndt)
    exact = np.array([0.0, -0.0, 1.0, -2.5, float(fi.max), float(fi.smallest_subnormal)], np.float32)
    for k in range(5):
        out = np.asarray(stochastic_round(exact, jdt, jax.random.key(k))).astype(np.float32)
        assert np.array_equal(out.view(np.uint32), exact.view(np.uint32))  # -0.0 kept
    special = np.array([np.inf, -np.inf, np.nan, float(fi.max) * 1.01, -float(fi.max) * 1.01],
                       np.float32)
    out = np.asarray(stochastic_round(special, jdt, jax.random.key(0)).astype(jnp.float32))
    # beyond the largest finite value: round to nearest, so an overflow is still inf
    np.testing.assert_array_equal(out, special.astype(ndt).astype(np.float32))
    # finite in fp32 beyond the largest finite value (to nearest: the max, never inf),
    # and NaNs whose bits a carry would wrap into the sign: 64 copies, 64 draws each
    spacing = float(fi.max) - float(np.nextafter(ndt(fi.max), ndt(0)))
    beyond = [float(fi.max) + 0.49 * spacing, -(float(fi.max) + 0.49 * spacing)]
    nans = np.array([0x7FFFFFFF, -1], np.int32).view(np.float32)
    edge = np.tile(np.concatenate([np.float32(beyond), nans]), 64)
    out = np.asarray(stochastic_round(edge, jdt, jax.random.key(0))).astype(np.float32)
    np.testing.assert_array_equal(out, edge.astype(ndt).astype(np.float32))


def test_other_dtypes_are_a_plain_cast():
    x = jnp.linspace(-3, 3, 101, dtype=jnp.float32) / 7
    assert stochastic_round(x, jnp.float32, jax.random.key(0)).dtype == jnp.float32
    np.testing.assert_array_equal(stochastic_round(x, jnp.float32, jax.random.key(0)), x)


def test_apply_updates_is_optax_without_a_key_and_unbiased_with_one():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(300, 200)), jnp.bfloat16),
              "b": jnp.asarray(rng.normal(size=(200,)), jnp.float32)}
    # updates far below half a bf16 spacing (~4e-3 at |w| ~ 1): nearest drops them
    updates = {"w": jnp.asarray(rng.uniform(1e-5, 3e-4, size=(300, 200)), jnp.float32),
               "b": jnp.asarray(rng.normal(size=(200,)) * 1e-3, jnp.float32)}
    plain = apply_updates(params, updates)
    jax.tree.map(np.testing.assert_array_equal, plain, optax.apply_updates(params, updates))
    sr = apply_updates(params, updates, rng=jax.random.key(1))
    np.testing.assert_array_equal(sr["b"], plain["b"])  # fp32 leaf: bit for bit
    intended = params["w"].astype(jnp.float32) + updates["w"]
    moved_sr = float(jnp.mean(sr["w"].astype(jnp.float32) - params["w"].astype(jnp.float32)))
    moved_rn = float(jnp.mean(plain["w"].astype(jnp.float32) - params["w"].astype(jnp.float32)))
    want = float(jnp.mean(updates["w"]))
    assert abs(moved_sr - want) < 0.05 * want  # 60000 draws: ~1% standard error
    assert moved_rn < 0.2 * want  # the defect: nearest drops most of the update
    assert float(jnp.abs(sr["w"].astype(jnp.float32) - intended).max()) <= 2**-6  # a spacing at |w| < 4


# --------------------------------------------------------------------------
# The fused step
# --------------------------------------------------------------------------

L, D, B = 4, 256, 2


def residual_model():
    """Every layer adds its own bias to the residual stream, so every layer gets
    the same gradient (dL/dh is the same at every depth); the head reads h."""

    def embed(p, batch):
        return jnp.broadcast_to(p["h0"], (B, D))

    def layer(p, h, batch):
        return h + p["b"]

    def head(p, h, batch):
        return jnp.sum(jnp.tanh(h.astype(jnp.float32)) * batch["t"])

    return LayeredModel(embed, layer, head)


def residual_params(dtype):
    rng = np.random.default_rng(0)
    b = rng.normal(size=(D,)).astype(np.float32)
    return {"embed": {"h0": jnp.asarray(rng.normal(size=(D,)), dtype)},
            "layers": {"b": jnp.asarray(np.broadcast_to(b, (L, D)), dtype)},  # identical layers
            "head": {}}


def run(dtype, rounding, steps=1, seed=0, lr=1e-3):
    params = residual_params(dtype)
    tx = lomo_jax.lomo(lr)
    state = fused_init(tx, params, rng=jax.random.key(seed))
    step = fused_train_step(residual_model(), tx, rounding=rounding)
    batch = {"t": jnp.asarray(np.random.default_rng(1).normal(size=(B, D)), jnp.float32)}
    for _ in range(steps):
        params, state, _ = step(params, state, batch)
    return params, state


def test_fused_each_layer_draws_its_own_bits():
    """Identical layers with identical gradients: round-to-nearest keeps them
    identical; stochastic rounding, drawing per layer, does not (a shared key
    would)."""
    near, _ = run(jnp.bfloat16, "nearest")
    sr, _ = run(jnp.bfloat16, "stochastic")
    b_near, b_sr = np.asarray(near["layers"]["b"], np.float32), np.asarray(sr["layers"]["b"], np.float32)
    assert all(np.array_equal(b_near[0], b_near[i]) for i in range(L))
    differ = [(b_sr[0] != b_sr[i]).mean() for i in range(1, L)]
    assert min(differ) > 0.05, differ
    # each a neighbour of the same fp32 value: at most one spacing apart
    spacing = np.abs(np.nextafter(b_sr[0].astype(ml_dtypes.bfloat16),
                                  np.array(np.inf, ml_dtypes.bfloat16)).astype(np.float32) - b_sr[0])
    assert all(np.all(np.abs(b_sr[i] - b_sr[0]) <= spacing * 1.0001) for i in range(L))


def test_fused_fp32_leaves_are_bit_identical_either_way():
    a, _ = run(jnp.float32, "nearest", steps=2)
    b, _ = run(jnp.float32, "stochastic", steps=2)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_fused_key_advances_and_resume_is_bit_exact(tmp_path):
    """The key is split every step; a run checkpointed after 2 steps and resumed
    for 2 more equals 4 straight steps bit for bit."""
    params = residual_params(jnp.bfloat16)
    tx = lomo_jax.lomo(1e-3)
    step = fused_train_step(residual_model(), tx, rounding="stochastic")
    batch = {"t": jnp.asarray(np.random.default_rng(1).normal(size=(B, D)), jnp.float32)}
    state = fused_init(tx, params, rng=jax.random.key(7))
    want = jax.random.key_data(jax.random.split(jax.random.key(7))[0])
    p, s = jax.tree.map(jnp.copy, params), state
    for i in range(4):
        p, s, _ = step(p, s, batch)
        if i == 0:
            assert np.array_equal(jax.random.key_data(s.rng), want)
    straight = p

    p, s = jax.tree.map(jnp.copy, params), fused_init(tx, params, rng=jax.random.key(7))
    for _ in range(2):
        p, s, _ = step(p, s, batch)
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
    ckpt.save(2, {"params": p, "opt_state": s})
    ckpt.wait_until_finished()
    restored, _ = ckpt.restore(target={"params": p, "opt_state": s})
    ckpt.close()
    p, s = restored["params"], restored["opt_state"]
    for _ in range(2):
        p, s, _ = step(p, s, batch)
    jax.tree.map(np.testing.assert_array_equal, p, straight)


def test_fused_stochastic_needs_a_key():
    params = residual_params(jnp.bfloat16)
    tx = lomo_jax.lomo(1e-3)
    step = fused_train_step(residual_model(), tx, rounding="stochastic")
    batch = {"t": jnp.ones((B, D), jnp.float32)}
    with pytest.raises(ValueError, match=r"rng=jax.random.key"):
        step(params, fused_init(tx, params), batch)
    with pytest.raises(ValueError, match="rounding must be"):
        fused_train_step(residual_model(), tx, rounding="up")
    with pytest.raises(TypeError, match="one PRNG key"):
        fused_init(tx, params, rng=jax.random.split(jax.random.key(0), 2))


SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from lomo_jax.rounding import stochastic_round
mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
x = jax.random.normal(jax.random.key(0), (64, 512)) * 3
key = jax.random.key(1)
f = jax.jit(lambda x, k: stochastic_round(x, jnp.bfloat16, k))
whole = np.asarray(f(x, key).astype(jnp.float32))
for spec in (P("x"), P(None, "x")):
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    out = f(xs, key)
    assert len(out.sharding.device_set) == 8
    assert np.array_equal(np.asarray(out.astype(jnp.float32)), whole), spec
print("SAME")
"""


def test_bits_do_not_depend_on_the_sharding():
    """Each element's random integer is a hash of its global index: a leaf split over
    8 devices (either axis) rounds bit for bit as on one device."""
    import subprocess
    import sys

    env = cpu_devices_env(8)
    proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "SAME" in proc.stdout, proc.stderr[-3000:]
