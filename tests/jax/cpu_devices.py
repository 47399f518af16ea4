"""The environment of a subprocess that runs JAX on ``n`` host-platform CPU devices.

XLA:CPU runs every device's program, and the collectives in them, on one thread
pool sized by ``PJRT_NPROC`` (default: the number of cores). A collective blocks
its thread until all ``n`` devices reach it, so with fewer threads than devices
(8 devices on a 2-core machine) the devices still queued behind the blocked
ones never arrive: the rendezvous times out and XLA aborts the process. Two
threads per device leave room for every device's collective and its neighbours'
work, whatever the load on the machine.

Also the tests' ways of running such programs: a script on ``n`` devices that
prints a JSON result (:func:`run_json`), ``n`` processes of one JAX distributed job
(:func:`run_processes`, :func:`join_processes`), and a script that uses
``transformers`` without importing torch (:func:`hide_torch`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

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


def _with_repo_path(env: dict[str, str]) -> dict[str, str]:
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def script_env(n_devices: int) -> dict[str, str]:
    """The environment of a test script on ``n_devices`` CPU devices:
    :func:`cpu_devices_env` with :data:`QUICK_COMPILE_FLAGS`, the repository on
    ``PYTHONPATH``."""
    return _with_repo_path(cpu_devices_env(n_devices, QUICK_COMPILE_FLAGS))


def run_json(args: Sequence[str], mark: str, n_devices: int, timeout: int = 600) -> Any:
    """Run ``python *args`` in :func:`script_env` (``cwd``: the repository), check that
    it succeeded and return the JSON after ``mark`` on its last stdout line that starts so."""
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=script_env(n_devices),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return marked_json(proc.stdout, mark)


def marked_json(stdout: str, mark: str) -> Any:
    """The JSON after ``mark`` on the last line of ``stdout`` that starts with it."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(mark)]
    assert lines, stdout[-3000:]
    return json.loads(lines[-1][len(mark):])


def hide_torch() -> None:
    """Make ``import torch`` fail in this process (a subprocess that needs
    ``transformers`` only for configs calls it first): ``transformers`` then reads
    and writes configs without importing torch, ~4 s of CPU less per process. The
    files are the same (checked: ``config.json`` and ``generation_config.json``
    written, ``load_pretrained``'s ``LlamaConfig`` read, with and without)."""
    sys.modules.setdefault("torch", None)  # a None entry: find_spec says not installed


def join_processes(rank: int, port: int, n: int, local_devices: int) -> None:
    """Start JAX in this process as process ``rank`` of the ``n`` that
    :func:`run_processes` started (``port``: its coordinator's), with
    ``local_devices`` CPU devices and gloo collectives. (Not
    ``jax_share_binary_between_hosts``: on the CPU the processes' cache keys differ,
    they hash their own devices, and the others wait for ever for process 0's.)"""
    os.environ.update(cpu_devices_env(local_devices, QUICK_COMPILE_FLAGS))
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=n,
                               process_id=rank, initialization_timeout=120)


def run_processes(script: Path, n: int, *args: str, timeout: int = 600) -> list[str]:
    """Run ``python script RANK PORT *args`` as ``n`` processes of one JAX
    distributed job (``PORT``: a free coordinator port; the inherited
    ``XLA_FLAGS`` replaced by :data:`QUICK_COMPILE_FLAGS`, the repository on
    ``PYTHONPATH``) and return each
    one's output, after checking that all of them succeeded."""
    env = _with_repo_path(dict(os.environ))
    env["XLA_FLAGS"] = " ".join(QUICK_COMPILE_FLAGS)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(port), *args],
                              cwd=REPO, env=env, stdout=subprocess.PIPE,
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
