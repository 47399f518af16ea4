"""A module or session fixture's result computed once per test run, for all xdist workers.

A module's tests, and so its module-scoped fixture, may run on several pytest-xdist
workers; a session fixture runs once per worker. :func:`once_per_run` makes the result
once: the first worker to ask computes it, the others wait on a lock and read it
(xdist's own recipe: the workers' base temporary directories share a parent). E.g.
``tests/jax/test_collectives.py`` at ``-n 2``: its 8-device compile ran on both
workers (11.3 + 11.8 s of CPU), now on one. (``--dist loadgroup`` does not keep a
module's tests together with pytest 9.2 and xdist 3.8: xdist marks a group by
rewriting ``item._nodeid``, which pytest 9 no longer reads.)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock


def once_per_run(tmp_path_factory, name: str,
                 compute: Callable[[Path], Any]) -> tuple[Path, Any]:
    """``(directory, compute(directory))``: the result (JSON) computed once per test run
    in ``directory`` (fresh: a run that failed is made again from scratch), which the
    result may name. Without xdist the parent of the base temporary directory is shared
    by every session: then it stays in this session's own."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    directory, done = root / name, root / f"{name}.json"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            result = compute(directory)
            done.with_suffix(".tmp").write_text(json.dumps(result))
            done.with_suffix(".tmp").replace(done)
    return directory, json.loads(done.read_text())
