"""The collectives of the fused step under FSDP on 8 CPU devices, read from its HLO.

With parameters split over an ``fsdp`` axis of 8 devices and the batch split
over the same devices, FSDP proper means: each layer's slice is all-gathered
once in every pass that runs the layer (the forward, and the recompute of each
backward pass: three passes with ``clip_grad_norm``), its gradient is reduced
once per backward pass, and the activations stay on their own device (no
collective holds the whole batch's activations, no full stacked parameter is
ever gathered). The step is compiled (not run) in a subprocess with 8 host
devices (``--xla_force_host_platform_device_count`` acts only before JAX
starts), which prints the collectives :mod:`lomo_jax.hlo_cost` reads from the
HLO; the assertions are made here. ``tests/jax/test_sharding.py`` checks that
the sharded step computes the single-device numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.jax.cpu_devices import run_json
from tests.once_per_run import once_per_run

MARK = "COLLECTIVES "
# sizes chosen so that no two of B*T, D, FFN, the kv width and the head's vocabulary
# chunk (128) coincide: a collective's shape says what it carries
N_DEVICES, N_LAYERS, BATCH, SEQ, D, FFN, VOCAB = 8, 3, 8, 12, 320, 640, 1024
PASSES = 3  # forward + the norm pass's and the update pass's recompute (clip_grad_norm)


def _worker() -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType

    import lomo_jax
    from lomo_jax import hlo_cost
    from lomo_jax import sharding as lsh
    from lomo_jax.models import llama

    cfg = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN,
                            num_hidden_layers=N_LAYERS, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=SEQ)
    mesh = jax.make_mesh((N_DEVICES,), ("fsdp",), axis_types=(AxisType.Auto,))
    tx = lomo_jax.adalomo(1e-3)
    sh = lsh.llama_shardings(cfg, mesh, tx)
    params = lsh.abstract_like(sh.params, llama.param_shapes(cfg))
    state = lsh.abstract_like(sh.opt_state,
                              jax.eval_shape(lambda p: lomo_jax.fused_init(tx, p), params))
    batch = lsh.abstract_like(sh.batch, {"input_ids": jax.ShapeDtypeStruct((BATCH, SEQ),
                                                                           jnp.int32)})
    step = lomo_jax.fused_train_step(llama.llama_layered_model(cfg), tx, shardings=sh,
                                     clip_grad_norm=1.0)
    compiled = step.lower(params, state, batch).compile()
    layers = [{"shape": list(x.shape), "split": any(e is not None for e in s.spec)}
              for x, s in zip(jax.tree.leaves(params["layers"]), jax.tree.leaves(sh.params["layers"]))]
    units = [list(x.shape) for x in jax.tree.leaves(params)]
    return {"collectives": [c._asdict() for c in hlo_cost.collectives(compiled)],
            "layers": layers, "units": units}


@pytest.fixture(scope="module")
def hlo(tmp_path_factory):
    return once_per_run(tmp_path_factory, "collectives", lambda _: run_json(
        [str(Path(__file__).resolve())], MARK, N_DEVICES))[1]


def _dims(shape: str):
    """``"f32[1,256,128]"`` -> ``(256, 128)`` (leading 1s dropped)."""
    dims = [int(d) for d in shape[shape.index("[") + 1:-1].split(",") if d]
    while dims and dims[0] == 1:
        dims = dims[1:]
    return tuple(dims)


def _float(c):
    return c["shape"].split("[")[0] in ("f32", "bf16", "f16") and ", " not in c["shape"]


def test_each_layer_is_gathered_once_per_pass(hlo):
    """Every split layer leaf's slice is all-gathered exactly PASSES x L times
    (leaves of equal slice shape counted together)."""
    want = {}
    for leaf in hlo["layers"]:
        if leaf["split"]:
            s = tuple(leaf["shape"][1:])
            want[s] = want.get(s, 0) + PASSES * N_LAYERS
    assert want, "no layer leaf is split: the test would check nothing"
    got = {s: 0 for s in want}
    for c in hlo["collectives"]:
        if c["kind"] == "all-gather" and _float(c) and _dims(c["shape"]) in got:
            got[_dims(c["shape"])] += c["count"]
    assert got == want


def _embedding_exchange(c) -> bool:
    """The embedding lookup (a gather) or its gradient (a scatter-add), once per
    step: with a ``D``-split table XLA exchanges the tokens' rows with an
    all-to-all, and for the gradient also all-reduces the cotangent of the whole
    batch's tokens in fp32 (its scatter partitioning)."""
    return c["count"] == 1 and c["op_name"].rsplit("/", 1)[-1] in ("gather", "scatter-add")


def test_no_stacked_or_batch_wide_collective(hlo):
    """No collective result is a whole parameter leaf: a stacked [L, ...] one
    (a full-model gather), or the embedding or the head (their vocabulary
    chunks are gathered one at a time, as layers are); and
    none holds the whole batch's activations ([B, T, ...] or [B*T, ...]) or
    moves activations between devices (all-to-all): the partitioner must not
    compute a layer by gathering activations instead of the layer's weights.
    The one exception is the embedding's exchange, once per step."""
    whole = {tuple(shape) for shape in hlo["units"] if len(shape) > 1}
    bad = []
    for c in hlo["collectives"]:
        dims = _dims(c["shape"]) if ", " not in c["shape"] else ()
        whole_batch = dims[:2] == (BATCH, SEQ) or (dims and dims[0] == BATCH * SEQ)
        moves = c["kind"] == "all-to-all" or (_float(c) and whole_batch)
        if dims in whole or (moves and not _embedding_exchange(c)):
            bad.append((c["kind"], c["shape"], c["count"], c["op_name"]))
    assert not bad, bad


def test_each_layer_gradient_is_reduced_once_per_backward_pass(hlo):
    """A split layer leaf's gradient leaves each backward pass (2 with clipping)
    in one reduction per layer: a reduce-scatter to this device's shard, or on
    XLA:CPU (which has none) an all-reduce of the slice, maybe transposed and
    combined with other operands; never more. Shapes compared as sorted dims."""
    want = {}
    for leaf in hlo["layers"]:
        if leaf["split"]:
            s = tuple(sorted(leaf["shape"][1:]))
            want[s] = want.get(s, 0) + 2 * N_LAYERS
    got = {s: 0 for s in want}
    for c in hlo["collectives"]:
        if c["kind"] not in ("all-reduce", "reduce-scatter"):
            continue
        for part in c["shape"].split(", "):
            dims = list(_dims(part))
            if c["kind"] == "reduce-scatter":  # the shard: one axis is n times smaller
                fulls = {tuple(sorted(dims[:i] + [d * N_DEVICES] + dims[i + 1:]))
                         for i, d in enumerate(dims)} & set(got)
            else:
                fulls = {tuple(sorted(dims))} & set(got)
            for s in fulls:
                got[s] += c["count"]
    assert got == want


if __name__ == "__main__":
    print(MARK + json.dumps(_worker()), flush=True)
