"""Errors a first model in the fused step runs into, and what they say.

* a block that was not stacked (every leaf without a layer axis): refused by
  ``num_layers``, by the all-1-D check, or when its first trace fails, always
  with the ``nnx.vmap`` hint;
* a non-leaf-wise ``tx``: at build time the probe tree's made-up leaves are not
  named; at trace time the user's own leaves are;
* ``model.loss`` on params donated to a step.

Everything here fails while tracing: nothing is compiled.
"""

import re

import jax.numpy as jnp
import optax
import pytest

import lomo_jax
from lomo_jax.fused import LayeredModel, fused_init, fused_train_step

D, V, B, T = 8, 11, 2, 3
HINT = r"are the blocks stacked with nnx.vmap \(or jax.vmap of the init\)"


def embed(p, batch):
    return p["tok"][batch["ids"]]


def head(p, h, batch):
    return jnp.mean((h @ p["out"]) ** 2)


def layer(p, h, batch):
    """A LayerNorm-ish scale and a Linear, as flax would use them (``len`` of the scale)."""
    assert len(p["scale"]) == h.shape[-1]
    return h * p["scale"] @ p["kernel"]


def params_with(layers):
    return {"embed": {"tok": jnp.ones((V, D))}, "layers": layers,
            "head": {"out": jnp.ones((D, V))}}


BATCH = {"ids": jnp.zeros((B, T), jnp.int32)}
UNSTACKED = {"scale": jnp.ones((D,)), "kernel": jnp.ones((D, D))}  # L would be D
STACKED = {"scale": jnp.ones((2, D)), "kernel": jnp.ones((2, D, D))}


def run(model, params, tx=None):
    tx = tx or lomo_jax.lomo(1e-2)
    return fused_train_step(model, tx)(params, fused_init(tx, params), BATCH)


def test_num_layers_must_match_the_layer_axis():
    model = LayeredModel(embed, layer, head, num_layers=2)
    with pytest.raises(ValueError, match=re.compile(
            r"params\['layers'\]\['kernel'\] has shape \[8, 8\].*num_layers = 2.*" + HINT, re.I)):
        run(model, params_with(UNSTACKED))
    with pytest.raises(ValueError, match=r"has shape \[8, 8\].*num_layers = 2"):
        model.loss(params_with(UNSTACKED), BATCH)
    assert model.loss(params_with(STACKED), BATCH).shape == ()
    with pytest.raises(ValueError, match="num_layers must be a positive int"):
        LayeredModel(embed, layer, head, num_layers=0)


def test_all_1d_layers_are_refused_unless_num_layers_says_so():
    scalar_layer = lambda p, h, batch: h * p["scale"]  # noqa: E731 - runs on any slice
    params = params_with({"scale": jnp.ones((D,))})
    with pytest.raises(ValueError, match=re.compile(
            r"every leaf of params\['layers'\] is 1-D \(params\['layers'\]\['scale'\] \[8\]\)"
            r".*L would be 8.*" + HINT + r".*num_layers=L", re.I)):
        run(LayeredModel(embed, scalar_layer, head), params)
    LayeredModel(embed, scalar_layer, head, num_layers=D).loss(params, BATCH)  # allowed


def test_first_trace_failure_names_the_slice_and_keeps_the_cause():
    with pytest.raises(TypeError) as info:
        run(LayeredModel(embed, layer, head), params_with(UNSTACKED))
    msg = str(info.value)
    assert "model.layer failed on one slice of params['layers'] (L = 8," in msg
    assert "'kernel': 'float32[8]'" in msg and "'scale': 'float32[]'" in msg
    assert "h: float32[2, 3, 8]" in msg
    assert re.search(HINT, msg, re.I)
    assert isinstance(info.value.__cause__, TypeError)
    assert "len() of unsized object" in str(info.value.__cause__)


def _not_on_probe(tx):
    """``tx``, except that its init refuses the build-time probe tree, so only
    the trace-time check (on the real parameters) sees it."""

    def init(params):
        if isinstance(params, dict) and set(params) == {"a", "b", "c"}:
            raise ValueError("not this tree")
        return tx.init(params)

    return optax.GradientTransformation(init, tx.update)


def test_leafwise_error_names_no_probe_leaf_at_build_time():
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1e-2))
    with pytest.raises(ValueError, match="not leaf-wise") as info:
        fused_train_step(LayeredModel(embed, layer, head), tx)
    msg = str(info.value)
    assert "probe tree" in msg
    assert not re.search(r"\['[abc]'\]", msg), msg


def test_leafwise_error_names_the_real_leaves_at_trace_time():
    tx = _not_on_probe(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1e-2)))
    step = fused_train_step(LayeredModel(embed, layer, head), tx)
    params = params_with(STACKED)
    with pytest.raises(ValueError, match="not leaf-wise") as info:
        step(params, fused_init(tx, params), BATCH)
    msg = str(info.value)
    for leaf in ("params['embed']['tok']", "params['layers']['kernel']",
                 "params['layers']['scale']", "params['head']['out']"):
        assert leaf in msg, msg
    assert "probe" not in msg


def test_loss_on_donated_params_says_so():
    model = LayeredModel(embed, layer, head)
    params = params_with(STACKED)
    params["layers"]["kernel"].delete()  # what donating it to a step does
    with pytest.raises(RuntimeError, match=re.compile(
            r"LayeredModel.loss: params\['layers'\]\['kernel'\] has been deleted.*donated to a "
            r"fused step.*params the step returned.*jax.tree.map\(jnp.copy, params\)", re.S)):
        model.loss(params, BATCH)
