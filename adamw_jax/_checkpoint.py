"""Optimizer state saved and restored with orbax-checkpoint; a misfit or damaged checkpoint is refused.

:func:`save_opt_state` writes one checkpoint directory, committed whole
(:mod:`adamw_jax._ckpt_commit`: one writer, written beside, then renamed), so
that no save can destroy the last good checkpoint; :func:`restore_opt_state`
reads it back, checked (:mod:`adamw_jax._ckpt_orbax`). For periodic saving,
keeping the last N and restoring the latest, the same item goes into orbax's
``CheckpointManager`` through :func:`opt_state_save_args` and
:func:`opt_state_restore_args`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from adamw_jax import _ckpt_commit, _ckpt_describe, _ckpt_orbax


def save_opt_state(
  directory: str | os.PathLike,
  opt_state: Any,
  *,
  config: Mapping[str, Any] | None = None,
  force: bool = False,
  timeout: float = 300.0,
) -> None:
  """Saves an optimizer state (or an ``nnx.Optimizer``) to `directory` with orbax, atomically.

  The checkpoint is written beside `directory` and renamed into place only
  when complete; with ``force=True`` the checkpoint it replaces is deleted only
  after that. A save killed at any point, or failing (a full disk), leaves the
  previous checkpoint restorable bit for bit. One save at a time writes to a
  directory: a second one waits for the first (up to `timeout` seconds). Call
  it in every process of a multi-process run; each checks the bytes of the
  shards it holds.

  Args:
    directory: the checkpoint directory (created; it must not exist unless
      ``force=True``).
    opt_state: the state of any optax transform, e.g. ``tx.init(params)``
      after some steps; or an ``nnx.Optimizer`` (its step and opt_state).
      Typed PRNG keys (``jax.random.key``) are saved with their implementation.
    config: a dict of JSON values describing the transform, e.g. its
      hyperparameters ``{"learning_rate": 1e-3, "weight_decay": 0.1}``; stored
      and compared on restore when a config is given there.
    force: replace the checkpoint at `directory`. Only an adamw_jax
      checkpoint is replaced: a directory holding anything else is refused.
    timeout: seconds to wait for another save to the same directory.

  Raises:
    FileExistsError: `directory` exists (without ``force=True``), or is not
      an adamw_jax checkpoint.
    TimeoutError: another save to `directory` still holds its lock after
      `timeout` seconds.
    TypeError, ValueError: a config JSON cannot hold (an array, NaN), an
      empty `directory`.

  >>> import tempfile, jax.numpy as jnp, adamw_jax
  >>> params = {"w": jnp.ones(3)}
  >>> tx = adamw_jax.adamw()
  >>> with tempfile.TemporaryDirectory() as directory:
  ...   adamw_jax.save_opt_state(directory + "/step0", tx.init(params), config={"lr": 1e-3})
  ...   restored = adamw_jax.restore_opt_state(directory + "/step0", tx.init(params),
  ...                                          config={"lr": 1e-3})
  >>> int(restored.count)
  0
  """
  who = "save_opt_state"
  path = _ckpt_commit.checked_path(directory, who)
  _ckpt_describe.config_json(config, who)  # refused before anything is locked or written
  ocp = _ckpt_orbax.ocp()
  handler, save_args, _ = _ckpt_orbax.types()
  with (
    _ckpt_commit.writing(path, force=force, timeout=timeout, who=who) as new,
    ocp.Checkpointer(handler()) as ckptr,
  ):
    ckptr.save(new, args=save_args(opt_state, config, who))


def restore_opt_state(
  directory: str | os.PathLike, target: Any, *, config: Mapping[str, Any] | None = None
) -> Any:
  """Restores a state saved by :func:`save_opt_state`, checking that it fits `target` first.

  .. code-block:: python

     adamw_jax.save_opt_state(path, opt_state, config=hyper)
     opt_state = adamw_jax.restore_opt_state(path, tx.init(params), config=hyper)
     adamw_jax.restore_opt_state(path, nnx_optimizer)   # in place

  A checkpoint that does not fit the target is refused, naming the difference:

  >>> import tempfile, jax.numpy as jnp, adamw_jax
  >>> params = {"w": jnp.ones(3)}
  >>> with tempfile.TemporaryDirectory() as directory:
  ...   adamw_jax.save_opt_state(directory + "/step0", adamw_jax.adamw().init(params))
  ...   adamw_jax.restore_opt_state(directory + "/step0",
  ...                               adamw_jax.adamw(amsgrad=True).init(params))
  ... # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
  Traceback (most recent call last):
  ValueError: restore_opt_state: the checkpoint at ... does not fit the target: different tree
  structure (AMSGrad: the target has 'nu_max', the checkpoint has it None):...

  Args:
    directory: a checkpoint written by :func:`save_opt_state`.
    target: what the state should look like: ``tx.init(params)``,
      ``jax.eval_shape(tx.init, params)``, or an ``nnx.Optimizer``, which is
      updated in place.
    config: if given, must equal the config stored with the checkpoint.

  Returns:
    The restored state with the structure of `target` (the optimizer itself
    for an ``nnx.Optimizer``).

  The arrays are restored into the shardings of `target`'s leaves (a
  checkpoint saved on other devices, by other processes, or sharded otherwise,
  is resharded on reading); leaves without a sharding (``jax.eval_shape``)
  take the saved one. Every array is checked against the checksum saved with
  it, in every process and whatever the sharding, and nothing is returned or
  updated unless all of them pass. If a save was killed while replacing the
  checkpoint (`directory` is missing and ``<directory>.adamw_jax-old`` is
  there), that previous checkpoint is restored, with a warning.

  Raises:
    ValueError: naming the directory and the first difference between the
      checkpoint and the target: a leaf on one side only (another tree
      structure, AMSGrad on one side only, other parameter groups, another
      transform), another shape or dtype, other node types, another
      ``FlatParams`` layout (naming the first leaf placed otherwise), or
      another config; a checkpoint format this version cannot read (naming
      the version that wrote it); a damaged or incomplete checkpoint
      (truncated, corrupted or missing files, an array or description that
      fails its checksum, naming the leaf), with the error underneath; a
      checkpoint from other devices restored into a target without shardings.
    FileNotFoundError: no checkpoint at `directory`, or only a partly written
      one (a save that did not finish).
  """
  who = "restore_opt_state"
  path = _ckpt_commit.checked_path(directory, who)
  path = _existing(path, who)
  ocp = _ckpt_orbax.ocp()
  handler, _, restore_args = _ckpt_orbax.types()
  with ocp.Checkpointer(handler()) as ckptr:
    return ckptr.restore(path, args=restore_args(target, config, who))


def _existing(path: str, who: str) -> str:
  """`path`, or the previous checkpoint an interrupted save left; else FileNotFoundError."""
  if _ckpt_commit.holds_checkpoint(path):
    return path
  previous = _ckpt_commit.previous(path)
  if previous is not None:
    warnings.warn(
      f"{who}: {path!r} is missing and {os.path.basename(previous)!r} is there: a save was "
      "interrupted while replacing the checkpoint; restoring that previous checkpoint.",
      stacklevel=3,
    )
    return previous
  if os.path.isdir(path):
    raise FileNotFoundError(
      f"{who}: {path!r} is not an adamw_jax checkpoint (it has no description; it "
      f"holds {sorted(os.listdir(path))[:8]})."
    )
  left = _ckpt_commit.unfinished(path)
  if left is not None:
    raise FileNotFoundError(
      f"{who}: the checkpoint at {path!r} was never finished: only the partly written "
      f"{left!r} is there (a save renames it to the directory when it completes); "
      "restore an earlier checkpoint."
    )
  raise FileNotFoundError(f"{who}: no adamw_jax checkpoint at {path!r}.")


def opt_state_save_args(opt_state: Any, *, config: Mapping[str, Any] | None = None) -> Any:
  """orbax ``CheckpointArgs`` saving an optimizer state as one item of a ``CheckpointManager`` step.

  The item is the checkpoint :func:`save_opt_state` writes (description,
  checksums and config); orbax's ``CheckpointManager`` saves it in step
  directories, each committed atomically, keeps the last ``max_to_keep``, and
  restores it with :func:`opt_state_restore_args`, all checks included.

  >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp, adamw_jax
  >>> tx = adamw_jax.adamw()
  >>> state = tx.init({"w": jnp.ones(3)})
  >>> options = ocp.CheckpointManagerOptions(max_to_keep=2)
  >>> with tempfile.TemporaryDirectory() as directory:
  ...   with ocp.CheckpointManager(directory, options=options) as manager:
  ...     for step in range(3):
  ...       _ = manager.save(step, args=ocp.args.Composite(
  ...         opt_state=adamw_jax.opt_state_save_args(state, config={"lr": 1e-3})))
  ...     manager.wait_until_finished()
  ...     print(manager.all_steps())
  [1, 2]
  """
  _ckpt_describe.config_json(config, "opt_state_save_args")
  return _ckpt_orbax.types()[1](opt_state, config)


def opt_state_restore_args(target: Any, *, config: Mapping[str, Any] | None = None) -> Any:
  """orbax ``CheckpointArgs`` restoring an item saved with :func:`opt_state_save_args`, checked.

  `target` and `config` are those of :func:`restore_opt_state`, and so are
  the checks and errors.

  >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp, adamw_jax
  >>> tx = adamw_jax.adamw()
  >>> params = {"w": jnp.ones(3)}
  >>> with tempfile.TemporaryDirectory() as directory:
  ...   with ocp.CheckpointManager(directory) as manager:
  ...     _ = manager.save(7, args=ocp.args.Composite(
  ...       opt_state=adamw_jax.opt_state_save_args(tx.init(params))))
  ...     manager.wait_until_finished()
  ...     step = manager.latest_step()
  ...     restored = manager.restore(step, args=ocp.args.Composite(
  ...       opt_state=adamw_jax.opt_state_restore_args(tx.init(params))))
  >>> step, int(restored["opt_state"].count)
  (7, 0)
  """
  _ckpt_describe.config_json(config, "opt_state_restore_args")
  return _ckpt_orbax.types()[2](target, config)
