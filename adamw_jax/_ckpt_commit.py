"""Where save_opt_state writes: one writer at a time, a new checkpoint committed by renames.

A save to ``<dir>`` takes an exclusive lock on ``<dir>.adamw_jax-lock`` (an
``fcntl.flock``, released by the kernel when its process dies; a second
writer waits for it, up to a timeout), writes the whole checkpoint to
``<dir>.adamw_jax-new`` (orbax writes there through a temporary directory of
its own, renamed when complete), and only then commits it: the old checkpoint
is renamed to ``<dir>.adamw_jax-old``, the new one to ``<dir>``, and the old
one deleted. Killed at any point, the directory holds the previous checkpoint
or the new one, whole: killed between the two renames, ``<dir>`` is missing
and ``<dir>.adamw_jax-old`` is the previous checkpoint, which a restore reads
and the next save puts back. Nothing is deleted but those names and a
checkpoint of ours that ``force=True`` replaces.

With several processes (``jax.distributed``), all of them save and process 0
alone locks, checks and renames; the others learn its outcome (a collective)
and return after the commit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Iterator

import jax
import numpy as np

LOCK, NEW, OLD = ".adamw_jax-lock", ".adamw_jax-new", ".adamw_jax-old"
# orbax writes `x` into `x.orbax-checkpoint-tmp*`, then renames it.
_ORBAX_TMP = ".orbax-checkpoint-tmp"
# What our checkpoints hold: orbax's files of the arrays' item and its step metadata, which
# names our handler; formats 1 and 2 held two items, `opt_state` and `adamw_jax`.
_FILES = {"_CHECKPOINT_METADATA", "_METADATA", "_sharding", "manifest.ocdbt", "d"}
_FILES |= {"array_metadatas", "commit_success.txt", "opt_state", "adamw_jax"}
HANDLER = "adamw_jax.OptStateHandler"  # our orbax handler's typestr, in _CHECKPOINT_METADATA


def checked_path(directory, who: str) -> str:
  text = os.fspath(directory)
  if not isinstance(text, str) or not text.strip():
    raise ValueError(f"{who}: the directory must be a non-empty path, not {text!r}.")
  return os.path.abspath(text)


def is_checkpoint(path: str) -> bool:
  """`path` is one of our checkpoints (its arrays possibly damaged) and holds nothing else."""
  if not os.path.isdir(path):
    return False
  names = os.listdir(path)
  if any(n not in _FILES and not n.startswith("ocdbt.process_") for n in names):
    return False
  if "adamw_jax" in names:  # formats 1 and 2
    return True
  try:
    with open(os.path.join(path, "_CHECKPOINT_METADATA")) as f:
      return HANDLER in f.read()
  except OSError:
    return False


def _rename(src: str, dst: str) -> None:
  os.rename(src, dst)


def _remove(path: str) -> None:
  shutil.rmtree(path)


def _sync_dir(path: str) -> None:
  """Makes the renames in directory `path` durable (a power loss keeps them)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _stale_writes(path: str) -> list[str]:
  """What an interrupted save left: its new checkpoint, whole or in orbax's temporary directory."""
  parent, name = os.path.split(path)
  return [
    os.path.join(parent, entry)
    for entry in os.listdir(parent)
    if entry == name + NEW or entry.startswith(name + NEW + _ORBAX_TMP)
  ]


def _discard(path: str, wait: float = 5.0) -> None:
  """Removes what a failed save wrote; orbax's writer threads may still be finishing (a full
  disk fails one write while others go on), so until nothing is left for 0.1 s, or `wait` s."""
  deadline = time.monotonic() + wait
  while True:
    for stale in _stale_writes(path):
      shutil.rmtree(stale, ignore_errors=True)
    time.sleep(0.1)
    if not _stale_writes(path) or time.monotonic() > deadline:
      return


def _recover(path: str) -> None:
  """Finishes or undoes what an interrupted save left (under the lock)."""
  old = path + OLD
  if not os.path.exists(path) and is_checkpoint(old):
    _rename(old, path)  # killed between the two renames: the previous checkpoint goes back
  elif os.path.exists(path) and os.path.isdir(old):
    _remove(old)  # killed after the commit, before (or while) the old one was deleted
  for stale in _stale_writes(path):
    _remove(stale)


@contextlib.contextmanager
def _locked(path: str, timeout: float, who: str) -> Iterator[None]:
  import fcntl  # POSIX

  lock = path + LOCK
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    deadline = time.monotonic() + timeout
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() >= deadline:
          holder = os.pread(fd, 200, 0).decode(errors="replace") or "unknown"
          raise TimeoutError(
            f"{who}: another save to {path!r} holds its lock {lock!r} ({holder}); waited "
            f"{timeout:g} s (timeout=). Nothing was written."
          ) from None
        time.sleep(0.02)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock


def _check_target(path: str, force: bool, who: str) -> None:
  if not os.path.exists(path):
    return
  if not force:
    raise FileExistsError(
      f"{who}: {path!r} already exists; give force=True to replace the checkpoint there."
    )
  if not is_checkpoint(path):
    held = sorted(os.listdir(path))[:8] if os.path.isdir(path) else "a file"
    raise FileExistsError(
      f"{who}: {path!r} is not an adamw_jax checkpoint (it holds {held}); force=True "
      "replaces only a checkpoint. Nothing was written or deleted."
    )


def failures(ok: bool) -> list[int]:
  """The processes whose `ok` is False; with several, a collective that every process calls."""
  if jax.process_count() == 1:
    return [] if ok else [0]
  from jax.experimental import multihost_utils

  flags = np.asarray(multihost_utils.process_allgather(np.int32(ok))).reshape(-1)
  return [i for i, flag in enumerate(flags) if not flag]


def _agree(ok: bool, path: str, who: str) -> None:
  """Raises in every process if process 0 failed (after its own error, which it raises)."""
  if failures(ok) and ok:
    raise RuntimeError(
      f"{who}: process 0 failed saving to {path!r} (its error says why). Nothing was committed."
    )


@contextlib.contextmanager
def writing(path: str, *, force: bool, timeout: float, who: str) -> Iterator[str]:
  """Yields the directory to write the new checkpoint to; commits it when the block succeeds."""
  primary = jax.process_index() == 0
  with contextlib.ExitStack() as stack:
    if primary:
      try:
        stack.enter_context(_locked(path, timeout, who))
        _recover(path)
        _check_target(path, force, who)
      except BaseException:
        _agree(False, path, who)
        raise
    _agree(True, path, who)
    new = path + NEW
    try:
      yield new
    except BaseException:
      if primary:
        _discard(path)
      raise
    if primary:
      try:
        _commit(new, path)
      except BaseException:
        _agree(False, path, who)
        raise
    _agree(True, path, who)


def _commit(new: str, path: str) -> None:
  parent = os.path.dirname(path)
  if os.path.exists(path):
    _rename(path, path + OLD)
    _rename(new, path)
    _sync_dir(parent)
    _remove(path + OLD)
  else:
    _rename(new, path)
    _sync_dir(parent)


def previous(path: str) -> str | None:
  """The previous checkpoint a save interrupted between its renames left, if `path` is missing."""
  old = path + OLD
  if not os.path.exists(path) and is_checkpoint(old):
    return old
  return None


def unfinished(path: str) -> str | None:
  """The name of what a save that never finished left beside `path`, if anything."""
  parent, name = os.path.split(path)
  if not os.path.isdir(parent):
    return None
  left = sorted(e for e in os.listdir(parent) if e.startswith((name + NEW, name + _ORBAX_TMP)))
  return left[-1] if left else None


def holds_checkpoint(path: str) -> bool:
  """`path` is a checkpoint to read, or to refuse as damaged (restoring tells whether it is whole)."""
  held = ("_METADATA", "adamw_jax")
  return any(os.path.exists(os.path.join(path, n)) for n in held) or is_checkpoint(path)
