"""The orbax item of a checked optimizer state: its CheckpointHandler, its save and restore args.

One item is what orbax's ``StandardCheckpointHandler`` writes of the arrays,
with the JSON description of :mod:`adamw_jax._ckpt_describe` (and the
arrays' checksums of :mod:`adamw_jax._ckpt_sums`) as its custom metadata.
``save_opt_state`` writes it with an orbax ``Checkpointer``; orbax's ``CheckpointManager`` writes it as one item of a step
(keeping the last N steps, committing each step atomically). Restoring checks
the description, compares it with the target, reads the arrays into the
target's shardings and checks them against their sums in every process:
nothing is returned, or updated in place, unless all of it passed.

orbax is imported when a checkpoint is first saved or restored, so the classes
are made then (:func:`types`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adamw_jax import _ckpt_commit, _ckpt_describe, _ckpt_sums, _tree
from adamw_jax._version import __version__

LEGACY = ("opt_state", "adamw_jax")  # formats 1 and 2: the arrays' and the description's items


def ocp():
  """``orbax.checkpoint``, or an ImportError that says how to install it."""
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:
    raise ImportError(
      "adamw_jax's checkpoints need orbax-checkpoint: pip install 'adamw_jax[checkpoint]' "
      "(or orbax-checkpoint>=0.11.1)."
    ) from e
  return ocp


def _nnx():
  """``flax.nnx`` if it is loaded (if it is not, nothing can be an ``nnx.Optimizer``)."""
  return sys.modules.get("flax.nnx")


def is_nnx_optimizer(x) -> bool:
  nnx = _nnx()
  return nnx is not None and isinstance(x, nnx.Optimizer)


def pure(tree):
  """The arrays of `tree`: an ``nnx.Optimizer`` becomes its pure state (step and opt_state)."""
  if is_nnx_optimizer(tree):
    nnx = _nnx()
    assert nnx is not None  # loaded: there is an nnx.Optimizer
    return nnx.as_pure(nnx.state(tree))
  return _tree.unbox_all(tree)


def _zero_size(x) -> bool:
  return not _ckpt_describe.is_empty(x) and int(np.prod(np.shape(x))) == 0


def _stand_in(x) -> np.ndarray:
  """What orbax stores for a zero-size array (it refuses them): one zero; the shape is described."""
  return np.zeros((1,), x.dtype)


def _stored(x):
  """What the arrays item holds for a leaf: a typed key's data; a zero-size array's stand-in."""
  if _ckpt_describe.is_key(x):
    x = jax.random.key_data(x)
  return _stand_in(x) if _zero_size(x) else x


def _abstract(x):
  """What to read for a target leaf: shape, dtype and sharding (None: the saved sharding)."""
  if _ckpt_describe.is_key(x):
    x = (
      jax.random.key_data(x) if isinstance(x, jax.Array) else jax.eval_shape(jax.random.key_data, x)
    )
  if _zero_size(x):
    return _stand_in(x)
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))


def _restored(read, target, impl: str | None):
  """The leaf to return: typed keys wrapped again, zero-size leaves made anew like the target."""
  if _ckpt_describe.is_key(target):
    assert impl is not None  # described: a key leaf of a format-3 checkpoint
    return jax.random.wrap_key_data(read, impl=impl)
  if not _zero_size(target):
    return read
  zeros = jnp.zeros(np.shape(target), target.dtype)
  sharding = getattr(target, "sharding", None)
  return zeros if sharding is None else jax.device_put(zeros, sharding)


def description(tree, config: Mapping[str, Any] | None, who: str) -> dict[str, Any]:
  """The JSON a checkpoint of `tree` stores, its checksums computed (in every process)."""
  config = _ckpt_describe.config_json(config, who)
  pairs = [(p, x) for p, x in _ckpt_describe.leaves(tree) if not _ckpt_describe.is_empty(x)]
  try:
    sums = _ckpt_sums.sums([_stored(x) for _, x in pairs])
  except TypeError as e:
    raise TypeError(f"{who}: {e}") from e
  meta = json.loads(
    json.dumps(
      {
        **_ckpt_describe.describe(tree),
        "keys": {p: str(jax.random.key_impl(x)) for p, x in pairs if _ckpt_describe.is_key(x)},
        "library": f"adamw_jax {__version__}",
        "checksums": {p: s for (p, _), s in zip(pairs, sums)},
        "config": config,
      }
    )
  )
  meta["checksum"] = _ckpt_describe.self_crc(meta)
  return meta


def damaged(path: str, what: str, who: str, error: BaseException | None = None) -> ValueError:
  cause = "" if error is None else f": {type(error).__name__}: {_first_line(error)}"
  return ValueError(
    f"{who}: the checkpoint at {path!r} is damaged or incomplete: {what}{cause}. "
    "Nothing was restored."
  )


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0][:300] if text else ""


def _check_description(meta, path: str, who: str) -> Mapping[str, Any]:
  """The checkpoint's JSON description, checked: a format this version reads, and its CRC."""
  if not isinstance(meta, Mapping) or not isinstance(meta.get("format"), int):
    raise damaged(path, "its description is not one adamw_jax writes (no format)", who)
  if meta["format"] not in _ckpt_describe.READS:
    raise ValueError(
      f"{who}: the checkpoint at {path!r} is in checkpoint format {meta['format']}, written by "
      f"{meta.get('library', 'an unknown adamw_jax')}; this is adamw_jax {__version__}, which "
      f"reads formats {', '.join(map(str, _ckpt_describe.READS))}: restore it with the version "
      "that wrote it."
    )
  if meta["format"] >= 2 and meta.get("checksum") != _ckpt_describe.self_crc(meta):
    raise damaged(
      path,
      "its description does not match the CRC saved with it (the file "
      "was changed or corrupted after saving)",
      who,
    )
  if not (isinstance(meta.get("leaves"), Mapping) and isinstance(meta.get("structure"), str)):
    raise damaged(path, "its description lacks the leaves or the structure", who)
  if meta["format"] >= 2 and not isinstance(meta.get("checksums"), Mapping):
    raise damaged(path, "its description lacks the arrays' checksums", who)
  return meta


def _abstract_tree(tree):
  return jax.tree.map(_abstract, tree)


def _unsharded_error(path: str, who: str) -> ValueError:
  return ValueError(
    f"{who}: the checkpoint at {path!r} was saved on other devices, and the "
    "target has leaves without a sharding (jax.eval_shape gives none): give a target "
    "whose leaves have the shardings to restore to, e.g. tx.init(params) with params on "
    "these devices, or jax.ShapeDtypeStruct(shape, dtype, sharding=...) leaves."
  )


def _verify(meta: Mapping[str, Any], read: Any, path: str, who: str) -> None:
  """Every array read against its saved checksum (format 3: sums; 2: CRC-32 where whole)."""
  if meta["format"] < 2:
    return
  saved = meta["checksums"]
  pairs = [(p, x) for p, x in _ckpt_describe.leaves(read) if not _ckpt_describe.is_empty(x)]
  if meta["format"] >= 3:
    got = dict(zip((p for p, _ in pairs), _ckpt_sums.sums([x for _, x in pairs])))
  else:
    got = {p: _ckpt_sums.crc32(x) for p, x in pairs}
  for p, value in got.items():
    if value is None and meta["format"] == 2:  # format 2 did not check what no process held
      continue
    if saved.get(p) != value:
      raise damaged(
        path,
        f"the array at {p!r} does not match the checksum saved with it (a data file "
        "was changed or corrupted after saving)",
        who,
      )


def restore(handler, directory, target: Any, config: Mapping[str, Any] | None, who: str):
  """Reads and checks the item in `directory` (an orbax path) with `handler`, shaped like `target`.

  An ``nnx.Optimizer`` target is updated in place and returned.
  """
  path = str(directory)
  tree = pure(target)
  try:
    meta = handler.read_description(directory)
  except Exception as e:
    raise damaged(
      path, "its metadata (the tree, the arrays, the description) cannot be read", who, e
    ) from e
  meta = _check_description(meta, path, who)
  wanted = _ckpt_describe.describe(tree)
  if meta["format"] < 3 and wanted["layouts"]:
    meta = {**meta, "layouts": wanted["layouts"]}  # not recorded before format 3: trusted
  _ckpt_describe.compare(meta, wanted, path, who)
  _ckpt_describe.compare_config(meta.get("config"), config, path, who)
  abstract = _abstract_tree(tree)
  error, read = None, None
  try:
    read = handler.read_arrays(directory, abstract)
  except Exception as e:
    error = e
  failed = _ckpt_commit.failures(error is None)  # every process learns of any failure
  if error is not None:
    unsharded = any(getattr(a, "sharding", 0) is None for a in jax.tree.leaves(abstract))
    if unsharded and "topology" in str(error).lower():
      raise _unsharded_error(path, who) from error
    raise damaged(path, "reading the arrays failed", who, error) from error
  if failed:
    raise damaged(
      path, f"reading the arrays failed in process {failed[0]} (its error says why)", who
    )
  _verify(meta, read, path, who)
  keys = meta.get("keys") or {}
  restored = jax.tree_util.tree_map_with_path(
    lambda p, r, t: _restored(r, t, keys.get(_ckpt_describe.key(p))), read, tree
  )
  if is_nnx_optimizer(target):
    nnx = _nnx()
    assert nnx is not None  # loaded: there is an nnx.Optimizer
    nnx.update(target, restored)
    return target
  return restored


@functools.cache
def types() -> tuple[type, type, type]:
  """(the CheckpointHandler, its save args, its restore args), registered with orbax.

  The handler is orbax's ``StandardCheckpointHandler`` with the description
  as the item's custom metadata (in its ``_METADATA`` file): it writes like
  it, asynchronously in a ``CheckpointManager``, in one directory. Format 1
  and 2 checkpoints (an ``opt_state/`` and an ``adamw_jax/`` directory) are
  read too.
  """
  o = ocp()

  class OptStateHandler(o.StandardCheckpointHandler):
    """An optimizer state with its description and checksums, checked on restore."""

    async def async_save(self, directory, item=None, save_args=None, args=None):
      if not isinstance(args, OptStateSave):
        raise TypeError(f"save an optimizer state with args=OptStateSave(...), not {args!r}")
      tree = pure(args.opt_state)
      meta = description(tree, args.config, args.who)
      stored = jax.tree.map(_stored, tree)
      return await super().async_save(
        directory, args=o.args.StandardSave(stored, custom_metadata=meta)
      )

    def restore(self, directory, item=None, args=None):
      if not isinstance(args, OptStateRestore):
        raise ValueError(
          f"restoring an adamw_jax optimizer state from {str(directory)!r} needs a target: "
          "give args=adamw_jax.opt_state_restore_args(target)."
        )
      return restore(self, directory, args.target, args.config, args.who)

    def read_description(self, directory) -> Any:
      if (directory / LEGACY[1]).is_dir():
        return o.JsonCheckpointHandler().restore(directory / LEGACY[1])
      return self.metadata(directory).custom_metadata

    def read_arrays(self, directory, abstract) -> Any:
      if (directory / LEGACY[1]).is_dir():
        directory = directory / LEGACY[0]
      return super().restore(directory, args=o.args.StandardRestore(abstract))

    @classmethod
    def typestr(cls) -> str:
      return _ckpt_commit.HANDLER

  @o.args.register_with_handler(OptStateHandler, for_save=True)
  @dataclasses.dataclass
  class OptStateSave(o.args.CheckpointArgs):
    """Save args of an optimizer state: ``adamw_jax.opt_state_save_args(opt_state, config=...)``."""

    opt_state: Any
    config: Mapping[str, Any] | None = None
    who: str = "adamw_jax.opt_state_save_args"

  @o.args.register_with_handler(OptStateHandler, for_restore=True)
  @dataclasses.dataclass
  class OptStateRestore(o.args.CheckpointArgs):
    """Restore args: ``adamw_jax.opt_state_restore_args(target, config=...)``."""

    target: Any
    config: Mapping[str, Any] | None = None
    who: str = "adamw_jax.opt_state_restore_args"

  return OptStateHandler, OptStateSave, OptStateRestore
