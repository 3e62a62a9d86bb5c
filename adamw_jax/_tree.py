"""Pytree checks with errors that name the path where two trees part ways."""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import numpy as np
from jax import tree_util as jtu

MaskOrFn = Union[Any, Callable[[Any], Any]]


def key_str(key) -> str:
  """One path entry as text: a dict key, attribute name or sequence index."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path) -> str:
  """A key path as '/'-joined text ('' is the root)."""
  return "/".join(key_str(k) for k in path)


def _where(path) -> str:
  return f"'{path_str(path)}'" if path else "the root"


def _children(node):
  """The immediate children of a pytree node as (key, child) pairs, or None for a leaf."""
  flat, treedef = jtu.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
  if jtu.treedef_is_leaf(treedef) and node is not None:
    return None
  return [(path[0], child) for path, child in flat], treedef


def _node_keys(node) -> str:
  kids = _children(node)
  if kids is None:
    return f"a leaf of type {type(node).__name__}"
  return f"{type(node).__name__} with keys {[key_str(k) for k, _ in kids[0]]}"


def first_mismatch(prefix, tree, path=(), *, prefix_ok: bool = True):
  """The path and description where `prefix` stops being a (prefix of) `tree`.

  Returns None when `prefix` matches. With ``prefix_ok=False`` the two trees
  must have the same structure all the way down to their leaves.
  """
  p_kids = _children(prefix)
  t_kids = _children(tree)
  if p_kids is None:
    if t_kids is None or prefix_ok:
      return None
    return path, _node_keys(prefix), _node_keys(tree)
  if t_kids is None:
    return path, _node_keys(prefix), _node_keys(tree)
  (p_items, p_def), (t_items, t_def) = p_kids, t_kids
  p_keys = [key_str(k) for k, _ in p_items]
  t_keys = [key_str(k) for k, _ in t_items]
  if p_def.node_data() != t_def.node_data() or p_keys != t_keys:
    return path, _node_keys(prefix), _node_keys(tree)
  for (key, p_child), (_, t_child) in zip(p_items, t_items):
    found = first_mismatch(p_child, t_child, path + (key,), prefix_ok=prefix_ok)
    if found is not None:
      return found
  return None


def check_same_structure(a, b, a_name: str, b_name: str, *, what: str) -> None:
  """Raises ValueError naming the first path where `a` and `b` differ in structure or shape."""
  if jax.tree.structure(a) == jax.tree.structure(b):
    for (path, x), y in zip(jtu.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
      if np.shape(x) != np.shape(y):
        raise ValueError(
            f"{what}: {a_name} and {b_name} differ in shape at {_where(path)}: "
            f"{a_name} has shape {np.shape(x)}, {b_name} has shape {np.shape(y)}.")
    return
  found = first_mismatch(a, b, prefix_ok=False)
  if found is None:  # same keys but different node types deeper down
    raise ValueError(
        f"{what}: {a_name} and {b_name} have different tree structures:\n"
        f"  {a_name}: {jax.tree.structure(a)}\n  {b_name}: {jax.tree.structure(b)}")
  path, a_desc, b_desc = found
  raise ValueError(
      f"{what}: {a_name} and {b_name} differ in tree structure at {_where(path)}: "
      f"{a_name} has {a_desc}, {b_name} has {b_desc}.")


def _is_bool(x) -> bool:
  return isinstance(x, (bool, np.bool_)) or (
      hasattr(x, "dtype") and np.shape(x) == () and np.dtype(x.dtype) == np.bool_)


def resolve_mask(mask: MaskOrFn, tree, *, what: str) -> Any:
  """A mask (bool pytree, prefix of `tree`, or callable) as a full bool pytree like `tree`.

  Errors name the first mismatching path and both trees' keys there.
  """
  if callable(mask) and not _is_bool(mask):
    mask = mask(tree)
  found = first_mismatch(mask, tree)
  if found is not None:
    path, m_desc, t_desc = found
    raise ValueError(
        f"{what}: the mask does not match the parameters at {_where(path)}: "
        f"the mask has {m_desc}, the parameters have {t_desc}.")

  def expand(path, m, subtree):
    if not _is_bool(m):
      raise TypeError(
          f"{what}: mask leaves must be booleans, got {type(m).__name__} {m!r} "
          f"at {_where(path)}.")
    flag = bool(m)
    return jax.tree.map(lambda _: flag, subtree)

  return jtu.tree_map_with_path(expand, mask, tree, is_leaf=lambda x: x is None)
