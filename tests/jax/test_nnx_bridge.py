"""lomo_jax.nnx: a Flax NNX model in the fused step, params back, nnx.Optimizer."""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lomo_jax

V, D, L = 16, 8, 3
PARTS = dict(embed="embed", blocks="blocks", head=("norm", "out"))
INIT = dict(kernel_init=nnx.initializers.normal(0.5))  # cheaper to compile than lecun's


class Block(nnx.Module):
    def __init__(self, rate, *, rngs, bn=False):
        self.norm = nnx.RMSNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, 2 * D, rngs=rngs, **INIT)
        self.drop = nnx.Dropout(rate, rngs=rngs if rate else None)
        self.down = nnx.Linear(2 * D, D, rngs=rngs, **INIT)
        if bn:
            self.bn = nnx.BatchNorm(D, rngs=rngs)

    def __call__(self, h):
        return h + self.down(self.drop(jax.nn.gelu(self.up(self.norm(h)))))


class LM(nnx.Module):
    def __init__(self, rate=0.5, *, bn=False, head_rate=0.0, seed=0):
        rngs = nnx.Rngs(jax.random.key(seed, impl="rbg"))
        self.embed = nnx.Embed(V, D, rngs=rngs, embedding_init=INIT["kernel_init"])

        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return Block(rate, rngs=rngs, bn=bn)

        self.blocks = blocks(rngs)
        self.norm = nnx.RMSNorm(D, rngs=rngs)
        self.out = nnx.Linear(D, V, rngs=rngs, **INIT)
        if head_rate:
            self.norm.drop = nnx.Dropout(head_rate, rngs=rngs)

    def hidden(self, tokens):  # the module's own forward: nnx.scan over the stack
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h, block):
            return block(h)

        return body(self.embed(tokens), self.blocks)

    def __call__(self, tokens):
        return self.out(self.norm(self.hidden(tokens)))


def xent(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:]).mean()


FNS = dict(embed_fn=lambda embed, b: embed(b["tokens"][:, :-1]),
           layer_fn=lambda block, h, b: block(h),
           head_fn=lambda head, h, b: xent(head[1](head[0](h)), b["tokens"]))
BATCH = {"tokens": jax.random.randint(jax.random.key(1), (2, 7), 0, V)}


def module_loss(lm):
    return xent(lm(BATCH["tokens"][:, :-1]), BATCH["tokens"])


def reference_tx(tx):
    """tx on embed/head, per_layer(tx) on the layers: what the fused step applies."""
    return optax.multi_transform({"one": tx, "stack": lomo_jax.per_layer(tx)},
                                 {"embed": "one", "layers": "stack", "head": "one"})


def test_update_then_split_round_trips():
    lm = LM()
    params = lomo_jax.nnx.split_params(lm, **PARTS)
    assert params["layers"]["up"]["kernel"].shape == (L, D, 2 * D)
    new = jax.tree.map(lambda x: x + 1.0, params)
    lomo_jax.nnx.update(lm, new, **PARTS)
    jax.tree.map(np.testing.assert_array_equal, lomo_jax.nnx.split_params(lm, **PARTS), new)
    bad = jax.tree.map(lambda x: x, new)
    bad["head"]["out"]["kernel"] = jnp.zeros((D, V + 1))
    with pytest.raises(ValueError, match="out.kernel has shape"):
        lomo_jax.nnx.update(lm, bad, **PARTS)


def test_layered_loss_is_the_modules_loss_plain_and_tied():
    lm = LM(rate=0.0)
    params, model = lomo_jax.nnx.layered(lm, **PARTS, **FNS)
    np.testing.assert_allclose(jax.jit(model.loss)(params, BATCH), nnx.jit(module_loss)(lm),
                               rtol=1e-6)

    def tied_head(head, h, b, embed):  # logits from the embedding (+ out's bias)
        return xent(embed.attend(head[0](h)) + head[1].bias, b["tokens"])

    params, tied = lomo_jax.nnx.layered(lm, **PARTS, **dict(FNS, head_fn=tied_head), tied=True)
    expected = tied_head((lm.norm, lm.out), lm.hidden(BATCH["tokens"][:, :-1]), BATCH, lm.embed)
    np.testing.assert_allclose(jax.jit(tied.loss)(params, BATCH), expected, rtol=1e-6)


def test_a_block_without_rng_state_needs_no_key():
    params, model = lomo_jax.nnx.layered(LM(rate=0.0), **PARTS, **FNS)
    assert "key" not in inspect.signature(model.layer).parameters
    h = model.embed(params["embed"], BATCH)
    model.layer(jax.tree.map(lambda x: x[0], params["layers"]), h, BATCH)
    params, keyed = lomo_jax.nnx.layered(LM(rate=0.5), **PARTS, **FNS)
    with pytest.raises(ValueError, match="hold RNG streams"):
        keyed.layer(jax.tree.map(lambda x: x[0], params["layers"]), h, BATCH)


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_a_layer_fn_with_index_gets_the_layers_position(rate):
    """``layer_fn(block, h, batch, index)`` (Gemma 2-style alternating layers) is
    passed each layer's position, with or without dropout keys: the loss equals
    a hand loop calling it with 0, 1, 2; one without ``index`` is not passed it."""
    def layer_fn(block, h, b, index):
        return block(h) * (1.0 + 0.5 * index)

    params, model = lomo_jax.nnx.layered(LM(rate=rate), **PARTS,
                                         **dict(FNS, layer_fn=layer_fn))
    assert model.takes_index and model.takes_key == bool(rate)
    k = jax.random.key(3) if rate else None
    h = model.embed(params["embed"], BATCH)
    for i in range(L):
        p_i = jax.tree.map(lambda x: x[i], params["layers"])
        h = model.call_layer(p_i, h, BATCH, jnp.int32(i),
                             None if k is None else lomo_jax.layer_key(k, i))
    expected = model.head(params["head"], h, BATCH)
    np.testing.assert_allclose(model.loss(params, BATCH, key=k), expected, rtol=1e-6)
    _, plain = lomo_jax.nnx.layered(LM(rate=rate), **PARTS, **FNS)
    assert not plain.takes_index


def test_dropout_masks_follow_the_key_per_layer_and_step():
    params, model = lomo_jax.nnx.layered(LM(rate=0.5), **PARTS, **FNS)
    k = jax.random.key(7)
    h = model.embed(params["embed"], BATCH)
    p0 = jax.tree.map(lambda x: x[0], params["layers"])
    out = [model.layer(p0, h, BATCH, key=jax.random.fold_in(k, i)) for i in (0, 0, 1)]
    np.testing.assert_array_equal(out[0], out[1])  # same key: same mask (recompute)
    assert np.mean(np.asarray(out[0] != out[2])) > 0.2  # another layer: another mask
    # the loss draws layer i's mask from fold_in(key, i); a new step key, new masks
    for i in range(L):
        h = model.layer(jax.tree.map(lambda x: x[i], params["layers"]), h, BATCH,
                        key=jax.random.fold_in(k, i))
    loss = jax.jit(lambda key: model.loss(params, BATCH, key=key))
    np.testing.assert_allclose(loss(k), model.call_head(params, h, BATCH), rtol=1e-6)
    assert loss(k) != loss(jax.random.key(8))


def test_fused_step_with_dropout_equals_value_and_grad():
    params, model = lomo_jax.nnx.layered(LM(rate=0.5), **PARTS, **FNS)
    tx = lomo_jax.adalomo(1e-2)
    step = lomo_jax.fused_train_step(model, tx)
    fused, state = jax.tree.map(jnp.copy, params), lomo_jax.fused_init(tx, params)
    ref, ref_state = params, reference_tx(tx).init(params)
    @jax.jit
    def reference(p, s, key):  # value_and_grad(model.loss) + the same transform
        updates, s = reference_tx(tx).update(jax.grad(model.loss)(p, BATCH, key=key), s, p)
        return optax.apply_updates(p, updates), s

    for seed in (3, 4):  # each step against the reference with the same key
        key = jax.random.key(seed)
        ref, ref_state = reference(ref, ref_state, key)
        fused, state, _ = step(fused, state, BATCH, key=key)
        # a wrong mask in the recompute moves a weight by ~lr * RMS(W) ~ 1e-3
        chex.assert_trees_all_close(fused, ref, rtol=0, atol=2e-6)


def test_nnx_optimizer_with_clip_then_per_layer_equals_the_reference():
    lm = LM(rate=0.0)
    params = lomo_jax.nnx.split_params(lm, **PARTS)
    tx, clip = lomo_jax.adalomo(1e-2, weight_decay=0.1), optax.clip_by_global_norm(1.0)
    grads = nnx.jit(nnx.grad(module_loss))(lm)  # through the module's own __call__
    g = nnx.to_pure_dict(grads)
    g = {"embed": g["embed"], "layers": g["blocks"], "head": {k: g[k] for k in ("norm", "out")}}
    ref = optax.chain(clip, reference_tx(tx))  # = fused step with clip_grad_norm=1.0
    updates, _ = jax.jit(ref.update)(g, ref.init(params), params)
    expected = optax.apply_updates(params, updates)
    optimizer = nnx.Optimizer(
        lm, optax.chain(clip, lomo_jax.nnx.per_layer(tx, blocks="blocks")), wrt=nnx.Param)
    naive_lm = LM(rate=0.0)  # the same weights, under tx on the whole stacked State
    naive = nnx.Optimizer(naive_lm, optax.chain(clip, tx), wrt=nnx.Param)
    step = nnx.jit(lambda opt, lm, grads: opt.update(lm, grads))
    step(optimizer, lm, grads)
    step(naive, naive_lm, grads)
    # tx on the whole stack (AdaLomo's RMS over L layers) differs by ~lr * RMS(W) ~ 1e-3
    chex.assert_trees_all_close(lomo_jax.nnx.split_params(lm, **PARTS), expected, rtol=0,
                                atol=1e-6)
    naive_layers = lomo_jax.nnx.split_params(naive_lm, **PARTS)["layers"]
    off = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), naive_layers,
                       expected["layers"])
    assert max(jax.tree.leaves(off)) > 1e-4, off  # the README's warning holds


@pytest.mark.parametrize("lm,where", [
    (lambda: LM(bn=True), "blocks.bn.mean"),
    (lambda: LM(head_rate=0.1), "norm.drop.rngs.count"),
])
def test_refuses_state_it_cannot_train_or_reseed(lm, where):
    with pytest.raises(ValueError, match=where.replace(".", r"\.")):
        lomo_jax.nnx.layered(lm(), **PARTS, **FNS)


def test_refuses_a_param_outside_the_parts():
    lm = LM(rate=0.0)
    with pytest.raises(ValueError, match=r"parameter out\.bias is in none"):
        lomo_jax.nnx.layered(lm, embed="embed", blocks="blocks", head="norm", **FNS)
