"""Crash-safe file writing: stage files in a directory, fsync, rename into place.

Imports neither jax nor torch (``lomo_torch`` may use it too).

Example::

    from lomo_jax._files import write_atomically

    with write_atomically("out/", last=("index.json",)) as tmp:
        write_shards(tmp)                       # any files, written into tmp
        write_index(os.path.join(tmp, "index.json"))
    # a process killed at any moment leaves each file of out/ whole: old or new
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Sequence

__all__ = ["write_atomically"]

_STAGING_PREFIX = ".lomo_staging-"
_SAME_FILE_BYTES = 2**20


@contextlib.contextmanager
def write_atomically(path: str, *, last: Sequence[str] = ()):
    """A new directory (its path, a str) to write files into, moved into ``path`` on a
    clean exit: each is fsynced, then renamed into place (``os.replace``), the
    names in ``last`` after the others in that order, so a process killed at
    any moment leaves each file of ``path`` whole, the old or the new one. A
    file byte-identical to the one it would replace (small files) is left as
    it is. On an exception nothing is moved. The directory is made inside
    ``path`` (the same file system) and removed either way; ones that killed
    writers left are removed first (one writer per directory at a time)."""
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.startswith(_STAGING_PREFIX):
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=path)
    try:
        yield tmp
        _move_into(tmp, path, tuple(last))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into(tmp: str, path: str, last: tuple) -> None:
    """Every file of ``tmp`` fsynced, then renamed into ``path``, ``last`` last."""
    names = sorted(os.listdir(tmp))
    dirs = [n for n in names if not os.path.isfile(os.path.join(tmp, n))]
    if dirs:
        raise ValueError(f"write_atomically moves files only; {dirs} are not files.")
    for name in names:
        _fsync_file(os.path.join(tmp, name))
    order = [n for n in names if n not in last] + [n for n in last if n in names]
    for name in order:
        src, dst = os.path.join(tmp, name), os.path.join(path, name)
        if not _same_small_file(src, dst):
            os.replace(src, dst)
    _fsync_dir(path)


def _same_small_file(a: str, b: str) -> bool:
    """Whether ``b`` exists with the same bytes as ``a`` (files up to 1 MiB)."""
    if not os.path.isfile(b) or os.path.getsize(a) != os.path.getsize(b) \
            or os.path.getsize(a) > _SAME_FILE_BYTES:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def _fsync_file(file: str) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    """Make renames in ``path`` durable (where directories can be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems without directory fsync
        pass
    finally:
        os.close(fd)
