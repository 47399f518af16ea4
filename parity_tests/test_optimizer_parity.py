"""lomo_jax against lomo_torch and against the original lomo-optim 0.1.1.

Same weights (PyTorch [out, in] Linear weights mapped to Flax [in, out]
kernels), same batches, a decaying learning rate; every parameter is compared
after every step, in fp32, to 1e-5 relative. lomo-optim only supports 1-D and
2-D parameters in fp32 without a process group, so the twin models are built
from Linear, LayerNorm and Embedding weights.

Global-norm clipping: lomo-optim's two passes (``grad_norm`` then
``fused_backward``) against ``optax.clip_by_global_norm`` in the chain.
"""

import pytest
import torch

import lomo_torch
from parity_tests.harness import (
    MODELS, SETTINGS, STEPS, Config, clipping_is_active, lrs_for, run_jax, run_torch,
)
from parity_tests.twin_models import assert_params_close


def reference_optimizer(request, reference, optimizer):
    if reference == "lomo_torch":
        return {"lomo": lomo_torch.Lomo, "adalomo": lomo_torch.AdaLomo}[optimizer]
    original = request.getfixturevalue("lomo_optim")
    return {"lomo": original.Lomo, "adalomo": original.AdaLomo}[optimizer]


@pytest.mark.parametrize("reference", ["lomo_torch", "lomo_optim"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("optimizer", ["lomo", "adalomo"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_lomo_jax_matches_pytorch(request, reference, model_name, optimizer, setting):
    torch_cls, jax_loss, make_batches = MODELS[model_name]
    torch.manual_seed(0)
    model = torch_cls()
    batches = make_batches(STEPS)
    cfg = Config(optimizer, lrs_for(optimizer), **SETTINGS[setting])
    assert clipping_is_active(jax_loss, model, cfg, batches[0]), "clipping would not bite"

    torch_steps, torch_losses = run_torch(
        reference_optimizer(request, reference, optimizer), model, cfg, batches)
    jax_steps, jax_losses = run_jax(jax_loss, model, cfg, batches)
    for step, (tm, jp) in enumerate(zip(torch_steps, jax_steps)):
        assert_params_close(tm, jp, rtol=1e-5, atol=1e-8, step=step)
    assert jax_losses == pytest.approx(torch_losses, rel=1e-5)
