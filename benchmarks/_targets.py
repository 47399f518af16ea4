"""Which compile target a benchmark was asked for, known before JAX starts
(XLA flags and ``JAX_PLATFORMS`` must be set first). No JAX import here."""

from __future__ import annotations

import argparse
import importlib.util


def default_target() -> str:
    """rtx4090 where JAX's CUDA plugin is installed, else cpu."""
    return "rtx4090" if importlib.util.find_spec("jax_plugins.xla_cuda12") else "cpu"


def target_from(argv, default=None) -> str:
    """The ``--target`` in ``argv`` (either ``--target X`` or ``--target=X``), else
    ``default``, else :func:`default_target`."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--target", default=None)
    return pre.parse_known_args(argv)[0].target or default or default_target()
