"""Checkpoints of a training run, written with orbax-checkpoint.

A checkpoint is one pytree of arrays (``state``: parameters, the optimizer
state - a :class:`lomo_jax.FusedState` with its loss scale, or any optax
state - PRNG keys, step counters as arrays, ...) plus a JSON dict
(``metadata``: the data position, the epoch, anything plain). Both are saved
together under ``directory/<step>/`` by an ``orbax.checkpoint
.CheckpointManager``; :class:`Checkpointer` is a thin layer over it that

* makes each save **atomic**: orbax writes into
  ``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` only once
  everything is on disk, so a process killed while saving leaves the previous
  checkpoints intact (the half-written temporary directory is ignored, and
  deleted the next time a :class:`Checkpointer` opens the directory);
* keeps the ``max_to_keep`` latest steps, and prunes **atomically** too: orbax
  first renames an old step into ``directory/.deleting/`` (orbax's
  ``todelete_subdir``; from then on it is not listed), and only then is it
  deleted, so a process killed while pruning never leaves a listed step that
  cannot be restored; what such a kill leaves in ``.deleting/`` is removed
  when a writer opens the directory and at every save;
* handles what orbax refuses: zero-size arrays (AdaLomo keeps empty
  placeholders in its state) are not written but rebuilt from the target;
* checks the target's structure, shapes and dtypes against the saved ones
  before restoring, and names the first leaves that differ;
* says so when a leaf has been donated (deleted) before it could be saved.

Restoring is bit-exact (arrays are stored losslessly in their own dtype), so a
run stopped after ``k`` steps and resumed gives bit-for-bit the parameters of
an uninterrupted run.

Example::

    import lomo_jax
    from lomo_jax import checkpoint

    ckpt = checkpoint.Checkpointer("/ckpt/run1", max_to_keep=3)
    state = {"params": params, "opt_state": opt_state, "rng": key}
    start = 0
    if ckpt.latest_step() is not None:      # resume
        state, meta = ckpt.restore(target=state)
        start = meta["data_position"]
    params, opt_state = state["params"], state["opt_state"]
    for i in range(start, n_steps):
        params, opt_state, metrics = step(params, opt_state, batches[i])
        if (i + 1) % 100 == 0:
            # before the next step donates params/opt_state
            ckpt.save(i + 1, {"params": params, "opt_state": opt_state, "rng": key},
                      metadata={"data_position": i + 1})
    ckpt.close()

``restore``'s ``target`` is a pytree of the saved structure whose leaves are
arrays (their shape, dtype and sharding are used, not their values) or
``jax.ShapeDtypeStruct`` (e.g. ``jax.eval_shape`` of the initialisation, with
a ``sharding`` or on the default device).

Notes: restored arrays are *committed* to their devices (as a jitted step's
outputs are); a step compiled for uncommitted inputs (straight from
``jnp.asarray``) compiles once more for them. On GCS, orbax commits with a
commit file instead of a rename, and orbax deletes old steps in place
(``todelete_subdir`` is local only). One writing process per directory; multi-host
saving is orbax's business and not exercised here.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Checkpointer", "save", "restore", "latest_step", "all_steps"]

_FORMAT = "lomo_jax.checkpoint/1"
_STATE, _META = "state", "meta"
# orbax's todelete_subdir: pruned steps are renamed in here, then deleted
_TRASH = ".deleting"


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError(
            "lomo_jax.checkpoint needs orbax-checkpoint: pip install orbax-checkpoint"
        ) from e
    return ocp


def _is_deleted(x) -> bool:
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_deleted()


def _leaf_info(tree):
    """``[(path, shape, dtype)]`` of every leaf (arrays or ShapeDtypeStructs)."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out.append((jax.tree_util.keystr(path), list(np.shape(x)), _dtype_name(x)))
    return out


def _dtype_name(x) -> str:
    return str(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype.name


def _size(x) -> int:
    return int(np.prod(np.shape(x), dtype=np.int64))


def _strip_empty(tree):
    """Zero-size leaves -> None (orbax cannot write them; rebuilt on restore)."""
    return jax.tree.map(lambda x: None if _size(x) == 0 else x, tree)


def _abstract_leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        if x.sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return x
    if isinstance(x, jax.Array):
        if _is_deleted(x):
            raise ValueError(
                "restore(target=...): a target leaf has been deleted (donated to a "
                "jitted step). Its shape, dtype and sharding are still needed: pass "
                "jax.eval_shape(...) of the state, or live arrays."
            )
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    arr = np.asarray(x)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(arr.shape, arr.dtype, sharding=sharding)


def _fill_empty(restored, target):
    """Put zero-size arrays back where :func:`_strip_empty` removed them."""

    def fill(t):
        if _size(t) != 0:
            return None
        sharding = getattr(t, "sharding", None)
        z = jnp.zeros(np.shape(t), t.dtype)
        return jax.device_put(z, sharding) if sharding is not None else z

    empties = jax.tree.map(fill, target)
    return jax.tree.map(
        lambda e, r: r if e is None else e,
        empties,
        restored,
        is_leaf=lambda x: x is None,
    )


def _check_saveable(state) -> None:
    bad = [
        jax.tree_util.keystr(p)
        for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
        if _is_deleted(x)
    ]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(
            f"cannot save state{shown}: the array has been deleted, most likely donated "
            "to a jitted step (the fused step donates params and opt_state). Save the "
            "values the step returned, before passing them to the next step."
        )
    for p, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not hasattr(x, "dtype"):
            raise TypeError(
                f"state{jax.tree_util.keystr(p)} is a {type(x).__name__}; checkpoint state "
                "leaves must be arrays. Put plain values (data position, epoch, config) "
                "in metadata=."
            )


def _mismatch(saved, target) -> Optional[str]:
    if [p for p, _, _ in saved] != [p for p, _, _ in target]:
        s = {p for p, _, _ in saved}
        t = {p for p, _, _ in target}
        only_s, only_t = sorted(s - t)[:4], sorted(t - s)[:4]
        return (
            "the target's tree structure differs from the saved state's: "
            f"only in the checkpoint: {only_s or '-'}; only in the target: {only_t or '-'} "
            "(a FusedState with/without loss scale or nonfinite counter, another tx, "
            "another model?)"
        )
    diffs = [
        f"state{p}: saved {sd}{ss}, target {td}{ts}"
        for (p, ss, sd), (_, ts, td) in zip(saved, target)
        if ss != ts or sd != td
    ]
    if diffs:
        more = f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""
        return "shapes/dtypes differ: " + "; ".join(diffs[:4]) + more
    return None


class Checkpointer:
    """Save and restore training checkpoints in ``directory`` (orbax).

    Args:
      directory: where the ``<step>/`` checkpoints live (created if needed).
      max_to_keep: keep this many latest checkpoints (``None``: all).
      save_interval_steps: :meth:`save` writes only on multiples of this
        (``force=True`` overrides).
      async_save: let orbax write in a background thread: :meth:`save` returns
        once the arrays are copied to host memory (so the caller may donate
        them afterwards); :meth:`wait_until_finished` / :meth:`close` wait for
        the write. Default: synchronous.
      read_only: only restore/query; leaves the directory untouched (no
        clean-up of other processes' temporary directories, no deletion).

    Use as a context manager, or call :meth:`close` at the end.
    """

    def __init__(
        self,
        directory,
        *,
        max_to_keep: Optional[int] = 3,
        save_interval_steps: int = 1,
        async_save: bool = False,
        read_only: bool = False,
    ):
        ocp = _ocp()
        if max_to_keep is not None and int(max_to_keep) < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep!r}.")
        self.directory = os.fspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=int(save_interval_steps),
            enable_async_checkpointing=bool(async_save),
            # remove leftovers of a killed save (never while only reading: another
            # process may be writing into its temporary directory right now)
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            # prune by renaming first: a step is unlisted before any file goes
            todelete_subdir=None if read_only else _TRASH,
        )
        self._read_only = bool(read_only)
        self._async = bool(async_save)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                _STATE: ocp.StandardCheckpointHandler(),
                _META: ocp.JsonCheckpointHandler(),
            },
        )
        self._empty_trash()

    # ------------------------------------------------------------ queries
    def latest_step(self) -> Optional[int]:
        """The newest complete checkpoint's step, or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list:
        """Steps of all complete checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def metadata(self, step: Optional[int] = None) -> dict:
        """The user metadata of a checkpoint (reads only the JSON)."""
        step = self._resolve(step)
        meta = self._manager.restore(
            step, args=_ocp().args.Composite(**{_META: _ocp().args.JsonRestore()})
        )[_META]
        return dict(meta["user"])

    # ------------------------------------------------------------ save
    def save(
        self,
        step: int,
        state: Any,
        *,
        metadata: Optional[Mapping[str, Any]] = None,
        force: bool = False,
    ) -> bool:
        """Write ``state`` (a pytree of arrays) and ``metadata`` (JSON) as ``step``.

        Returns whether a checkpoint was written (``False`` when
        ``save_interval_steps`` says no). Save the arrays a jitted step
        *returned*, before they are donated to the next step. Raises if
        ``step`` already exists.
        """
        ocp = _ocp()
        if self._read_only:
            raise ValueError("this Checkpointer was opened with read_only=True.")
        step = int(step)
        _check_saveable(state)
        if step in self._manager.all_steps():
            raise ValueError(
                f"a checkpoint for step {step} already exists in {self.directory}; "
                "checkpoints are never overwritten in place (that would not be atomic)."
            )
        writes = force or self._manager.should_save(step)
        if writes:  # orbax waits for the previous save here anyway
            self._manager.wait_until_finished()
            self._empty_trash()
        stripped = _strip_empty(state)
        meta = {
            "format": _FORMAT,
            "step": step,
            "treedef": str(jax.tree.structure(state)),
            "leaves": _leaf_info(state),
            "user": dict(metadata or {}),
        }
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(stripped), _META: ocp.args.JsonSave(meta)}
            ),
            force=force,
        )
        if saved and not self._async:  # pruned synchronously: delete now
            self._empty_trash()
        return saved

    # ------------------------------------------------------------ restore
    def _resolve(self, step):
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}.")
            return step
        step = int(step)
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; "
                f"available: {self.all_steps()}."
            )
        return step

    def restore(self, target: Any, step: Optional[int] = None):
        """Restore ``(state, metadata)`` of ``step`` (default: the latest).

        ``target`` gives the structure, shapes, dtypes and shardings (arrays or
        ``jax.ShapeDtypeStruct``); it must match what was saved, else a
        ``ValueError`` names the differing leaves.
        """
        ocp = _ocp()
        step = self._resolve(step)
        meta = self._manager.restore(
            step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        )[_META]
        if meta.get("format") != _FORMAT:
            raise ValueError(
                f"{self.directory}/{step} is not a lomo_jax.checkpoint checkpoint "
                f"(format {meta.get('format')!r})."
            )
        abstract = jax.tree.map(_abstract_leaf, target)
        why = _mismatch([tuple(x) for x in meta["leaves"]], _leaf_info(abstract))
        if why is None and meta["treedef"] != str(jax.tree.structure(abstract)):
            why = (
                "the target's tree structure differs from the saved state's: saved "
                f"{meta['treedef']}, target {jax.tree.structure(abstract)}"
            )
        if why is not None:
            raise ValueError(f"cannot restore step {step} from {self.directory}: {why}.")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardRestore(_strip_empty(abstract))}
            ),
        )[_STATE]
        return _fill_empty(restored, abstract), dict(meta["user"])

    # ------------------------------------------------------------ lifetime
    def _empty_trash(self) -> None:
        """Delete the steps pruning renamed into ``.deleting/`` (also those a
        killed process left there). Only while no save is in flight."""
        trash = os.path.join(self.directory, _TRASH)
        if not self._read_only and os.path.isdir(trash):
            shutil.rmtree(trash, ignore_errors=True)

    def wait_until_finished(self) -> None:
        """Block until an asynchronous save has been committed."""
        self._manager.wait_until_finished()
        self._empty_trash()

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        return f"Checkpointer({self.directory!r}, steps={self.all_steps()})"


# ---------------------------------------------------------------- functions


def save(directory, step: int, state: Any, *, metadata=None, max_to_keep: Optional[int] = 3) -> bool:
    """One-shot :meth:`Checkpointer.save` (synchronous)."""
    with Checkpointer(directory, max_to_keep=max_to_keep) as ckpt:
        return ckpt.save(step, state, metadata=metadata, force=True)


def restore(directory, target: Any, step: Optional[int] = None):
    """One-shot :meth:`Checkpointer.restore`: ``(state, metadata)``."""
    with Checkpointer(directory, max_to_keep=None, read_only=True) as ckpt:
        return ckpt.restore(target, step)


def latest_step(directory) -> Optional[int]:
    """The newest complete checkpoint's step in ``directory``, or ``None``."""
    with Checkpointer(directory, max_to_keep=None, read_only=True) as ckpt:
        return ckpt.latest_step()


def all_steps(directory) -> list:
    """Steps of all complete checkpoints in ``directory``."""
    with Checkpointer(directory, max_to_keep=None, read_only=True) as ckpt:
        return ckpt.all_steps()
