"""Checkpoints from 2 jax.distributed processes, run by tests/test_multiprocess.py.

Each process (2 virtual CPU devices, gloo collectives on 127.0.0.1) runs, from
the repository root::

  PROCESS_ID=i NUM_PROCESSES=2 COORDINATOR=127.0.0.1:PORT \\
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
    python -m tests.multiprocess_checks WORKDIR [--flips=0.5] [--saved=...] [--flipped=...]

first the docs' blocks marked ``<!-- docs-test: 2-processes -->`` (they call
``jax.distributed.initialize``), then the checks below, and prints one line
``RESULTS {json}``: each check's outcome. The checks train 3 FSDP steps of a
plain and an 8-bit state (and a 4-bit one: ``--saved=plain,8bit,4bit``) over the 4
devices, save them from both
processes (``save_opt_state`` and a ``CheckpointManager``), restore them into
the same sharding, another one and ``jax.eval_shape`` targets, and restore
copies with one byte flipped in each data file. Process 0 also writes the
states' values (``WORKDIR/<name>.npz``) for the test to restore into 1 process.
"""

from __future__ import annotations

import faulthandler
import functools
import json
import os
import pathlib
import shutil
import sys
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adamw_jax
from tests import checkpoint_files, docs_pages

# Importing jax touches no device: the docs' example initialises jax.distributed first (main).
MARKER = "RESULTS "
PROCESSES, DEVICES = 2, 2
STATES = {"plain": None, "8bit": 8, "4bit": 4}  # moment_bits
SHAPES = {"w": (64, 256), "b": (64,)}  # w: 16 rows a device, whole blocks of 256 and 128
FLIPS = (0.5,)  # where in each data file a byte is flipped (--flips=0.1,0.5 for others)
SAVED = ("plain", "8bit")  # the states saved and restored (--saved=plain,8bit,4bit)
FLIPPED = ("plain", "8bit")  # of those, the states whose files are flipped (--flipped=...)
DOCS_CHECK = "docs_several_hosts_example"  # the docs' blocks, run first
CHECKS: dict[str, Callable[[pathlib.Path], str]] = {}


def check(name: str):
  def register(fn):
    CHECKS[name] = fn
    return fn

  return register


def docs_blocks() -> list[docs_pages.Block]:
  """The blocks marked ``<!-- docs-test: 2-processes -->``: tests/test_docs.py leaves them here."""
  return [
    b
    for p in docs_pages.pages()
    for b in docs_pages.blocks(p)
    if b.marker == docs_pages.TWO_PROCESSES
  ]


def _barrier(name: str) -> None:
  multihost_utils.sync_global_devices(name)


def _tx(bits):
  block = {None: None, 8: 256, 4: 128}[bits]
  extra = {} if bits is None else {"moment_bits": bits, "moment_block_size": block}
  return adamw_jax.adamw(1e-2, weight_decay=0.1, amsgrad=True, **extra)


def _mesh():
  return jax.make_mesh((PROCESSES * DEVICES,), ("fsdp",), axis_types=(AxisType.Auto,))


def _params(sharding):
  rng = np.random.default_rng(3)  # the same numbers in every process
  values = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  return jax.device_put(values, sharding)


def _equal(state, restored) -> bool:
  """Same structure, dtypes and, wherever this process holds the state, the same bits.

  No collective: the restored leaves are sharded as the state's or replicated, so
  this process holds them wherever it holds the state; the other process checks
  the rest.
  """
  if jax.tree.structure(state) != jax.tree.structure(restored):
    return False
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    if x.dtype != y.dtype or x.shape != y.shape:
      return False
    values, held = np.zeros(y.shape, y.dtype), np.zeros(y.shape, bool)
    for shard in y.addressable_shards:
      values[shard.index], held[shard.index] = np.asarray(shard.data), True
    for shard in x.addressable_shards:
      if not held[shard.index].all():
        return False
      if values[shard.index].tobytes() != np.asarray(shard.data).tobytes():
        return False
  return True


@functools.cache
def _trained(bits):
  """(tx, params, state) after 3 FSDP steps on the 4 devices of both processes."""
  tx = _tx(bits)
  params = _params(NamedSharding(_mesh(), P("fsdp")))

  @jax.jit
  def step(params, state, t):
    grads = jax.tree.map(lambda p: jnp.cos(p * (3.0 + t)), params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for t in range(3):
    params, state = step(params, state, jnp.float32(t))
  return tx, params, state


def _save_restore(name: str, workdir: pathlib.Path) -> str:
  tx, params, state = _trained(STATES[name])
  path = workdir / name
  adamw_jax.save_opt_state(path, state, config={"name": name})
  targets = {
    "same sharding": tx.init(params),
    "replicated": tx.init(jax.device_put(params, NamedSharding(_mesh(), P()))),
    "eval_shape": jax.eval_shape(tx.init, params),
  }
  restored = {}
  for target_name, target in targets.items():
    restored[target_name] = adamw_jax.restore_opt_state(path, target, config={"name": name})
    assert _equal(state, restored[target_name]), f"{target_name}: restored other values"
  if jax.process_index() == 0:  # replicated: every leaf whole in this process
    whole = jax.tree.leaves(restored["replicated"])
    leaves = [np.asarray(x.addressable_shards[0].data) for x in whole]
    np.savez(workdir / f"{name}.npz", **{str(i): x for i, x in enumerate(leaves)})
  _barrier(f"saved {name}")
  return f"saved from 2 processes; restored bit for bit into {sorted(targets)}"


@check("checkpoint_manager")
def _manager(workdir: pathlib.Path) -> str:
  tx, params, state = _trained(8)
  options = ocp.CheckpointManagerOptions(max_to_keep=2)
  with ocp.CheckpointManager(workdir / "manager", options=options) as manager:
    for step in range(3):
      manager.save(step, args=ocp.args.Composite(opt_state=adamw_jax.opt_state_save_args(state)))
    manager.wait_until_finished()
    steps = manager.all_steps()
    restored = manager.restore(
      manager.latest_step(),
      args=ocp.args.Composite(opt_state=adamw_jax.opt_state_restore_args(tx.init(params))),
    )["opt_state"]
  assert steps == [1, 2], steps
  assert _equal(state, restored)
  return f"steps kept {steps}; the latest restored bit for bit"


def _flip_outcomes(name: str, workdir: pathlib.Path, flips: tuple[float, ...]) -> str:
  """Every data file of the checkpoint, one byte flipped at a time: refused or bit for bit."""
  tx, params, state = _trained(STATES[name])
  saved = workdir / name
  files = checkpoint_files.data_files(saved)
  outcomes: dict[str, int] = {}
  for i, at in ((i, at) for i in range(len(files)) for at in flips):
    copy = workdir / f"{name}-flip{i}-{at}"
    if jax.process_index() == 0:
      shutil.copytree(saved, copy)
      checkpoint_files.flip(checkpoint_files.data_files(copy)[i], at)
    _barrier(f"flipped {copy.name}")
    try:
      restored = adamw_jax.restore_opt_state(copy, tx.init(params))
    except ValueError as e:
      message = str(e)
      assert message.startswith(f"restore_opt_state: the checkpoint at '{copy}' is damaged"), e
      kind = "checksum" if "does not match the checksum" in message else "orbax"
      if kind == "checksum":
        assert "the array at '" in message, message
    else:
      assert _equal(state, restored), f"{copy.name}: restored other values"
      kind = "same"
    outcomes[kind] = outcomes.get(kind, 0) + 1
  assert outcomes.get("checksum"), f"no flip that only the checksums catch: {outcomes}"
  return json.dumps({"files": len(files), **outcomes})


def checks(
  flips: tuple[float, ...] = FLIPS,
  flipped: tuple[str, ...] = FLIPPED,
  saved: tuple[str, ...] = SAVED,
) -> dict:
  """The checks to run, by name: the states `saved`, those above, the flips of `flipped`."""
  out = {f"save_restore[{n}]": lambda w, n=n: _save_restore(n, w) for n in saved}
  out.update(CHECKS)
  for name in flipped:
    out[f"flipped_bytes[{name}]"] = lambda w, n=name: _flip_outcomes(n, w, flips)
  return out


def main(argv: list[str]) -> int:
  faulthandler.dump_traceback_later(float(os.environ.get("CHECKS_TIMEOUT", "250")), exit=True)
  options = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
  workdir = pathlib.Path(next(a for a in argv if not a.startswith("--")))
  flips = tuple(float(f) for f in options.get("flips", ",".join(map(str, FLIPS))).split(","))
  flipped = tuple(options.get("flipped", ",".join(FLIPPED)).split(","))
  saved = tuple(options.get("saved", ",".join(SAVED)).split(","))
  os.chdir(workdir)  # the docs' example writes ckpt/ here
  blocks = docs_blocks()
  namespace: dict = {"__name__": "docs"}
  start = time.perf_counter()
  for block in blocks:
    exec(compile(block.code, block.where, "exec"), namespace)
  if jax.process_count() != PROCESSES or jax.device_count() != PROCESSES * DEVICES:
    print(f"need {PROCESSES} processes of {DEVICES} devices", file=sys.stderr)
    return 2
  seconds = round(time.perf_counter() - start, 2)
  results = {DOCS_CHECK: {"ok": True, "detail": f"ran {len(blocks)} block(s)", "seconds": seconds}}
  for name, fn in checks(flips, flipped, saved).items():
    print(f"process {jax.process_index()}: {name}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
      results[name] = {"ok": True, "detail": fn(workdir)}
    except Exception:
      results[name] = {"ok": False, "detail": traceback.format_exc()}
    results[name]["seconds"] = round(time.perf_counter() - start, 2)
  print(MARKER + json.dumps(results), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
