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

REPLACED_FLAGS = ("--xla_force_host_platform_device_count",)


def cpu_devices_env(n: int, extra_flags: Iterable[str] = (),
                    base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with ``n`` CPU devices, enough pool
    threads for their collectives, ``JAX_PLATFORMS=cpu`` and ``extra_flags``
    added to ``XLA_FLAGS`` (a flag given again replaces the inherited one)."""
    env = dict(os.environ if base is None else base)
    extra = list(extra_flags)
    replaced = REPLACED_FLAGS + tuple(f.split("=")[0] for f in extra)
    kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(replaced)]
    env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={n}"] + extra)
    env["PJRT_NPROC"] = str(max(2 * n, int(env.get("PJRT_NPROC", 0) or 0)))
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_processes(script: Path, n: int, *args: str, timeout: int = 600) -> list[str]:
    """Run ``python script RANK PORT *args`` as ``n`` processes of one JAX
    distributed job (``PORT``: a free coordinator port; the inherited
    ``XLA_FLAGS`` dropped, the repository on ``PYTHONPATH``) and return each
    one's output, after checking that all of them succeeded."""
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
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
