"""Shared builders of the JAX tests: a small attention-free layered model,
its parameters and batches, the unfused reference step the fused step must
equal, the transforms the tests run, and two exact checks on parameters.

Example::

    from tests.jax.builders import make_model, make_params, make_batch, reference_step
    model, tx = make_model(), lomo_jax.adalomo(5e-2)
    params = make_params()
    ref = reference_step(model, tx, clip_grad_norm=0.5)
    params, state, metrics = ref(params, lomo_jax.fused_init(tx, params), make_batch(0))
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lomo_jax
from lomo_jax.fused import FusedState, LayeredModel
from lomo_jax._per_layer import per_layer

L, D, F, V, B, T = 3, 16, 24, 29, 2, 5


# --------------------------------------------------------------------------
# A small pre-norm transformer-ish model (attention-free: a token-mixing
# matrix stands in), written against the LayeredModel interface.
# --------------------------------------------------------------------------


def _rms_norm(x, scale):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def embed(p, batch):
    return p["tok"][batch["ids"]]


def layer(p, h, batch):
    x = _rms_norm(h, p["norm1"])
    h = h + jnp.einsum("st,btd->bsd", p["mix"], x)
    x = _rms_norm(h, p["norm2"])
    return h + jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"]


def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels
    ).mean()


def head(p, h, batch):
    return xent(_rms_norm(h, p["norm"]) @ p["out"], batch["labels"])


def tied_head(p, h, batch, embed_params=None):
    return xent(_rms_norm(h, p["norm"]) @ embed_params["tok"].T, batch["labels"])


def make_params(seed=0, dtype=jnp.float32, tied=False, n_layers=L):
    rng = np.random.default_rng(seed)

    def a(*shape, scale=0.3):
        return jnp.asarray(rng.normal(size=shape) * scale, dtype)

    params = {
        "embed": {"tok": a(V, D, scale=1.0)},
        "layers": {
            "norm1": jnp.asarray(1.0 + rng.normal(size=(n_layers, D)) * 0.1, dtype),
            "mix": a(n_layers, T, T),
            "norm2": jnp.asarray(1.0 + rng.normal(size=(n_layers, D)) * 0.1, dtype),
            "w1": a(n_layers, D, F),
            "b1": a(n_layers, F, scale=0.1),
            "w2": a(n_layers, F, D),
        },
        "head": {"norm": jnp.ones((D,), dtype)},
    }
    if not tied:
        params["head"]["out"] = a(D, V)
    return params


def make_batch(seed):
    rng = np.random.default_rng(100 + seed)
    return {
        "ids": jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32),
        "labels": jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32),
    }


def make_model(tied=False):
    return LayeredModel(embed, layer, tied_head if tied else head, tied=tied)


def copy_tree(t):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), t)


def reference_step(model, tx, clip_grad_norm=None, loss_scale=None, norm_of=None):
    """The unfused path the fused step must equal. With ``loss_scale`` S the
    gradient is that of ``S * loss``, divided by S in fp32 (as the fused step
    does for fp16). ``metrics["updates"]`` holds tx's fp32 updates, before the
    rounding into the parameters' dtype. ``norm_of(path) -> bool``: the leaves
    the gradient norm covers (default: all). ``step(params, state, batch, key=k)``:
    the loss of a key-taking model with step key ``k`` (``model.loss(..., key=k)``)."""
    layer_tx = per_layer(tx)
    scale = 1.0 if loss_scale is None else loss_scale

    @jax.jit
    def step(params, state, batch, key=None):
        keyed = {} if key is None else {"key": key}
        loss, g = jax.value_and_grad(lambda p: model.loss(p, batch, **keyed) * scale)(params)
        if loss_scale is not None:
            loss = loss / scale
            g = jax.tree.map(lambda x: x.astype(jnp.float32) / scale, g)
        norm = optax.tree.norm(g if norm_of is None else jax.tree_util.tree_map_with_path(
            lambda path, x: x if norm_of(path) else jnp.zeros_like(x), g))
        if clip_grad_norm is not None:
            coef = jnp.minimum(1.0, clip_grad_norm / (norm + 1e-6))
            g = jax.tree.map(lambda x: x.astype(jnp.float32) * coef, g)
        new_params, new_state, updates = {}, {}, {}
        for key, t in (("embed", tx), ("layers", layer_tx), ("head", tx)):
            updates[key], new_state[key] = t.update(g[key], getattr(state, key), params[key])
            new_params[key] = optax.apply_updates(params[key], updates[key])
        state = FusedState(new_state["embed"], new_state["layers"], new_state["head"], None)
        return new_params, state, {"loss": loss, "grad_norm": norm, "updates": updates}

    return step


TRANSFORMS = {
    "lomo": lambda: lomo_jax.lomo(
        optax.linear_schedule(5e-2, 1e-2, 4), weight_decay=0.01, clip_grad_value=0.05
    ),
    "adalomo": lambda: lomo_jax.adalomo(5e-2, weight_decay=0.01),
    "sgd": lambda: optax.sgd(optax.linear_schedule(5e-2, 1e-2, 4), momentum=0.9),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.01),
    "adafactor": lambda: optax.adafactor(1e-2, min_dim_size_to_factor=4),
}


def with_random_lora_b(params, scale=0.5, seed=1):
    """``params`` with every ``lora_b`` redrawn ~ N(0, scale^2): the adapters matter
    from the first step (PEFT initialises B to zero)."""
    rng = np.random.default_rng(seed)

    def redraw(path, x):
        if jax.tree_util.keystr(path).endswith("['lora_b']"):
            return jnp.asarray(rng.normal(size=x.shape) * scale, x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(redraw, params)


def bits(tree):
    """The bytes of every leaf: equal lists mean bit-identical trees."""
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _spacing(x, dtype):
    """The gap from ``|x|`` (rounded to ``dtype``) to the next larger value, in float64."""
    a = np.abs(np.asarray(x, np.float64)).astype(dtype)
    return np.nextafter(a, np.asarray(np.inf, dtype)).astype(np.float64) - a.astype(np.float64)


def assert_one_rounding_from(old, new, updates, dtype):
    r"""``new = round(old + u)`` for each leaf, ``u`` the reference's fp32 update.

    Rounding to nearest is off by at most half a spacing at ``old + u``; the
    gradient, computed in ``dtype`` in another op order, may differ by about
    one unit roundoff of ``dtype``, so ``u`` gets ``eps * |u|`` on top
    (``eps`` = 2^-11 for fp16, 2^-8 for bf16). An update off by 10% (or any
    fraction well over ``eps``) exceeds this wherever ``|u|`` is more than a
    few spacings, which the tests check holds for a good share of entries.
    """
    np_dtype = np.dtype(dtype)
    eps = float(jnp.finfo(dtype).eps) / 2
    flat = jax.tree_util.tree_flatten_with_path(old)[0]
    telling = []  # per leaf: share of entries where a 10% error would exceed tol
    for (path, o), n, u in zip(flat, jax.tree.leaves(new), jax.tree.leaves(updates)):
        o, n, u = (np.asarray(t, np.float64) for t in (o, n, u))
        tol = _spacing(o + u, np_dtype) / 2 + eps * np.abs(u)
        err = np.abs((n - o) - u)
        assert np.all(err <= tol), (
            f"{jax.tree_util.keystr(path)}: update off by {np.max(err / tol):.2f}x "
            "one rounding")
        telling.append(np.mean(0.1 * np.abs(u) > tol))
    assert np.mean(telling) > 0.1, f"updates too small to tell a 10% error: {telling}"
