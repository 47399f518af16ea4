"""Atomic checkpoints of a lomo_torch training run.

One checkpoint is a directory ``<directory>/step_<8 digits>/`` holding

* ``model.safetensors``: the model's ``state_dict`` (parameters and buffers,
  in their own dtypes) written with ``safetensors.torch.save_model``, which
  stores a tied (shared) weight once and ties it again on load;
* ``train_state.pt``: the optimizer's ``state_dict()`` (step count, lr,
  clipping, the fp16 :class:`~lomo_torch.DynamicLossScaler`, AdaLomo's
  statistics), an optional LR scheduler's ``state_dict()`` and torch's RNG
  states; read back with ``torch.load(weights_only=True)``;
* ``meta.json``: the step and your ``metadata`` (data position, epoch, ...).

**Atomic.** Everything is written into a hidden temporary directory next to
the final one, each file and the directory are ``fsync``-ed, and the
temporary directory is then renamed (``os.replace``) to ``step_<n>``: a
checkpoint is either complete or absent, so a process killed while saving
leaves every earlier checkpoint intact. Half-written temporary directories
are ignored by :func:`latest_step`/:func:`load_checkpoint` and removed by the
next :func:`save_checkpoint` (one writer per directory is assumed). A step is
never overwritten in place.

**Pruning is atomic too** (``max_to_keep``): an old ``step_<n>`` is first
renamed to a hidden ``.deleting-step_<n>-*`` directory, which is no checkpoint,
and only then deleted; a process killed while pruning leaves every listed step
loadable. A step is listed only when all three files are there. The next
:func:`save_checkpoint` removes what such a kill left: ``.deleting-*``
directories and ``step_<n>`` directories missing a file (a deletion killed
before this rule, or damage).

Example::

    from lomo_torch import AdaLomo, checkpoint

    opt = AdaLomo(model, lr=1e-3, clip_grad_norm=1.0)
    start = 0
    if checkpoint.latest_step("ckpt") is not None:
        meta = checkpoint.load_checkpoint("ckpt", model, opt)
        start = meta["data_position"]
    for i in range(start, n_steps):
        loss = model(*batches[i])
        opt.grad_norm(loss)
        opt.fused_backward(loss, lr)
        if (i + 1) % 100 == 0:
            checkpoint.save_checkpoint("ckpt", i + 1, model, opt,
                                       metadata={"data_position": i + 1}, max_to_keep=3)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from typing import Any, Mapping, Optional

import torch

from lomo_jax._files import _fsync_dir, _fsync_file  # neither imports JAX

__all__ = ["save_checkpoint", "load_checkpoint", "latest_step", "all_steps", "step_path"]

_FORMAT = "lomo_torch.checkpoint/1"
_MODEL, _TRAIN, _META = "model.safetensors", "train_state.pt", "meta.json"
_FILES = (_MODEL, _TRAIN, _META)
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-step_"
_TRASH_PREFIX = ".deleting-"


def step_path(directory, step: int) -> str:
    """The directory of checkpoint ``step``."""
    return os.path.join(os.fspath(directory), f"step_{int(step):08d}")


def _is_complete(path: str) -> bool:
    """Whether the checkpoint directory ``path`` holds all its files."""
    return all(os.path.isfile(os.path.join(path, name)) for name in _FILES)


def all_steps(directory) -> list:
    """Steps of all complete checkpoints in ``directory``, ascending."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in os.listdir(directory):
        m = _STEP_RE.match(name)
        if m and _is_complete(os.path.join(directory, name)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_step(directory) -> Optional[int]:
    """The newest complete checkpoint's step, or ``None``."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def _discard(directory: str, name: str) -> None:
    """Delete ``directory/name``, renamed first to a ``.deleting-`` name (one
    atomic step that unlists it) so that a kill never leaves it half-listed."""
    trash = os.path.join(directory, f"{_TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
    os.rename(os.path.join(directory, name), trash)
    _fsync_dir(directory)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(directory: str) -> None:
    """Remove what killed saves and prunings left (single writer assumed):
    temporary and ``.deleting-`` directories, incomplete ``step_<n>`` ones."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)
        elif _STEP_RE.match(name) and os.path.isdir(path) and not _is_complete(path):
            _discard(directory, name)


def _prune(directory: str, max_to_keep: int) -> None:
    """Delete all but the ``max_to_keep`` newest steps; a step that cannot be
    removed stays complete and listed, with a warning."""
    for old in all_steps(directory)[:-max_to_keep]:
        try:
            _discard(directory, os.path.basename(step_path(directory, old)))
        except OSError as e:
            warnings.warn(f"max_to_keep: could not delete {step_path(directory, old)}: {e}")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")


def save_checkpoint(
    directory,
    step: int,
    model: torch.nn.Module,
    optimizer=None,
    *,
    scheduler=None,
    metadata: Optional[Mapping[str, Any]] = None,
    max_to_keep: Optional[int] = None,
    save_rng: bool = True,
) -> str:
    """Write checkpoint ``step`` atomically; returns its directory.

    Args:
      directory: the run's checkpoint directory (created if needed).
      step: the step number (a new one; existing steps are not overwritten).
      model: the module whose ``state_dict`` is saved (tied weights once).
      optimizer: a :class:`~lomo_torch.Lomo`/:class:`~lomo_torch.AdaLomo`
        (or any optimizer with ``state_dict()``); ``None`` to skip.
      scheduler: an LR scheduler with ``state_dict()``, or ``None``.
      metadata: JSON-serialisable values (data position, epoch, ...).
      max_to_keep: after the save, delete all but this many newest steps.
      save_rng: also save torch's RNG states (restored by ``load_checkpoint``).
    """
    _check_model(model)
    from safetensors.torch import save_model

    if max_to_keep is not None and int(max_to_keep) < 1:
        raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep!r}.")
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    directory = os.fspath(directory)
    final = step_path(directory, step)
    if _is_complete(final):
        raise FileExistsError(
            f"checkpoint {final} already exists; a step is never overwritten in place "
            "(that could not be atomic). Delete it first or use another step."
        )
    user = dict(metadata or {})
    try:
        meta_text = json.dumps({"format": _FORMAT, "step": step, "user": user}, indent=1)
    except TypeError as e:
        raise TypeError(f"metadata must be JSON-serialisable: {e}") from None
    os.makedirs(directory, exist_ok=True)
    _remove_leftovers(directory)
    tmp = os.path.join(directory, f"{_TMP_PREFIX}{step:08d}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        save_model(model, os.path.join(tmp, _MODEL), metadata={"format": _FORMAT})
        train = {
            "optimizer": None if optimizer is None else optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "rng": _rng_state() if save_rng else None,
        }
        torch.save(train, os.path.join(tmp, _TRAIN))
        with open(os.path.join(tmp, _META), "w") as f:
            f.write(meta_text)
        for name in (_MODEL, _TRAIN, _META):
            _fsync_file(os.path.join(tmp, name))
        _fsync_dir(tmp)
        os.replace(tmp, final)  # the commit
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if max_to_keep is not None:
        _prune(directory, int(max_to_keep))
    return final


def load_checkpoint(
    directory,
    model: torch.nn.Module,
    optimizer=None,
    *,
    scheduler=None,
    step: Optional[int] = None,
    restore_rng: bool = True,
    strict: bool = True,
) -> dict:
    """Load checkpoint ``step`` (default: the latest) into ``model`` (in place:
    the optimizer's hooks stay attached), ``optimizer`` and ``scheduler``.

    Returns the saved ``metadata`` dict with ``"step"`` added. Mismatched
    parameter names or shapes raise (``strict=False`` tolerates missing or
    unexpected names, not shapes); an optimizer of another type or for other
    parameters raises from its ``load_state_dict``.
    """
    _check_model(model)
    from safetensors.torch import load_model

    directory = os.fspath(directory)
    if step is None:
        step = latest_step(directory)
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {directory}.")
    path = step_path(directory, step)
    if not _is_complete(path):
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {directory}; available: {all_steps(directory)}."
        )
    with open(os.path.join(path, _META)) as f:
        meta = json.load(f)
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a lomo_torch checkpoint (format {meta.get('format')!r}).")
    train = torch.load(os.path.join(path, _TRAIN), weights_only=True, map_location="cpu")
    if optimizer is not None and train["optimizer"] is None:
        raise ValueError(f"{path} was saved without optimizer state.")
    if scheduler is not None and train["scheduler"] is None:
        raise ValueError(f"{path} was saved without scheduler state.")

    first = next(iter(model.parameters()), None)
    device = "cpu" if first is None else str(first.device)
    load_model(model, os.path.join(path, _MODEL), strict=strict, device=device)
    if optimizer is not None:
        optimizer.load_state_dict(train["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(train["scheduler"])
    if restore_rng and train["rng"] is not None:
        _set_rng_state(train["rng"])
    return {**meta["user"], "step": int(meta["step"])}
