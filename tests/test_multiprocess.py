"""Checkpoints across 2 jax.distributed processes, and restored into this one.

Two subprocesses (2 virtual CPU devices each, gloo collectives on 127.0.0.1, a
free port) run tests/multiprocess_checks.py: the docs' "Several hosts" example,
then FSDP training of plain and 8-bit states saved from both
processes, restored bit for bit in both, and damaged copies refused. Each check
is one test here. Then this process (1 device) restores the 2-process
checkpoints, bit for bit, and refuses one whose second process's shards are
damaged. Every wait is bounded: a subprocess that hangs is killed.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adamw_jax
from tests import checkpoint_files, multiprocess_checks

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds for the whole 2-process run (about 35 here)
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[pathlib.Path, list[dict]]:
  """The working directory of the 2 processes, and each one's results."""
  workdir = tmp_path_factory.mktemp("two_processes")
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={multiprocess_checks.DEVICES}",
    "NUM_PROCESSES": str(multiprocess_checks.PROCESSES),
    "COORDINATOR": f"127.0.0.1:{_free_port()}",
    "CHECKS_TIMEOUT": str(TIMEOUT - 20),  # each process dumps its stacks and exits first
  }
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", "tests.multiprocess_checks", str(workdir)],
      cwd=ROOT,
      env={**env, "PROCESS_ID": str(i)},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(multiprocess_checks.PROCESSES)
  ]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=TIMEOUT))
  except subprocess.TimeoutExpired:
    for proc in procs:
      proc.kill()
    logs = "\n".join(p.communicate()[1][-3000:] for p in procs)
    pytest.fail(f"the 2 processes did not finish in {TIMEOUT} s:\n{logs}")
  results = []
  for proc, (out, err) in zip(procs, outputs):
    lines = [x for x in out.splitlines() if x.startswith(multiprocess_checks.MARKER)]
    if proc.returncode != 0 or len(lines) != 1:
      pytest.fail(f"a process failed (exit {proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}")
    results.append(json.loads(lines[0][len(multiprocess_checks.MARKER) :]))
  return workdir, results


NAMES = [multiprocess_checks.DOCS_CHECK, *multiprocess_checks.checks()]


def test_every_check_ran_in_both_processes(run):
  _, results = run
  assert [set(r) for r in results] == [set(NAMES)] * multiprocess_checks.PROCESSES


@pytest.mark.parametrize("name", NAMES)
def test_two_processes(run, name):
  _, results = run
  for process, result in enumerate(results):
    assert result[name]["ok"], f"process {process}: {result[name]['detail']}"


def _one_device(name: str):
  tx = multiprocess_checks._tx(multiprocess_checks.STATES[name])
  params = {k: jnp.zeros(s) for k, s in multiprocess_checks.SHAPES.items()}
  return tx, params


@pytest.mark.parametrize("name", multiprocess_checks.SAVED)
def test_restore_into_one_process(run, name):
  """The 2-process checkpoint restores here, on 1 device, bit for bit."""
  workdir, _ = run
  tx, params = _one_device(name)
  restored = adamw_jax.restore_opt_state(workdir / name, tx.init(params), config={"name": name})
  values = np.load(workdir / f"{name}.npz")
  leaves = jax.tree.leaves(restored)
  assert len(leaves) == len(values.files)
  for i, leaf in enumerate(leaves):
    assert leaf.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert np.asarray(leaf).tobytes() == values[str(i)].tobytes(), i


def test_second_process_shards_damaged_are_refused_here(run, tmp_path):
  """A byte flipped in the data of the shards process 1 wrote: refused here, or harmless."""
  workdir, _ = run
  tx, params = _one_device("plain")
  expected = adamw_jax.restore_opt_state(workdir / "plain", tx.init(params))
  files = checkpoint_files.data_files(workdir / "plain" / "ocdbt.process_1")
  outcomes = []
  for i, at in ((i, at) for i in range(len(files)) for at in (0.3, 0.5, 0.7)):
    copy = tmp_path / f"flip{i}-{at}"
    shutil.copytree(workdir / "plain", copy)
    checkpoint_files.flip(checkpoint_files.data_files(copy / "ocdbt.process_1")[i], at)
    try:
      got = adamw_jax.restore_opt_state(copy, tx.init(params))
    except ValueError as e:
      assert str(e).startswith(f"restore_opt_state: the checkpoint at '{copy}' is damaged"), e
      outcomes.append("checksum" if "does not match the checksum" in str(e) else "orbax")
    else:
      assert checkpoint_files.bitwise_equal(got, expected)
      outcomes.append("same")
  assert files and "checksum" in outcomes, outcomes
