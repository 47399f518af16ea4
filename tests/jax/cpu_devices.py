"""The environment of a subprocess that runs JAX on ``n`` host-platform CPU devices.

XLA:CPU runs every device's program, and the collectives in them, on one thread
pool sized by ``PJRT_NPROC`` (default: the number of cores). A collective blocks
its thread until all ``n`` devices reach it, so with fewer threads than devices
(8 devices on a 2-core machine) the devices still queued behind the blocked
ones never arrive: the rendezvous times out and XLA aborts the process. Two
threads per device leave room for every device's collective and its neighbours'
work, whatever the load on the machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

# XLA:CPU built for compile time, not run time: the tests' programs are tiny and each is
# compiled once or twice, so compiling is most of a test's time. ``-O0`` skips LLVM's
# optimisations; with the fusion emitters off, XLA:CPU emits each fusion's loops as LLVM IR
# directly instead of lowering it through MLIR first. Both are code generation only: the
# HLO, its fusions and the results' values are XLA's own either way (no test changed its
# outcome; the XLA:CPU buffer assignment moves by at most a few hundred bytes of scalars,
# e.g. 10,712,408 -> 10,712,920 bytes of temporaries for a 4-layer fused LOMO step).
# Measured on 2 cores: tests/jax/test_fused.py, ``pytest -n 0``, 167 s at -O0 alone,
# 67 s with both; the whole suite 1547 s -> 1027 s. The root conftest sets them for the
# session; a subprocess that builds its own environment adds them (run_processes).
QUICK_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def with_xla_flags(current: str, flags: Iterable[str], *, replace: bool) -> str:
    """``current`` (an ``XLA_FLAGS`` value) with ``flags`` appended; a flag whose name
    ``current`` already has replaces it (``replace=True``) or is left out (False)."""
    flags = list(flags)
    names = {f.split("=")[0] for f in flags}
    given = current.split()
    if replace:
        return " ".join([f for f in given if f.split("=")[0] not in names] + flags)
    have = {f.split("=")[0] for f in given}
    return " ".join(given + [f for f in flags if f.split("=")[0] not in have])


def cpu_devices_env(n: int, extra_flags: Iterable[str] = (),
                    base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with ``n`` CPU devices, enough pool
    threads for their collectives, ``JAX_PLATFORMS=cpu`` and ``extra_flags``
    added to ``XLA_FLAGS`` (a flag given again replaces the inherited one)."""
    env = dict(os.environ if base is None else base)
    env["XLA_FLAGS"] = with_xla_flags(
        env.get("XLA_FLAGS", ""),
        [f"--xla_force_host_platform_device_count={n}", *extra_flags], replace=True)
    env["PJRT_NPROC"] = str(max(2 * n, int(env.get("PJRT_NPROC", 0) or 0)))
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_processes(script: Path, n: int, *args: str, timeout: int = 600) -> list[str]:
    """Run ``python script RANK PORT *args`` as ``n`` processes of one JAX
    distributed job (``PORT``: a free coordinator port; the inherited
    ``XLA_FLAGS`` replaced by :data:`QUICK_COMPILE_FLAGS`, the repository on
    ``PYTHONPATH``) and return each
    one's output, after checking that all of them succeeded."""
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(QUICK_COMPILE_FLAGS)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(port), *args],
                              cwd=repo, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for rank in range(n)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, text) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {rank} failed:\n{text[-6000:]}"
    return outputs
