"""Fault trials of checkpoints, many of each kind: the trial counts of docs/checkpoints.md.

Run from the repository root (as root, for the full-disk trials' tmpfs):

  python -m benchmarks.checkpoint_faults [--quick] [--out DIR]

Runs the trials of tests/fault_trials.py (the suite runs a representative set)
on 8 MB states (1M parameters, plain and 8-bit): saves replacing a good
checkpoint killed with SIGKILL at each named point and after delays spread
over a save; a CheckpointManager's save killed; saves on a full disk; two
writers at once; a byte flipped at 5 places in every file; and the 2-process
checks (tests/multiprocess_checks.py) with a byte flipped at 5 places in every
data file of plain, 8-bit and 4-bit states. A trial that loses or damages data
raises; the report counts each kind's trials and outcomes. Writes
benchmarks/results/checkpoint_faults.md (``--quick``: a few trials, small
states, a folder of its own).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import platform
import socket
import subprocess
import sys
import tempfile
import time

from benchmarks import output
from tests import fault_trials, multiprocess_checks

ROOT = pathlib.Path(__file__).resolve().parents[1]
BITS = {"plain": None, "8-bit": 8}


def _timed_save(size: int, bits) -> float:
  """Seconds a warm save of the new state takes here (the delays are spread over it)."""
  import adamw_jax

  with tempfile.TemporaryDirectory() as directory:
    adamw_jax.save_opt_state(f"{directory}/c", fault_trials.state(1, bits, size))
    start = time.perf_counter()
    adamw_jax.save_opt_state(f"{directory}/c", fault_trials.state(1, bits, size), force=True)
    return time.perf_counter() - start


def _trials(rows: list, kind: str, run, count: int) -> None:
  """Runs `run(directory)` `count` times; one row: the kind, the count and the outcomes."""
  outcomes: collections.Counter = collections.Counter()
  start = time.perf_counter()
  for _ in range(count):
    with tempfile.TemporaryDirectory() as directory:
      outcomes[run(pathlib.Path(directory))] += 1
  seconds = time.perf_counter() - start
  rows.append((kind, count, dict(outcomes)))
  print(f"{kind}: {count} trials, {dict(outcomes)} ({seconds:.0f} s)", flush=True)


def _spread(total: float, n: int) -> list[float]:
  """`n` delays from 0 to twice `total` (a child's save is slower than this process's)."""
  return [total * 2 * i / (n - 1) for i in range(n)]


def _two_processes(flips: str, flipped: str) -> dict:
  """The 2-process checks with more flips: each process's results."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with tempfile.TemporaryDirectory() as workdir:
    env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={multiprocess_checks.DEVICES}",
      "NUM_PROCESSES": str(multiprocess_checks.PROCESSES),
      "COORDINATOR": f"127.0.0.1:{port}",
      "CHECKS_TIMEOUT": "1100",
    }
    command = [sys.executable, "-m", "tests.multiprocess_checks", workdir]
    command += [f"--flips={flips}", f"--flipped={flipped}", f"--saved={flipped}"]
    procs = [
      subprocess.Popen(
        command, cwd=ROOT, env={**env, "PROCESS_ID": str(i)}, stdout=subprocess.PIPE, text=True
      )
      for i in range(multiprocess_checks.PROCESSES)
    ]
    outs = [p.communicate(timeout=1200)[0] for p in procs]
  lines = [line for out in outs for line in out.splitlines()]
  results = [
    json.loads(x[len(multiprocess_checks.MARKER) :]) for x in lines if x.startswith("RESULTS")
  ]
  assert len(results) == multiprocess_checks.PROCESSES, outs
  for result in results:
    failed = {k: v["detail"][-500:] for k, v in result.items() if not v["ok"]}
    assert not failed, failed
  return results[0]


def run(quick: bool) -> list:
  size = 1 << 12 if quick else 1 << 20  # parameters: 8 MB of moments
  reps = 1 if quick else 5
  rows: list = []
  for name, bits in BITS.items():
    for point in fault_trials.POINTS:
      _trials(
        rows,
        f"{name}: killed {point}",
        lambda d, b=bits, p=point: fault_trials.kill_trial(d, b, size, p),
        reps,
      )
  for name, bits in BITS.items():
    delays = _spread(_timed_save(size, bits), 3 if quick else 20)
    it = iter(delays)
    _trials(
      rows,
      f"{name}: killed after 0 to {delays[-1] * 1000:.0f} ms",
      lambda d, b=bits: fault_trials.kill_trial(d, b, size, delay=next(it)),
      len(delays),
    )
  delays = _spread(_timed_save(size, None), 3 if quick else 20)
  it = iter(delays)
  _trials(
    rows,
    f"CheckpointManager: killed after 0 to {delays[-1] * 1000:.0f} ms",
    lambda d: fault_trials.manager_kill_trial(d, None, size, next(it)),
    len(delays),
  )
  for force in (True, False):
    what = "over a checkpoint" if force else "to a new directory"
    _trials(
      rows,
      f"two writers at once, {what}",
      lambda d, f=force: fault_trials.writers_trial(d, None, size, f),
      2 if quick else 10,
    )
  _full_disk(rows, quick)
  positions = (0.5,) if quick else (0.1, 0.3, 0.5, 0.7, 0.9)
  for name, bits in BITS.items():
    with tempfile.TemporaryDirectory() as directory:
      outcomes = fault_trials.flip_trials(pathlib.Path(directory), bits, 1 << 16, positions)
    rows.append((f"{name}: a byte flipped in every file", sum(outcomes.values()), outcomes))
    print(rows[-1], flush=True)
  flipped = "plain" if quick else "plain,8bit,4bit"
  result = _two_processes(",".join(map(str, positions)), flipped)
  for name in flipped.split(","):
    detail = json.loads(result[f"flipped_bytes[{name}]"]["detail"])
    files = detail.pop("files")
    rows.append(
      (
        f"2 processes, {name}: a byte flipped in every data file ({files})",
        sum(detail.values()),
        detail,
      )
    )
    print(rows[-1], flush=True)
  return rows


def _full_disk(rows: list, quick: bool) -> None:
  with tempfile.TemporaryDirectory() as directory:
    disk = pathlib.Path(directory) / "disk"
    reason = fault_trials.mount_tmpfs(disk, "2m")
    if reason is not None:
      rows.append(("a full disk", 0, {"not run": reason}))
      return
    try:
      # New states from about the disk's size (2 MB of moments) to 4 times it.
      plain = [1 << 18, 1 << 20] if quick else [200_000 + 50_000 * i for i in range(10)] + [1 << 20]
      sizes = {"plain": plain, "8-bit": [4 * n for n in plain]}
      for name, bits in BITS.items():
        it = iter(sizes[name])
        _trials(
          rows,
          f"{name}: a full disk (2 MB), states of {sizes[name][0]:,} to {sizes[name][-1]:,} "
          "parameters",
          lambda d, b=bits: fault_trials.full_disk_trial(disk, b, 1 << 13, next(it)),
          len(sizes[name]),
        )
      it = iter(plain)
      _trials(
        rows,
        "CheckpointManager: a full disk (2 MB)",
        lambda d: fault_trials.manager_full_disk_trial(disk, None, 1 << 13, next(it)),
        len(plain),
      )
    finally:
      fault_trials.unmount(disk)


def write(rows: list, out: pathlib.Path, seconds: float) -> None:
  lines = [
    "# Checkpoint fault trials",
    "",
    "`python -m benchmarks.checkpoint_faults` (tests/fault_trials.py): every trial starts from a",
    "good checkpoint; a trial that loses or damages data (the last good checkpoint not restored",
    "bit for bit, other values restored, a file left behind, a wait past its bound) fails the run.",
    f"{platform.machine()}, {os.cpu_count()} CPUs, {seconds / 60:.1f} minutes.",
    "",
    "| fault | trials | outcomes |",
    "|---|---|---|",
  ]
  for kind, count, outcomes in rows:
    text = ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))
    lines.append(f"| {kind} | {count} | {text} |")
  total = sum(count for _, count, _ in rows)
  lines += ["", f"{total} trials; data lost or damaged in none.", ""]
  (out / "checkpoint_faults.md").write_text("\n".join(lines))
  print(f"wrote {out / 'checkpoint_faults.md'}")


def main(argv: list[str] | None = None) -> list:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a few trials of small states")
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args(argv)
  out = output.out_dir(args.out, args.quick, "checkpoint_faults")
  start = time.perf_counter()
  rows = run(args.quick)
  write(rows, out, time.perf_counter() - start)
  return rows


if __name__ == "__main__":
  main()
