"""Optimizer state saved and restored with orbax-checkpoint; a misfit or damaged checkpoint is refused.

A checkpoint is an orbax composite of the state (``StandardSave``) and a JSON
description of it: every leaf's path, shape and dtype (``None`` and
``optax.MaskedNode`` included, so AMSGrad and parameter groups show), the
pytree node types, a CRC-32 of every array's bytes, the checkpoint format and
library version, an optional user ``config``, and a CRC-32 of the description
itself. Restoring checks the description, compares it with the target and
names what differs, reads the arrays into the target's shardings and checks
them against their CRCs: a checkpoint of another transform, tree, shape or
dtype, of an unknown format, or one that is truncated, corrupted or partly
written is an error naming the directory, never a partial or silently wrong
restore.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import zlib
from collections.abc import Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import tree_util as jtu

from adamw_jax import _tree
from adamw_jax._version import __version__

_FORMAT = 2
_READS = (1, 2)  # format 1: written before the CRCs, restored without checking them
_STATE, _META = "opt_state", "adamw_jax"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes here, then renames to the directory


def _ocp():
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:
    raise ImportError(
      "adamw_jax.save_opt_state / restore_opt_state need orbax-checkpoint: "
      "pip install 'adamw_jax[checkpoint]' (or orbax-checkpoint>=0.11)."
    ) from e
  return ocp


def _nnx():
  """``flax.nnx`` if it is loaded (if it is not, nothing can be an ``nnx.Optimizer``)."""
  return sys.modules.get("flax.nnx")


def _nnx_optimizer(x) -> bool:
  nnx = _nnx()
  return nnx is not None and isinstance(x, nnx.Optimizer)


def _pure(tree):
  """The arrays of `tree`: an ``nnx.Optimizer`` becomes its pure state (step and opt_state)."""
  if _nnx_optimizer(tree):
    nnx = _nnx()
    assert nnx is not None  # loaded: there is an nnx.Optimizer
    return nnx.as_pure(nnx.state(tree))
  return _tree.unbox_all(tree)


def _is_empty(x) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def _describe_leaf(x) -> str:
  if x is None:
    return "None"
  if isinstance(x, optax.MaskedNode):
    return "MaskedNode"
  dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)
  return f"{dtype.name}{list(np.shape(x))}"


def _key(path) -> str:
  return _tree.path_str(path) or "<root>"


def describe(tree) -> dict[str, Any]:
  """The JSON description a checkpoint stores: leaves by path, and the node types."""
  flat, treedef = jtu.tree_flatten_with_path(tree, is_leaf=_is_empty)
  return {
    "format": _FORMAT,
    "leaves": {_key(p): _describe_leaf(x) for p, x in flat},
    "structure": str(treedef),
  }


def _crc(x) -> int | None:
  """CRC-32 of an array's bytes in C order; None where this process does not hold all of it."""
  if not getattr(x, "is_fully_addressable", True):
    return None
  data = np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)
  # numpy's stubs give ndarray the buffer protocol (__buffer__) only for Python >= 3.12.
  return zlib.crc32(data)  # pyright: ignore[reportArgumentType]


def _crcs(tree) -> dict[str, int | None]:
  flat = jtu.tree_flatten_with_path(tree, is_leaf=_is_empty)[0]
  return {_key(p): _crc(x) for p, x in flat if not _is_empty(x)}


def _zero_size(x) -> bool:
  return not _is_empty(x) and int(np.prod(np.shape(x))) == 0


def _stand_in(x) -> np.ndarray:
  """What orbax stores for a zero-size array (it refuses them): one zero; the shape is described."""
  return np.zeros((1,), x.dtype)


def _self_crc(meta: Mapping[str, Any]) -> int:
  """CRC-32 of the description without its own CRC, as JSON with sorted keys."""
  rest = {k: v for k, v in meta.items() if k != "checksum"}
  return zlib.crc32(json.dumps(rest, sort_keys=True).encode())


def _groups(leaves: Mapping[str, str]) -> list[str]:
  """The param_groups (optax.partition) group names of a described state."""
  out = []
  for path in leaves:
    parts = path.split("/")
    for i, part in enumerate(parts[:-1]):
      if part == "inner_states" and parts[i + 1] not in out:
        out.append(parts[i + 1])
  return out


def _without_amsgrad(leaves: Mapping[str, str]) -> set[str]:
  """Paths of the Adam states whose nu_max is None (AMSGrad off)."""
  return {p for p, d in leaves.items() if p.split("/")[-1] == "nu_max" and d == "None"}


def _structure_hint(a: Mapping[str, str], b: Mapping[str, str]) -> str:
  ga, gb = _groups(a), _groups(b)
  if ga != gb:
    describe_groups = lambda g: f"param groups {g}" if g else "no param groups"
    return f" (the checkpoint has {describe_groups(ga)}, the target {describe_groups(gb)})"
  off_a, off_b = _without_amsgrad(a), _without_amsgrad(b)
  if off_b - off_a:
    return f" (AMSGrad: the checkpoint has {sorted(off_b - off_a)[0]!r}, the target has it None)"
  if off_a - off_b:
    return f" (AMSGrad: the target has {sorted(off_a - off_b)[0]!r}, the checkpoint has it None)"
  return ""


def _compare(saved: Mapping[str, Any], wanted: Mapping[str, Any], directory: str) -> None:
  what = f"restore_opt_state: the checkpoint at {directory!r} does not fit the target"
  a, b = saved["leaves"], wanted["leaves"]
  only_saved = [p for p in a if p not in b]
  only_target = [p for p in b if p not in a]
  if only_saved or only_target:
    lines = [f"  only in the checkpoint: {p!r} ({a[p]})" for p in only_saved[:4]]
    lines += [f"  only in the target: {p!r} ({b[p]})" for p in only_target[:4]]
    more = len(only_saved) + len(only_target) - len(lines)
    raise ValueError(
      f"{what}: different tree structure{_structure_hint(a, b)}:\n"
      + "\n".join(lines)
      + (f"\n  ... and {more} more" if more > 0 else "")
    )
  for path in b:
    if a[path] != b[path]:
      kind = "dtype" if a[path].split("[")[1:] == b[path].split("[")[1:] else "shape"
      raise ValueError(
        f"{what}: different {kind} at {path!r}: the checkpoint has {a[path]}, the target {b[path]}."
      )
  if saved["structure"] != wanted["structure"]:
    raise ValueError(
      f"{what}: same leaves, different pytree node types:\n"
      f"  checkpoint: {saved['structure']}\n  target:     {wanted['structure']}"
    )


def _compare_config(saved: Mapping | None, given: Mapping | None, directory: str) -> None:
  if given is None:
    return
  what = f"restore_opt_state: the checkpoint at {directory!r} was saved with another config"
  if saved is None:
    raise ValueError(f"{what}: it has none, and config={dict(given)!r} was given.")
  given = cast(Mapping, json.loads(json.dumps(given)))  # tuples -> lists, as stored
  for key in sorted(set(saved) | set(given)):
    if saved.get(key, "<missing>") != given.get(key, "<missing>"):
      raise ValueError(
        f"{what}: {key!r} is {saved.get(key, '<missing>')!r} in the checkpoint "
        f"and {given.get(key, '<missing>')!r} here."
      )


def save_opt_state(
  directory: str | os.PathLike,
  opt_state: Any,
  *,
  config: Mapping[str, Any] | None = None,
  force: bool = False,
) -> None:
  """Saves an optimizer state (or an ``nnx.Optimizer``) to `directory` with orbax.

  Args:
    directory: the checkpoint directory (created; it must not exist unless
      ``force=True``).
    opt_state: the state of any optax transform, e.g. ``tx.init(params)``
      after some steps; or an ``nnx.Optimizer`` (its step and opt_state).
    config: a JSON-serialisable description of the transform, e.g. its
      hyperparameters ``{"learning_rate": 1e-3, "weight_decay": 0.1}``; stored
      and compared on restore when a config is given there.
    force: overwrite an existing checkpoint.

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
  ocp = _ocp()
  tree = _pure(opt_state)
  meta = json.loads(
    json.dumps(
      {  # as JSON reads it back
        **describe(tree),
        "library": f"adamw_jax {__version__}",
        "checksums": _crcs(tree),
        "config": None if config is None else dict(config),
      }
    )
  )
  meta["checksum"] = _self_crc(meta)
  stored = jax.tree.map(lambda x: _stand_in(x) if _zero_size(x) else x, tree)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(
      os.path.abspath(directory),
      args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(stored), _META: ocp.args.JsonSave(meta)}
      ),
      force=force,
    )


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
  checkpoint saved on other devices, or sharded otherwise, is resharded on
  reading); leaves without a sharding (``jax.eval_shape``) take the saved one.
  Every array is checked against the CRC-32 saved with it (where this process
  holds all of it), and nothing is returned or updated unless all of them pass.

  Raises:
    ValueError: naming the directory and the first difference between the
      checkpoint and the target: a leaf on one side only (another tree
      structure, AMSGrad on one side only, other parameter groups), another
      shape or dtype, other node types, or another config; a checkpoint
      format this version cannot read (naming the version that wrote it);
      a damaged or incomplete checkpoint (truncated, corrupted or missing
      files, an array or description that fails its CRC), with the error
      underneath; a checkpoint from other devices restored into a target
      without shardings.
    FileNotFoundError: no checkpoint at `directory`, or only a partly written
      one (a save that did not finish).
  """
  ocp = _ocp()
  path = os.path.abspath(directory)
  _check_exists(path)
  tree = _pure(target)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    meta = _read_description(ckptr, ocp, path)
    _compare(meta, describe(tree), path)
    _compare_config(meta.get("config"), config, path)
    restored = _read_arrays(ckptr, ocp, path, tree)
  _verify(meta, restored, path)
  if _nnx_optimizer(target):
    nnx = _nnx()
    assert nnx is not None  # loaded: there is an nnx.Optimizer
    nnx.update(target, restored)
    return target
  return restored


def _damaged(path: str, what: str, error: BaseException | None = None) -> ValueError:
  cause = "" if error is None else f": {type(error).__name__}: {_first_line(error)}"
  return ValueError(
    f"restore_opt_state: the checkpoint at {path!r} is damaged or incomplete: "
    f"{what}{cause}. Nothing was restored."
  )


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0][:300] if text else ""


def _check_exists(path: str) -> None:
  """Raises FileNotFoundError unless `path` holds an adamw_jax checkpoint, saying what is there."""
  if os.path.isdir(os.path.join(path, _META)):
    return
  partial = sorted(glob.glob(glob.escape(path) + _TMP_SUFFIX + "*"))
  if partial:
    raise FileNotFoundError(
      f"restore_opt_state: the checkpoint at {path!r} was never finished: only the partly "
      f"written {os.path.basename(partial[-1])!r} is there (orbax renames it to the "
      "directory when a save completes); restore an earlier checkpoint."
    )
  if os.path.isdir(path):
    raise FileNotFoundError(
      f"restore_opt_state: {path!r} is not an adamw_jax checkpoint (it has no {_META!r} "
      f"description; it holds {sorted(os.listdir(path))[:8]})."
    )
  raise FileNotFoundError(f"restore_opt_state: no adamw_jax checkpoint at {path!r}.")


def _read_description(ckptr, ocp, path: str) -> Mapping[str, Any]:
  """The checkpoint's JSON description, checked: a format this version reads, and its CRC."""
  try:
    meta = ckptr.restore(path, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
  except Exception as e:
    raise _damaged(path, f"its description ({_META}/) cannot be read", e) from e
  if not isinstance(meta, Mapping) or not isinstance(meta.get("format"), int):
    raise _damaged(path, "its description is not one adamw_jax writes (no format)")
  if meta["format"] not in _READS:
    raise ValueError(
      f"restore_opt_state: the checkpoint at {path!r} is in checkpoint format "
      f"{meta['format']}, written by {meta.get('library', 'an unknown adamw_jax')}; this is "
      f"adamw_jax {__version__}, which reads formats {', '.join(map(str, _READS))}: restore "
      "it with the version that wrote it."
    )
  if meta["format"] >= 2 and meta.get("checksum") != _self_crc(meta):
    raise _damaged(
      path,
      "its description does not match the CRC saved with it (the file "
      "was changed or corrupted after saving)",
    )
  if not (isinstance(meta.get("leaves"), Mapping) and isinstance(meta.get("structure"), str)):
    raise _damaged(path, "its description lacks the leaves or the structure")
  return meta


def _abstract(x) -> jax.ShapeDtypeStruct:
  """What to restore a leaf as: its shape, dtype and sharding (None: the saved sharding)."""
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))


def _refilled(restored, target):
  """A zero-size leaf made anew from the target (no data: exact), placed as the target's."""
  if not _zero_size(target):
    return restored
  zeros = jnp.zeros(np.shape(target), target.dtype)
  sharding = getattr(target, "sharding", None)
  return zeros if sharding is None else jax.device_put(zeros, sharding)


def _read_arrays(ckptr, ocp, path: str, tree) -> Any:
  abstract = jax.tree.map(lambda x: _stand_in(x) if _zero_size(x) else _abstract(x), tree)
  try:
    restored = ckptr.restore(
      path, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)})
    )[_STATE]
    return jax.tree.map(_refilled, restored, tree)
  except Exception as e:
    unsharded = any(getattr(a, "sharding", 0) is None for a in jax.tree.leaves(abstract))
    if unsharded and "topology" in str(e).lower():
      raise ValueError(
        f"restore_opt_state: the checkpoint at {path!r} was saved on other devices, and the "
        "target has leaves without a sharding (jax.eval_shape gives none): give a target "
        "whose leaves have the shardings to restore to, e.g. tx.init(params) with params on "
        "these devices, or jax.ShapeDtypeStruct(shape, dtype, sharding=...) leaves."
      ) from e
    raise _damaged(path, f"reading the arrays ({_STATE}/) failed", e) from e


def _verify(meta: Mapping[str, Any], restored: Any, path: str) -> None:
  """Every restored array against its saved CRC-32 (format 2; None: not recorded)."""
  if meta["format"] < 2:
    return
  saved = meta.get("checksums")
  if not isinstance(saved, Mapping):
    raise _damaged(path, "its description lacks the arrays' CRCs")
  for key, crc in _crcs(restored).items():
    if saved.get(key) is not None and crc is not None and crc != saved[key]:
      raise _damaged(
        path,
        f"the array at {key!r} does not match the CRC saved with it (a data "
        "file was changed or corrupted after saving)",
      )
