"""LoRA on lomo_jax's models (lomo_jax.models.lora, lora_config): the config's
checks, PEFT's initialisation, the adapter's math against numpy, merge, the NNX
module, generate, the optimizer (LoRA only: a frozen base, bit for bit; LoRA +
AdaLomo: the fused step equals the unfused one), the adapters' shardings, and a
LoRA + AdaLomo step on an 8-device CPU mesh equal to one device.

The 8-device case runs ``tests/jax/lora_mesh_script.py`` in one subprocess
(``--xla_force_host_platform_device_count`` acts only before JAX starts); it and
the unfused step are compared with one run of the fused step on one device
(``adalomo_run``, made once).
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lomo_jax
from lomo_jax import models
from lomo_jax import sharding as lsh
from lomo_jax.models import llama, lora
from lomo_jax.models.lora import LoraConfig
from lomo_jax.models.lora_config import LoraLinear, lora_path
from tests.jax.builders import bits, reference_step, with_random_lora_b
from tests.jax.cpu_devices import run_json
from tests.once_per_run import once_per_run
from tests.jax.tiny_llama import TINY

LORA = LoraConfig(rank=4, alpha=8, targets=("v_proj", "q_proj", "down_proj"))
TARGETS = {"q_proj": ("self_attn", 64, 64), "v_proj": ("self_attn", 64, 32),
           "down_proj": ("mlp", 128, 64)}  # TINY: branch, d_in, d_out


#: ``models.logits`` jitted (one compile per config and shape, not one per op)
_logits = jax.jit(models.logits, static_argnums=0)


def _base(seed=0):
    cfg = llama.LlamaConfig(**TINY)
    return cfg, llama.init_params(cfg, seed)


def _batch(seed=0, b=2, t=8):
    ids = np.random.default_rng(seed).integers(0, TINY["vocab_size"], (b, t)).astype(np.int32)
    return {"input_ids": jnp.asarray(ids)}


def _adapted(seed=0):
    cfg0, p0 = _base(seed)
    cfg = cfg0.replace(lora=LORA)
    return cfg0, p0, cfg, lora.add_adapters(cfg, p0, rng=jax.random.key(7))


def test_adapters_of_a_bf16_model_are_fp32():
    """PEFT's autocast_adapter_dtype: a bf16 adapter would round AdamW's ~1e-4
    relative updates away (bf16 keeps 8 bits), so adapters are fp32 at least, from
    add_adapters and from the NNX init alike (LoraLinear casts them to the compute dtype)."""
    cfg0, p0 = _base()
    cfg = cfg0.replace(lora=LORA, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p0)
    for params in (lora.add_adapters(cfg, p16, rng=0), llama.init_params(cfg, 0)):
        q = params["layers"]["self_attn"]["q_proj"]
        assert q["kernel"].dtype == jnp.bfloat16
        assert q["lora_a"].dtype == q["lora_b"].dtype == jnp.float32


# --------------------------------------------------------------------------
# LoraConfig
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kw,field", [
    (dict(rank=0), "rank"), (dict(rank=2.0), "rank"), (dict(rank=True), "rank"),
    (dict(alpha=0), "alpha"), (dict(alpha=float("inf")), "alpha"), (dict(alpha=True), "alpha"),
    (dict(alpha="8"), "alpha"), (dict(targets=()), "targets"), (dict(targets=5), "targets"),
    (dict(targets=("q_proj", "qkv_proj")), "targets"), (dict(targets=[["q_proj"]]), "targets"),
    (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
    (dict(dropout=False), "dropout"),
])
def test_lora_config_refuses_bad_fields_by_name(kw, field):
    with pytest.raises(ValueError, match=f"LoraConfig.{field}"):
        LoraConfig(**{"rank": 4, "alpha": 8, "targets": ("q_proj",), **kw})


def test_lora_config_normalises_and_llama_config_checks_its_type():
    c = LoraConfig(rank=np.int64(4), alpha=8, targets=["v_proj", "q_proj", "v_proj"])
    assert (c.rank, c.alpha, c.targets, c.dropout) == (4, 8.0, ("q_proj", "v_proj"), 0.0)
    assert type(c.rank) is int and c.scale == 2.0
    assert LoraConfig(2, 1, "o_proj").targets == ("o_proj",)
    assert hash(c) == hash(LoraConfig(4, 8.0, ("q_proj", "v_proj")))
    assert lora_path("down_proj") == ("mlp", "down_proj")
    with pytest.raises(ValueError, match="lora must be a lomo_jax.models.lora.LoraConfig"):
        llama.LlamaConfig(**TINY, lora={"rank": 4})


# --------------------------------------------------------------------------
# add_adapters, the adapter's math, merge
# --------------------------------------------------------------------------


def test_add_adapters_shapes_peft_init_and_unchanged_logits():
    cfg0, p0, cfg, p = _adapted()
    L, r = TINY["num_hidden_layers"], LORA.rank
    for name, (branch, d_in, d_out) in TARGETS.items():
        leaf = p["layers"][branch][name]
        assert leaf["kernel"] is p0["layers"][branch][name]["kernel"]  # shared, not copied
        a, b = np.asarray(leaf["lora_a"]), np.asarray(leaf["lora_b"])
        assert a.shape == (L, d_in, r) and b.shape == (L, r, d_out), name
        assert a.dtype == b.dtype == leaf["kernel"].dtype == np.float32
        bound = 1 / math.sqrt(d_in)  # PEFT: kaiming_uniform_(a=sqrt(5)) of [r, d_in]
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound, name
        assert abs(a.std() - bound / math.sqrt(3)) < 0.15 * bound / math.sqrt(3), name
        assert not np.array_equal(a[0], a[1]), name  # layers draw their own
        assert np.all(b == 0), name
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(p)[0]]
    assert sum("lora" in n for n in names) == 2 * len(TARGETS)  # nothing on k/o/gate/up
    assert "lora_a" not in p0["layers"]["self_attn"]["q_proj"]  # the input is untouched
    llama.check_params(cfg, p)
    batch = _batch()
    np.testing.assert_array_equal(_logits(cfg, p, batch), _logits(cfg0, p0, batch))
    # the same key draws the same adapters; another key others
    again = lora.add_adapters(cfg, p0, rng=jax.random.key(7))
    assert bits(again) == bits(p)
    assert bits(lora.add_adapters(cfg, p0, rng=np.int64(8))) != bits(p)


def test_add_adapters_and_merge_refuse_bad_input():
    cfg0, p0, cfg, p = _adapted()
    with pytest.raises(ValueError, match=r"unexpected .*\['lora_a'\]"):
        lora.add_adapters(cfg, p, rng=0)  # already has adapters
    for fn in (lambda: lora.add_adapters(cfg0, p0, rng=0), lambda: lora.merge(cfg0, p0)):
        with pytest.raises(ValueError, match="needs a config with lora set"):
            fn()
    with pytest.raises(ValueError, match=r"missing .*\['lora_b'\]"):
        lora.merge(cfg, p0)
    bad = jax.tree.map(lambda x: x, p)
    bad["layers"]["self_attn"]["q_proj"]["lora_a"] = jnp.zeros((2, 64, 5))
    with pytest.raises(ValueError, match=r"\['lora_a'\]: got shape \(2, 64, 5\)"):
        lora.merge(cfg, bad)


def test_lora_linear_is_xw_plus_b_plus_scaled_xab():
    """One projection against float64 numpy: y = x W + b + (alpha / r) (x A) B."""
    lin = LoraLinear(6, 5, lora=LoraConfig(3, 12, ("q_proj",)), use_bias=True, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    lin.lora_b[...] = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    lin.bias[...] = jnp.asarray(rng.normal(size=5), jnp.float32)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    w, b, a, bb = (np.asarray(v[...], np.float64) for v in (lin.kernel, lin.bias, lin.lora_a,
                                                             lin.lora_b))
    want = x @ w + b + (12 / 3) * (x @ a) @ bb
    adapter = (12 / 3) * (x @ a) @ bb
    assert np.abs(adapter).max() > 0.5  # the adapter is a large part of y
    np.testing.assert_allclose(lin(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)


def test_gate_and_up_sum_at_once_with_the_same_values():
    """``SUMMED_AT_ONCE`` (gate_proj, up_proj): ``xW + s(xA)B`` is one array behind
    an ``optimization_barrier`` (what lets XLA:GPU drop the low-rank term before the
    MLP's backward; benchmarks/results/memory.md), the values and gradients bit for
    bit those of any other projection's."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    outs, grads = {}, {}
    for name in ("up_proj", "gate_proj", "q_proj"):
        lin = LoraLinear(6, 5, lora=LoraConfig(3, 12, (name,)), rngs=nnx.Rngs(0), name=name)
        lin.lora_b[...] = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)), jnp.float32)
        jaxpr = str(jax.make_jaxpr(lambda xx: lin(xx))(x))
        assert ("optimization_barrier" in jaxpr) == (name != "q_proj"), name
        outs[name] = np.asarray(lin(x))
        grads[name] = np.asarray(jax.grad(lambda xx: jnp.sum(lin(xx) ** 2))(x))
    assert bits(outs["up_proj"]) == bits(outs["q_proj"]) == bits(outs["gate_proj"])
    assert bits(grads["up_proj"]) == bits(grads["q_proj"])


def test_adapters_change_logits_as_the_numpy_merged_kernel_does_and_merge_matches():
    """With B != 0 the logits of (W, A, B) equal those of the base model whose kernels
    are W + (alpha / r) A B computed in float64 numpy, to fp32 rounding: the logits
    move by O(0.1) (``effect``), the two fp32 computations differ by ~1e-7
    relative to the logits (a few roundings a layer, 2 layers); 1e-4 of the effect
    is ~100x that and far below any error in the math (a wrong scale, A and B
    swapped, an adapter left out all move the logits by O(effect))."""
    cfg0, p0, cfg, p = _adapted()
    p = with_random_lora_b(p)
    batch = _batch()
    got = np.asarray(_logits(cfg, p, batch), np.float64)
    base = np.asarray(_logits(cfg0, p0, batch), np.float64)
    np_merged = jax.tree.map(lambda x: x, p0)
    for name, (branch, _, _) in TARGETS.items():
        leaf = p["layers"][branch][name]
        w, a, b = (np.asarray(leaf[k], np.float64) for k in ("kernel", "lora_a", "lora_b"))
        np_merged["layers"][branch][name] = {"kernel": jnp.asarray(w + LORA.scale * a @ b,
                                                                   jnp.float32)}
    want = np.asarray(_logits(cfg0, np_merged, batch), np.float64)
    effect = np.abs(got - base).max()
    assert effect > 0.05, effect
    assert np.abs(got - want).max() <= 1e-4 * effect, (np.abs(got - want).max(), effect)

    cfg_m, p_m = lora.merge(cfg, p)
    assert cfg_m.lora is None and cfg_m == cfg0
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(p_m)[0]]
    assert not [n for n in names if "lora" in n]
    llama.check_params(cfg0, p_m)
    for name, (branch, _, _) in TARGETS.items():
        np.testing.assert_allclose(p_m["layers"][branch][name]["kernel"],
                                   np_merged["layers"][branch][name]["kernel"],
                                   rtol=1e-6, atol=1e-7)
    assert p_m["layers"]["self_attn"]["k_proj"]["kernel"] is p0["layers"]["self_attn"]["k_proj"][
        "kernel"]
    assert "lora_a" in p["layers"]["self_attn"]["q_proj"]  # merge leaves its input alone
    merged = np.asarray(_logits(cfg_m, p_m, batch), np.float64)
    assert np.abs(got - merged).max() <= 1e-4 * effect


def test_nnx_module_and_generate_use_the_adapters():
    """``params_to_module`` of a LoRA config computes ``models.logits``; greedy
    ``models.generate`` (KV cache) picks the argmax of ``models.logits`` on the
    growing sequence (no cache), and differs from the base model's choice."""
    cfg0, p0, cfg, p = _adapted()
    p = with_random_lora_b(p, scale=2.0)
    batch = _batch(1)
    module = models.params_to_module(cfg, p)
    assert isinstance(module.layers.self_attn.q_proj, LoraLinear)
    assert not isinstance(module.layers.self_attn.k_proj, LoraLinear)
    np.testing.assert_allclose(nnx.jit(lambda m, ids: m(ids))(module, batch["input_ids"]),
                               _logits(cfg, p, batch),
                               rtol=1e-5, atol=1e-6)

    n = 4
    new = np.asarray(models.generate(cfg, p, batch["input_ids"], max_new_tokens=n))
    ids = np.concatenate([np.asarray(batch["input_ids"]), new], 1)
    t = batch["input_ids"].shape[1]  # causal: position i's logits see ids[:, :i + 1] only
    full = np.asarray(_logits(cfg, p, {"input_ids": jnp.asarray(ids)}))
    np.testing.assert_array_equal(new, np.argmax(full[:, t - 1:-1], -1))
    base_new = np.asarray(models.generate(cfg0, p0, batch["input_ids"], max_new_tokens=n))
    assert not np.array_equal(base_new, new)


def test_lora_dropout_drops_the_adapter_input_only():
    """PEFT's ``lora_dropout``: ``x W + b + s ((m * x / (1 - p)) A) B`` with a
    Bernoulli(1 - p) mask ``m`` drawn from the module's key; the base path sees ``x``;
    no key (inference), no dropout."""
    lin = LoraLinear(32, 6, lora=LoraConfig(2, 4, ("q_proj",), dropout=0.25), rngs=nnx.Rngs(0))
    lin.lora_b[...] = jax.random.normal(jax.random.key(1), lin.lora_b[...].shape)
    x = jax.random.normal(jax.random.key(2), (64, 32))
    base = x @ lin.kernel[...] + lin.bias[...]
    a, b = lin.lora_a[...], lin.lora_b[...]
    np.testing.assert_allclose(lin(x), base + 2.0 * ((x @ a) @ b), rtol=1e-5, atol=1e-5)
    lin.dropout_key = key = jax.random.key(3)
    keep = jax.random.bernoulli(key, 0.75, x.shape)
    assert 0.7 < float(keep.mean()) < 0.8  # 2,048 draws: 0.75 +- 0.03 at 3 sigma
    dropped = jnp.where(keep, x / 0.75, 0.0)
    np.testing.assert_allclose(lin(x), base + 2.0 * ((dropped @ a) @ b), rtol=1e-5, atol=1e-5)
    assert np.abs(lin(x) - (base + 2.0 * ((x @ a) @ b))).max() > 0.1  # the mask matters


def _dropout_model():
    """An adapted tiny LLaMA with LoRA dropout 0.3 and non-zero B; the same without."""
    _, _, cfg, p = _adapted()
    drop = cfg.replace(lora=LoraConfig(4, 8, LORA.targets, dropout=0.3))
    return drop, cfg, with_random_lora_b(p, scale=0.1)


def test_lora_dropout_is_off_in_inference():
    """``models.logits`` (so ``generate``) and ``llama_loss`` of a dropout config are
    exactly those without dropout; the training loss draws masks from its key."""
    drop, plain, p = _dropout_model()
    batch = _train_batch(0)
    np.testing.assert_array_equal(_logits(drop, p, batch), _logits(plain, p, batch))
    lm, lm0 = models.layered_model(drop), models.layered_model(plain)
    assert float(llama.llama_loss(drop, p, batch)) == float(lm0.loss(p, batch))
    losses = {float(lm.loss(p, batch, key=jax.random.key(k))) for k in (0, 1)}
    assert len(losses) == 2 and float(lm0.loss(p, batch)) not in losses


def test_lora_dropout_fused_step_equals_value_and_grad_with_the_same_key():
    """LoRA + AdaLomo with dropout 0.3: 2 fused steps with ``key=`` equal
    ``jax.value_and_grad(lm.loss(..., key=k))`` + the same transform (each layer and
    projection its own mask, the same in the forward and the backward's recompute), to
    fp32 rounding (1e-5, as the fused step's own tests; a step without the masks is off
    by the loss's 1e-3 change); without a key the step refuses to trace."""
    drop, _, p = _dropout_model()
    tx = lora.optimizer(base=lomo_jax.adalomo(1e-2, weight_decay=0.01),
                        adapters=optax.adamw(1e-2, weight_decay=0.0))
    lm = models.layered_model(drop)
    step, ref = lomo_jax.fused_train_step(lm, tx), reference_step(lm, tx)
    params, state = jax.tree.map(jnp.copy, p), lomo_jax.fused_init(tx, p)
    r_params, r_state = jax.tree.map(jnp.copy, p), lomo_jax.fused_init(tx, p)
    for i in range(2):
        key = jax.random.key(10 + i)
        params, state, m = step(params, state, _train_batch(i), key=key)
        r_params, r_state, rm = ref(r_params, r_state, _train_batch(i), key=key)
        np.testing.assert_allclose(m["loss"], rm["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 params, r_params)
    with pytest.raises(ValueError, match="key"):
        step(params, state, _train_batch(2))


# --------------------------------------------------------------------------
# The optimizer in the fused step
# --------------------------------------------------------------------------


def _train_batch(seed):
    ids = _batch(seed, b=2, t=8)["input_ids"]
    return {"input_ids": ids, "labels": ids}


def test_lora_only_keeps_base_bit_identical_and_has_no_base_state():
    """``base=None``: 3 fused steps leave every base leaf bit for bit (a ``-0.0``
    weight included: ``+0.0`` updates would flip it), the state holds only the
    adapters' AdamW moments and counts, and the adapters move."""
    _, _, cfg, p = _adapted()
    p = with_random_lora_b(p, scale=0.1)
    k = p["layers"]["self_attn"]["k_proj"]["kernel"]
    p["layers"]["self_attn"]["k_proj"]["kernel"] = k.at[0, 0, :3].set(-0.0)
    tx = lora.optimizer(base=None, adapters=optax.adamw(1e-2, weight_decay=0.0))
    state = lomo_jax.fused_init(tx, p)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    arrays = [(jax.tree_util.keystr(k), x) for k, x in flat if np.ndim(x) > 1]
    assert arrays and all("lora" in k for k, _ in arrays), [k for k, _ in arrays]
    n_adapter = sum(x.size for kp, x in jax.tree_util.tree_flatten_with_path(p)[0]
                    if "lora" in jax.tree_util.keystr(kp))
    assert sum(x.size for _, x in arrays) == 2 * n_adapter  # mu and nu, nothing else
    assert all(np.ndim(x) <= 1 and "count" in jax.tree_util.keystr(k)
               for k, x in flat if np.ndim(x) <= 1)

    def base_bits(tree):
        return [np.asarray(x).view(np.uint32).tobytes()
                for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]
                if "lora" not in jax.tree_util.keystr(kp)]

    before, start = base_bits(p), jax.tree.map(np.asarray, p)
    step = lomo_jax.fused_train_step(models.layered_model(cfg), tx)
    params = jax.tree.map(jnp.copy, p)
    losses = []
    for i in range(3):
        params, state, m = step(params, state, _train_batch(i))
        losses.append(float(m["loss"]))
    assert base_bits(params) == before
    assert np.signbit(np.asarray(params["layers"]["self_attn"]["k_proj"]["kernel"])[0, 0, :3]).all()
    for name, (branch, _, _) in TARGETS.items():
        for ab in ("lora_a", "lora_b"):
            assert not np.array_equal(params["layers"][branch][name][ab],
                                      start["layers"][branch][name][ab]), (name, ab)
    assert all(np.isfinite(losses))
    # a plain optax loop: the updates reach apply_updates as arrays (inside the fused
    # step XLA folds "+ constant 0" away, so it cannot tell +0.0 updates from -0.0)
    g = jax.tree.map(jnp.ones_like, p)
    u, _ = tx.update(g, tx.init(p), p)
    assert base_bits(optax.apply_updates(p, u)) == before


@pytest.fixture(scope="module")
def adalomo_run(tmp_path_factory):
    """``lora_mesh_script.one_device_run()`` (the fused LoRA + AdaLomo steps on one
    device: the reference of the unfused step's test and of the 8-device one, made once
    per test run) and the ``file`` it is pickled in."""
    from tests.jax import lora_mesh_script

    def compute(directory):
        path = directory / "one_device.pkl"
        path.write_bytes(pickle.dumps(lora_mesh_script.one_device_run()))
        return str(path)

    _, path = once_per_run(tmp_path_factory, "lora_adalomo_run", compute)
    return {**pickle.loads(Path(path).read_bytes()), "file": path}


def test_lora_plus_adalomo_fused_equals_unfused(adalomo_run):
    """``base=adalomo``, ``adapters=adamw``: the fused step
    (``lora_mesh_script.one_device_run``) == ``jax.value_and_grad`` of the whole loss +
    the same transform (per layer on the stack), to fp32 rounding (1e-5 relative, as
    the fused step's own tests), and both parts move."""
    from tests.jax import lora_mesh_script

    p, tx = adalomo_run["initial"], lora_mesh_script.transform()
    ref = reference_step(models.layered_model(lora_mesh_script.config()[1]), tx)
    r_params, r_state = jax.tree.map(jnp.asarray, p), lomo_jax.fused_init(tx, p)
    for loss, batch in zip(adalomo_run["losses"], lora_mesh_script.batches(), strict=True):
        r_params, r_state, rm = ref(r_params, r_state, batch)
        np.testing.assert_allclose(loss, rm["loss"], rtol=1e-6)
    params, state = adalomo_run["params"], adalomo_run["state"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 params, r_params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 state, r_state)
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params, p)
    assert all(jax.tree.leaves(moved)), moved


# --------------------------------------------------------------------------
# Shardings of the adapters
# --------------------------------------------------------------------------


def _specs(tree):
    return {jax.tree_util.keystr(k): tuple(s.spec)
            for k, s in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_adapter_shardings_rule():
    """Adapters: replicated below ``adapter_min_size`` a layer; above it ``lora_a``
    split along d_in and ``lora_b`` along d_out, never the rank (the generic rule
    would split ``lora_b`` ``[L, 4, 64]`` along its rank 4 on a 4-device axis).
    The rule reads only sizes, so it is called with the axis size ``n`` here;
    ``llama_shardings`` of a LoRA config is checked on a 1-device mesh (8 devices:
    the subprocess test below)."""
    from lomo_jax.sharding_params import _adapter_spec, is_adapter

    k = jax.tree_util.DictKey
    P = jax.sharding.PartitionSpec
    a, b = (k("layers"), k("q_proj"), k("lora_a")), (k("q_proj"), k("lora_b"))
    assert is_adapter(a) and is_adapter(b) and not is_adapter((k("q_proj"), k("kernel")))
    assert _adapter_spec(a, (2, 64, 4), True, 4, 0, "fsdp") == P(None, "fsdp", None)
    assert _adapter_spec(b, (2, 4, 64), True, 4, 0, "fsdp") == P(None, None, "fsdp")
    assert _adapter_spec(b, (2, 4, 64), True, 4, 257, "fsdp") == P()  # 256 a layer: small
    assert _adapter_spec(a, (2, 66, 4), True, 4, 0, "fsdp") == P()  # 4 does not divide 66
    assert _adapter_spec((k("lora_scale"),), (2, 64, 4), True, 4, 0, "fsdp") == P()
    assert _adapter_spec(a, (64, 4), False, 4, 256, "fsdp") == P("fsdp", None)  # unstacked

    mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    tx = lora.optimizer(base=lomo_jax.adalomo(1e-3), adapters=optax.adamw(1e-3))
    _, _, cfg, _ = _adapted()
    sh = lsh.llama_shardings(cfg, mesh, tx)
    specs = _specs(sh.params)
    assert specs["['layers']['self_attn']['q_proj']['lora_a']"] == ()
    assert specs["['layers']['mlp']['down_proj']['lora_b']"] == ()


def test_lora_adalomo_step_on_8_cpu_devices_equals_one_device(adalomo_run):
    """One subprocess, one tiny model: 3 LoRA + AdaLomo fused steps on an
    ``fsdp=8`` mesh (every base leaf and adapter split: ``min_size=0``,
    ``adapter_min_size=0``) == one device (losses, params and state to 1e-5
    relative); the default shardings replicate these small adapters and let
    AdaLomo's statistics of the base weights follow the weights through
    ``optax.multi_transform``'s masked state."""
    from tests.jax import lora_mesh_script

    r = run_json([lora_mesh_script.__file__, adalomo_run["file"]], "LORA_MESH ", 8)

    assert r["devices"] == 8
    assert r["worst_rel"] <= 1e-5, r["worst"]
    assert r["not_close"] == {}, r["not_close"]
    assert r["compared"] == r["n_leaves"] and r["n_leaves"] > 30
    for a, b in zip(r["ref_losses"], r["losses"], strict=True):
        assert abs(a - b) <= 1e-5 * abs(a), (r["ref_losses"], r["losses"])
    assert r["adapters_moved"] and r["base_moved"]
    assert r["bad_shardings"] == [], r["bad_shardings"]
    split = r["split_specs"]
    assert split["['layers']['self_attn']['q_proj']['lora_a']"] == [None, "fsdp", None]
    assert split["['layers']['self_attn']['q_proj']['lora_b']"] == [None, None, "fsdp"]
    assert split["['layers']['mlp']['down_proj']['lora_a']"] == [None, "fsdp", None]
    assert split["['layers']['self_attn']['q_proj']['kernel']"] == [None, "fsdp", None]
    state = r["split_state_specs"]  # through optax.multi_transform's masked state
    inner = ".layers.inner_state.inner_states[{!r}].inner_state[0].{}['self_attn']['q_proj']"
    assert state[inner.format("base", "v_row") + "['kernel']"] == [None, "fsdp"]
    assert state[inner.format("adapters", "mu") + "['lora_a']"] == [None, "fsdp", None]
    assert state[inner.format("adapters", "nu") + "['lora_b']"] == [None, None, "fsdp"]
    default = r["default_adapter_specs"]  # min_size=0, adapter_min_size left at its default
    assert default["['layers']['self_attn']['q_proj']['kernel']"] == [None, "fsdp", None]
    lora_specs = {k: v for k, v in default.items() if "lora" in k}
    assert len(lora_specs) == 6 and all(v == [] for v in lora_specs.values()), lora_specs
