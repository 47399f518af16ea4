"""AdaLomo on 0-D ... 4-D parameters against a plain reference implementation.

Gradients are exact: the loss is ``sum(p * g)``, so d loss / d p == g bit for bit
(the default loss scale 2**10 is a power of two and cancels exactly).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lomo_torch
from tests.torch.helpers import Params, assert_close_rel, ref_adalomo, ref_clip

SHAPES = {"scalar": (), "vector": (7,), "matrix": (5, 6), "rank3": (3, 4, 5), "rank4": (2, 3, 4, 5)}


def run(shapes, steps, lrs, seed=0, dtype=torch.float32, **kw):
    g = torch.Generator().manual_seed(seed)
    init = {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}
    grads = [{n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()} for _ in range(steps)]
    model = Params(init)
    opt = lomo_torch.AdaLomo(model, lr=lrs[0], **kw)
    ref = {n: t.clone() for n, t in init.items()}
    ref_state = {n: {} for n in shapes}
    ref_kw = {k: v for k, v in kw.items() if k in ("eps", "clip_threshold", "decay_rate", "weight_decay")}
    for t, (gr, lr) in enumerate(zip(grads, lrs), start=1):
        loss = model(gr)
        if kw.get("clip_grad_norm") is not None:
            opt.grad_norm(loss)
        opt.fused_backward(loss, lr)
        clipped = ref_clip(gr, kw.get("clip_grad_value"), kw.get("clip_grad_norm"))
        for n in shapes:
            ref[n] = ref_adalomo(ref[n], clipped[n], ref_state[n], t, lr, **ref_kw)
            assert_close_rel(getattr(model, n).detach(), ref[n], rtol=1e-6, msg=f"step {t}: {n}")
    return model, opt, ref_state


@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.1, "clip_grad_value": 0.5},
                                {"clip_grad_norm": 1.0, "clip_threshold": 0.5, "decay_rate": -0.5}])
def test_any_rank_matches_reference(kw):
    model, opt, ref_state = run(SHAPES, steps=4, lrs=[1e-2, 8e-3, 6e-3, 4e-3], **kw)
    state = opt.state_dict()["state"]
    for name, shape in SHAPES.items():
        if len(shape) >= 2:
            assert state[name]["exp_avg_sq_row"].shape == shape[:-1]
            assert state[name]["exp_avg_sq_col"].shape == shape[:-2] + shape[-1:]
            assert_close_rel(state[name]["exp_avg_sq_row"], ref_state[name]["row"])
            assert_close_rel(state[name]["exp_avg_sq_col"], ref_state[name]["col"])
        else:
            assert set(state[name]) == {"exp_avg_sq"}
            assert state[name]["exp_avg_sq"].shape == shape
            assert_close_rel(state[name]["exp_avg_sq"], ref_state[name]["v"])


def test_factored_memory_is_row_plus_col():
    _, opt, _ = run({"m": (40, 30), "t": (2, 8, 9)}, steps=1, lrs=[1e-2])
    n_state = sum(v.numel() for s in opt.state_dict()["state"].values() for v in s.values())
    assert n_state == (40 + 30) + (2 * 8 + 2 * 9)


def test_small_params_use_eps_floor():
    """rms(p) below eps[1]: the step is lr * eps[1] (zero-initialised biases)."""
    model = Params({"b": torch.zeros(4)})
    opt = lomo_torch.AdaLomo(model, lr=0.1)
    opt.fused_backward(model({"b": torch.tensor([1.0, -2.0, 3.0, -4.0])}), 0.1)
    # t=1: v = g^2 + eps0, update = sign(g) with rms 1, step = lr * eps[1]
    torch.testing.assert_close(model.b.detach(), -0.1 * 1e-3 * torch.tensor([1.0, -1.0, 1.0, -1.0]))


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=0, max_size=4).map(tuple),
       seed=st.integers(0, 2**31 - 1), weight_decay=st.sampled_from([0.0, 0.1]))
def test_random_shapes(shape, seed, weight_decay):
    run({"p": shape}, steps=3, lrs=[1e-2, 5e-3, 2e-3], seed=seed, weight_decay=weight_decay)
