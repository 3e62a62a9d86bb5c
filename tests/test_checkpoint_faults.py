"""Checkpoints under faults: killed saves, a full disk, two writers, flipped bytes.

A representative set of tests/fault_trials.py (benchmarks/checkpoint_faults.py
runs many more, for the trial counts in docs/checkpoints.md): a save that
replaces a good checkpoint, killed with SIGKILL at every named point of the
save and after delays (plain and 8-bit states), and a CheckpointManager's
save killed; a save on a full disk (a small tmpfs: mounting needs root, and
the tests skip, saying why, where it fails); two processes saving to one
directory at once; one byte flipped in every file of a checkpoint. After each,
the last good checkpoint restores bit for bit; nothing is left behind.
"""

from __future__ import annotations

import pathlib
import re

import pytest

import adamw_jax
from adamw_jax import _ckpt_commit
from tests import fault_trials

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
SIZE = 1 << 18  # parameters: 2 MB of moments, random
BITS = {"plain": None, "8bit": 8}


# Every point with a plain state; with an 8-bit one, a point during, between and after.
KILLS = [(p, "plain") for p in fault_trials.POINTS] + [
  (p, "8bit")
  for p in (
    "arrays written, before orbax's rename",
    "between the renames",
    "while removing the old",
  )
]


@pytest.mark.parametrize("point, bits", KILLS, ids=[f"{p}-{b}" for p, b in KILLS])
def test_save_killed_at_a_point(tmp_path, point, bits):
  expected = fault_trials.POINTS[point][2]
  assert fault_trials.kill_trial(tmp_path, BITS[bits], SIZE, point) == expected


def test_save_killed_after_delays(tmp_path):
  """Killed 0 or 0.1 s after it began: the old or the new checkpoint, whole, each time."""
  outcomes = []
  for i, delay in enumerate((0.0, 0.1)):
    (tmp_path / str(i)).mkdir()
    outcomes.append(fault_trials.kill_trial(tmp_path / str(i), BITS["8bit"], SIZE, delay=delay))
  assert set(outcomes) <= {"old", "new"}


def test_checkpoint_manager_killed(tmp_path):
  """orbax's CheckpointManager, our item: the latest step is 2 or 3 and every step kept restores
  (step 1, which orbax deletes in place once step 3 is committed, may be refused, never wrong)."""
  outcomes = []
  for i, delay in enumerate((0.05, 0.3)):
    (tmp_path / str(i)).mkdir()
    outcomes.append(fault_trials.manager_kill_trial(tmp_path / str(i), None, SIZE, delay))
  assert set(outcomes) <= {"step 2", "step 3", "step 3 (step 1, being deleted, refused)"}


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
  """A 2 MB tmpfs: a disk that fills. Mounting it needs root: skipped, saying why, otherwise."""
  where = tmp_path_factory.mktemp("disk") / "mounted"
  reason = fault_trials.mount_tmpfs(where, "2m")
  if reason is not None:
    pytest.skip(f"no small disk to fill: {reason}")
  yield where
  fault_trials.unmount(where)


@pytest.mark.parametrize(
  "bits, size",
  [(None, 1 << 18), (None, 1 << 20), (8, 1 << 22)],
  ids=["plain-2MB", "plain-8MB", "8bit-8MB"],
)
def test_full_disk_keeps_the_old_checkpoint(disk, bits, size):
  assert fault_trials.full_disk_trial(disk, bits, 1 << 13, size) == "refused, old restored"


def test_full_disk_first_save_leaves_nothing(disk):
  with pytest.raises(ValueError, match="RESOURCE_EXHAUSTED"):
    adamw_jax.save_opt_state(disk / "ckpt", fault_trials.state(1, None, 1 << 20))
  assert sorted(p.name for p in disk.iterdir()) == ["ckpt" + _ckpt_commit.LOCK]
  with pytest.raises(FileNotFoundError, match=r"no adamw_jax checkpoint at"):
    adamw_jax.restore_opt_state(disk / "ckpt", fault_trials.target(None, 1 << 20))
  (disk / ("ckpt" + _ckpt_commit.LOCK)).unlink()


def test_full_disk_checkpoint_manager(disk):
  assert fault_trials.manager_full_disk_trial(disk, None, 1 << 13, 1 << 20) == (
    "refused, step 1 restored"
  )


@pytest.mark.parametrize("force", [True, False], ids=["over a checkpoint", "new directory"])
def test_two_writers_at_once(tmp_path, force):
  outcome = fault_trials.writers_trial(tmp_path, None, SIZE, force)
  assert outcome == ("both saved, the last restored" if force else "one saved, one refused")


def test_a_second_writer_waits_then_times_out(tmp_path):
  """While another save holds the lock, a save waits `timeout` seconds, then says who holds it."""
  path = str(tmp_path / "ckpt")
  with (
    _ckpt_commit._locked(path, 1.0, "test"),
    pytest.raises(
      TimeoutError,
      match=r"^save_opt_state: another save to '.*ckpt' holds its lock '.*ckpt\.adamw_jax-lock' "
      r"\(process \d+ on .*\); waited 0\.3 s \(timeout=\)\. Nothing was written\.$",
    ),
  ):
    adamw_jax.save_opt_state(path, fault_trials.state(0, None, 64), timeout=0.3)
  assert not (tmp_path / "ckpt").exists()
  adamw_jax.save_opt_state(path, fault_trials.state(0, None, 64), timeout=0.3)  # free again


@pytest.mark.parametrize("bits", list(BITS))
def test_a_byte_flipped_in_every_file(tmp_path, bits):
  """Each file of a checkpoint, a byte flipped: refused naming the directory, or restored bit
  for bit (files the restore does not read); the checksums catch some that orbax and
  tensorstore do not."""
  outcomes = fault_trials.flip_trials(tmp_path, BITS[bits], 1 << 12, (0.5,))
  assert set(outcomes) <= {"checksum", "refused otherwise", "same"}
  assert outcomes.get("checksum"), outcomes


def test_trial_failures_are_caught(tmp_path):
  """The trials' own check fails on other values and on leftovers (a test that can fail)."""
  path = tmp_path / "ckpt"
  adamw_jax.save_opt_state(path, fault_trials.state(0, None, 64))
  with pytest.raises(fault_trials.TrialFailed, match="restored values other than"):
    fault_trials.restored_as(path, {"new": fault_trials.state(1, None, 64)}, None, 64)
  (tmp_path / "ckpt.adamw_jax-new").mkdir()
  with pytest.raises(fault_trials.TrialFailed, match=re.escape("left behind: ['ckpt', ")):
    fault_trials.check_clean(pathlib.Path(path))
