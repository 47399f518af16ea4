import pytest
import torch


@pytest.fixture
def lomo_optim_on_cpu(monkeypatch):
    """lomo-optim's AdaLomo puts its state on ``.cuda()``; make that a no-op on CPU."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    import lomo_optim

    return lomo_optim
