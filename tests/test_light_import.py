"""``import lomo_jax`` is light (PEP 562: each name imported on first use), so
``lomo_jax.records`` serves PyTorch code without JAX; every public name still resolves."""

import subprocess
import sys

import lomo_jax


def test_import_lomo_jax_records_and_lomo_torch_imports_no_jax():
    code = ("import sys, lomo_jax, lomo_jax.records, lomo_torch, lomo_torch.checkpoint; "
            "print(sorted(m for m in ('jax', 'grain', 'flax', 'optax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_public_name_and_submodule_resolves():
    import lomo_jax.fused
    import lomo_jax.transforms

    assert lomo_jax.fused_train_step is lomo_jax.fused.fused_train_step
    assert lomo_jax.adalomo is lomo_jax.transforms.adalomo
    for name in lomo_jax.__all__:
        assert getattr(lomo_jax, name) is not None
    for name in ("sharding", "checkpoint", "hlo_cost", "rounding", "models", "aot", "data",
                 "records", "nnx"):
        assert getattr(lomo_jax, name).__name__ == f"lomo_jax.{name}"
    assert set(lomo_jax.__all__) <= set(dir(lomo_jax))
    try:
        lomo_jax.no_such_name
    except AttributeError as e:
        assert "no attribute 'no_such_name'" in str(e)
    else:
        raise AssertionError("lomo_jax.no_such_name resolved")


def test_no_submodule_shadows_a_public_name():
    """Importing a submodule sets the package attribute of its name, and then
    ``__getattr__`` is never asked: a module named like a public function (the old
    ``lomo_jax/per_layer.py``) made ``lomo_jax.per_layer(tx)`` call a module once
    anything had imported it. Checked in a fresh interpreter, every submodule loaded."""
    code = ("import pkgutil, importlib, types, lomo_jax\n"
            "for m in pkgutil.walk_packages(lomo_jax.__path__, 'lomo_jax.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(sorted(n for n in lomo_jax.__all__ "
            "if isinstance(getattr(lomo_jax, n), types.ModuleType)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
