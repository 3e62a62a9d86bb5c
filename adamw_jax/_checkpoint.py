"""Optimizer state saved and restored with orbax-checkpoint; a misfit checkpoint is refused.

A checkpoint is an orbax composite of the state (``StandardSave``) and a JSON
description of it: every leaf's path, shape and dtype (``None`` and
``optax.MaskedNode`` included, so AMSGrad and parameter groups show), the
pytree node types, and an optional user ``config``. Restoring compares the
description with the target first and names what differs, so a checkpoint of
another transform, tree, shape or dtype is an error, never a partial restore.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any, Optional

import jax
import numpy as np
import optax
from jax import tree_util as jtu

from adamw_jax import _tree

_FORMAT = 1
_STATE, _META = "opt_state", "adamw_jax"


def _ocp():
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:
    raise ImportError("adamw_jax.save_opt_state / restore_opt_state need orbax-checkpoint: "
                      "pip install 'adamw_jax[checkpoint]' (or orbax-checkpoint>=0.11).") from e
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
    return _nnx().as_pure(_nnx().state(tree))
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


def describe(tree) -> dict[str, Any]:
  """The JSON description a checkpoint stores: leaves by path, and the node types."""
  flat, treedef = jtu.tree_flatten_with_path(tree, is_leaf=_is_empty)
  return {
      "format": _FORMAT,
      "leaves": {_tree.path_str(p) or "<root>": _describe_leaf(x) for p, x in flat},
      "structure": str(treedef),
  }


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
    describe_groups = lambda g: f"param groups {g}" if g else "no param groups"  # noqa: E731
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
    raise ValueError(f"{what}: different tree structure{_structure_hint(a, b)}:\n"
                     + "\n".join(lines) + (f"\n  ... and {more} more" if more > 0 else ""))
  for path in b:
    if a[path] != b[path]:
      kind = "dtype" if a[path].split("[")[1:] == b[path].split("[")[1:] else "shape"
      raise ValueError(f"{what}: different {kind} at {path!r}: the checkpoint has {a[path]}, "
                       f"the target {b[path]}.")
  if saved["structure"] != wanted["structure"]:
    raise ValueError(f"{what}: same leaves, different pytree node types:\n"
                     f"  checkpoint: {saved['structure']}\n  target:     {wanted['structure']}")


def _compare_config(saved: Optional[Mapping], given: Optional[Mapping], directory: str) -> None:
  if given is None:
    return
  what = f"restore_opt_state: the checkpoint at {directory!r} was saved with another config"
  if saved is None:
    raise ValueError(f"{what}: it has none, and config={dict(given)!r} was given.")
  given = json.loads(json.dumps(given))  # tuples -> lists, as stored
  for key in sorted(set(saved) | set(given)):
    if saved.get(key, "<missing>") != given.get(key, "<missing>"):
      raise ValueError(f"{what}: {key!r} is {saved.get(key, '<missing>')!r} in the checkpoint "
                       f"and {given.get(key, '<missing>')!r} here.")


def save_opt_state(directory: str | os.PathLike, opt_state: Any, *,
                   config: Optional[Mapping[str, Any]] = None, force: bool = False) -> None:
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
  stored = None if config is None else json.loads(json.dumps(dict(config)))  # as JSON reads it back
  meta = {**describe(tree), "config": stored}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(os.path.abspath(directory), args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(tree), _META: ocp.args.JsonSave(meta)}), force=force)


def restore_opt_state(directory: str | os.PathLike, target: Any, *,
                      config: Optional[Mapping[str, Any]] = None) -> Any:
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

  Raises:
    ValueError: naming the first difference between the checkpoint and the
      target: a leaf on one side only (another tree structure, AMSGrad on one
      side only, other parameter groups), another shape or dtype, other node
      types, or another config.
    FileNotFoundError: no checkpoint at `directory`.
  """
  ocp = _ocp()
  path = os.path.abspath(directory)
  if not os.path.isdir(os.path.join(path, _META)):
    raise FileNotFoundError(f"restore_opt_state: no adamw_jax checkpoint at {path!r}.")
  tree = _pure(target)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    meta = ckptr.restore(path, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
    _compare(meta, describe(tree), path)
    _compare_config(meta.get("config"), config, path)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
    restored = ckptr.restore(path, args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardRestore(abstract)}))[_STATE]
  if _nnx_optimizer(target):
    _nnx().update(target, restored)
    return target
  return restored
