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
from collections.abc import Iterable, Mapping

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
