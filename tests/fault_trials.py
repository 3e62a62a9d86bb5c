"""Fault trials of checkpoints: a saving process killed, a full disk, two writers, flipped bytes.

Each trial starts from a good checkpoint of one state ("old") and tries to
replace it with another ("new"), then restores: the outcome is "old" or "new"
restored bit for bit, or a refusal; anything else (an error restoring the last
good checkpoint, other values, a file left behind) raises ``TrialFailed``.
tests/test_checkpoint_faults.py runs a representative set of them and
benchmarks/checkpoint_faults.py many, for the trial counts.

Killed savers are forked from a forkserver that has imported jax, orbax and
adamw_jax (no device touched), so a trial costs its save, not the imports; a
child kills itself with SIGKILL at a named point of the save (a function of
adamw_jax wrapped), or the test kills it after a delay. Every wait is bounded.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import pathlib
import shutil
import signal
import subprocess
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import adamw_jax
from adamw_jax import _ckpt_commit, _ckpt_orbax, _ckpt_sums
from tests import checkpoint_files

WAIT = 120  # seconds: the longest any trial waits for a child
LOCK = _ckpt_commit.LOCK


class TrialFailed(AssertionError):
  """Data lost or damaged: the last good checkpoint did not restore bit for bit."""


# --------------------------------------------------------------------------
# The states
# --------------------------------------------------------------------------


def tx(bits: int | None):
  extra = {} if bits is None else {"moment_bits": bits}
  return adamw_jax.adamw(1e-2, weight_decay=0.1, **extra)


def _params(size: int, seed: int):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.standard_normal(size), jnp.float32), "b": jnp.ones(3)}


@functools.lru_cache(maxsize=16)
def state(seed: int, bits: int | None, size: int):
  """A state after one step from random parameters: moments of random values (incompressible)."""
  params = _params(size, seed)
  t = tx(bits)
  return jax.jit(t.update)(params, t.init(params), params)[1]


def target(bits: int | None, size: int):
  return tx(bits).init(_params(size, 0))


def restored_as(path: pathlib.Path, candidates: dict[str, Any], bits, size) -> str:
  """Which candidate the checkpoint at `path` restores to, bit for bit; TrialFailed otherwise."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # the previous checkpoint restored from <dir>.adamw_jax-old
      got = adamw_jax.restore_opt_state(path, target(bits, size))
  except Exception as e:
    raise TrialFailed(f"the last good checkpoint does not restore: {e}") from e
  for name, value in candidates.items():
    if checkpoint_files.bitwise_equal(got, value):
      return name
  raise TrialFailed(f"{path} restored values other than {sorted(candidates)}")


def check_clean(path: pathlib.Path) -> None:
  """Nothing but the checkpoint and its lock file beside it (after a save that succeeded)."""
  left = sorted(p.name for p in path.parent.iterdir())
  if left != sorted([path.name, path.name + LOCK]):
    raise TrialFailed(f"left behind: {left}")


# --------------------------------------------------------------------------
# Killed savers
# --------------------------------------------------------------------------


@functools.cache
def _context():
  context = multiprocessing.get_context("forkserver")
  context.set_forkserver_preload(["jax", "orbax.checkpoint", "adamw_jax", "tests.fault_trials"])
  return context


def _die() -> None:
  os.kill(os.getpid(), signal.SIGKILL)


def _kill_on(owner, name: str, call: int, partial=None) -> None:
  """Wraps `owner.name` so that its `call`-th call kills the process (after `partial(*args)`)."""
  original = getattr(owner, name)
  calls = [0]

  def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] == call:
      if partial is not None:
        partial(*args)
      _die()
    return original(*args, **kwargs)

  setattr(owner, name, wrapped)


def _remove_half(path: str) -> None:
  files = sorted(p for p in pathlib.Path(path).rglob("*") if p.is_file())
  for file in files[: len(files) // 2]:
    file.unlink()


# Where a child kills itself: (what is wrapped, on which call, what must restore afterwards).
POINTS = {
  "locked, before writing": (lambda: (_ckpt_sums, "sums"), 1, "old"),
  "arrays written, before orbax's rename": (lambda: (_ckpt_orbax.types()[0], "finalize"), 1, "old"),
  "written, before the commit": (lambda: (_ckpt_commit, "_commit"), 1, "old"),
  "between the renames": (lambda: (_ckpt_commit, "_rename"), 2, "old"),
  "committed, before removing the old": (lambda: (_ckpt_commit, "_remove"), 1, "new"),
  "while removing the old": (lambda: (_ckpt_commit, "_remove"), 1, "new"),
}


def _receive(conn, children, what: str):
  """The next message from a child; TrialFailed if they all died first or after WAIT seconds."""
  deadline = time.monotonic() + WAIT
  while not conn.poll(0.05):
    if not any(c.is_alive() for c in children) and not conn.poll(0.05):
      raise TrialFailed(f"{what}: the child exited ({[c.exitcode for c in children]})")
    if time.monotonic() > deadline:
      raise TrialFailed(f"{what}: nothing after {WAIT} s")
  return conn.recv()


def _saver(path: str, new, point: str | None, conn) -> None:
  """The child: warms up (compiles), then replaces the checkpoint at `path` with `new`."""
  scratch = path + "-warmup"
  adamw_jax.save_opt_state(scratch, new, force=True)
  shutil.rmtree(scratch)
  os.remove(scratch + LOCK)
  if point is not None:
    where, call, _ = POINTS[point]
    partial = _remove_half if point == "while removing the old" else None
    _kill_on(*where(), call, partial)
  conn.send("saving")
  adamw_jax.save_opt_state(path, new, force=True)
  conn.send("saved")


def kill_trial(
  directory: pathlib.Path, bits, size: int, point: str | None = None, delay: float | None = None
) -> str:
  """A child replaces a good checkpoint and is killed at `point` or after `delay` seconds.

  Returns what restores afterwards, "old" or "new" (at a named point, the one
  POINTS says); then a save in this process succeeds and leaves nothing behind.
  """
  path = directory / "ckpt"
  old, new = state(0, bits, size), state(1, bits, size)
  adamw_jax.save_opt_state(path, old)
  context = _context()
  mine, theirs = context.Pipe()
  child = context.Process(target=_saver, args=(str(path), new, point, theirs))
  child.start()
  try:
    _receive(mine, [child], "the saver's start")
    if delay is not None:
      time.sleep(delay)
      child.kill()
    child.join(WAIT)
    if child.is_alive():
      raise TrialFailed(f"the saver still runs after {WAIT} s")
  finally:
    if child.is_alive():
      child.kill()
      child.join(10)
  saved = mine.poll(0) and mine.recv() == "saved"
  if point is not None and (saved or child.exitcode != -signal.SIGKILL):
    raise TrialFailed(f"the saver was not killed at {point!r} (exit {child.exitcode})")
  outcome = restored_as(path, {"old": old, "new": new}, bits, size)
  expected = POINTS[point][2] if point is not None else ("new" if saved else outcome)
  if outcome != expected:
    raise TrialFailed(f"{outcome!r} restored, {expected!r} expected")
  adamw_jax.save_opt_state(path, old, force=True)  # the next save cleans up and succeeds
  if restored_as(path, {"old": old}, bits, size) != "old":
    raise TrialFailed("the next save did not restore")
  check_clean(path)
  return outcome


def _manager_saver(root: str, new, conn) -> None:
  options = ocp.CheckpointManagerOptions(max_to_keep=2)
  args = ocp.args.Composite(opt_state=adamw_jax.opt_state_save_args(new))
  with ocp.CheckpointManager(root + "-warmup", options=options) as m:  # compiles, warms up
    m.save(3, args=args)
  shutil.rmtree(root + "-warmup")
  with ocp.CheckpointManager(root, options=options) as m:
    conn.send("saving")
    m.save(3, args=args)
    m.wait_until_finished()
  conn.send("saved")


def manager_kill_trial(directory: pathlib.Path, bits, size: int, delay: float) -> str:
  """A CheckpointManager (keep 2) holding steps 1 and 2 saves step 3 and is killed after `delay`.

  Returns the latest step, which restores bit for bit, as every step kept does.
  """
  root = directory / "steps"
  states = {step: state(step, bits, size) for step in (1, 2, 3)}
  with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=2)) as m:
    for step in (1, 2):
      m.save(step, args=ocp.args.Composite(opt_state=adamw_jax.opt_state_save_args(states[step])))
    m.wait_until_finished()
  context = _context()
  mine, theirs = context.Pipe()
  child = context.Process(target=_manager_saver, args=(str(root), states[3], theirs))
  child.start()
  try:
    _receive(mine, [child], "the saver's start")
    time.sleep(delay)
    child.kill()
    child.join(WAIT)
  finally:
    if child.is_alive():
      child.kill()
      child.join(10)
  saved = mine.poll(0) and mine.recv() == "saved"
  with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=2)) as m:
    steps, latest = m.all_steps(), m.latest_step()
    if latest not in (2, 3) or (saved and latest != 3) or 2 not in steps:
      raise TrialFailed(f"steps {steps} after the kill: the last good step is lost")
    half_deleted = False
    for step in steps:
      args = adamw_jax.opt_state_restore_args(target(bits, size))
      try:
        got = m.restore(step, args=ocp.args.Composite(opt_state=args))["opt_state"]
      except Exception as e:
        # orbax deletes the step beyond max_to_keep in place, after step 3 is committed:
        # killed then, step 1 is still listed, part deleted, and refused (by our checks, or by
        # orbax when a whole item is gone).
        if step == 1 and latest == 3:
          half_deleted = True
          continue
        raise TrialFailed(f"step {step} does not restore: {e}") from e
      if not checkpoint_files.bitwise_equal(got, states[step]):
        raise TrialFailed(f"step {step} restored other values")
  return f"step {latest}" + (" (step 1, being deleted, refused)" if half_deleted else "")


# --------------------------------------------------------------------------
# Two writers at once
# --------------------------------------------------------------------------


def _writer(path: str, seed: int, value, force: bool, start, conn) -> None:
  scratch = f"{path}-warmup{seed}"
  adamw_jax.save_opt_state(scratch, value)
  shutil.rmtree(scratch)
  os.remove(scratch + LOCK)
  start.wait(WAIT)
  try:
    adamw_jax.save_opt_state(path, value, force=force)
  except FileExistsError as e:
    conn.send(("refused", seed, time.monotonic(), str(e)))
  else:
    conn.send(("saved", seed, time.monotonic(), ""))


def writers_trial(directory: pathlib.Path, bits, size: int, force: bool) -> str:
  """Two processes save to one directory at the same moment (``force``: over a checkpoint).

  Both return (the second waited for the first's lock) and the checkpoint
  restores to the state of the last one to return; without ``force`` on a new
  directory, one saves and the other is refused (FileExistsError).
  """
  path = directory / "ckpt"
  if force:
    adamw_jax.save_opt_state(path, state(0, bits, size))
  context = _context()
  start = context.Barrier(2)
  pipes = [context.Pipe() for _ in range(2)]
  children = [
    context.Process(
      target=_writer, args=(str(path), 10 + i, state(10 + i, bits, size), force, start, theirs)
    )
    for i, (_, theirs) in enumerate(pipes)
  ]
  for child in children:
    child.start()
  reports = []
  try:
    for mine, _ in pipes:
      reports.append(_receive(mine, children, "a writer's outcome"))
  finally:
    for child in children:
      child.join(WAIT)
      if child.is_alive():
        child.kill()
  outcomes = sorted(r[0] for r in reports)
  expected = ["saved", "saved"] if force else ["refused", "saved"]
  if outcomes != expected:
    raise TrialFailed(f"writers: {reports}")
  last = max((r for r in reports if r[0] == "saved"), key=lambda r: r[2])
  candidates = {f"writer {r[1] - 10}": state(r[1], bits, size) for r in reports}
  outcome = restored_as(path, candidates, bits, size)
  if outcome != f"writer {last[1] - 10}":
    raise TrialFailed(f"{outcome} restored, but writer {last[1] - 10} returned last")
  check_clean(path)
  return "both saved, the last restored" if force else "one saved, one refused"


# --------------------------------------------------------------------------
# A full disk (a small tmpfs; root only)
# --------------------------------------------------------------------------


def mount_tmpfs(where: pathlib.Path, size: str) -> str | None:
  """Mounts a tmpfs of `size` at `where`; the reason it cannot, or None."""
  where.mkdir(parents=True, exist_ok=True)
  try:
    proc = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
      capture_output=True,
      text=True,
      timeout=30,
      check=False,
    )
  except (OSError, subprocess.TimeoutExpired) as e:
    return f"mount failed: {e}"
  return None if proc.returncode == 0 else f"mount -t tmpfs failed: {proc.stderr.strip()}"


def unmount(where: pathlib.Path) -> None:
  subprocess.run(["umount", str(where)], capture_output=True, timeout=30, check=False)


def full_disk_trial(disk: pathlib.Path, bits, old_size: int, new_size: int) -> str:
  """On a disk too small for the new state, a save over a good checkpoint fails and loses nothing."""
  path = disk / "ckpt"
  old, new = state(0, bits, old_size), state(1, bits, new_size)
  try:
    adamw_jax.save_opt_state(path, old)
    try:
      adamw_jax.save_opt_state(path, new, force=True)
    except Exception as e:
      error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    else:
      error = None
    if error is None:  # the disk was large enough after all
      restored_as(path, {"new": new}, bits, new_size)
    else:
      restored_as(path, {"old": old}, bits, old_size)
    check_clean(path)
    return "saved" if error is None else "refused, old restored"
  finally:
    for entry in disk.iterdir():
      shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def manager_full_disk_trial(disk: pathlib.Path, bits, old_size: int, new_size: int) -> str:
  """A CheckpointManager's step too large for the disk fails; the step before it restores."""
  root = disk / "steps"
  old, new = state(0, bits, old_size), state(1, bits, new_size)
  save = lambda m, step, value: m.save(
    step, args=ocp.args.Composite(opt_state=adamw_jax.opt_state_save_args(value))
  )
  try:
    with ocp.CheckpointManager(root) as m:
      save(m, 1, old)
      m.wait_until_finished()
      try:
        save(m, 2, new)
        m.wait_until_finished()
      except Exception:
        error = True
      else:
        error = False
    with ocp.CheckpointManager(root) as m:
      latest = m.latest_step()
      if latest != (1 if error else 2):
        raise TrialFailed(
          f"latest step {latest} after the save {'failed' if error else 'returned'}"
        )
      size, value = (old_size, old) if error else (new_size, new)
      args = adamw_jax.opt_state_restore_args(target(bits, size))
      got = m.restore(latest, args=ocp.args.Composite(opt_state=args))["opt_state"]
      if not checkpoint_files.bitwise_equal(got, value):
        raise TrialFailed(f"step {latest} restored other values")
    return "refused, step 1 restored" if error else "saved"
  finally:
    for entry in disk.iterdir():
      shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


# --------------------------------------------------------------------------
# Flipped bytes
# --------------------------------------------------------------------------


def flip_trials(directory: pathlib.Path, bits, size: int, positions) -> dict[str, int]:
  """One byte flipped in every file of a checkpoint in turn: refused, or restored bit for bit."""
  saved = directory / "saved"
  value = state(0, bits, size)
  adamw_jax.save_opt_state(saved, value)
  outcomes: dict[str, int] = {}
  files = [f.relative_to(saved) for f in checkpoint_files.all_files(saved)]
  for i, (file, at) in enumerate((f, at) for f in files for at in positions):
    copy = directory / f"flip{i}"
    shutil.copytree(saved, copy)
    checkpoint_files.flip(copy / file, at)
    try:
      got = adamw_jax.restore_opt_state(copy, target(bits, size))
    except (ValueError, FileNotFoundError) as e:
      if str(copy) not in str(e):
        raise TrialFailed(f"{file} at {at}: the error does not name the directory: {e}") from e
      kind = "checksum" if "does not match the checksum" in str(e) else "refused otherwise"
    else:
      if not checkpoint_files.bitwise_equal(got, value):
        raise TrialFailed(f"{file} flipped at {at}: other values restored")
      kind = "same"
    outcomes[kind] = outcomes.get(kind, 0) + 1
    shutil.rmtree(copy)
  return outcomes
